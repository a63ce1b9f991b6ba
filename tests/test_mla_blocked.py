"""MultiHeadLatentAttention's blocked computation (the decompressed keys and values on FlexAttention) and the
automatic choice through the one dispatch rule (``attn_spec.mla.choose``), in both twins.

- blocked == plain: output and gradients w.r.t. x and every parameter, on a left-padded batch, without a
  cache and with a cache prefilled by several tokens, for a dense and a sparse (DSA top-k) layer; fully
  masked rows (left-pad queries) give zeros, as in the plain computation.
- The automatic choice: plain for a small call, blocked above ``attn_spec.dispatch.MATH_MAX_LOGITS``
  logits, absorbed for one-token decoding with a cache; ``last_choice`` and ``repr`` show it.
- Memory (JAX, compile only): XLA's temporaries of the jitted forward+backward at T 4096 and 8192 (16
  heads, tiny widths) grow about linearly, far below the plain computation's ``(B, N, T, T)`` logits.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn.mla as jmla
import torch_attn.mla as tmla
from attn_spec import mla as spec
from attn_spec.dispatch import MATH_MAX_LOGITS
from attn_spec.mla import MLAConfig

BASE = dict(hidden_size=20, num_heads=3, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5)
DSA = dict(q_lora_rank=10, index_topk=3, index_n_heads=2, index_head_dim=8)
B, T, PAD, PREFILL = 2, 9, 3, 5  # row 1 starts with 3 pads; the cached run prefills 5 tokens, then 4
RTOL, ATOL = 1e-4, 2e-5


def _config(kind: str) -> MLAConfig:
    if kind == "sparse":
        return MLAConfig(**BASE, **DSA)
    return MLAConfig(**BASE, q_lora_rank=10, attention_bias=True)


def _inputs(c: MLAConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape in spec.state_dict_shapes(c).items():
        if name.endswith("norm.weight"):
            sd[name] = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            sd[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    x = rng.standard_normal((B, T, c.E)).astype(np.float32)
    dy = rng.standard_normal((B, T, c.E)).astype(np.float32)
    mask = np.ones((B, T), np.int64)
    mask[1, :PAD] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    return sd, x, dy, mask, pos


def _torch_run(c, sd, x, dy, mask, pos, implementation, cached):
    m = tmla.MultiHeadLatentAttention(c, implementation=implementation)
    m.load_torch_state_dict(sd)
    xt = torch.tensor(x, requires_grad=True)
    mt, pt = torch.tensor(mask), torch.tensor(pos)
    if cached:
        cache = m.init_cache(B, T + 2)
        y1, cache = m(xt[:, :PREFILL], mt[:, :PREFILL], pt[:, :PREFILL], cache=cache)
        y2, _ = m(xt[:, PREFILL:], mt[:, PREFILL:], pt[:, PREFILL:], cache=cache)
        y = torch.cat([y1, y2], dim=1)
    else:
        y = m(xt, mt, pt)
    y.backward(torch.tensor(dy))
    grads = {"x": xt.grad.numpy()}
    for name, p in m.named_parameters():
        if p.grad is not None:
            grads[name] = p.grad.numpy()
    return y.detach().numpy(), grads, m


def _jax_run(c, sd, x, dy, mask, pos, implementation, cached):
    m = jmla.MultiHeadLatentAttention(c, implementation=implementation, rngs=nnx.Rngs(0))
    m.load_torch_state_dict(sd)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    mj, pj = jnp.asarray(mask), jnp.asarray(pos)

    def forward(params, x):
        model = nnx.merge(graphdef, params, rest)
        if not cached:
            return model(x, mj, pj)
        cache = model.init_cache(B, T + 2)
        y1, cache = model(x[:, :PREFILL], mj[:, :PREFILL], pj[:, :PREFILL], cache=cache)
        y2, _ = model(x[:, PREFILL:], mj[:, PREFILL:], pj[:, PREFILL:], cache=cache)
        return jnp.concatenate([y1, y2], axis=1)

    y, vjp = jax.vjp(forward, params, jnp.asarray(x))
    dparams, dx = vjp(jnp.asarray(dy))
    grads = {"x": np.asarray(dx)}
    for path, value in nnx.to_flat_state(dparams):
        grads[".".join(str(p) for p in path)] = np.asarray(value[...])
    return np.asarray(y), grads, m


RUNNERS = {"torch": _torch_run, "jax": _jax_run}


@pytest.mark.parametrize("cached", [False, True], ids=["full", "cache"])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_blocked_equals_plain_forward_and_gradients(twin, kind, cached):
    c = _config(kind)
    sd, x, dy, mask, pos = _inputs(c, seed=3 if kind == "dense" else 4)
    y_plain, g_plain, _ = RUNNERS[twin](c, sd, x, dy, mask, pos, "plain", cached)
    y_blocked, g_blocked, _ = RUNNERS[twin](c, sd, x, dy, mask, pos, "blocked", cached)
    np.testing.assert_allclose(y_blocked, y_plain, rtol=RTOL, atol=ATOL)
    assert set(g_blocked) == set(g_plain) and {"x", "kv_b_proj.weight", "q_b_proj.weight"} <= set(g_plain)
    for name in g_plain:
        np.testing.assert_allclose(g_blocked[name], g_plain[name], rtol=RTOL, atol=ATOL, err_msg=name)
    assert np.abs(g_plain["kv_b_proj.weight"]).max() > 1e-2  # the comparison is not vacuous


@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_blocked_fully_masked_rows_give_zeros(twin):
    """Left-pad queries see no valid key: the attention output is 0 (y = o_proj's bias, here 0)."""
    c = MLAConfig(**BASE)
    sd, x, dy, mask, pos = _inputs(c, seed=5)
    y, grads, _ = RUNNERS[twin](c, sd, x, dy, mask, pos, "blocked", False)
    assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(g)) for g in grads.values())
    np.testing.assert_array_equal(y[1, :PAD], 0.0)
    assert np.abs(y[1, PAD:]).min() > 0


