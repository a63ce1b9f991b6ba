"""Bad MultiheadAttention input raises the same ValueError, naming the shapes, in both twins."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn
import torch_attn

f32 = np.float32
E, NH, L, S, N = 12, 3, 3, 5, 2


def arr(shape, dtype=f32):
    return np.zeros(shape, dtype)


Q, K, V = arr((L, N, E)), arr((S, N, E)), arr((S, N, E))

# name: (ctor kwargs, call args, call kwargs, pattern)
BAD_CALLS = {
    "query_rank_4": ({}, (arr((1, L, N, E)), K, V), {}, r"query must be 3-D .*query.shape=\(1, 3, 2, 12\)"),
    "key_rank_differs": ({}, (Q, arr((S, E)), V), {}, r"same rank as query.*key.shape=\(5, 12\)"),
    "query_width": ({}, (arr((L, N, 7)), K, V), {}, r"query's feature size .* embed_dim=12.*\(3, 2, 7\)"),
    "key_width_vs_kdim": ({"kdim": 7}, (Q, arr((S, N, 8)), V), {}, r"key's feature size .* kdim=7"),
    "value_width_vs_vdim": ({"vdim": 10}, (Q, K, arr((S, N, 9))), {}, r"value's feature size .* vdim=10"),
    "batch_mismatch": ({}, (Q, arr((S, 3, E)), arr((S, 3, E))), {}, r"same batch size N .*\(5, 3, 12\)"),
    "batch_mismatch_batch_first": (
        {"batch_first": True},
        (arr((N, L, E)), arr((3, S, E)), arr((3, S, E))),
        {},
        r"batch_first=True.*key.shape=\(3, 5, 12\)",
    ),
    "key_value_length_mismatch": ({}, (Q, K, arr((4, N, E))), {}, r"same length S.*value.shape=\(4, 2, 12\)"),
    "dtype_mismatch": ({}, (Q, K, V.astype(np.float16)), {}, r"value.dtype=float16"),
    "integer_query": ({}, (Q.astype(np.int32), K, V), {}, r"query must be floating.*int32"),
    "empty_length": ({}, (arr((0, N, E)), K, V), {}, r"empty batch or sequence axis"),
    "attn_mask_shape": (
        {},
        (Q, K, V),
        {"attn_mask": np.ones((S, L), bool)},
        r"attn_mask.shape=\(5, 3\) must",
    ),
    "attn_mask_3d_shape": (
        {},
        (Q, K, V),
        {"attn_mask": np.ones((NH, L, S), bool)},
        r"attn_mask.shape=\(3, 3, 5\) must be .*\(6, 3, 5\)",
    ),
    "attn_mask_4d": (
        {},
        (Q, K, V),
        {"attn_mask": np.ones((N, NH, L, S), bool)},
        r"attn_mask.shape=\(2, 3, 3, 5\)",
    ),
    "attn_mask_int": ({}, (Q, K, V), {"attn_mask": np.ones((L, S), np.int32)}, r"attn_mask.dtype=int32"),
    "key_padding_mask_shape": (
        {},
        (Q, K, V),
        {"key_padding_mask": np.ones((S, N), bool)},
        r"key_padding_mask.shape=\(5, 2\) must be \(2, 5\)",
    ),
    "key_padding_mask_int": (
        {},
        (Q, K, V),
        {"key_padding_mask": np.ones((N, S), np.int32)},
        r"key_padding_mask.dtype=int32",
    ),
    "is_causal_without_mask": (
        {},
        (Q, K, V),
        {"is_causal": True},
        r"is_causal=True is only a hint and needs attn_mask",
    ),
    "dropout_mask_shape": (
        {"dropout": 0.5},
        (Q, K, V),
        {"dropout_mask": np.ones((N, NH, L, S + 1), bool)},
        r"dropout_mask.shape=\(2, 3, 3, 6\) must be .*\(2, 3, 3, 5\)",
    ),
    "dropout_mask_not_bool": (
        {"dropout": 0.5},
        (Q, K, V),
        {"dropout_mask": np.ones((N, NH, L, S), f32)},
        r"dropout_mask must be bool",
    ),
}

BAD_CTORS = {
    "seed_002_not_divisible": (
        (2, 4),
        {},
        r"embed_dim must be divisible by num_heads; got embed_dim=2, num_heads=4",
    ),
    "zero_heads": ((12, 0), {}, r"num_heads must be a positive int; got num_heads=0"),
    "negative_kdim": ((12, 3), {"kdim": -1}, r"kdim must be a positive int or None"),
    "dropout_one": ((12, 3), {"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
}


def _message(fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def _jax(x):
    return jnp.asarray(x) if isinstance(x, np.ndarray) else x


def _torch(x):
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_same_value_error_in_both_twins(case):
    ctor, args, kwargs, pattern = BAD_CALLS[case]
    jm = jax_attn.MultiheadAttention(E, NH, **ctor, rngs=nnx.Rngs(0))
    tm = torch_attn.MultiheadAttention(E, NH, **ctor)
    j = _message(jm, *map(_jax, args), **{k: _jax(v) for k, v in kwargs.items()})
    t = _message(tm, *map(_torch, args), **{k: _torch(v) for k, v in kwargs.items()})
    assert j == t
    assert re.search(pattern, j), j


@pytest.mark.parametrize("case", list(BAD_CTORS))
def test_same_constructor_error_in_both_twins(case):
    args, kwargs, pattern = BAD_CTORS[case]
    j = _message(jax_attn.MultiheadAttention, *args, **kwargs, rngs=nnx.Rngs(0))
    t = _message(torch_attn.MultiheadAttention, *args, **kwargs)
    assert j == t
    assert re.search(pattern, j), j


def test_builtin_raises_for_seed_002_too():
    """The condition is torch's own (it raises AssertionError); we raise ValueError with the sizes."""
    with pytest.raises(AssertionError, match="embed_dim must be divisible by num_heads"):
        torch.nn.MultiheadAttention(embed_dim=2, num_heads=4)


def test_load_state_dict_mismatch_names_keys_and_shapes():
    jm = jax_attn.MultiheadAttention(E, NH, rngs=nnx.Rngs(0))
    sd = torch.nn.MultiheadAttention(E, NH, kdim=7).state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['in_proj_weight'\].*'k_proj_weight'"):
        jm.load_torch_state_dict(sd)
    sd = torch.nn.MultiheadAttention(6, NH).state_dict()
    with pytest.raises(
        ValueError, match=r"in_proj_weight has shape \(18, 6\), this module expects \(36, 12\)"
    ):
        jm.load_torch_state_dict(sd)
