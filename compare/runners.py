"""Run each implementation on a shared vector and return float64 NumPy results.

Every runner takes a :class:`compare.vectors.Vector` and returns ``{"out", "weights"?, "dq", "dk", "dv"}``
where the gradients are those of ``sum(out * dout)``: a vector-Jacobian product with the stored ``dout``.
This is the one place where arrays cross into and out of each framework.
"""

from __future__ import annotations

import numpy as np

from compare.cases import NP_DTYPES
from compare.vectors import Vector

# Where the torch runners put their tensors; set by ``compare.env.select_device`` (JAX uses its default
# device, which the same function sets).
TORCH_DEVICE = "cpu"


def to_torch(x: np.ndarray, dtype: str | None = None):
    """A NumPy array (bf16 included) as a torch tensor on :data:`TORCH_DEVICE`, in ``dtype`` if given."""
    import torch

    if x.dtype == bool:
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif dtype is not None or x.dtype == NP_DTYPES["bfloat16"]:
        t = torch.from_numpy(np.asarray(x, np.float32)).to(getattr(torch, dtype or "bfloat16"))
    else:
        t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(TORCH_DEVICE)


def to_float64(x) -> np.ndarray:
    """Any framework's array (bf16 included) as a float64 NumPy array."""
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().double().numpy()
    return np.asarray(x).astype(np.float64)


def _jax_inputs(vec: Vector):
    import jax.numpy as jnp

    import jax_attn

    a, dt = vec.arrays, vec.case.dtype
    q, k, v, dout = (jnp.asarray(a[n], dtype=jnp.dtype(NP_DTYPES[dt])) for n in ("q", "k", "v", "dout"))
    mask = a.get("attn_mask")
    if mask is not None:
        mask = jnp.asarray(mask)
        if vec.case.mask_form == "masked":
            mask = jax_attn.masked_to_keep(mask)
    drop = a.get("dropout_mask")
    return q, k, v, dout, mask, None if drop is None else jnp.asarray(drop)


def run_jax(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``jax_attn.scaled_dot_product_attention`` under ``jax.jit``: output, weights and input gradients
    (no weights from a fast ``implementation``)."""
    import jax

    import jax_attn

    c = vec.case
    q, k, v, dout, mask, drop = _jax_inputs(vec)
    if implementation != "math":

        @jax.jit
        def fast(q, k, v):
            return jax_attn.scaled_dot_product_attention(
                q, k, v, mask, 0.0, c.is_causal, c.scale, c.enable_gqa, implementation=implementation
            )

        out, vjp = jax.vjp(fast, q, k, v)
        dq, dk, dv = vjp(dout)
        return {n: to_float64(x) for n, x in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv))}

    @jax.jit
    def fwd(q, k, v):
        return jax_attn.scaled_dot_product_attention_with_weights(
            q, k, v, mask, c.dropout_p, c.is_causal, c.scale, c.enable_gqa, dropout_mask=drop
        )

    (out, weights), vjp = jax.vjp(fwd, q, k, v)
    dq, dk, dv = vjp((dout, jax.numpy.zeros_like(weights)))
    return {
        n: to_float64(x) for n, x in zip(("out", "weights", "dq", "dk", "dv"), (out, weights, dq, dk, dv))
    }


def _torch_inputs(vec: Vector):
    import torch_attn

    a, dt = vec.arrays, vec.case.dtype
    q, k, v, dout = (to_torch(a[n], dt) for n in ("q", "k", "v", "dout"))
    mask = a.get("attn_mask")
    if mask is not None:
        # A mask stored in the query's dtype (finfo.min fills) stays in it; others keep their own dtype.
        mask = to_torch(mask, dt if mask.dtype == NP_DTYPES[dt] else None)
        if vec.case.mask_form == "masked":
            mask = torch_attn.masked_to_keep(mask)
    drop = a.get("dropout_mask")
    return q, k, v, dout, mask, None if drop is None else to_torch(drop)


def run_torch(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``torch_attn.scaled_dot_product_attention`` (eager): output, weights and input gradients (no
    weights from a fast ``implementation``)."""
    import torch_attn

    c = vec.case
    q, k, v, dout, mask, drop = _torch_inputs(vec)
    for x in (q, k, v):
        x.requires_grad_(True)
    if implementation != "math":
        out = torch_attn.scaled_dot_product_attention(
            q, k, v, mask, 0.0, c.is_causal, c.scale, c.enable_gqa, implementation=implementation
        )
        out.backward(dout)
        result = {"out": out, "dq": q.grad, "dk": k.grad, "dv": v.grad}
        return {n: to_float64(x) for n, x in result.items()}
    out, weights = torch_attn.scaled_dot_product_attention_with_weights(
        q, k, v, mask, c.dropout_p, c.is_causal, c.scale, c.enable_gqa, dropout_mask=drop
    )
    out.backward(dout)
    result = {"out": out, "weights": weights, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return {n: to_float64(x) for n, x in result.items()}


def builtin_applies(vec: Vector) -> bool:
    """Whether torch's own ``F.scaled_dot_product_attention`` can run this vector: no injected dropout
    (its dropout draws its own mask)."""
    return vec.case.dropout_p == 0.0


def applies(impl: str, vec: Vector) -> bool:
    """The built-in and the fast paths (``*_blocked``, ``*_fused``) have no injectable dropout."""
    if impl == "torch_builtin" or impl.endswith(("_blocked", "_fused")):
        return builtin_applies(vec)
    return True


def run_torch_builtin(vec: Vector) -> dict[str, np.ndarray]:
    """torch's ``F.scaled_dot_product_attention`` on the vector: output and input gradients (no weights)."""
    import torch
    import torch.nn.functional as F

    c = vec.case
    if not builtin_applies(vec):
        raise ValueError(f"case {vec.name!r}: torch's built-in SDPA cannot take an injected dropout mask")
    q, k, v, dout, mask, _ = _torch_inputs(vec)
    for x in (q, k, v):
        x.requires_grad_(True)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)  # the built-in wants a float mask in the query's dtype
    out = F.scaled_dot_product_attention(
        q, k, v, mask, 0.0, c.is_causal, scale=c.scale, enable_gqa=c.enable_gqa
    )
    out.backward(dout)
    result = {"out": out, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return {n: to_float64(x) for n, x in result.items()}


IMPLEMENTATIONS = {
    "jax_attn": run_jax,
    "torch_attn": run_torch,
    "torch_builtin": run_torch_builtin,
    # the fast paths, judged on every vector they apply to (see applies)
    "jax_attn_blocked": lambda vec: run_jax(vec, "blocked"),
    "jax_attn_fused": lambda vec: run_jax(vec, "fused"),
    "torch_attn_blocked": lambda vec: run_torch(vec, "blocked"),
    "torch_attn_fused": lambda vec: run_torch(vec, "fused"),
}
