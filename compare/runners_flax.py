"""flax's own ``nnx.MultiHeadAttention`` on the MHA vectors, with torch's weights ported in.

It joins the agreement matrix where its semantics overlap torch's ``nn.MultiheadAttention``: batched input,
the same width for query/key/value (one ``in_kv_features``), no ``add_bias_kv``/``add_zero_attn``, no
dropout, a *bool* mask (flax reads a 0/-inf float mask as truthy: polarity silently inverted) and no
fully-masked row (flax gives such a row uniform weights, torch NaN, we zeros). It returns no weights, so
output and gradients are compared.

Weight mapping (REFERENCE.md): ``W (out, in)`` → ``kernel = W.T.reshape(E, heads, head_dim)``;
``b → b.reshape(heads, head_dim)``; ``out_proj.weight`` → ``out.kernel = W.T.reshape(heads, head_dim, E)``;
torch's MHA-polarity bool masks are inverted into flax's keep polarity.
"""

from __future__ import annotations

import numpy as np

from compare.cases import NP_DTYPES
from compare.cases_mha import MhaCase, parameters
from compare.runners import to_float64
from compare.vectors import Vector


def applies(vec: Vector) -> bool:
    import jax

    c: MhaCase = vec.case
    if c.dtype == "float16" and jax.default_backend() == "cpu":
        return False  # XLA:CPU rejects flax's fp16 dot with fp32 accumulation (F16_F16_F32)
    bool_masks = all(
        getattr(c, name) is None or getattr(c, f"{name}_form") == "masked"
        for name in ("attn_mask", "key_padding_mask")
    )
    return (
        c.batched
        and c.kdim in (None, c.E)
        and c.vdim in (None, c.E)
        and not c.add_bias_kv
        and not c.add_zero_attn
        and c.dropout_p == 0.0
        and not c.fully_masked
        and bool_masks
    )


def _keep_mask(c: MhaCase, a: dict[str, np.ndarray]) -> np.ndarray:
    """torch MHA masks (True = ignore) as one flax keep-mask broadcastable to ``(N, heads, L, S)``."""
    keep = np.ones((c.N, 1, 1, c.S), bool)
    if a.get("key_padding_mask") is not None:
        keep = keep & ~a["key_padding_mask"][:, None, None, :]
    if a.get("attn_mask") is not None:
        m = ~a["attn_mask"]
        keep = keep & (m.reshape(c.N, c.num_heads, c.L, c.S) if m.ndim == 3 else m[None, None])
    return keep


def run_flax_nnx(vec: Vector) -> dict[str, np.ndarray]:
    """flax ``nnx.MultiHeadAttention`` under ``jax.jit``: output and gradients (inputs and parameters),
    keyed like the torch state dict."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    c, a = vec.case, vec.arrays
    if not applies(vec):
        raise ValueError(f"case {vec.name!r}: outside what flax's nnx.MultiHeadAttention can express")
    dt = jnp.dtype(NP_DTYPES[c.dtype])
    E, Nh = c.E, c.num_heads
    D = E // Nh
    p = {k: np.asarray(v, np.float64) for k, v in parameters(a).items()}
    module = nnx.MultiHeadAttention(
        Nh, E, use_bias=c.bias, dtype=dt, param_dtype=dt, decode=False, deterministic=True, rngs=nnx.Rngs(0)
    )
    w_q, w_k, w_v = np.split(p["in_proj_weight"], 3)
    for layer, w in ((module.query, w_q), (module.key, w_k), (module.value, w_v)):
        layer.kernel[...] = jnp.asarray(w.T.reshape(E, Nh, D), dt)
    module.out.kernel[...] = jnp.asarray(p["out_proj.weight"].T.reshape(Nh, D, E), dt)
    if c.bias:
        for layer, b in zip((module.query, module.key, module.value), np.split(p["in_proj_bias"], 3)):
            layer.bias[...] = jnp.asarray(b.reshape(Nh, D), dt)
        module.out.bias[...] = jnp.asarray(p["out_proj.bias"], dt)

    def to_nle(x):  # flax is batch first: (N, L, E)
        return x if c.batch_first else jnp.swapaxes(x, 0, 1)

    mask = jnp.asarray(_keep_mask(c, a))
    graphdef, params = nnx.split(module, nnx.Param)

    @jax.jit
    def forward(params, query, key, value):
        m = nnx.merge(graphdef, params)
        return to_nle(m(to_nle(query), to_nle(key), to_nle(value), mask=mask))

    query, key, value, dout = (jnp.asarray(a[n], dt) for n in ("query", "key", "value", "dout"))
    out, vjp = jax.vjp(forward, params, query, key, value)
    dparams, dquery, dkey, dvalue = vjp(dout)
    g = nnx.merge(graphdef, dparams)
    kernels = [np.asarray(layer.kernel[...], np.float64) for layer in (g.query, g.key, g.value)]
    result = {
        "out": out,
        "dquery": dquery,
        "dkey": dkey,
        "dvalue": dvalue,
        "din_proj_weight": np.concatenate([k.reshape(E, E).T for k in kernels]),
        "dout_proj.weight": np.asarray(g.out.kernel[...], np.float64).reshape(E, E).T,
    }
    if c.bias:
        result["din_proj_bias"] = np.concatenate(
            [np.asarray(layer.bias[...], np.float64).reshape(E) for layer in (g.query, g.key, g.value)]
        )
        result["dout_proj.bias"] = g.out.bias[...]
    return {k: to_float64(v) for k, v in result.items()}
