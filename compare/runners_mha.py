"""Run the MHA implementations on a shared vector (kind ``"mha"``); float64 NumPy results.

Every runner takes a :class:`compare.vectors.Vector` of ``compare.cases_mha`` and returns ``{"out",
"weights"?, "dquery", "dkey", "dvalue", "d<param name>"...}``: the outputs as torch returns them and the
gradients of ``sum(out * dout)`` with respect to the inputs and every parameter.

- ``jax_attn``: ``jax_attn.MultiheadAttention`` loaded with the vector's ``state_dict``, forward and VJP
  under ``jax.jit`` (the module split with ``nnx.split`` and merged inside the jitted function).
- ``torch_attn``: ``torch_attn.MultiheadAttention`` loaded with the ``state_dict``, eager.
- ``torch_builtin``: ``torch.nn.MultiheadAttention`` itself, where it applies (no injected dropout: it
  draws its own; no fully-masked rows: it gives NaN there on some paths, see ``docs/porting.md``).
"""

from __future__ import annotations

import numpy as np

from compare import runners
from compare.cases import NP_DTYPES
from compare.cases_mha import MhaCase, parameters
from compare.runners import to_float64
from compare.vectors import Vector


def _ctor_kwargs(case: MhaCase) -> dict:
    return {
        "dropout": case.dropout_p,
        "bias": case.bias,
        "add_bias_kv": case.add_bias_kv,
        "add_zero_attn": case.add_zero_attn,
        "kdim": case.kdim,
        "vdim": case.vdim,
        "batch_first": case.batch_first,
    }


def _forward_kwargs(case: MhaCase, implementation: str = "math") -> dict:
    # the fast paths return no weights: they run the vector with need_weights=False
    return {
        "need_weights": case.need_weights and implementation == "math",
        "average_attn_weights": case.average_attn_weights,
        "is_causal": case.is_causal,
    }


def run_jax(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``jax_attn.MultiheadAttention`` under ``jax.jit``: outputs and gradients (inputs and parameters)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_attn

    c, a = vec.case, vec.arrays
    dt = jnp.dtype(NP_DTYPES[c.dtype])
    module = jax_attn.MultiheadAttention.from_state_dict(
        parameters(a), c.E, c.num_heads, **_ctor_kwargs(c), param_dtype=dt, implementation=implementation
    )
    if c.dropout_p == 0:
        module.eval()
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    masks = {n: None if a.get(n) is None else jnp.asarray(a[n]) for n in ("attn_mask", "key_padding_mask")}
    drop = None if a.get("dropout_mask") is None else jnp.asarray(a["dropout_mask"])

    @jax.jit
    def forward_and_grads(params, query, key, value, dout):
        # Forward and VJP in one compiled program (compiling once is what dominates on CPU).
        def forward(params, query, key, value):
            m = nnx.merge(graphdef, params, rest)
            return m(query, key, value, **masks, **_forward_kwargs(c, implementation), dropout_mask=drop)

        (out, weights), vjp = jax.vjp(forward, params, query, key, value)
        grads = vjp((dout, None if weights is None else jnp.zeros_like(weights)))
        return out, weights, grads

    inputs = (jnp.asarray(a[n], dt) for n in ("query", "key", "value", "dout"))
    out, weights, (dparams, dquery, dkey, dvalue) = forward_and_grads(params, *inputs)
    result = {"out": out, "dquery": dquery, "dkey": dkey, "dvalue": dvalue}
    if weights is not None:
        result["weights"] = weights
    grads = nnx.merge(graphdef, dparams, rest).torch_state_dict()
    result.update({f"d{k}": v for k, v in grads.items()})
    return {k: to_float64(v) for k, v in result.items()}


def _torch_run(vec: Vector, module, implementation: str = "math") -> dict[str, np.ndarray]:

    c, a = vec.case, vec.arrays

    def tensor(x):  # on runners.TORCH_DEVICE (set by --device)
        return runners.to_torch(x) if x.dtype == bool else runners.to_torch(x, c.dtype)

    module.to(runners.TORCH_DEVICE)
    module.load_state_dict({k: tensor(v) for k, v in parameters(a).items()}, strict=True)
    module.train(c.dropout_p > 0)
    query, key, value = (tensor(a[n]).requires_grad_(True) for n in ("query", "key", "value"))
    masks = {n: None if a.get(n) is None else tensor(a[n]) for n in ("attn_mask", "key_padding_mask")}
    extra = {} if a.get("dropout_mask") is None else {"dropout_mask": tensor(a["dropout_mask"])}
    out, weights = module(query, key, value, **masks, **_forward_kwargs(c, implementation), **extra)
    out.backward(tensor(a["dout"]))
    result = {"out": out, "dquery": query.grad, "dkey": key.grad, "dvalue": value.grad}
    if weights is not None:
        result["weights"] = weights
    result.update({f"d{k}": p.grad for k, p in module.named_parameters()})
    return {k: to_float64(v) for k, v in result.items()}


def run_torch(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``torch_attn.MultiheadAttention`` (eager): outputs and gradients (inputs and parameters)."""
    import torch

    import torch_attn

    c = vec.case
    module = torch_attn.MultiheadAttention(
        c.E, c.num_heads, **_ctor_kwargs(c), dtype=getattr(torch, c.dtype), implementation=implementation
    )
    return _torch_run(vec, module, implementation)


def builtin_applies(vec: Vector) -> bool:
    """Whether ``torch.nn.MultiheadAttention`` can run this vector: no injected dropout (its dropout draws
    its own mask) and no fully-masked row (NaN there on the weights path)."""
    return vec.case.dropout_p == 0.0 and not vec.case.fully_masked


def applies(impl: str, vec: Vector) -> bool:
    """The fast paths (``*_blocked``, ``*_fused``) take no dropout; they run with need_weights=False."""
    if impl.endswith(("_blocked", "_fused")):
        return vec.case.dropout_p == 0.0
    return builtin_applies(vec) if impl == "torch_builtin" else True


def run_torch_builtin(vec: Vector) -> dict[str, np.ndarray]:
    """``torch.nn.MultiheadAttention`` itself: outputs and gradients (inputs and parameters)."""
    import torch

    c = vec.case
    if not builtin_applies(vec):
        raise ValueError(
            f"case {vec.name!r}: torch's built-in MHA cannot take an injected dropout mask, and gives NaN "
            "on fully-masked rows"
        )
    module = torch.nn.MultiheadAttention(c.E, c.num_heads, **_ctor_kwargs(c), dtype=getattr(torch, c.dtype))
    return _torch_run(vec, module)


IMPLEMENTATIONS = {
    "jax_attn": run_jax,
    "torch_attn": run_torch,
    "torch_builtin": run_torch_builtin,
    # the fast SDPA paths inside the module, judged on every dropout-free vector (without weights)
    "jax_attn_blocked": lambda vec: run_jax(vec, "blocked"),
    "jax_attn_fused": lambda vec: run_jax(vec, "fused"),
    "torch_attn_blocked": lambda vec: run_torch(vec, "blocked"),
    "torch_attn_fused": lambda vec: run_torch(vec, "fused"),
}
