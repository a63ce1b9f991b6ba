"""The compressed MLA cache: decoding equals the full pass (≤ 1e-5 fp32) token by token and in uneven chunks
(chunked prefill), on a left-padded batch, dense and sparse (DSA, the indexer's keys cached too), through
the absorbed computation (one-token calls by default) and the plain one; JAX compiles once per chunk length;
the cache holds (kv_lora_rank + qk_rope_head_dim) values per token whatever the head count, measured in
bytes; overflow raises (torch, eager JAX; under jit the output is NaN, as ``Attention``'s cache); calls
never modify the given cache."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn.mla as jmla
import torch_attn.mla as tmla
from attn_spec.mla import MLAConfig, cache_values_per_token, state_dict_shapes
from attn_spec.rope import RopeConfig

B, T, E = 2, 9, 20
BASE = dict(hidden_size=E, num_heads=3, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5)
YARN = RopeConfig(
    rope_type="yarn", factor=4.0, original_max_position_embeddings=4, mscale=1.0, mscale_all_dim=0.8,
    layout="interleaved",
)  # fmt: skip
CONFIGS = {
    "qlora_yarn": dict(q_lora_rank=10, rope=YARN),
    "direct_q_half_bias": dict(attention_bias=True, rope=RopeConfig(layout="half")),
    "dsa": dict(q_lora_rank=10, index_topk=3, index_n_heads=2, index_head_dim=8),
}
SCHEDULES = {"token_by_token": (1,) * T, "chunks_3141": (3, 1, 4, 1), "chunks_153": (1, 5, 3)}


def _setup(name, seed=0):
    c = MLAConfig(**BASE, **CONFIGS[name])
    rng = np.random.default_rng(seed)
    sd = {
        k: ((1.0 if k.endswith("norm.weight") else 0.0) + 0.4 * rng.standard_normal(s)).astype(np.float32)
        for k, s in state_dict_shapes(c).items()
    }
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = 0  # row 1 left-padded
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return c, sd, x, mask, pos


def _torch(c, sd, implementation=None):
    m = tmla.MultiHeadLatentAttention(c, implementation=implementation).eval()
    m.load_torch_state_dict(sd)
    return m


def _jax(c, sd, implementation=None):
    m = jmla.MultiHeadLatentAttention(c, implementation=implementation, rngs=nnx.Rngs(0))
    m.load_torch_state_dict(sd)
    return m


def _decode(call, cache, x, mask, pos, schedule):
    ys, start = [], 0
    for size in schedule:
        sl = slice(start, start + size)
        y, cache = call(x[:, sl], mask[:, sl], pos[:, sl], cache)
        ys.append(np.asarray(y.detach() if hasattr(y, "detach") else y, np.float64))
        start += size
    return np.concatenate(ys, axis=1), cache


def _close(got, want, rows):
    return np.abs(got - want)[rows].max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("implementation", [None, "plain"])
def test_torch_decode_equals_full_pass(name, implementation):
    c, sd, x, mask, pos = _setup(name)
    t = torch.from_numpy
    full = _torch(c, sd, "plain")(t(x), t(mask), t(pos)).detach().double().numpy()
    m = _torch(c, sd, implementation)
    with torch.no_grad():
        call = lambda x, mk, p, cache: m(t(x), t(mk), t(p), cache=cache)
        for schedule in SCHEDULES.values():
            got, cache = _decode(call, m.init_cache(B, T + 2), x, mask, pos, schedule)
            assert _close(got, full, np.ones((B, T), bool)), schedule
            assert cache.index == T
            assert cache.ckv.shape == (B, T + 2, c.L) and cache.k_rot.shape == (B, T + 2, c.R)


def test_jax_decode_equals_full_pass_and_compiles_once_per_chunk_length():
    c, sd, x, mask, pos = _setup("dsa")  # the indexer's keys cached too; one-token calls: absorbed
    m = _jax(c, sd)
    a = jnp.asarray
    graphdef, state = nnx.split(m)
    full = jax.jit(lambda s, x, mk, p: nnx.merge(graphdef, s)(x, mk, p))(state, a(x), a(mask), a(pos))
    full = np.asarray(full, np.float64)
    traces = []

    @jax.jit
    def step(state, x, mask, pos, cache):
        traces.append(x.shape)
        return nnx.merge(graphdef, state)(x, mask, pos, cache=cache)

    call = lambda x, mk, p, cache: step(state, a(x), a(mk), a(p), cache)
    got, cache = _decode(call, m.init_cache(B, T + 2), x, mask, pos, SCHEDULES["chunks_3141"])
    assert _close(got, full, np.ones((B, T), bool))
    assert int(cache.index) == T
    assert sorted(s[1] for s in traces) == [1, 3, 4]  # one compile per chunk length, whatever the index


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_bytes_per_token_is_the_latent_and_the_rotary_key(dtype):
    """(L + R) × dtype size per token and batch row, measured on the arrays, independent of the heads; a
    GQA ``Attention`` cache of the same heads holds 2 · K · H values per token."""
    size = {"float32": 4, "bfloat16": 2}[dtype]
    for N in (3, 16):
        c = MLAConfig(**{**BASE, "num_heads": N}, q_lora_rank=10)
        tm = tmla.MultiHeadLatentAttention(c, dtype=getattr(torch, dtype))
        jm = nnx.eval_shape(
            lambda c=c: jmla.MultiHeadLatentAttention(c, rngs=nnx.Rngs(0), param_dtype=getattr(jnp, dtype))
        )
        for mod, fn in ((tm, tmla.cache_bytes_per_token), (jm, jmla.cache_bytes_per_token)):
            cache = mod.init_cache(2, 64)
            assert fn(cache) == (c.L + c.R) * size == cache_values_per_token(c) * size
            assert cache.index_k is None
    c = MLAConfig(**BASE, q_lora_rank=10, index_topk=4, index_n_heads=2, index_head_dim=8)
    cache = tmla.MultiHeadLatentAttention(c).init_cache(1, 16)  # DSA: the indexer's key is cached too
    assert tmla.cache_bytes_per_token(cache) == (c.L + c.R + 8) * 4


def test_calls_do_not_modify_the_given_cache_and_branches_agree():
    c, sd, x, mask, pos = _setup("qlora_yarn")
    m = _torch(c, sd)
    t = torch.from_numpy
    with torch.no_grad():
        _, cache = m(t(x[:, :4]), t(mask[:, :4]), t(pos[:, :4]), cache=m.init_cache(B, T))
        before = cache.ckv.clone()
        y1, _ = m(t(x[:, 4:5]), t(mask[:, 4:5]), t(pos[:, 4:5]), cache=cache)
        y2, _ = m(t(x[:, 4:5]), t(mask[:, 4:5]), t(pos[:, 4:5]), cache=cache)
    assert torch.equal(cache.ckv, before) and torch.equal(y1, y2)


def test_overflow_raises():
    c, sd, x, mask, pos = _setup("qlora_yarn")
    msg = re.escape("KV cache overflow: 3 cached + 2 new tokens > max_length=4")
    tm, jm = _torch(c, sd), _jax(c, sd)
    t = torch.from_numpy
    _, tc = tm(t(x[:, :3]), cache=tm.init_cache(B, 4))
    with pytest.raises(ValueError, match=msg):
        tm(t(x[:, 3:5]), cache=tc)
    jc = jm.init_cache(B, 4).replace(index=jnp.asarray(3, jnp.int32))  # checked before any computation
    with pytest.raises(ValueError, match=msg):
        jm(jnp.asarray(x[:, 3:5]), cache=jc)
