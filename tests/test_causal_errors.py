"""Bad arguments raise ValueError naming the shapes/values, with the same text in both twins."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn
import torch_attn

E, N = 24, 4


def _jax(*args, **kw):
    return jax_attn.CausalSelfAttention(*args, **kw, rngs=nnx.Rngs(0))


CONSTRUCTOR = {
    "E_not_divisible": (
        (25, 4),
        {},
        "embed_dim must be divisible by num_heads; got embed_dim=25, num_heads=4",
    ),
    "kv_not_dividing": (
        (24, 4, 3),
        {},
        "num_kv_heads must divide num_heads (grouped-query attention); got num_heads=4, num_kv_heads=3",
    ),
    "kv_zero": ((24, 4, 0), {}, "num_kv_heads must be a positive int or None; got num_kv_heads=0"),
    "heads_zero": ((24, 0), {}, "num_heads must be a positive int; got num_heads=0"),
    "dropout_one": ((24, 4, None, True, 1.0), {}, "dropout must be a number in [0, 1); got dropout=1.0"),
    "unknown_impl": (
        (24, 4),
        {"implementation": "flash"},
        "implementation must be None ('auto', see attn_spec.dispatch) or one of "
        "('math', 'fused', 'blocked'); got implementation='flash'",
    ),
    "fused_dropout": (
        (24, 4, None, True, 0.1),
        {"implementation": "fused"},
        "implementation='fused' does not support attention dropout (got dropout=0.1)",
    ),
}


@pytest.mark.parametrize("name", list(CONSTRUCTOR))
def test_constructor_errors_identical(name):
    args, kw, msg = CONSTRUCTOR[name]
    with pytest.raises(ValueError, match=re.escape(msg)) as je:
        _jax(*args, **kw)
    with pytest.raises(ValueError, match=re.escape(msg)) as te:
        torch_attn.CausalSelfAttention(*args, **kw)
    assert str(je.value) == str(te.value) and str(te.value).startswith("CausalSelfAttention: ")


CALLS = {
    "x_2d": ((5, 24), None, "x must be (B, T, E) with batch first; got x.shape=(5, 24)"),
    "x_4d": ((2, 1, 5, 24), None, "x must be (B, T, E) with batch first; got x.shape=(2, 1, 5, 24)"),
    "E_mismatch": ((2, 5, 23), None, "x's last axis must be embed_dim=24; got x.shape=(2, 5, 23)"),
    "cache_batch": (
        (2, 5, 24),
        (3, 8),
        "cache batch size 3 does not match x's batch size 2; got cache.k.shape=(3, 2, 8, 6)",
    ),
    "overflow": ((2, 9, 24), (2, 8), "KV cache overflow: 0 cached + 9 new tokens > max_length=8"),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_call_errors_identical(name):
    x_shape, cache_args, msg = CALLS[name]
    x = np.zeros(x_shape, np.float32)
    j, t = _jax(E, N, 2), torch_attn.CausalSelfAttention(E, N, 2)
    with pytest.raises(ValueError, match=re.escape(msg)) as je:
        j(jnp.asarray(x), **({} if cache_args is None else {"cache": j.init_cache(*cache_args)}))
    with pytest.raises(ValueError, match=re.escape(msg)) as te:
        t(torch.from_numpy(x), **({} if cache_args is None else {"cache": t.init_cache(*cache_args)}))
    assert str(je.value) == str(te.value)


def test_cache_from_another_module_and_bad_init_cache():
    j, t = _jax(E, N, 2), torch_attn.CausalSelfAttention(E, N, 2)
    j_other, t_other = _jax(E, N, 1), torch_attn.CausalSelfAttention(E, N, 1)
    msg = "cache.k and cache.v must both be (B, K, L, H) = (2, 2, L, 6); got cache.k.shape=(2, 1, 8, 6)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        j(jnp.zeros((2, 1, E)), cache=j_other.init_cache(2, 8))
    with pytest.raises(ValueError, match=re.escape(msg)):
        t(torch.zeros(2, 1, E), cache=t_other.init_cache(2, 8))
    for m in (j, t):
        with pytest.raises(
            ValueError, match=re.escape("init_cache: max_length must be a positive int; got max_length=0")
        ):
            m.init_cache(2, 0)


def test_dropout_mask_without_dropout_raises_the_same_error():
    j, t = _jax(E, N, 2, True, 0.1), torch_attn.CausalSelfAttention(E, N, 2, True, 0.1)
    j.eval()
    t.eval()
    msg = "dropout_mask was given, but attention dropout is off (dropout=0.1, training=False)"
    with pytest.raises(ValueError, match=re.escape(msg)) as je:
        j(jnp.zeros((2, 3, E)), dropout_mask=jnp.ones((2, N, 3, 3), bool))
    with pytest.raises(ValueError, match=re.escape(msg)) as te:
        t(torch.zeros(2, 3, E), dropout_mask=torch.ones(2, N, 3, 3, dtype=torch.bool))
    assert str(je.value) == str(te.value)
