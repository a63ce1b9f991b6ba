"""Run the causal-self-attention twins on a shared vector and return float64 NumPy results.

Every runner takes a :class:`compare.vectors.Vector` of kind ``"causal"`` and returns
``{"out", "grad_x", "grad_<parameter name>"...}``: the output and the gradients of ``sum(out * dy)``
with respect to ``x`` and every parameter. A vector with ``chunks`` is fed through a KV cache chunk by
chunk (the outputs concatenated, gradients flowing through the cache); its expectation is the full pass.
"""

from __future__ import annotations

import numpy as np

from compare import runners
from compare.cases import NP_DTYPES
from compare.cases_causal import param_names
from compare.runners import to_float64
from compare.vectors import Vector


def _chunks(case) -> list[tuple[int, int]]:
    """``(start, stop)`` of each chunk; one chunk (no cache) for a full pass."""
    sizes = case.chunks or (case.T,)
    stops = np.cumsum(sizes).tolist()
    return list(zip([0, *stops[:-1]], stops))


def run_jax(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``jax_attn.CausalSelfAttention`` under ``jax.jit``: output and gradients w.r.t. x and parameters."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_attn

    c, a = vec.case, vec.arrays
    dt = jnp.dtype(NP_DTYPES[c.dtype])
    module = jax_attn.CausalSelfAttention(
        c.E, c.N, c.K, c.bias, c.dropout_p, implementation=implementation, rngs=nnx.Rngs(0), param_dtype=dt
    )
    module.load_torch_state_dict({n: a[n] for n in param_names(c)})
    if c.dropout_p == 0:
        module.eval()
    drop = None if "dropout_mask" not in a else jnp.asarray(a["dropout_mask"])
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def forward(params, x):
        model = nnx.merge(graphdef, params, rest)
        if c.chunks is None:
            return model(x, dropout_mask=drop)
        cache, ys = model.init_cache(c.B, c.max_length), []
        for start, stop in _chunks(c):
            y, cache = model(x[:, start:stop], cache=cache)
            ys.append(y)
        return jnp.concatenate(ys, axis=1)

    @jax.jit  # forward and backward in one program: one XLA compilation per vector
    def forward_backward(params, x, dy):
        out, vjp = jax.vjp(forward, params, x)
        return out, *vjp(dy)

    x, dy = (jnp.asarray(a[n], dtype=dt) for n in ("x", "dy"))
    out, dparams, dx = forward_backward(params, x, dy)
    result = {"out": to_float64(out), "grad_x": to_float64(dx)}
    for path, value in nnx.to_flat_state(dparams):
        result["grad_" + ".".join(str(p) for p in path)] = to_float64(value[...])
    return result


def run_jax_fused(vec: Vector) -> dict[str, np.ndarray]:
    """:func:`run_jax` with ``implementation="fused"`` (``jax.nn.dot_product_attention``, XLA)."""
    return run_jax(vec, "fused")


def run_torch(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``torch_attn.CausalSelfAttention`` (eager): output and gradients w.r.t. x and parameters."""
    import torch

    import torch_attn

    c, a = vec.case, vec.arrays
    dt = getattr(torch, c.dtype)
    module = torch_attn.CausalSelfAttention(
        c.E, c.N, c.K, c.bias, c.dropout_p, implementation=implementation, dtype=dt
    )
    module.to(runners.TORCH_DEVICE)  # set by --device
    module.load_torch_state_dict({n: a[n] for n in param_names(c)})
    module.train(c.dropout_p > 0)
    drop = None if "dropout_mask" not in a else runners.to_torch(a["dropout_mask"])
    x, dy = (runners.to_torch(a[n], c.dtype) for n in ("x", "dy"))
    x.requires_grad_(True)
    if c.chunks is None:
        out = module(x, dropout_mask=drop)
    else:
        cache, ys = module.init_cache(c.B, c.max_length), []
        for start, stop in _chunks(c):
            y, cache = module(x[:, start:stop], cache=cache)
            ys.append(y)
        out = torch.cat(ys, dim=1)
    out.backward(dy)
    result = {"out": to_float64(out), "grad_x": to_float64(x.grad)}
    for name, p in module.named_parameters():
        result[f"grad_{name}"] = to_float64(p.grad)
    return result


def run_torch_fused(vec: Vector) -> dict[str, np.ndarray]:
    """:func:`run_torch` with ``implementation="fused"`` (``F.scaled_dot_product_attention``)."""
    return run_torch(vec, "fused")


def applies(impl: str, vec: Vector) -> bool:
    """The fused paths have no injectable dropout: they run the dropout-free vectors. XLA:CPU's
    ``dot_general`` rejects fp16 inputs with fp32 accumulation ("The precision 'F16_F16_F32' is not
    supported by dot_general on CPU"), which ``jax.nn.dot_product_attention`` asks for: the JAX fused path
    runs fp16 only on an accelerator."""
    if impl.endswith(("_fused", "_blocked")) and vec.case.dropout_p > 0.0:
        return False
    if impl == "jax_attn_fused" and vec.case.dtype == "float16":
        import jax

        return jax.default_backend() != "cpu"
    return True


IMPLEMENTATIONS = {
    "jax_attn": run_jax,
    "torch_attn": run_torch,
    "jax_attn_fused": run_jax_fused,
    "torch_attn_fused": run_torch_fused,
    "jax_attn_blocked": lambda vec: run_jax(vec, "blocked"),
    "torch_attn_blocked": lambda vec: run_torch(vec, "blocked"),
}
