"""Scaled dot-product attention with torch's signature and semantics (PyTorch twin of
``jax_attn/functional.py``). This is our own math, not a call to ``F.scaled_dot_product_attention``.

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
- ``implementation=None`` (the default, also ``"auto"``) picks math, blocked or fused per call by the rule
  of ``attn_spec.dispatch`` (:func:`select_implementation` says which and why; logged at DEBUG).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from attn_spec import check_implementation, check_sdpa
from attn_spec.blocks import block_sizes
from attn_spec.dispatch import AUTO, Choice, select
from torch_attn.engine import block_attention
from torch_attn.masks import causal_mask

logger = logging.getLogger(__name__)


def _spec(x) -> tuple[tuple[int, ...], str] | None:
    return None if x is None else (tuple(x.shape), str(x.dtype).removeprefix("torch."))


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


def _compute_dtype(dtype) -> torch.dtype:
    # Low precision is upcast: fp32 logits/softmax is what keeps bf16 attention accurate.
    return torch.promote_types(dtype, torch.float32)


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis that ignores masked keys and returns zeros for rows with no key left.

    Masked entries become -inf; the row maximum is taken over what remains and replaced by 0 where the
    whole row is -inf, so ``exp`` gives exact zeros instead of ``exp(-inf - -inf) = NaN``, and the
    denominator is replaced by 1 where it is 0. Gradients through such rows are zeros.
    """
    if keep is not None:
        logits = torch.where(keep, logits, -torch.inf)
    row_max = torch.amax(logits, dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    unnormalized = torch.exp(logits - row_max)
    total = torch.sum(unnormalized, dim=-1, keepdim=True)
    return unnormalized / torch.where(total == 0.0, 1.0, total)


def scaled_dot_product_attention_with_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    dropout_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    implementation: str = "math",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scaled_dot_product_attention` that also returns the attention weights.

    Returns:
      ``(output, weights)``: output ``(..., T, V)`` and weights ``(..., T, S)`` (after dropout, as
      torch's ``nn.MultiheadAttention`` returns them), both in the query's dtype.

    Only ``implementation="math"`` materialises the weights; any other value raises ``ValueError``.
    """
    check_implementation(implementation, dropout_p=dropout_p, need_weights=True)
    shapes = _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_mask)
    ct = _compute_dtype(query.dtype)
    q_TH, k_SH, v_SV = query.to(ct), key.to(ct), value.to(ct)
    if shapes.groups > 1:
        # torch's enable_gqa semantics: query head n uses key/value head n // G (repeat_interleave).
        k_SH = torch.repeat_interleave(k_SH, shapes.groups, dim=-3)
        v_SV = torch.repeat_interleave(v_SV, shapes.groups, dim=-3)
    scale = 1.0 / (shapes.H**0.5) if scale is None else scale
    logits_TS = torch.einsum("...th,...sh->...ts", q_TH, k_SH) * scale

    keep_TS = None
    if is_causal:
        keep_TS = causal_mask(shapes.T, shapes.S, device=query.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep_TS = attn_mask
        else:
            logits_TS = logits_TS + attn_mask.to(ct)
    weights_TS = masked_softmax(logits_TS, keep_TS)

    if dropout_p > 0.0:
        if dropout_mask is None:
            draw = torch.rand(shapes.logits, generator=generator, device=query.device)
            dropout_mask = draw >= dropout_p
        weights_TS = torch.where(dropout_mask, weights_TS / (1.0 - dropout_p), 0.0)
    out_TV = torch.einsum("...ts,...sv->...tv", weights_TS, v_SV)
    return out_TV.to(query.dtype), weights_TS.to(query.dtype)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    dropout_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    implementation: str | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, written out as readable math.

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
      generator: ``torch.Generator`` for the random draw (the JAX twin takes ``dropout_rng``); the global
        generator when None.
      implementation: None (default) or ``"auto"``: chosen from the call's shapes, device, mask and
        dropout by :func:`select_implementation` (math for dropout, fused on CPU and CUDA, else math for
        small problems and blocked for large ones). Or explicitly ``"math"`` (the readable reference
        above), ``"blocked"`` (online softmax over query/key blocks, causal blocks above the diagonal
        skipped, memory bounded by one block; no dropout) or ``"fused"``
        (``F.scaled_dot_product_attention``, torch picks the kernel; no dropout). Unsupported explicit
        combinations raise.

    Returns:
      ``(..., T, V)`` in the query's dtype.
    """
    shapes = None
    if implementation in AUTO:  # one check serves the choice and the fast path
        shapes = _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_mask)
        implementation = _select(shapes, query.device, attn_mask, dropout_p, False).implementation
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
            generator=generator,
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

    Takes the arguments of :func:`scaled_dot_product_attention` plus ``need_weights``; nothing is computed
    (tensors on the ``meta`` device or ``expand``-ed ones will do). Bad arguments raise the same
    ``ValueError`` as the call. The rule is :func:`attn_spec.dispatch.select`; this twin's own fact is
    whether ``F.scaled_dot_product_attention`` is the fast path: on ``cpu`` and ``cuda`` tensors, where
    torch ships fused kernels (flash on CPU; flash, memory-efficient and cuDNN on CUDA). The choice is
    logged at DEBUG.

    Returns:
      :class:`attn_spec.dispatch.Choice`: ``implementation`` (``"math"``, ``"blocked"`` or ``"fused"``)
      and ``reason``.
    """
    shapes = _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_mask)
    return _select(shapes, query.device, attn_mask, dropout_p, need_weights)


#: Choices whose warning was logged already (each distinct warning once per process).
_WARNED: set[str] = set()


def _select(
    shapes, device, attn_mask, dropout_p, need_weights, name="scaled_dot_product_attention"
) -> Choice:
    """:func:`attn_spec.dispatch.select` on this call's facts; logs the choice (DEBUG) and its warning."""
    fused = "F.scaled_dot_product_attention" if torch.device(device).type in ("cpu", "cuda") else None
    choice = select(
        logits=math.prod(shapes.logits),
        need_weights=need_weights,
        dropout=dropout_p > 0.0,
        float_mask=attn_mask is not None and attn_mask.dtype != torch.bool,
        fused=fused,
    )
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
        q = query.expand(*lead, N, T, H).reshape(-1, K, G, T, H)
        k = key.expand(*lead, K, S, H).reshape(-1, K, S, H)
        v = value.expand(*lead, K, S, V).reshape(-1, K, S, V)
    else:
        q = query.expand(*shapes.batch, T, H).reshape(-1, 1, 1, T, H)
        k = key.expand(*shapes.batch, S, H).reshape(-1, 1, S, H)
        v = value.expand(*shapes.batch, S, V).reshape(-1, 1, S, V)
    mask = None
    if attn_mask is not None:
        rank = len(shapes.batch) + 2
        m = attn_mask.reshape((1,) * (rank - attn_mask.ndim) + tuple(attn_mask.shape))
        Tm, Sm = m.shape[-2:]
        if all(d == 1 for d in m.shape[:-2]):
            mask = m.reshape(1, 1, 1, Tm, Sm)  # one mask for every batch and head: keep it small
        else:
            mask = m.expand(*shapes.batch, Tm, Sm).reshape(q.shape[0], q.shape[1], q.shape[2], Tm, Sm)
    return q, k, v, mask


def _blocked_attention(query, key, value, attn_mask, is_causal, scale, shapes):
    """Flash-attention style SDPA on the blocked engine (:func:`torch_attn.engine.block_attention`, its
    dense plan, as in the JAX twin): for each block of ``bt`` queries, an online softmax over blocks of
    ``bs`` keys. With ``is_causal`` key blocks wholly above the diagonal are never computed. Memory
    (forward and backward): one block of logits per step; the backward is the engine's custom autograd
    Function, which recomputes each block's probabilities from the saved row max and sum (as the JAX twin's
    custom VJP) and gives a float mask its gradient."""
    ct = _compute_dtype(query.dtype)
    T, S = shapes.T, shapes.S
    q, k, v, mask = _grouped(query.to(ct), key.to(ct), value.to(ct), attn_mask, shapes)
    bt, bs = block_sizes(T, S, bool(is_causal))  # shared with the JAX twin
    out, _ = block_attention(
        q, k, v, None, T=T, S=S, bt=bt, bs=bs, scale=scale, causal=bool(is_causal), mask=mask
    )
    return out.reshape(shapes.out).to(query.dtype)


def fused_backend(dtype) -> str:
    """What ``implementation="fused"`` runs: ``F.scaled_dot_product_attention``, kernel chosen by torch
    (the JAX twin names ``"cudnn"`` or ``"xla"``)."""
    return "F.scaled_dot_product_attention"


def _fused_attention(query, key, value, attn_mask, is_causal, scale, shapes):
    """``F.scaled_dot_product_attention`` with our semantics around it: computed in at least float32 on
    CPU, and rows with no key left are zeroed (its math backend would return NaN there)."""
    logger.info("scaled_dot_product_attention(implementation='fused'): F.scaled_dot_product_attention")
    ct = _compute_dtype(query.dtype) if query.device.type == "cpu" else query.dtype
    q, k, v = query.to(ct), key.to(ct), value.to(ct)
    mask = attn_mask
    if mask is not None and mask.dim() == 1:
        mask = mask[None]  # F.sdpa rejects rank-1 masks (IndexError); (1, S) broadcasts the same
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(ct)
    if mask is not None and is_causal:
        # F.sdpa takes one or the other: fold the causal mask into the given one
        keep = causal_mask(shapes.T, shapes.S, device=q.device)
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, -torch.inf)
        is_causal = False
    out = F.scaled_dot_product_attention(
        q, k, v, mask, 0.0, is_causal, scale=scale, enable_gqa=shapes.groups > 1
    )
    if mask is not None:
        has_key = (mask if mask.dtype == torch.bool else mask > -torch.inf).any(dim=-1, keepdim=True)
        out = torch.where(has_key, torch.nan_to_num(out), 0.0)
    return out.to(query.dtype)
