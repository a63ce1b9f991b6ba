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
  result is cast back, so bf16/fp16 keep fp32 accuracy inside. Exception: the explicit ``"fused"`` path,
  whose ``jax.nn.dot_product_attention`` takes the softmax in float32 for float64 inputs too.
- Dropout is applied whenever ``dropout_p > 0`` (torch's functional applies it in eval mode too). For
  agreement across frameworks, pass the same bool keep-mask as ``dropout_mask`` on both sides.
- ``implementation=None`` (the default, also ``"auto"``) picks math, blocked or fused per call by the rule
  of ``attn_spec.dispatch`` (:func:`select_implementation` says which and why; logged at DEBUG).
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

from attn_spec import check_implementation, check_sdpa
from attn_spec.blocks import block_sizes
from attn_spec.dispatch import AUTO, Choice, select
from jax_attn.engine import block_attention, native_reason
from jax_attn.masks import causal_mask
from jax_attn.native import NAME as NATIVE_NAME

logger = logging.getLogger(__name__)


def _spec(x) -> tuple[tuple[int, ...], str] | None:
    return None if x is None else (tuple(x.shape), jnp.dtype(x.dtype).name)


def _check(
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_mask, needs_rng=False
):
    """The shared ``attn_spec`` checks on this framework's arrays; returns the derived shapes."""
    return check_sdpa(
        query=_spec(query),
        key=_spec(key),
        value=_spec(value),
        attn_mask=_spec(attn_mask),
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
        dropout_mask=_spec(dropout_mask),
        needs_rng=needs_rng,
    )


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
    implementation: str = "math",
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """:func:`scaled_dot_product_attention` that also returns the attention weights.

    Returns:
      ``(output, weights)``: output ``(..., T, V)`` and weights ``(..., T, S)`` (after dropout, as
      torch's ``nn.MultiheadAttention`` returns them), both in the query's dtype.

    Only ``implementation="math"`` materialises the weights; any other value raises ``ValueError``.
    """
    check_implementation(implementation, dropout_p=dropout_p, need_weights=True)
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    attn_mask = None if attn_mask is None else jnp.asarray(attn_mask)
    dropout_mask = None if dropout_mask is None else jnp.asarray(dropout_mask)
    shapes = _check(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        dropout_mask,
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
    implementation: str | None = None,
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
      implementation: None (default) or ``"auto"``: chosen from the call's shapes, dtype, device, mask
        and dropout by :func:`select_implementation` (math for dropout or small problems, blocked for
        large ones, fused for cuDNN's fp16/bf16 GPU kernel). Or explicitly ``"math"`` (the readable
        reference above), ``"blocked"`` (online softmax over query/key blocks, causal blocks above the
        diagonal skipped, memory bounded by one block; no dropout) or
        ``"fused"`` (``jax.nn.dot_product_attention``: cuDNN on a GPU for fp16/bf16, XLA otherwise, see
        :func:`fused_backend`; no dropout). Unsupported explicit combinations raise.

    Returns:
      ``(..., T, V)`` in the query's dtype.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    attn_mask = None if attn_mask is None else jnp.asarray(attn_mask)
    shapes = None
    if implementation in AUTO:  # one check serves the choice and the fast path
        shapes = _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_mask)
        implementation = _select(shapes, query.dtype, attn_mask, dropout_p, False).implementation
    check_implementation(implementation, dropout_p=dropout_p, need_weights=False)
    if implementation == "math":
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
    if shapes is None:
        shapes = _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_mask)
    return _fast_attention(query, key, value, attn_mask, is_causal, scale, shapes, implementation)


def select_implementation(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    dropout_mask=None,
    need_weights: bool = False,
) -> Choice:
    """What ``scaled_dot_product_attention(..., implementation=None)`` runs for these arguments, and why.

    Takes the arguments of :func:`scaled_dot_product_attention` (anything with ``shape`` and ``dtype``
    will do, e.g. ``jax.ShapeDtypeStruct``: nothing is computed) plus ``need_weights``. Bad arguments raise
    the same ``ValueError`` as the call. The rule is :func:`attn_spec.dispatch.select`; this twin's own
    fact is whether cuDNN's fused kernel applies (:func:`fused_backend` ``== "cudnn"`` and head widths
    that are a multiple of 8, at most 128). The choice is logged at DEBUG.

    Returns:
      :class:`attn_spec.dispatch.Choice`: ``implementation`` (``"math"``, ``"blocked"`` or ``"fused"``)
      and ``reason``.
    """
    shapes = _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_mask)
    return _select(shapes, query.dtype, attn_mask, dropout_p, need_weights)