def test_blocked_twins_agree():
    c = _config("sparse")
    sd, x, dy, mask, pos = _inputs(c, seed=6)
    yt, gt, _ = _torch_run(c, sd, x, dy, mask, pos, "blocked", True)
    yj, gj, _ = _jax_run(c, sd, x, dy, mask, pos, "blocked", True)
    np.testing.assert_allclose(yj, yt, rtol=RTOL, atol=ATOL)
    for name in gt:
        np.testing.assert_allclose(gj[name], gt[name], rtol=RTOL, atol=ATOL, err_msg=name)


# --- the automatic choice ----------------------------------------------------------------------------------


def test_choose_follows_the_one_dispatch_rule():
    c = MLAConfig(**BASE)
    small = spec.choose(c, B=2, T=9, S=9, cached=False)
    assert small.implementation == "plain" and "small" in small.reason and "486 logits" in small.reason
    # exactly at the threshold: blocked (dispatch.select: math below MATH_MAX_LOGITS)
    T_big = int(np.sqrt(MATH_MAX_LOGITS // (1 * c.N))) + 1
    large = spec.choose(c, B=1, T=T_big, S=T_big, cached=False)
    assert large.implementation == "blocked" and "large" in large.reason
    assert f"{c.N * T_big * T_big} logits" in large.reason
    # a chunked prefill with a cache is no decode: the rule decides on B·N·T·S, S = cache slots + T
    assert spec.choose(c, B=1, T=4, S=4 + 8, cached=True).implementation == "plain"
    assert spec.choose(c, B=1, T=T_big, S=T_big + 64, cached=True).implementation == "blocked"
    decode = spec.choose(c, B=64, T=1, S=8193, cached=True)
    assert decode.implementation == "absorbed" and "decoding one token" in decode.reason
    assert "8192 slots" in decode.reason and "L + R = 14" in decode.reason
    # B1 N128 T8192 (the out-of-memory case): blocked
    deep = MLAConfig(**{**BASE, "num_heads": 128})
    assert spec.choose(deep, B=1, T=8192, S=8192, cached=False).implementation == "blocked"


def test_check_implementation_lists_the_computations_in_both_twins():
    c = MLAConfig(**BASE)
    msg = (
        "implementation must be None (auto) or one of ('plain', 'absorbed', 'blocked'); "
        "got implementation='math'"
    )
    texts = []
    for make in (
        lambda: tmla.MultiHeadLatentAttention(c, implementation="math"),
        lambda: jmla.MultiHeadLatentAttention(c, implementation="math", rngs=nnx.Rngs(0)),
    ):
        with pytest.raises(ValueError, match=re.escape(msg)) as e:
            make()
        texts.append(str(e.value))
    assert texts[0] == texts[1]
    # "auto" is None, as for Attention
    assert tmla.MultiHeadLatentAttention(c, implementation="auto").implementation is None
    assert jmla.MultiHeadLatentAttention(c, implementation="auto", rngs=nnx.Rngs(0)).implementation is None


SMALL = dict(hidden_size=8, num_heads=2, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=3)
T_LARGE = 256  # B1 · N2 · 256 · 256 = 2^17 = MATH_MAX_LOGITS logits: blocked


def test_torch_last_choice_and_repr():
    c = MLAConfig(**SMALL)
    m = tmla.MultiHeadLatentAttention(c)
    assert m.last_choice is None and "implementation=None (auto; not called yet)" in repr(m)
    x = torch.randn(1, 8, c.E)
    m(x)
    assert m.last_choice.implementation == "plain" and "small" in m.last_choice.reason
    assert "implementation=None (auto; last call: plain (small: 128 logits" in repr(m)
    xl = torch.randn(1, T_LARGE, c.E)
    y_auto = m(xl)
    assert m.last_choice.implementation == "blocked"
    assert "implementation=None (auto; last call: blocked (large: 131072 logits" in repr(m)
    plain = tmla.MultiHeadLatentAttention(c, implementation="plain")
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(y_auto, plain(xl), rtol=RTOL, atol=ATOL)
    assert plain.last_choice is None and "implementation='plain'" in repr(plain)
    cache = m.init_cache(1, 12)
    _, cache = m(x, cache=cache)
    assert m.last_choice.implementation == "plain"
    m(x[:, :1], cache=cache)
    assert m.last_choice.implementation == "absorbed"
    assert (
        "implementation=None (auto; last call: absorbed (decoding one token with a cache of 12 slots"
        in repr(m)
    )


def test_jax_last_choice_and_repr():
    c = MLAConfig(**SMALL)
    m = jmla.MultiHeadLatentAttention(c, rngs=nnx.Rngs(0))
    assert m.last_choice is None and "not called yet" in repr(m)
    x = jax.random.normal(jax.random.key(0), (1, 8, c.E))
    m(x)
    assert m.last_choice.implementation == "plain" and "small" in m.last_choice.reason
    assert "last call: plain (small: 128 logits" in repr(m)
    xl = jax.random.normal(jax.random.key(1), (1, T_LARGE, c.E))
    y_auto = m(xl)
    assert m.last_choice.implementation == "blocked"
    assert "last call: blocked (large: 131072 logits" in repr(m)
    plain = jmla.MultiHeadLatentAttention(c, implementation="plain", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(y_auto), np.asarray(plain(xl)), rtol=RTOL, atol=ATOL)
    assert plain.last_choice is None
    cache = m.init_cache(1, 12)
    _, cache = m(x, cache=cache)
    assert m.last_choice.implementation == "plain"
    m(x[:, :1], cache=cache)
    assert m.last_choice.implementation == "absorbed"
    assert "last call: absorbed (decoding one token with a cache of 12 slots" in repr(m)


# --- memory (JAX, compile only) ----------------------------------------------------------------------------

MEM = dict(hidden_size=16, num_heads=16, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)


def _temp_bytes(T: int, implementation) -> int:
    c = MLAConfig(**MEM)
    m = nnx.eval_shape(
        lambda: jmla.MultiHeadLatentAttention(c, implementation=implementation, rngs=nnx.Rngs(0))
    )
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def forward_backward(params, x, dy):
        _, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, x)
        return vjp(dy)

    x = jax.ShapeDtypeStruct((1, T, c.E), jnp.float32)
    compiled = jax.jit(forward_backward).lower(params, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes, m


def test_default_forward_backward_memory_grows_linearly_not_quadratically():
    """B1 N16 at T 4096 and 8192 (the issue's B1 N128 T8192 shape, fewer heads): the default takes the
    blocked path and XLA's temporaries stay far below one (B, N, T, T) fp32 logits array and grow about
    linearly; the plain path at T 4096 holds several such arrays."""
    t1, m1 = _temp_bytes(4096, None)
    t2, m2 = _temp_bytes(8192, None)
    assert m1.last_choice.implementation == m2.last_choice.implementation == "blocked"
    logits_bytes = lambda T: 16 * T * T * 4  # noqa: E731
    assert t1 < logits_bytes(4096) / 16 and t2 < logits_bytes(8192) / 64, (t1, t2)
    assert t2 <= 2.5 * t1, (t1, t2)
    plain, _ = _temp_bytes(4096, "plain")
    assert plain >= logits_bytes(4096), plain
