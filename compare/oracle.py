"""The float64 NumPy oracle: plain attention math, independent of torch and jax.

Expected values in the shared vectors come from here. Every function is written for reading: one
NumPy operation per line of the textbook formula, in float64.

The same functions, given ``dtype=`` a low-precision type, round after every operation and so act as the
*naive same-dtype baseline* that the tolerance policy measures low-precision implementations against
(an implementation may be at most a small multiple of the naive baseline's error; see
``compare.tolerance``).

Dimension key (see ``attn_spec``): ``...`` leading dims, T query length, S key length, H q/k head width,
V value head width.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

LOW_PRECISION = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _rounder(dtype: str | None):
    """Identity for float64; float32: the *plain float32 evaluation* (arrays kept in float32, so every
    product, sum and matmul runs in float32 itself: its error includes what float32 sums cost, not only the
    rounding of each result); bf16/fp16: each intermediate rounded to ``dtype`` (kept in float64, the sums
    exact before the rounding, as kernels that accumulate in float32 nearly are)."""
    if dtype in (None, "float64"):
        return lambda x: np.asarray(x, np.float64)
    if dtype == "float32":
        return lambda x: np.asarray(x, np.float32)
    np_dtype = LOW_PRECISION.get(dtype)
    if np_dtype is None:
        raise ValueError(f"oracle: unknown dtype {dtype!r}")

    def round_to_dtype(x):
        # Overflow to ±inf is part of what a naive low-precision implementation does (fp16 and -1e9).
        with np.errstate(over="ignore"):
            return np.asarray(np.asarray(x, np.float64).astype(np_dtype), np.float64)

    return round_to_dtype


def causal_keep(T: int, S: int) -> np.ndarray:
    """Top-left causal keep-mask ``(T, S)``: query t sees key s when s <= t."""
    return np.arange(S)[None, :] <= np.arange(T)[:, None]


def _repeat_heads(x: np.ndarray, groups: int) -> np.ndarray:
    return np.repeat(x, groups, axis=-3) if groups > 1 else x


def sdpa_forward(
    q,
    k,
    v,
    attn_mask=None,
    is_causal=False,
    scale=None,
    groups=1,
    dropout_mask=None,
    dropout_p=0.0,
    dtype=None,
):
    """Attention output and weights, torch SDPA semantics, fully-masked rows giving zeros.

    Args:
      q ``(..., T, H)``, k ``(..., S, H)``, v ``(..., S, V)``; attn_mask bool keep-mask or additive float;
      groups: query heads per key/value head (GQA, axis -3); dropout_mask: bool keep-mask of the weights.
      dtype: None/"float64" for the oracle; "float32"/"bfloat16"/"float16" for the naive baseline.

    Returns:
      dict with ``out (..., T, V)``, ``weights (..., T, S)`` (after dropout), ``probs`` (before dropout).
    """
    r = _rounder(dtype)
    q, k, v = r(q), r(_repeat_heads(k, groups)), r(_repeat_heads(v, groups))
    T, S, H = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / np.sqrt(H) if scale is None else scale

    logits = r(r(q @ np.swapaxes(k, -1, -2)) * scale)
    keep = np.ones(logits.shape, bool)
    if is_causal:
        keep = keep & causal_keep(T, S)
    if attn_mask is not None:
        attn_mask = np.asarray(attn_mask)
        if attn_mask.dtype == bool:
            keep = keep & attn_mask
        else:
            logits = r(logits + attn_mask)
    keep = keep & (logits > -np.inf)

    # Softmax over the kept keys only; a row with no kept key gets all-zero weights.
    masked = np.where(keep, logits, -np.inf)
    row_max = masked.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    unnormalized = np.where(keep, r(np.exp(r(masked - row_max))), 0.0)
    total = r(unnormalized.sum(axis=-1, keepdims=True))
    probs = r(unnormalized / np.where(total == 0.0, 1.0, total))

    weights = probs
    if dropout_mask is not None:
        weights = r(np.where(dropout_mask, probs / (1.0 - dropout_p), 0.0))
    out = r(weights @ v)
    return {"out": out, "weights": weights, "probs": probs}


def _sum_heads(x: np.ndarray, groups: int) -> np.ndarray:
    """Gradient of repeat along axis -3: add up the G query heads that share one key/value head."""
    if groups == 1:
        return x
    shape = x.shape
    return x.reshape(*shape[:-3], shape[-3] // groups, groups, *shape[-2:]).sum(axis=-3)


def _unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Gradient of broadcasting: sum over the dimensions an input was broadcast along."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad


def sdpa_backward(
    q,
    k,
    v,
    dout,
    attn_mask=None,
    is_causal=False,
    scale=None,
    groups=1,
    dropout_mask=None,
    dropout_p=0.0,
    dtype=None,
):
    """Gradients of ``sum(out * dout)`` with respect to q, k and v, by the textbook backward pass.

    Returns:
      dict with ``dq`` (q's shape), ``dk`` (k's shape), ``dv`` (v's shape).
    """
    r = _rounder(dtype)
    fwd = sdpa_forward(q, k, v, attn_mask, is_causal, scale, groups, dropout_mask, dropout_p, dtype)
    qf, kf, vf = r(q), r(_repeat_heads(k, groups)), r(_repeat_heads(v, groups))
    dout = r(dout)
    H = qf.shape[-1]
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    probs, weights = fwd["probs"], fwd["weights"]

    dv = r(np.swapaxes(weights, -1, -2) @ dout)
    dweights = r(dout @ np.swapaxes(vf, -1, -2))
    dprobs = dweights
    if dropout_mask is not None:
        dprobs = r(np.where(dropout_mask, dweights / (1.0 - dropout_p), 0.0))
    # Softmax backward: d logits = P * (dP - rowsum(dP * P)); rows of zeros stay zeros.
    dlogits = r(probs * r(dprobs - r((dprobs * probs).sum(axis=-1, keepdims=True))))
    dq = r(r(dlogits @ kf) * scale)
    dk = r(r(np.swapaxes(dlogits, -1, -2) @ qf) * scale)
    return {
        "dq": _unbroadcast(dq, np.shape(q)),
        "dk": _unbroadcast(_sum_heads(dk, groups), np.shape(k)),
        "dv": _unbroadcast(_sum_heads(dv, groups), np.shape(v)),
    }


# ---------------------------------------------------------------------------------------------------
# MultiheadAttention (torch.nn.MultiheadAttention semantics), composed from sdpa_forward/sdpa_backward.
#
# Layout: batch first, ``query (N, L, E)``, ``key (N, S, kdim)``, ``value (N, S, vdim)`` (callers convert
# torch's (L, N, E) and unbatched layouts). ``params`` holds torch's state_dict names: ``in_proj_weight``
# or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``, and optionally ``in_proj_bias``, ``bias_k``,
# ``bias_v``, ``out_proj.weight``, ``out_proj.bias``. Masks are in the oracle's polarity: bool keep-masks
# (True = may attend) or additive floats; ``attn_mask`` is (L, S) or (N * Nh, L, S), key_padding_mask
# (N, S). Dimension key: Nh heads, D = E // Nh head width, S_total keys after bias_kv / zero_attn.
# ---------------------------------------------------------------------------------------------------


def _in_projection_weights(params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if "in_proj_weight" in params:
        return tuple(np.split(np.asarray(params["in_proj_weight"], np.float64), 3, axis=0))
    return tuple(
        np.asarray(params[n], np.float64) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    )


def _in_projection_biases(params, E: int):
    if params.get("in_proj_bias") is None:
        return (np.zeros(E),) * 3
    return tuple(np.split(np.asarray(params["in_proj_bias"], np.float64), 3))


def mha_merged_mask(attn_mask, key_padding_mask, N: int, num_heads: int, L: int, S: int, pad: int):
    """attn_mask and key_padding_mask as one oracle mask broadcastable to ``(N, Nh, L, S + pad)``.

    Both bool: their logical AND. Otherwise additive: bool becomes 0 / -inf and the two are summed (what
    torch does). The ``pad`` appended keys (bias_k, zero attention) are never masked.
    """
    masks = []
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        masks.append(m.reshape(N, num_heads, L, S) if m.ndim == 3 else m)
    if key_padding_mask is not None:
        masks.append(np.asarray(key_padding_mask).reshape(N, 1, 1, S))
    if not masks:
        return None
    masks = [
        np.concatenate([m, np.full((*m.shape[:-1], pad), m.dtype == bool, m.dtype)], axis=-1) for m in masks
    ]
    if all(m.dtype == bool for m in masks):
        return np.logical_and.reduce(np.broadcast_arrays(*masks))
    additive = [np.where(m, 0.0, -np.inf) if m.dtype == bool else m.astype(np.float64) for m in masks]
    return sum(additive[1:], additive[0])


def mha_forward(
    query,
    key,
    value,
    params,
    num_heads: int,
    attn_mask=None,
    key_padding_mask=None,
    add_zero_attn: bool = False,
    dropout_mask=None,
    dropout_p: float = 0.0,
    dtype=None,
    is_causal: bool = False,
):
    """torch's MultiheadAttention forward: in-projections, heads, SDPA, out-projection.

    ``is_causal``: top-left causal over every key, the appended bias_k / zero key included, in place of any
    mask: what torch does with the hint when no key_padding_mask is given and no weights are asked for (the
    caller applies that rule; ``F.multi_head_attention_forward`` otherwise applies the mask, hint dropped).

    Args:
      dropout_mask: bool keep-mask of the per-head weights ``(N, Nh, L, S_total)`` or None.
      dtype: None for the float64 oracle; a low-precision name for the naive same-dtype baseline.

    Returns:
      dict with ``out (N, L, E)``, ``weights (N, Nh, L, S_total)`` (post-dropout, per head) and the
      intermediates ``q``, ``k``, ``v`` (heads split, ``(N, Nh, ·, D)``), ``mask``, ``heads (N, L, E)``.
    """
    r = _rounder(dtype)
    query, key, value = r(query), r(key), r(value)
    w_q, w_k, w_v = (r(w) for w in _in_projection_weights(params))
    E = w_q.shape[0]
    N, L, S, Nh, D = query.shape[0], query.shape[1], key.shape[1], num_heads, E // num_heads
    b_q, b_k, b_v = (r(b) for b in _in_projection_biases(params, E))

    q = r(r(query @ w_q.T) + b_q)  # (N, L, E)
    k = r(r(key @ w_k.T) + b_k)  # (N, S, E)
    v = r(r(value @ w_v.T) + b_v)
    if params.get("bias_k") is not None:
        k = np.concatenate([k, np.broadcast_to(r(params["bias_k"]).reshape(1, 1, E), (N, 1, E))], axis=1)
        v = np.concatenate([v, np.broadcast_to(r(params["bias_v"]).reshape(1, 1, E), (N, 1, E))], axis=1)
    # Head h owns features [h * D, (h + 1) * D).
    q = q.reshape(N, L, Nh, D).transpose(0, 2, 1, 3)
    k = k.reshape(N, -1, Nh, D).transpose(0, 2, 1, 3)
    v = v.reshape(N, -1, Nh, D).transpose(0, 2, 1, 3)
    if add_zero_attn:
        k = np.concatenate([k, np.zeros((N, Nh, 1, D))], axis=2)
        v = np.concatenate([v, np.zeros((N, Nh, 1, D))], axis=2)
    mask = mha_merged_mask(attn_mask, key_padding_mask, N, Nh, L, S, k.shape[2] - S)
    if is_causal:
        mask = causal_keep(L, k.shape[2])

    attn = sdpa_forward(q, k, v, mask, dropout_mask=dropout_mask, dropout_p=dropout_p, dtype=dtype)
    heads = attn["out"].transpose(0, 2, 1, 3).reshape(N, L, E)
    out = r(heads @ r(params["out_proj.weight"]).T)
    if params.get("out_proj.bias") is not None:
        out = r(out + r(params["out_proj.bias"]))
    return {"out": out, "weights": attn["weights"], "q": q, "k": k, "v": v, "mask": mask, "heads": heads}


def mha_backward(
    query,
    key,
    value,
    params,
    num_heads: int,
    dout,
    attn_mask=None,
    key_padding_mask=None,
    add_zero_attn: bool = False,
    dropout_mask=None,
    dropout_p: float = 0.0,
    dtype=None,
    is_causal: bool = False,
):
    """Gradients of ``sum(out * dout)`` w.r.t. query, key, value and every parameter, by hand.

    Returns:
      dict with ``dquery``, ``dkey``, ``dvalue`` and ``d<param name>`` (e.g. ``din_proj_weight``,
      ``dout_proj.weight``) for each parameter in ``params``, each in its input's shape.
    """
    r = _rounder(dtype)
    fwd = mha_forward(
        query, key, value, params, num_heads, attn_mask, key_padding_mask, add_zero_attn,
        dropout_mask, dropout_p, dtype, is_causal,
    )  # fmt: skip
    query, key, value, dout = r(query), r(key), r(value), r(dout)
    w_q, w_k, w_v = (r(w) for w in _in_projection_weights(params))
    E = w_q.shape[0]
    N, L, S, Nh, D = query.shape[0], query.shape[1], key.shape[1], num_heads, E // num_heads
    w_o = r(params["out_proj.weight"])
    grads = {}

    # out = heads @ w_o.T + b_o
    grads["dout_proj.weight"] = r(np.einsum("nle,nlf->ef", dout, fwd["heads"]))
    if params.get("out_proj.bias") is not None:
        grads["dout_proj.bias"] = r(dout.sum(axis=(0, 1)))
    dheads = r(dout @ w_o).reshape(N, L, Nh, D).transpose(0, 2, 1, 3)

    attn = sdpa_backward(
        fwd["q"], fwd["k"], fwd["v"], dheads, fwd["mask"],
        dropout_mask=dropout_mask, dropout_p=dropout_p, dtype=dtype,
    )  # fmt: skip
    dq, dk, dv = attn["dq"], attn["dk"], attn["dv"]
    if add_zero_attn:  # the zero key/value is a constant
        dk, dv = dk[:, :, :-1], dv[:, :, :-1]
    dq = dq.transpose(0, 2, 1, 3).reshape(N, L, E)
    dk = dk.transpose(0, 2, 1, 3).reshape(N, -1, E)
    dv = dv.transpose(0, 2, 1, 3).reshape(N, -1, E)
    if params.get("bias_k") is not None:  # bias_k/bias_v were broadcast over the batch
        grads["dbias_k"] = r(dk[:, S].sum(axis=0)).reshape(1, 1, E)
        grads["dbias_v"] = r(dv[:, S].sum(axis=0)).reshape(1, 1, E)
        dk, dv = dk[:, :S], dv[:, :S]

    # q = query @ w_q.T + b_q, and likewise for k, v.
    dw = [r(np.einsum("nle,nlf->ef", g, x)) for g, x in ((dq, query), (dk, key), (dv, value))]
    if "in_proj_weight" in params:
        grads["din_proj_weight"] = np.concatenate(dw, axis=0)
    else:
        grads["dq_proj_weight"], grads["dk_proj_weight"], grads["dv_proj_weight"] = dw
    if params.get("in_proj_bias") is not None:
        grads["din_proj_bias"] = np.concatenate([r(g.sum(axis=(0, 1))) for g in (dq, dk, dv)])
    grads["dquery"] = r(dq @ w_q)
    grads["dkey"] = r(dk @ w_k)
    grads["dvalue"] = r(dv @ w_v)
    return grads


# ----------------------------------------------------------------------------------------------------------
# Causal self-attention (the GPT-style module of ``jax_attn.causal`` / ``torch_attn.causal``)
#
# Dimension key: B batch, T tokens, E model width, N query heads, K key/value heads, H = E // N head width,
# G = N // K. Parameters are keyed like the twins' state dicts, in torch's nn.Linear layout (out, in):
# ``q_proj.weight (N·H, E)``, ``k_proj.weight (K·H, E)``, ``v_proj.weight (K·H, E)``,
# ``out_proj.weight (E, N·H)`` and ``<proj>.bias`` when present. Composed from sdpa_forward/sdpa_backward
# (``is_causal=True``, ``groups=G``) and plain matrix products; ``dtype=`` gives the naive baseline.
# ----------------------------------------------------------------------------------------------------------


def _linear(x, params, proj, r):
    """``x @ W.T + b`` for the projection ``proj``, rounding after each operation."""
    y = r(x @ np.asarray(params[f"{proj}.weight"], np.float64).T)
    bias = params.get(f"{proj}.bias")
    return y if bias is None else r(y + np.asarray(bias, np.float64))


def _split_heads(x_BTF, heads):
    B, T, F = x_BTF.shape
    return x_BTF.reshape(B, T, heads, F // heads).transpose(0, 2, 1, 3)


def _merge_heads(x_BNTH):
    B, N, T, H = x_BNTH.shape
    return x_BNTH.transpose(0, 2, 1, 3).reshape(B, T, N * H)


def causal_self_attention_forward(
    x, params, num_heads, num_kv_heads=None, dropout_mask=None, dropout_p=0.0, dtype=None
):
    """Output of causal self-attention over the whole sequence ``x (B, T, E)``.

    Args:
      params: ``{name: array}`` as described above; dropout_mask: bool ``(B, N, T, T)`` keep-mask of the
        attention weights (kept weights scaled by ``1 / (1 - dropout_p)``).

    Returns:
      dict with ``out (B, T, E)`` and the intermediates ``q (B, N, T, H)``, ``k``, ``v (B, K, T, H)``,
      ``o (B, T, N·H)`` (the heads' outputs, merged, before ``out_proj``).
    """
    r = _rounder(dtype)
    K = num_heads if num_kv_heads is None else num_kv_heads
    x = r(x)
    q = _split_heads(_linear(x, params, "q_proj", r), num_heads)
    k = _split_heads(_linear(x, params, "k_proj", r), K)
    v = _split_heads(_linear(x, params, "v_proj", r), K)
    heads = sdpa_forward(
        q,
        k,
        v,
        is_causal=True,
        groups=num_heads // K,
        dropout_mask=dropout_mask,
        dropout_p=dropout_p,
        dtype=dtype,
    )
    o = _merge_heads(heads["out"])
    return {"out": _linear(o, params, "out_proj", r), "q": q, "k": k, "v": v, "o": o}


def causal_self_attention_backward(
    x, params, dy, num_heads, num_kv_heads=None, dropout_mask=None, dropout_p=0.0, dtype=None
):
    """Gradients of ``sum(out * dy)`` with respect to ``x`` and every parameter.

    Returns:
      dict with ``x`` (x's shape) and one entry per parameter name (its shape), plus the intermediates
      ``dq (B, T, N·H)``, ``dk``, ``dv (B, T, K·H)`` (gradients at the projections' outputs) and ``o``,
      which the tolerance policy uses to size gradient terms.
    """
    r = _rounder(dtype)
    K = num_heads if num_kv_heads is None else num_kv_heads
    fwd = causal_self_attention_forward(x, params, num_heads, K, dropout_mask, dropout_p, dtype)
    x, dy = r(x), r(dy)
    E = x.shape[-1]
    w = {name: np.asarray(p, np.float64) for name, p in params.items()}

    grads = {}
    o2, dy2 = fwd["o"].reshape(-1, fwd["o"].shape[-1]), dy.reshape(-1, E)
    grads["out_proj.weight"] = r(dy2.T @ o2)
    if "out_proj.bias" in w:
        grads["out_proj.bias"] = r(dy2.sum(axis=0))
    do = _split_heads(r(dy @ w["out_proj.weight"]), num_heads)
    heads = sdpa_backward(
        fwd["q"],
        fwd["k"],
        fwd["v"],
        do,
        is_causal=True,
        groups=num_heads // K,
        dropout_mask=dropout_mask,
        dropout_p=dropout_p,
        dtype=dtype,
    )
    d_proj = {"q_proj": heads["dq"], "k_proj": heads["dk"], "v_proj": heads["dv"]}
    x2 = x.reshape(-1, E)
    dx = None
    for proj, d_BNTH in d_proj.items():
        d_BTF = _merge_heads(d_BNTH)
        d2 = d_BTF.reshape(-1, d_BTF.shape[-1])
        grads[f"{proj}.weight"] = r(d2.T @ x2)
        if f"{proj}.bias" in w:
            grads[f"{proj}.bias"] = r(d2.sum(axis=0))
        term = r(d_BTF @ w[f"{proj}.weight"])
        dx = term if dx is None else r(dx + term)
        grads[f"d{proj[0]}"] = d_BTF
    grads["x"] = dx
    grads["o"] = fwd["o"]
    return grads
