"""KV-cache decoding with the ``Attention`` twins equals the full pass (≤ 1e-5 fp32): token by token and
in uneven chunks, with left padding, with a sliding window shorter than the sequence (a ring buffer of
``window`` slots that wraps around); JAX compiles once per chunk length; overflow raises (torch, JAX eager)
or gives NaN (JAX under jit), as ``CausalSelfAttention``'s cache does.

Sequence-length-dependent rope types (``dynamic``, ``longrope``) are left out on purpose: their full pass
uses one table for every token while decoding switches tables as the length grows, in transformers too."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn.attention as jatt
import torch_attn.attention as tatt
from attn_spec.attention import AttentionConfig, state_dict_shapes
from attn_spec.rope import RopeConfig

B, T, E, N, K, H = 2, 9, 20, 4, 2, 6
ROPE = RopeConfig(rope_theta=1e4)
CONFIGS = {
    "gqa_rope": dict(rope=ROPE),
    "window3_sinks_softcap": dict(
        rope=ROPE, sliding_window=3, sinks=True, softcap=2.0, q_bias=True, k_bias=True, v_bias=True
    ),
    "mqa_window5_qknorm_yarn": dict(
        num_kv_heads=1,
        sliding_window=5,
        qk_norm="full",
        rope=RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=4, rope_theta=1e4),
    ),
}
SCHEDULES = {"token_by_token": (1,) * T, "uneven_3141": (3, 1, 4, 1), "uneven_153": (1, 5, 3)}


def _setup(name, seed=0):
    c = AttentionConfig(**{**dict(hidden_size=E, num_heads=N, num_kv_heads=K, head_dim=H), **CONFIGS[name]})
    rng = np.random.default_rng(seed)
    sd = {k: (0.4 * rng.standard_normal(s)).astype(np.float32) for k, s in state_dict_shapes(c).items()}
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = 0  # row 1 left-padded
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return c, sd, x, mask, pos


def _jax(c, sd, implementation="math"):
    m = jatt.Attention(c, implementation=implementation, rngs=nnx.Rngs(0))
    m.load_torch_state_dict(sd)
    m.deterministic = True
    return m


def _torch(c, sd, implementation="math"):
    m = tatt.Attention(c, implementation=implementation).eval()
    m.load_torch_state_dict(sd)
    return m


def _jit_step(module):
    graphdef, state = nnx.split(module)
    traces = []

    @jax.jit
    def step(state, x, mask, pos, cache):
        traces.append(x.shape)
        return nnx.merge(graphdef, state)(x, mask, pos, cache=cache)

    return (lambda x, mask, pos, cache: step(state, x, mask, pos, cache)), traces


def _decode(call, cache, x, mask, pos, schedule):
    ys, start = [], 0
    for size in schedule:
        sl = slice(start, start + size)
        y, cache = call(x[:, sl], mask[:, sl], pos[:, sl], cache)
        ys.append(np.asarray(y.detach() if hasattr(y, "detach") else y, np.float64))
        start += size
    return np.concatenate(ys, axis=1), cache


def _close(got, want):
    real = np.ones(got.shape[:2], bool)
    return np.abs(got - want)[real].max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_torch_decode_equals_full_pass(name, schedule):
    c, sd, x, mask, pos = _setup(name)
    m = _torch(c, sd)
    t = torch.from_numpy
    with torch.no_grad():
        full = m(t(x), t(mask), t(pos)).double().numpy()
        call = lambda x, mk, p, cache: m(t(x), t(mk), t(p), cache=cache)
        got, cache = _decode(call, m.init_cache(B, T + 2), x, mask, pos, SCHEDULES[schedule])
    assert _close(got, full)
    assert cache.index == T
    if c.sliding_window is not None:  # ring: memory bounded by the window, not the sequence
        assert cache.k.shape == (B, c.K, c.sliding_window, H)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jax_decode_equals_full_pass_and_compiles_once_per_chunk_length(name):
    c, sd, x, mask, pos = _setup(name)
    m = _jax(c, sd)
    full = np.asarray(m(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(pos)), np.float64)
    call, traces = _jit_step(m)
    a = jnp.asarray
    jcall = lambda x, mk, p, cache: call(a(x), a(mk), a(p), cache)
    for schedule in SCHEDULES.values():
        got, cache = _decode(jcall, m.init_cache(B, T + 2), x, mask, pos, schedule)
        assert _close(got, full), schedule
        assert int(cache.index) == T
    # chunk lengths 1, 3, 4, 5: one compilation each, whatever the cache index
    assert sorted({s[1] for s in traces}) == [1, 3, 4, 5] and len(traces) == 4


@pytest.mark.parametrize("twin", ["jax", "torch"])
def test_blocked_decode_equals_math_full_pass(twin):
    """The blocked path through the ring cache (its BlockMask built from the slots' positions)."""
    c, sd, x, mask, pos = _setup("window3_sinks_softcap")
    full = np.asarray(_jax(c, sd)(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(pos)), np.float64)
    if twin == "jax":
        call, traces = _jit_step(_jax(c, sd, "blocked"))
        a = jnp.asarray
        got, _ = _decode(
            lambda x, mk, p, cache: call(a(x), a(mk), a(p), cache),
            _jax(c, sd).init_cache(B, T),
            x,
            mask,
            pos,
            (3, 1, 4, 1),
        )
        assert len(traces) == 3
    else:
        m = _torch(c, sd, "blocked")
        t = torch.from_numpy
        with torch.no_grad():
            got, _ = _decode(
                lambda x, mk, p, cache: m(t(x), t(mk), t(p), cache=cache),
                m.init_cache(B, T),
                x,
                mask,
                pos,
                (3, 1, 4, 1),
            )
    assert _close(got, full)


def test_ring_buffer_memory_is_bounded_by_the_window():
    c = AttentionConfig(hidden_size=E, num_heads=N, num_kv_heads=K, head_dim=H, sliding_window=4)
    j = jatt.Attention(c, rngs=nnx.Rngs(0))
    t = tatt.Attention(c)
    for L in (8, 4096):
        cj, ct = j.init_cache(1, L), t.init_cache(1, L)
        assert cj.k.shape == ct.k.shape == (1, K, 4, H)
        assert cj.k.nbytes + cj.v.nbytes == 2 * 4 * K * H * 4
    assert j.init_cache(1, 3).k.shape[2] == 3  # never more slots than max_length


@pytest.mark.parametrize("twin", ["jax", "torch"])
def test_overflow_raises(twin):
    c, sd, x, mask, pos = _setup("window3_sinks_softcap")
    m = _jax(c, sd) if twin == "jax" else _torch(c, sd)
    arr = jnp.asarray if twin == "jax" else torch.from_numpy
    cache = m.init_cache(B, 4)
    _, cache = m(arr(x[:, :3]), cache=cache)
    message = "Attention: KV cache overflow: 3 cached + 2 new tokens > max_length=4; allocate a longer cache"
    with pytest.raises(ValueError, match=re.escape(message)):
        m(arr(x[:, 3:5]), cache=cache)


def test_jax_overflow_under_jit_gives_nan_from_then_on():
    c, sd, x, mask, pos = _setup("gqa_rope")
    m = _jax(c, sd)
    call, _ = _jit_step(m)
    a = jnp.asarray
    cache = m.init_cache(B, 2)
    ys = []
    for t in range(4):
        y, cache = call(a(x[:, t : t + 1]), a(mask[:, t : t + 1]), a(pos[:, t : t + 1]), cache)
        ys.append(np.asarray(y))
    assert np.isfinite(ys[0]).all() and np.isfinite(ys[1]).all()
    assert np.isnan(ys[2]).all() and np.isnan(ys[3]).all()


@pytest.mark.parametrize("twin", ["jax", "torch"])
def test_cache_of_the_wrong_batch_raises(twin):
    c, sd, x, mask, pos = _setup("gqa_rope")
    m = _jax(c, sd) if twin == "jax" else _torch(c, sd)
    arr = jnp.asarray if twin == "jax" else torch.from_numpy
    message = "Attention: cache.k and cache.v must both be (B, K, C, H) = (2, 2, 6, 6); got "
    message += "cache.k.shape=(3, 2, 6, 6)"
    with pytest.raises(ValueError, match=re.escape(message)):
        m(arr(x[:, :1]), cache=m.init_cache(3, 6))
