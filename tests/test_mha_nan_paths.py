"""Fully-masked rows: which paths of torch's built-in give NaN (measured here, tabled in
docs/porting.md), and the twins' behaviour there: zeros, finite gradients, torch's values elsewhere."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn
import torch_attn

E, NH, L, N = 8, 2, 4, 2

# (mask, need_weights, path) -> (output has NaN, weights have NaN, some gradient has NaN); None = n/a.
# path: "train" (module.train(), grads on), "eval" (module.eval(), grads on), "fast" (eval +
# inference_mode + batch_first self-attention: torch's fused fast path).
MEASURED = {
    ("attn_mask", True, "train"): (True, True, True),
    ("attn_mask", True, "eval"): (True, True, True),
    ("attn_mask", True, "fast"): (True, True, None),
    ("attn_mask", False, "train"): (False, None, False),
    ("attn_mask", False, "eval"): (False, None, False),
    ("attn_mask", False, "fast"): (True, None, None),
    ("key_padding_mask", True, "train"): (True, True, True),
    ("key_padding_mask", True, "eval"): (True, True, True),
    ("key_padding_mask", True, "fast"): (True, True, None),
    ("key_padding_mask", False, "train"): (False, None, False),
    ("key_padding_mask", False, "eval"): (False, None, False),
    ("key_padding_mask", False, "fast"): (True, None, None),
}


def _masks(kind):
    if kind == "attn_mask":
        am = torch.zeros(L, L, dtype=torch.bool)
        am[1] = True  # query 1 may attend to nothing
        return {"attn_mask": am}
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1] = True  # sequence 1 is all padding
    return {"key_padding_mask": kpm}


def _nan(x):
    return None if x is None else bool(torch.isnan(x).any())


def _builtin(kind, need_weights, path, **ctor):
    torch.manual_seed(0)
    m = torch.nn.MultiheadAttention(E, NH, batch_first=True, **ctor)
    x = torch.randn(N, L, E)
    if path == "fast":
        m.eval()
        with torch.inference_mode():
            out, w = m(x, x, x, need_weights=need_weights, **_masks(kind))
        return m, x, (_nan(out), _nan(w), None), out
    m.train(path == "train")
    xx = x.clone().requires_grad_(True)
    out, w = m(xx, xx, xx, need_weights=need_weights, **_masks(kind))
    out.sum().backward()
    grads_nan = bool(torch.isnan(xx.grad).any()) or any(
        bool(torch.isnan(p.grad).any()) for p in m.parameters()
    )
    return m, x, (_nan(out), _nan(w), grads_nan), out


@pytest.mark.parametrize("key", list(MEASURED), ids=lambda k: "-".join(map(str, k)))
def test_builtin_nan_table_is_as_documented(key):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, measured, _ = _builtin(*key)
    assert measured == MEASURED[key]


@pytest.mark.parametrize(
    "ctor", [{"add_zero_attn": True}, {"add_bias_kv": True}], ids=["zero_attn", "bias_kv"]
)
def test_appended_keys_rescue_the_row_in_torch_too(ctor):
    _, _, measured, _ = _builtin("key_padding_mask", True, "train", **ctor)
    assert measured == (False, False, False)


@pytest.mark.parametrize("kind", ["attn_mask", "key_padding_mask"])
def test_twins_give_zeros_and_finite_gradients(kind):
    """Where torch is finite (need_weights=False, not the fast path) the twins equal it; on the masked row
    they give the output projection's bias (attention output zeros) and finite gradients everywhere."""
    builtin, x, _, want = _builtin(kind, False, "train")
    masks = _masks(kind)
    tm = torch_attn.MultiheadAttention.from_torch(builtin)
    xx = x.clone().requires_grad_(True)
    out, w = tm(xx, xx, xx, need_weights=True, average_attn_weights=False, **masks)
    out.sum().backward()
    np.testing.assert_allclose(out.detach().numpy(), want.detach().numpy(), atol=1e-5)
    assert torch.isfinite(xx.grad).all() and all(torch.isfinite(p.grad).all() for p in tm.parameters())
    row = (slice(None), slice(None), 1) if kind == "attn_mask" else (1,)
    assert not w[row].any()  # per-head weights of the masked row are zeros, not NaN

    jm = jax_attn.MultiheadAttention.from_torch(builtin)
    graphdef, params, rest = nnx.split(jm, nnx.Param, ...)
    jmasks = {k: jnp.asarray(v.numpy()) for k, v in masks.items()}

    def loss(params, x):
        out, w = nnx.merge(graphdef, params, rest)(x, x, x, **jmasks)
        return out.sum(), (out, w)

    (_, (jout, jw)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params, jnp.asarray(x.numpy())
    )
    np.testing.assert_allclose(np.asarray(jout), want.detach().numpy(), atol=1e-5)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert bool(jnp.isfinite(jw).all())
