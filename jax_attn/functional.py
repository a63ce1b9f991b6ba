"""Scaled dot-product attention with torch's signature and semantics (JAX twin of
``torch_attn/functional.py``).

Dimension key (see ``attn_spec``): ``...`` leading batch/head dimensions, T query length, S key length,
H query/key head width, V value head width, G query heads per key/value head.

Semantics, identical in both twins:
- ``attn_mask`` bool: True = may attend (SDPA polarity). Float: added to the logits. It broadcasts to
  ``(..., T, S)``.
- ``is_causal``: top-left aligned, as torch (query t sees keys ``s <= t`` even when T != S). Combining it
  with ``attn_mask`` raises, as torch 2.13 does; pass ``causal_mask(T, S) & mask`` instead.
- A row whose keys are all masked returns zeros, and its gradients are zeros (never NaN), in every dtype.
  torch's fused CPU kernel does the same; its math reference gives NaN.
- Logits, softmax and the weighted sum are computed in float32 (or float64 for float64 inputs) and the
  result is cast back, so bf16/fp16 keep fp32 accuracy inside.
- Dropout is applied whenever ``dropout_p > 0`` (torch's functional applies it in eval mode too). For
  agreement across frameworks, pass the same bool keep-mask as ``dropout_mask`` on both sides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_spec import check_sdpa
from jax_attn.masks import causal_mask


def _spec(x) -> tuple[tuple[int, ...], str] | None:
    return None if x is None else (tuple(x.shape), jnp.dtype(x.dtype).name)


def _compute_dtype(dtype) -> jnp.dtype:
    # Low precision is upcast: fp32 logits/softmax is what keeps bf16 attention accurate.
    return jnp.promote_types(dtype, jnp.float32)


def masked_softmax(logits: jnp.ndarray, keep: jnp.ndarray | None) -> jnp.ndarray:
    """Softmax over the last axis that ignores masked keys and returns zeros for rows with no key left.

    Masked entries become -inf; the row maximum is taken over what remains and replaced by 0 where the
    whole row is -inf, so ``exp`` gives exact zeros instead of ``exp(-inf - -inf) = NaN``, and the
    denominator is replaced by 1 where it is 0. Gradients through such rows are zeros.
    """
    if keep is not None:
        logits = jnp.where(keep, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnormalized = jnp.exp(logits - row_max)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / jnp.where(total == 0.0, 1.0, total)


def scaled_dot_product_attention_with_weights(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    attn_mask: jnp.ndarray | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    dropout_mask: jnp.ndarray | None = None,
    dropout_rng: jax.Array | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """:func:`scaled_dot_product_attention` that also returns the attention weights.

    Returns:
      ``(output, weights)``: output ``(..., T, V)`` and weights ``(..., T, S)`` (after dropout, as
      torch's ``nn.MultiheadAttention`` returns them), both in the query's dtype.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    attn_mask = None if attn_mask is None else jnp.asarray(attn_mask)
    dropout_mask = None if dropout_mask is None else jnp.asarray(dropout_mask)
    shapes = check_sdpa(
        query=_spec(query),
        key=_spec(key),
        value=_spec(value),
        attn_mask=_spec(attn_mask),
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
        dropout_mask=_spec(dropout_mask),
        needs_rng=dropout_rng is None,
    )
    ct = _compute_dtype(query.dtype)
    q_TH, k_SH, v_SV = query.astype(ct), key.astype(ct), value.astype(ct)
    if shapes.groups > 1:
        # torch's enable_gqa semantics: query head n uses key/value head n // G (repeat_interleave).
        k_SH = jnp.repeat(k_SH, shapes.groups, axis=-3)
        v_SV = jnp.repeat(v_SV, shapes.groups, axis=-3)
    scale = 1.0 / (shapes.H**0.5) if scale is None else scale
    logits_TS = jnp.einsum("...th,...sh->...ts", q_TH, k_SH) * scale

    keep_TS = None
    if is_causal:
        keep_TS = causal_mask(shapes.T, shapes.S)
    if attn_mask is not None:
        if attn_mask.dtype == jnp.bool_:
            keep_TS = attn_mask
        else:
            logits_TS = logits_TS + attn_mask.astype(ct)
    weights_TS = masked_softmax(logits_TS, keep_TS)

    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = jax.random.bernoulli(dropout_rng, 1.0 - dropout_p, shapes.logits)
        weights_TS = jnp.where(dropout_mask, weights_TS / (1.0 - dropout_p), 0.0)
    out_TV = jnp.einsum("...ts,...sv->...tv", weights_TS, v_SV)
    return out_TV.astype(query.dtype), weights_TS.astype(query.dtype)


def scaled_dot_product_attention(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    attn_mask: jnp.ndarray | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    dropout_mask: jnp.ndarray | None = None,
    dropout_rng: jax.Array | None = None,
) -> jnp.ndarray:
    """``torch.nn.functional.scaled_dot_product_attention`` in JAX.

    Args:
      query: ``(..., T, H)``. key: ``(..., S, H)``. value: ``(..., S, V)``. Leading dimensions broadcast;
        with ``enable_gqa=True`` axis -3 holds heads and key/value may have fewer (a divisor).
      attn_mask: bool ``(..., T, S)`` keep-mask (True = may attend) or float additive mask; broadcasts.
      dropout_p: probability of dropping an attention weight; applied whenever > 0.
      is_causal: top-left causal masking; cannot be combined with ``attn_mask``.
      scale: logit scale; default ``1 / sqrt(H)``.
      enable_gqa: repeat each key/value head over ``G = query heads / kv heads`` query heads.
      dropout_mask: bool keep-mask broadcastable to ``(..., T, S)``; replaces the random draw so that two
        frameworks drop the same weights. Kept weights are scaled by ``1 / (1 - dropout_p)``.
      dropout_rng: ``jax.random`` key; required when ``dropout_p > 0`` and no ``dropout_mask`` is given.

    Returns:
      ``(..., T, V)`` in the query's dtype.
    """
    out, _ = scaled_dot_product_attention_with_weights(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        dropout_mask=dropout_mask,
        dropout_rng=dropout_rng,
    )
    return out
