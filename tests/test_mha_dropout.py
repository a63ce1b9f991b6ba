"""Dropout on the attention weights: training mode only, post-dropout weights returned, the same
injected keep-mask makes the twins agree, and the random draw keeps 1 - p of the weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn
import torch_attn

E, NH, L, S, N = 12, 3, 4, 6, 2


def _pair(p, **ctor):
    torch.manual_seed(0)
    builtin = torch.nn.MultiheadAttention(E, NH, dropout=p, **ctor)
    return (
        jax_attn.MultiheadAttention.from_torch(builtin),
        torch_attn.MultiheadAttention.from_torch(builtin),
        builtin,
    )


@pytest.mark.parametrize("average", [True, False])
def test_injected_mask_makes_twins_agree_in_training(average):
    jm, tm, _ = _pair(0.4, add_zero_attn=True)
    assert jm.training and tm.training  # torch's default mode, in both
    rng = np.random.default_rng(0)
    q, kv = (
        rng.standard_normal((L, N, E)).astype(np.float32),
        rng.standard_normal((S, N, E)).astype(np.float32),
    )
    keep = rng.random((N, NH, L, S + 1)) >= 0.4
    jo, jw = jm(
        jnp.asarray(q),
        jnp.asarray(kv),
        jnp.asarray(kv),
        average_attn_weights=average,
        dropout_mask=jnp.asarray(keep),
    )
    tq, tkv = torch.from_numpy(q).requires_grad_(True), torch.from_numpy(kv)
    to, tw = tm(tq, tkv, tkv, average_attn_weights=average, dropout_mask=torch.from_numpy(keep))
    np.testing.assert_allclose(np.asarray(jo), to.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(jw), tw.detach().numpy(), atol=1e-6)
    if not average:  # post-dropout per-head weights: the eval-mode weights, dropped or scaled by 1/(1-p)
        _, w_eval = tm.eval()(tq, tkv, tkv, average_attn_weights=False)
        tm.train()
        want = np.where(keep, w_eval.detach().numpy() / 0.6, 0.0)
        np.testing.assert_allclose(tw.detach().numpy(), want, atol=1e-6)
    # gradients through the dropped weights agree too
    g = jax.jit(
        jax.grad(lambda q: jm(q, jnp.asarray(kv), jnp.asarray(kv), dropout_mask=jnp.asarray(keep))[0].sum())
    )(jnp.asarray(q))
    to.sum().backward()
    np.testing.assert_allclose(np.asarray(g), tq.grad.numpy(), atol=1e-5)


def test_eval_mode_has_no_dropout_and_ignores_the_mask():
    jm, tm, builtin = _pair(0.5)
    for m in (jm, tm, builtin):
        m.eval()
    x = torch.randn(L, N, E)
    keep = torch.zeros((N, NH, L, L), dtype=torch.bool)
    want, want_w = builtin(x, x, x)
    to, tw = tm(x, x, x, dropout_mask=keep)
    jo, jw = jm(*(jnp.asarray(x.numpy()),) * 3, dropout_mask=jnp.asarray(keep.numpy()))
    for out, w in ((to.detach(), tw.detach()), (jo, jw)):
        np.testing.assert_allclose(np.asarray(out), want.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(w), want_w.detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("framework", ["jax", "torch", "builtin"])
def test_random_dropout_statistics(framework):
    """Same distribution in all three: about 1 - p kept, kept weights scaled by 1 / (1 - p)."""
    p, T = 0.25, 64
    jm, tm, builtin = _pair(p)
    x = np.ones((T, 4, E), np.float32)
    if framework == "jax":
        jm = jax_attn.MultiheadAttention.from_torch(builtin, rngs=nnx.Rngs(dropout=3))
        _, w = jm(*(jnp.asarray(x),) * 3, average_attn_weights=False)
        w = np.asarray(w)
    else:
        torch.manual_seed(3)
        m = tm if framework == "torch" else builtin
        _, w = m(*(torch.from_numpy(x),) * 3, average_attn_weights=False)
        w = w.detach().numpy()
    kept = w > 0
    assert abs(kept.mean() - (1 - p)) < 0.01
    np.testing.assert_allclose(w[kept], 1 / T / (1 - p), rtol=1e-4)
