"""Bad input raises the same ValueError, with the same message naming the shapes, in both twins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_attn
import torch_attn

f32 = np.float32


def arr(shape, dtype=f32):
    return np.zeros(shape, dtype)


Q, K, V = arr((2, 3, 5, 8)), arr((2, 3, 7, 8)), arr((2, 3, 7, 6))

BAD = {
    "query_rank_1": ((arr((8,)), K, V), {}, r"query must have at least 2 dimensions.*query.shape=\(8,\)"),
    "head_width_mismatch": ((Q, arr((2, 3, 7, 9)), V), {}, r"same head width.*key.shape=\(2, 3, 7, 9\)"),
    "kv_length_mismatch": ((Q, K, arr((2, 3, 6, 6))), {}, r"same length S.*value.shape=\(2, 3, 6, 6\)"),
    "batch_not_broadcastable": (
        (arr((2, 3, 5, 8)), arr((4, 3, 7, 8)), arr((4, 3, 7, 6))),
        {},
        r"do not broadcast.*key.shape=\(4, 3, 7, 8\)",
    ),
    "gqa_heads_not_dividing": (
        (arr((2, 4, 5, 8)), arr((2, 3, 7, 8)), arr((2, 3, 7, 6))),
        {"enable_gqa": True},
        r"query heads \(4\) must be a multiple of key/value heads \(3\)",
    ),
    "gqa_rank_2": ((arr((5, 8)), arr((7, 8)), arr((7, 6))), {"enable_gqa": True}, r"at least 3 dimensions"),
    "heads_differ_without_gqa": (
        (arr((2, 4, 5, 8)), arr((2, 2, 7, 8)), arr((2, 2, 7, 6))),
        {},
        r"do not broadcast",
    ),
    "mask_int_dtype": ((Q, K, V), {"attn_mask": np.zeros((5, 7), np.int32)}, r"attn_mask.dtype=int32"),
    "mask_wrong_shape": (
        (Q, K, V),
        {"attn_mask": np.ones((7, 5), bool)},
        r"attn_mask.shape=\(7, 5\) does not broadcast to .*\(2, 3, 5, 7\)",
    ),
    "mask_too_many_dims": ((Q, K, V), {"attn_mask": np.ones((1, 2, 3, 5, 7), bool)}, r"does not broadcast"),
    "causal_with_mask": (
        (Q, K, V),
        {"attn_mask": np.ones((5, 7), bool), "is_causal": True},
        r"is_causal=True with an explicit attn_mask",
    ),
    "dropout_p_out_of_range": ((Q, K, V), {"dropout_p": 1.0}, r"dropout_p must be a number in \[0, 1\)"),
    "dropout_mask_not_bool": (
        (Q, K, V),
        {"dropout_p": 0.5, "dropout_mask": np.ones((2, 3, 5, 7), f32)},
        r"dropout_mask must be bool",
    ),
    "dropout_mask_wrong_shape": (
        (Q, K, V),
        {"dropout_p": 0.5, "dropout_mask": np.ones((2, 3, 7, 5), bool)},
        r"dropout_mask.shape=\(2, 3, 7, 5\)",
    ),
    "dropout_mask_without_p": (
        (Q, K, V),
        {"dropout_mask": np.ones((2, 3, 5, 7), bool)},
        r"dropout_mask was given with dropout_p=0.0",
    ),
    "dtype_mismatch": ((Q, K, V.astype(np.float16)), {}, r"value.dtype=float16"),
    "integer_query": (
        (Q.astype(np.int32), K.astype(np.int32), V.astype(np.int32)),
        {},
        r"query must be floating.*int32",
    ),
    "scale_not_finite": ((Q, K, V), {"scale": float("inf")}, r"scale must be a finite number"),
    "empty_length": ((arr((2, 3, 0, 8)), K, V), {}, r"empty length or width"),
}


def _to_jax(x):
    return jnp.asarray(x) if isinstance(x, np.ndarray) else x


def _to_torch(x):
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _message(fn, convert, args, kwargs, **extra):
    with pytest.raises(ValueError) as info:
        fn(*(convert(a) for a in args), **{k: convert(v) for k, v in kwargs.items()}, **extra)
    return str(info.value)


@pytest.mark.parametrize("case", list(BAD))
def test_same_value_error_in_both_twins(case):
    args, kwargs, pattern = BAD[case]
    j = _message(jax_attn.scaled_dot_product_attention, _to_jax, args, kwargs, dropout_rng=jax.random.key(0))
    t = _message(torch_attn.scaled_dot_product_attention, _to_torch, args, kwargs)
    assert j == t
    import re

    assert re.search(pattern, j), j


def test_jax_dropout_needs_rng_or_mask():
    with pytest.raises(ValueError, match=r"dropout_p=0.5 needs dropout_rng="):
        jax_attn.scaled_dot_product_attention(jnp.asarray(Q), jnp.asarray(K), jnp.asarray(V), dropout_p=0.5)


def test_checks_run_under_jit():
    """Shapes are static under jit, so the same error is raised at trace time."""
    f = jax.jit(lambda q, k, v: jax_attn.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="same head width"):
        f(jnp.asarray(Q), jnp.zeros((2, 3, 7, 9)), jnp.asarray(V))