#: Choices whose warning was logged already (each distinct warning once per process).
_WARNED: set[str] = set()


def _select(shapes, dtype, attn_mask, dropout_p, need_weights, name="scaled_dot_product_attention") -> Choice:
    """:func:`attn_spec.dispatch.select` on this call's facts; logs the choice (DEBUG) and its warning."""
    width = max(shapes.H, shapes.V)
    fused = None
    if fused_backend(dtype) == "cudnn" and width % 8 == 0 and width <= 128:
        fused = "jax.nn.dot_product_attention[cudnn]"
    choice = select(
        logits=math.prod(shapes.logits),
        need_weights=need_weights,
        dropout=dropout_p > 0.0,
        float_mask=attn_mask is not None and jnp.dtype(attn_mask.dtype) != jnp.bool_,
        fused=fused,
    )
    if choice.implementation == "blocked" and not native_reason(_compute_dtype(dtype), mask=attn_mask):
        choice = Choice("blocked", f"{choice.reason}; runs on {NATIVE_NAME}", choice.warning)
    logger.debug("%s(implementation=None): %s", name, choice)
    if choice.warning and choice.warning not in _WARNED:
        _WARNED.add(choice.warning)
        logger.warning("%s: %s", name, choice.warning)
    return choice


def _fast_attention(query, key, value, attn_mask, is_causal, scale, shapes, implementation):
    """The checked inputs through a fast path. Unlike the public function this accepts ``is_causal`` and
    ``attn_mask`` together (their conjunction). ``MultiheadAttention`` passes its causal hint only where
    torch keeps it (no key_padding_mask, no weights), with no mask, so the blocked path skips the
    blocks above the diagonal."""
    scale = 1.0 / (shapes.H**0.5) if scale is None else scale
    if implementation == "blocked":
        return _blocked_attention(query, key, value, attn_mask, is_causal, scale, shapes)
    return _fused_attention(query, key, value, attn_mask, is_causal, scale, shapes)


# ------------------------------------------------------------------------------- fast paths
# Both take the checked inputs and return what the math path returns (fully-masked rows give zeros and
# zero gradients) without materialising attention weights.


def _grouped(query, key, value, attn_mask, shapes):
    """Inputs as ``q (Z, K, G, T, H)``, ``k (Z, K, S, H)``, ``v (Z, K, S, V)`` and the mask as
    ``(Z|1, K|1, G|1, T|1, S|1)``: Z flattens the leading dimensions, K the key/value heads. Query heads
    are grouped over their key/value head (reshape, never a repeated copy of K and V)."""
    T, S, H, V, G = shapes.T, shapes.S, shapes.H, shapes.V, shapes.groups
    if G > 1:
        lead, N = shapes.batch[:-1], shapes.batch[-1]
        K = N // G
        q = jnp.broadcast_to(query, (*lead, N, T, H)).reshape(-1, K, G, T, H)
        k = jnp.broadcast_to(key, (*lead, K, S, H)).reshape(-1, K, S, H)
        v = jnp.broadcast_to(value, (*lead, K, S, V)).reshape(-1, K, S, V)
    else:
        q = jnp.broadcast_to(query, (*shapes.batch, T, H)).reshape(-1, 1, 1, T, H)
        k = jnp.broadcast_to(key, (*shapes.batch, S, H)).reshape(-1, 1, S, H)
        v = jnp.broadcast_to(value, (*shapes.batch, S, V)).reshape(-1, 1, S, V)
    mask = None
    if attn_mask is not None:
        rank = len(shapes.batch) + 2
        m = attn_mask.reshape((1,) * (rank - attn_mask.ndim) + attn_mask.shape)
        Tm, Sm = m.shape[-2:]
        if all(d == 1 for d in m.shape[:-2]):
            mask = m.reshape(1, 1, 1, Tm, Sm)  # one mask for every batch and head: keep it small
        else:
            mask = jnp.broadcast_to(m, (*shapes.batch, Tm, Sm))
            mask = mask.reshape(q.shape[0], q.shape[1], q.shape[2], Tm, Sm)
    return q, k, v, mask


