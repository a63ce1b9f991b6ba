"""The twins against torch's own ``F.scaled_dot_product_attention``: on the shared vectors and fuzzed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_attn
import torch_attn
from compare import agree
from compare.kinds import sdpa
from compare.kinds.sdpa import SDPA_CASES


@pytest.mark.parametrize("name", [n for n, c in SDPA_CASES.items() if c.dropout_p == 0])
def test_torch_twin_matches_builtin_on_vectors(all_vectors, name):
    vec = all_vectors[name]
    ours = sdpa.run_torch(vec)
    theirs = sdpa.run_torch_builtin(vec)
    bad = [a for a in agree.between(vec, ours, theirs) if not a.ok]
    assert not bad, [(a.quantity, a.max_abs, a.tol) for a in bad]


@st.composite
def sdpa_inputs(draw):
    gqa = draw(st.booleans())
    rank = draw(st.sampled_from([3, 4])) if gqa else draw(st.sampled_from([2, 3, 4]))
    T, S = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    H, V = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    K = draw(st.integers(1, 3))
    N = K * draw(st.integers(1, 3)) if gqa else K
    lead = {2: (), 3: (N,), 4: (draw(st.integers(1, 3)), N)}[rank]
    kv_lead = lead[:-1] + (K,) if gqa else lead
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((*lead, T, H)).astype(np.float32)
    k = rng.standard_normal((*kv_lead, S, H)).astype(np.float32)
    v = rng.standard_normal((*kv_lead, S, V)).astype(np.float32)
    mask_kind = draw(st.sampled_from(["none", "bool", "float", "causal"]))
    mask = None
    if mask_kind in ("bool", "float"):
        full = (*lead, T, S)
        # a mask of any broadcastable rank >= 2 / size-1 pattern (torch's built-in rejects rank-1 masks,
        # which its documentation calls broadcastable; ours accept them)
        mrank = draw(st.integers(2, len(full)))
        mshape = tuple(d if draw(st.booleans()) else 1 for d in full[-mrank:])
        keep = rng.random(mshape) < 0.75
        mask = (
            keep
            if mask_kind == "bool"
            else np.where(keep, rng.standard_normal(mshape), -np.inf).astype(np.float32)
        )
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    return q, k, v, mask, mask_kind == "causal", scale, gqa


def _torch_builtin(q, k, v, mask, causal, scale, gqa):
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    tm = None if mask is None else torch.from_numpy(mask)
    out = F.scaled_dot_product_attention(tq, tk, tv, tm, 0.0, causal, scale=scale, enable_gqa=gqa)
    out.backward(torch.ones_like(out))
    return [x.detach().numpy() for x in (out, tq.grad, tk.grad, tv.grad)]


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _jax_out_and_grads(q, k, v, mask, causal, scale, gqa):
    # One compiled program per example (forward + VJP together) costs less than eager op-by-op dispatch,
    # which compiles every primitive again for each new shape.
    def f(q, k, v):
        return jax_attn.scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale, gqa)

    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(jnp.ones_like(out)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sdpa_inputs())
def test_fuzz_jax_matches_torch_builtin_fp32(inputs):
    q, k, v, mask, causal, scale, gqa = inputs
    expected = _torch_builtin(q, k, v, mask, causal, scale, gqa)
    out, *grads = _jax_out_and_grads(q, k, v, mask, causal, scale, gqa)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5, err_msg=name)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sdpa_inputs())
def test_fuzz_torch_twin_matches_torch_builtin_fp32(inputs):
    q, k, v, mask, causal, scale, gqa = inputs
    expected = _torch_builtin(q, k, v, mask, causal, scale, gqa)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    tm = None if mask is None else torch.from_numpy(mask)
    out = torch_attn.scaled_dot_product_attention(tq, tk, tv, tm, 0.0, causal, scale, gqa)
    out.backward(torch.ones_like(out))
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, tq.grad, tk.grad, tv.grad), expected):
        np.testing.assert_allclose(got.detach().numpy(), want, atol=1e-5, rtol=1e-5, err_msg=name)


def test_dropout_statistics_jax():
    """Without an injected mask, the JAX draw keeps about 1 - p of the weights, scaled by 1/(1-p)."""
    q = jnp.ones((4, 8, 64, 16))
    out, w = jax_attn.scaled_dot_product_attention_with_weights(
        q, q, q, dropout_p=0.25, dropout_rng=jax.random.key(0)
    )
    kept = np.asarray(w) > 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(np.asarray(w)[kept], 1 / 64 / 0.75, rtol=1e-5)


def test_dropout_statistics_torch():
    q = torch.ones((4, 8, 64, 16))
    out, w = torch_attn.scaled_dot_product_attention_with_weights(
        q, q, q, dropout_p=0.25, generator=torch.Generator().manual_seed(0)
    )
    kept = w.numpy() > 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(w.numpy()[kept], 1 / 64 / 0.75, rtol=1e-5)
