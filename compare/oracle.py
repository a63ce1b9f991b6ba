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
    """Identity for float64; otherwise round each intermediate to ``dtype`` (kept in float64)."""
    if dtype in (None, "float64"):
        return lambda x: np.asarray(x, np.float64)
    np_dtype = LOW_PRECISION.get(dtype, np.float32 if dtype == "float32" else None)
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