def _blocked_attention(query, key, value, attn_mask, is_causal, scale, shapes):
    """Flash-attention style SDPA on the blocked engine (:func:`jax_attn.engine.block_attention`, its
    dense plan): for each block of ``bt`` queries (all G query heads of a key/value head together), an
    online softmax over blocks of ``bs`` keys. With ``is_causal`` key blocks wholly above the diagonal are
    never computed. Memory: one block of logits per step instead of ``(..., T, S)``, forward and backward
    (a custom VJP that recomputes each block's probabilities). A float ``attn_mask`` receives its gradient.
    Block sizes: :func:`attn_spec.blocks.block_sizes`."""
    ct = _compute_dtype(query.dtype)
    T, S = shapes.T, shapes.S
    q, k, v, mask = _grouped(query.astype(ct), key.astype(ct), value.astype(ct), attn_mask, shapes)
    bt, bs = block_sizes(T, S, bool(is_causal))
    out, _ = block_attention(
        q, k, v, None, T=T, S=S, bt=bt, bs=bs, scale=scale, causal=bool(is_causal), mask=mask
    )
    return out.reshape(shapes.out).astype(query.dtype)


def fused_backend(dtype) -> str:
    """What ``implementation="fused"`` runs for inputs of ``dtype`` on the default device: ``"cudnn"``
    (GPU, fp16/bf16) or ``"xla"``."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def _fused_attention(query, key, value, attn_mask, is_causal, scale, shapes):
    """``jax.nn.dot_product_attention`` (layout ``(Z, T, N, H)``) with our semantics around it: a float
    mask's -inf entries become a bool mask (its bias alone would give NaN rows), and rows with no key left
    are zeroed (the kernel would return the mean of V there). Its softmax is float32 whatever the input
    dtype, so float64 inputs get float32 accuracy on this path (about 1e-8 relative, measured by
    ``tests/test_fuzz_sdpa.py``); math and blocked compute in float64."""
    backend = fused_backend(query.dtype)
    logger.info(
        "scaled_dot_product_attention(implementation='fused'): jax.nn.dot_product_attention[%s]", backend
    )
    ct = query.dtype if backend == "cudnn" else _compute_dtype(query.dtype)
    q, k, v, mask = _grouped(query.astype(ct), key.astype(ct), value.astype(ct), attn_mask, shapes)
    Z, K, G, T, H = q.shape
    q_ZTNH = q.reshape(Z, K * G, T, H).transpose(0, 2, 1, 3)
    k_ZSKH, v_ZSKV = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    # The kernel wants one head width for q, k and v: zero-pad the narrower side (exact: zero features
    # add nothing to the logits, zero value columns are sliced off).
    width = max(H, shapes.V)
    q_ZTNH, k_ZSKH = (jnp.pad(x, [(0, 0)] * 3 + [(0, width - H)]) for x in (q_ZTNH, k_ZSKH))
    v_ZSKV = jnp.pad(v_ZSKV, [(0, 0)] * 3 + [(0, width - shapes.V)])
    keep = bias = None
    if mask is not None:
        m = mask.reshape(mask.shape[0], mask.shape[1] * mask.shape[2], *mask.shape[3:])
        if m.dtype == jnp.bool_:
            keep = m
        else:
            keep = m > -jnp.inf
            bias = jnp.where(keep, m, 0.0).astype(ct)
        keep = jnp.broadcast_to(keep, (*keep.shape[:2], T, shapes.S))
    out = jax.nn.dot_product_attention(
        q_ZTNH, k_ZSKH, v_ZSKV, bias=bias, mask=keep, scale=scale, is_causal=is_causal, implementation=backend
    )
    if keep is not None:
        has_key = jnp.any(keep, axis=-1)  # (Z|1, N|1, T)
        out = jnp.where(has_key.transpose(0, 2, 1)[..., None], out, 0.0)
    out = out[..., : shapes.V].transpose(0, 2, 1, 3)  # (Z, N, T, V)
    return out.reshape(shapes.out).astype(query.dtype)
