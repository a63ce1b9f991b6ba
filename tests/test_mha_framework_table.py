"""The behaviours docs/porting.md tables for flax and ``jax.nn.dot_product_attention``, measured here
(not copied): mask polarity, float masks and fully-masked rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

B, T, S, N, H = 1, 2, 3, 1, 4
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((B, L, N, H)), jnp.float32) for L in (T, S, S))
# query 0 may attend to key 0 only; query 1 to nothing
KEEP = jnp.array([[True, False, False], [False, False, False]])[None, None]


def _attend(keep_row):
    """Softmax attention of query 0 over the keys in keep_row, by hand."""
    logits = np.einsum("h,sh->s", np.asarray(q[0, 0, 0]), np.asarray(k[0, :, 0])) / np.sqrt(H)
    w = np.where(keep_row, np.exp(logits - logits[keep_row].max()), 0.0)
    return (w / w.sum()) @ np.asarray(v[0, :, 0])


@pytest.mark.parametrize(
    "fn", [jax.nn.dot_product_attention, nnx.dot_product_attention], ids=["jax.nn", "flax"]
)
def test_bool_mask_true_means_may_attend_and_empty_row_is_mean_of_values(fn):
    out = fn(q, k, v, mask=KEEP)
    np.testing.assert_allclose(out[0, 0, 0], v[0, 0, 0], atol=1e-6)  # True = attend (SDPA polarity)
    np.testing.assert_allclose(out[0, 1, 0], v[0, :, 0].mean(0), atol=1e-6)  # uniform, not zeros, not NaN


def test_jax_nn_rejects_float_mask_and_bias_minus_inf_gives_nan():
    with pytest.raises(ValueError):
        jax.nn.dot_product_attention(q, k, v, mask=jnp.where(KEEP, 0.0, -jnp.inf))
    out = jax.nn.dot_product_attention(q, k, v, bias=jnp.where(KEEP, 0.0, -jnp.inf))
    assert np.isnan(np.asarray(out[0, 1, 0])).all()


def test_flax_float_mask_is_read_as_truthy_polarity_inverted():
    """A torch-style additive 0 / -inf mask handed to flax: 0 is falsy (masked), -inf truthy (kept)."""
    out = nnx.dot_product_attention(q, k, v, mask=jnp.where(KEEP, 0.0, -jnp.inf))
    np.testing.assert_allclose(out[0, 0, 0], _attend(np.array([False, True, True])), atol=1e-5)
