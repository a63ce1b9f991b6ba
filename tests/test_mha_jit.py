"""``jax_attn.MultiheadAttention`` under ``nnx.jit``: same numbers as eager, one compile per shape."""

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import jax_attn


def test_nnx_jit_compiles_once_per_shape_and_matches_builtin():
    torch.manual_seed(0)
    builtin = torch.nn.MultiheadAttention(12, 3, add_bias_kv=True).eval()
    m = jax_attn.MultiheadAttention.from_torch(builtin)
    traces = []

    @nnx.jit
    def call(m, q, kv):
        traces.append(q.shape)  # runs only while tracing
        return m(q, kv, kv)

    rng = np.random.default_rng(0)
    for shape in [(3, 2), (3, 2), (3, 2), (4, 2), (4, 2), (3, 2)]:
        q = rng.standard_normal((*shape, 12)).astype(np.float32)
        kv = rng.standard_normal((5, shape[1], 12)).astype(np.float32)
        out, w = call(m, jnp.asarray(q), jnp.asarray(kv))
        want, want_w = builtin(torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(kv))
        np.testing.assert_allclose(np.asarray(out), want.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(w), want_w.detach().numpy(), atol=1e-5)
    assert traces == [(3, 2, 12), (4, 2, 12)]  # one trace (compile) per input shape


def test_nnx_jit_dropout_draws_fresh_masks_each_call():
    """In training mode the rng stream advances inside jit: two calls drop different weights."""
    m = jax_attn.MultiheadAttention.from_torch(
        torch.nn.MultiheadAttention(8, 2, dropout=0.5), rngs=nnx.Rngs(1)
    )
    call = nnx.jit(lambda m, x: m(x, x, x, average_attn_weights=False))
    x = jnp.ones((6, 1, 8))
    _, w1 = call(m, x)
    _, w2 = call(m, x)
    assert not np.array_equal(np.asarray(w1) > 0, np.asarray(w2) > 0)
    m.eval()
    _, w3 = call(m, x)
    np.testing.assert_allclose(np.asarray(w3), 1 / 6, rtol=1e-6)  # eval: no dropout, uniform weights
