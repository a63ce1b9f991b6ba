"""Modern decoder attention (PyTorch twin of ``jax_attn/attention.py``): rotary embeddings, grouped query
heads, QK-norm, a logit scale and soft-cap, sliding windows, learned sinks, padding masks and a KV cache
(a ring buffer for sliding-window layers), configured by one ``attn_spec.attention.AttentionConfig``.

Dimension key (see ``attn_spec``):

    B  batch                     E  model width (hidden_size)
    T  tokens in this call       N  query heads
    S  keys attended             K  key/value heads, G = N // K
    C  cache slots               H  head width (head_dim), R rotary width

Order of operations (as transformers' decoder layers): ``q/k/v_proj`` → ``qk_norm="full"`` norm →
split heads → ``qk_norm="head"`` norm → rotary on q and k → (cache) → attention → merge heads → ``o_proj``
(the norms are RMSNorms, or LayerNorms with ``qk_norm_kind="layer"``).

KV cache: ``cache = attn.init_cache(B, max_length)`` holds ``C`` slots: ``max_length``, or ``min(window,
max_length)`` for a sliding-window layer, used as a ring (slot = position mod C), so the memory of a window
layer is bounded by its window. Each slot stores its token's sequence index (``pos``, -1 when empty) and
whether it is a real token (``valid``), so masking is right after the ring wraps and for left-padded rows.
A call attends over the C cached slots and its own T tokens (S = C + T), then writes the last ``min(T, C)``
of them (``index_copy``: calls never modify the given cache, as in the JAX twin). Overflow (more than
``max_length`` tokens in all) raises ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attn_spec.attention import (
    FUSED_MASK_MAX,
    AttentionConfig,
    cache_slots,
    check_attention_mask,
    check_cache,
    check_dropout_mask,
    check_implementation,
    check_init_cache,
    check_input,
    check_kv_call,
    check_position_ids,
    check_shared_kv,
    check_state_dict,
    choose,
    qk_norm_shapes,
    state_dict_shapes,
)
from attn_spec.blocks import block_sizes
from attn_spec.dispatch import ChoiceLog, describe
from torch_attn.engine import block_attention
from torch_attn.flex import create_block_mask, flex_attention
from torch_attn.rope import apply_rope, rope_cos_sin


def _spec(x) -> tuple[tuple[int, ...], str]:
    return tuple(x.shape), str(x.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVCache:
    """Cached keys and values.

    Attributes:
      k, v: ``(B, K, C, H)``, rotated keys and values.
      pos: int64 ``(C,)``, the sequence index of the token in each slot, -1 for an empty slot.
      valid: bool ``(B, C)``, whether each slot holds a real (non-padding) token.
      index: int, the number of tokens seen so far.
      lead: int64 ``(B,)``, each row's padding tokens before its first real one (where chunks start).
      max_length: the most tokens the cache accepts.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    index: int
    lead: torch.Tensor
    max_length: int


@dataclass(frozen=True)
class SharedKV:
    """What a producer layer's call attended over (``attn(..., return_kv=True)``), for the key/value-sharing
    consumers of the same call (``AttentionConfig.kv_shared``; Gemma 4's ``shared_kv_states``).

    Attributes:
      k, v: ``(B, K, S, H)``, the normed and rotated keys and the values: the cache slots then this call's
        tokens (S = C + T), or this call's tokens (S = T) without a cache.
      pos: int64 ``(S,)``, each key's sequence index (-1: an empty cache slot).
      valid: bool ``(B, S)``, whether each key is a real token.
      q_pos: int64 ``(T,)``, the call's query sequence indices.
      lead: int64 ``(B,)``, each row's leading pads (where chunks start).
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    q_pos: torch.Tensor
    lead: torch.Tensor


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis without a weight (``qk_norm="unit"``, Llama 4), in float32, cast back."""
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + eps)).to(x.dtype)


def clamp(x: torch.Tensor, limit: float) -> torch.Tensor:
    """``x`` clamped to ``[-limit, limit]`` (the limit in x's dtype); gradient 1 inside the closed interval, 0
    outside (``torch.clamp``'s)."""
    return torch.clamp(x, -limit, limit)


def leading_pads(valid_BT: torch.Tensor) -> torch.Tensor:
    """int64 ``(B,)``: each row's padding tokens before its first real one."""
    return torch.sum(torch.cumsum(valid_BT.to(torch.int64), dim=1) == 0, dim=1)


def temperature_scales(config: AttentionConfig, index_T: torch.Tensor) -> torch.Tensor:
    """float32 ``(T,)``: Llama 4's query scales ``1 + attn_scale · log1p(floor((i + 1) / floor_scale))``
    for sequence indices i, in float32 as transformers computes them."""
    floor_scale, attn_scale = config.attn_temperature
    i = index_T.to(torch.float32)
    return torch.log1p(torch.floor((i + 1.0) / floor_scale)) * attn_scale + 1.0


def alibi_bias(config: AttentionConfig, q_pos_T: torch.Tensor, k_pos_S: torch.Tensor) -> torch.Tensor:
    """float32 ``(N, T, S)``: ``slope_n · (s - t)`` (``AttentionConfig.alibi_slopes``)."""
    slopes = torch.tensor(config.alibi_slopes, dtype=torch.float32, device=q_pos_T.device)[:, None, None]
    return slopes * (k_pos_S[None, None, :] - q_pos_T[None, :, None]).to(torch.float32)


def per_head(w: torch.Tensor) -> torch.Tensor:
    """A norm's weight or bias in float32, shaped for ``x (B, heads, T, H)``: a per-head ``(heads, H)`` one
    broadcast over the tokens; a 1-D one as it is."""
    w = w.to(torch.float32)
    return w[:, None, :] if w.ndim == 2 else w


class RMSNorm(nn.Module):
    """RMSNorm over the last axis in float32, scaled by ``offset + weight`` and cast back. ``size``: the
    weight's shape (an int: ``(size,)``; ``(heads, H)``: a weight per head of ``x (B, heads, T, H)``)."""

    def __init__(self, size: int | tuple[int, ...], eps: float, offset: float, *, device=None, dtype=None):
        super().__init__()
        self.eps, self.offset = eps, offset
        shape = (size,) if isinstance(size, int) else tuple(size)
        self.weight = nn.Parameter(torch.full(shape, 1.0 - offset, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        normed = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        return (normed * (self.offset + per_head(self.weight))).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in float32 (the mean subtracted, then divided by ``sqrt(variance +
    eps)``), scaled by ``offset + weight``, plus ``bias`` when it has one, and cast back once (as Cohere's
    ``CohereLayerNorm`` and torch's ``nn.LayerNorm`` on bf16 inputs compute it). ``size`` as in
    :class:`RMSNorm`; the bias has the weight's shape."""

    def __init__(
        self, size: int | tuple[int, ...], eps: float, offset: float, bias: bool, *, device=None, dtype=None
    ):
        super().__init__()
        self.eps, self.offset = eps, offset
        shape = (size,) if isinstance(size, int) else tuple(size)
        self.weight = nn.Parameter(torch.full(shape, 1.0 - offset, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        centered = x32 - torch.mean(x32, dim=-1, keepdim=True)
        normed = centered * torch.rsqrt(torch.mean(centered * centered, dim=-1, keepdim=True) + self.eps)
        y = normed * (self.offset + per_head(self.weight))
        if self.bias is not None:
            y = y + per_head(self.bias)
        return y.to(x.dtype)


def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T + bias`` as ``F.linear`` (addmm) computes it: the products summed in float32 (at least)
    with the bias added before the one rounding to x's dtype. In the backward the weight's gradient (a sum
    over the B·T rows) and the bias's (a row sum) are float32 reductions too, rounded once to the
    parameter's dtype (torch accumulates bf16/fp16 matmuls and sums in float32), as in the JAX twin."""
    return F.linear(x, linear.weight, linear.bias)


def attention_keep_mask(
    q_pos_T: torch.Tensor,
    k_pos_S: torch.Tensor,
    k_valid_BS: torch.Tensor,
    config: AttentionConfig,
    lead_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool ``(B, T, S)``, True = may attend: a filled, valid key slot, causal (key index ≤ query index),
    inside the window (distance < w; ``|distance| < w`` when bidirectional) and in the query's chunk
    (chunks counted from each row's ``lead_B`` padding tokens; None: none)."""
    q, k = q_pos_T[:, None], k_pos_S[None, :]
    keep_TS = k >= 0
    if config.causal:
        keep_TS = keep_TS & (k <= q)
    if config.sliding_window is not None:
        dist = q - k if config.causal else torch.abs(q - k)
        keep_TS = keep_TS & (dist < config.sliding_window)
    keep_BTS = keep_TS[None] & k_valid_BS[:, None, :]
    if config.chunk_size is not None:
        lead = 0 if lead_B is None else lead_B[:, None, None]
        keep_BTS = keep_BTS & (
            torch.div(q[None] - lead, config.chunk_size, rounding_mode="floor")
            == torch.div(k[None] - lead, config.chunk_size, rounding_mode="floor")
        )
    return keep_BTS


def dot_product_attention(
    q_BNTH: torch.Tensor,
    k_BKSH: torch.Tensor,
    v_BKSH: torch.Tensor,
    keep_BTS: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    sinks_N: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    bias_NTS: torch.Tensor | None = None,
) -> torch.Tensor:
    """The readable dense core: ``softmax(cap(scale · q·k) + bias masked, with sinks) · v`` in float32
    (float64 inputs: float64).

    Args:
      q_BNTH: queries; k_BKSH, v_BKSH: keys and values, key/value head ``n // G`` serving query head n.
      keep_BTS: bool, True = may attend. Fully masked rows give zeros.
      scale: the logit scale; softcap: ``c`` in ``c · tanh(x / c)``, applied before the mask.
      sinks_N: one logit per query head joining every row's softmax denominator, with no value.
      dropout_p, dropout_mask (bool keep-mask broadcastable to (B, N, T, S)), generator: weight dropout.
      bias_NTS: added to the (soft-capped) logits (ALiBi), or None.

    Returns:
      ``(B, N, T, H)`` in q's dtype.
    """
    B, N, T, H = q_BNTH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    G = N // K
    acc = torch.promote_types(q_BNTH.dtype, torch.float32)  # fp32 at least: bf16/fp16 logits never round
    q_BKGTH = q_BNTH.to(acc).reshape(B, K, G, T, H)
    logits = torch.einsum("bkgth,bksh->bkgts", q_BKGTH, k_BKSH.to(acc)) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if bias_NTS is not None:
        logits = logits + bias_NTS.to(acc).reshape(1, K, G, T, S)
    keep = keep_BTS[:, None, None]
    logits = logits.masked_fill(~keep, -torch.inf)
    m = torch.amax(logits, dim=-1, keepdim=True)
    if sinks_N is not None:
        sink = sinks_N.to(acc).reshape(1, K, G, 1, 1)
        m = torch.maximum(m, sink)
    m = torch.where(torch.isfinite(m), m, 0.0).detach()  # fully masked row: any shift works
    e = torch.where(keep, torch.exp(logits - m), 0.0)
    denom = torch.sum(e, dim=-1, keepdim=True)
    if sinks_N is not None:
        denom = denom + torch.exp(sink - m)
    p = e / torch.where(denom > 0, denom, 1.0)  # fully masked without sinks: zeros
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.empty((B, N, T, S), device=p.device).bernoulli_(
                1.0 - dropout_p, generator=generator
            )
            dropout_mask = dropout_mask.bool()
        keep_drop = torch.broadcast_to(dropout_mask, (B, N, T, S)).reshape(B, K, G, T, S)
        p = torch.where(keep_drop, p / (1.0 - dropout_p), 0.0)
    out = torch.einsum("bkgts,bksh->bkgth", p, v_BKSH.to(acc))
    return out.reshape(B, N, T, H).to(q_BNTH.dtype)


def _fused_attention(q_BNTH, k_BKSH, v_BKSH, keep_BTS, scale) -> torch.Tensor:
    """The fused kernel; ``keep_BTS`` None: plain causal attention (``is_causal``, no mask array)."""
    out_BNTH = F.scaled_dot_product_attention(
        q_BNTH,
        k_BKSH,
        v_BKSH,
        attn_mask=None if keep_BTS is None else keep_BTS[:, None],
        scale=scale,
        is_causal=keep_BTS is None,
        enable_gqa=q_BNTH.shape[1] != k_BKSH.shape[1],
    )
    if keep_BTS is None:  # every causal row sees at least itself
        return out_BNTH.to(q_BNTH.dtype)
    # Fully masked rows: zeros (our convention), whatever the selected kernel does with them.
    any_BT = torch.any(keep_BTS, dim=-1)
    return torch.where(any_BT[:, None, :, None], out_BNTH, 0.0).to(q_BNTH.dtype)


def _blocked_attention(
    q_BNTH, k_BKSH, v_BKSH, q_pos_T, k_pos_S, k_valid_BS, config, sinks_N, lead_B, unmasked=False
) -> torch.Tensor:
    """The blocked path: FlexAttention over a ``BlockMask`` of causal ∧ window ∧ chunk ∧ padding (key
    blocks outside the window or chunk or fully padded are skipped, so prefill cost grows linearly with T
    at a fixed window), the soft-cap and ALiBi as its ``score_mod``, and sinks applied afterwards as
    ``out · sigmoid(lse − sink)`` (the sink's share ``e^sink / (Z + e^sink)`` of a row with key mass
    ``Z = e^lse``).

    ``unmasked`` (no padding, cache, shared keys, window or chunk): with no soft-cap or ALiBi either, the
    engine's dense plan instead (SDPA's blocked path: causal key ranges with no mask function, 512-row
    forward blocks). Measured (B1, 8 key/value heads × 4, T4096, H64, causal, jit, 2-core CPU): forward
    0.56 s vs 0.90 s through the block mask, forward+backward 2.54 s vs 3.19 s."""
    c = config
    B, N, T, _ = q_BNTH.shape
    S = k_BKSH.shape[2]
    if unmasked and c.softcap is None and c.alibi_slopes is None:
        bt, bs = block_sizes(T, S, c.causal)
        ct = torch.promote_types(q_BNTH.dtype, torch.float32)
        q_BKGTH = q_BNTH.to(ct).reshape(B, c.K, c.G, T, -1)
        out, lse = block_attention(
            q_BKGTH, k_BKSH.to(ct), v_BKSH.to(ct), None, T=T, S=S, bt=bt, bs=bs,
            scale=c.logit_scale, causal=c.causal,
        )  # fmt: skip
        return _with_sinks(out.reshape(B, N, T, -1), lse.reshape(B, N, T), sinks_N).to(q_BNTH.dtype)

    def mask_mod(b, h, q_idx, kv_idx):
        q, k = q_pos_T[q_idx], k_pos_S[kv_idx]
        keep = (k >= 0) & k_valid_BS[b, kv_idx]
        if c.causal:
            keep = keep & (k <= q)
        if c.sliding_window is not None:
            keep = keep & ((q - k if c.causal else torch.abs(q - k)) < c.sliding_window)
        if c.chunk_size is not None:
            keep = keep & (
                torch.div(q - lead_B[b], c.chunk_size, rounding_mode="floor")
                == torch.div(k - lead_B[b], c.chunk_size, rounding_mode="floor")
            )
        return keep

    score_mod = None
    if c.softcap is not None or c.alibi_slopes is not None:
        slopes_N = None
        if c.alibi_slopes is not None:
            slopes_N = torch.tensor(c.alibi_slopes, dtype=torch.float32, device=q_BNTH.device)

        def score_mod(score, b, h, q_idx, kv_idx):
            if c.softcap is not None:
                score = c.softcap * torch.tanh(score / c.softcap)
            if slopes_N is not None:
                dist = (k_pos_S[kv_idx] - q_pos_T[q_idx]).to(score.dtype)
                score = score + slopes_N[h].to(score.dtype) * dist
            return score

    block_mask = create_block_mask(mask_mod, B, None, T, S, device=q_BNTH.device)
    out_BNTH, lse_BNT = flex_attention(
        q_BNTH, k_BKSH, v_BKSH, score_mod, block_mask, c.logit_scale, enable_gqa=c.G > 1, return_lse=True
    )
    return _with_sinks(out_BNTH, lse_BNT, sinks_N).to(q_BNTH.dtype)


def _with_sinks(out_BNTH, lse_BNT, sinks_N) -> torch.Tensor:
    """``out · sigmoid(lse − sink)``: the rows' share left after each head's sink (None: ``out``)."""
    if sinks_N is None:
        return out_BNTH
    return out_BNTH * torch.sigmoid(lse_BNT - sinks_N.to(lse_BNT.dtype)[None, :, None])[..., None]


class Attention(nn.Module):
    """A decoder attention layer configured by :class:`attn_spec.attention.AttentionConfig`.

    Args:
      config: the layer (heads, head width, biases, rope, QK-norm, scale, soft-cap, window, sinks, causal,
        dropout).
      implementation: None or ``"auto"`` (``attn_spec.attention.choose``, the one dispatch rule of
        ``attn_spec.dispatch``, on each call's ``B·N·T·S`` logits: ``F.scaled_dot_product_attention``
        where the layer's math allows it (no soft-cap, sinks, ALiBi, dropout), else math when small and
        blocked above; the choice and its reason in ``last_choice`` and ``repr``), ``"math"`` (the
        readable dense core, every knob), ``"fused"``
        (``F.scaled_dot_product_attention``: no soft-cap, sinks or dropout) or ``"blocked"``.
      device, dtype: of the parameters.

    Parameters (``state_dict()`` keys, transformers' names, ``nn.Linear`` layout):
    ``q_proj.weight (N·H, E)`` (``2·N·H`` rows with ``output_gate``), ``k_proj.weight (K·H, E)``,
    ``v_proj.weight (K·H, E)`` (none with ``k_eq_v``),
    ``o_proj.weight (E, N·H)``, ``<proj>.bias`` where configured, ``q_norm.weight``/``k_norm.weight``
    ((H,), (N, H)/(K, H) per head, or (N·H,)/(K·H,)) with QK-norm and ``q_norm.bias``/``k_norm.bias`` of
    the same shapes with ``qk_norm_bias``, ``sinks (N,)`` with sinks.
    """

    def __init__(
        self,
        config: AttentionConfig,
        *,
        implementation: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        c = self.config = config
        self.implementation = check_implementation(implementation, c)
        self.dispatch = ChoiceLog()  # the last automatic choice (implementation=None), shown in repr
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(c.E, c.N * c.H * (2 if c.output_gate else 1), bias=c.q_bias, **kw)
        self.k_proj = None if c.kv_shared else nn.Linear(c.E, c.K * c.H, bias=c.k_bias, **kw)
        no_v = c.k_eq_v or c.kv_shared
        self.v_proj = None if no_v else nn.Linear(c.E, c.K * c.H, bias=c.v_bias, **kw)
        self.o_proj = nn.Linear(c.N * c.H, c.E, bias=c.o_bias, **kw)
        self.q_norm = self.k_norm = None
        if c.qk_norm in ("head", "full"):
            shape_q, shape_k = qk_norm_shapes(c)
            if c.qk_norm_kind == "layer":
                eps, offset, bias = c.qk_norm_eps, c.qk_norm_offset, c.qk_norm_bias
                self.q_norm = LayerNorm(shape_q, eps, offset, bias, **kw)
                self.k_norm = None if c.kv_shared else LayerNorm(shape_k, eps, offset, bias, **kw)
            else:
                self.q_norm = RMSNorm(shape_q, c.qk_norm_eps, c.qk_norm_offset, **kw)
                if not c.kv_shared:
                    self.k_norm = RMSNorm(shape_k, c.qk_norm_eps, c.qk_norm_offset, **kw)
        self.sinks = nn.Parameter(torch.zeros(c.N, **kw)) if c.sinks else None

    def extra_repr(self) -> str:
        return f"implementation={describe(self.implementation, self.dispatch)}, config={self.config}"

    @property
    def last_choice(self):
        """The :class:`attn_spec.dispatch.Choice` of the last call (eager) when
        ``implementation`` is None / ``"auto"``; None before the first call or with an explicit path."""
        return self.dispatch.last

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_length`` tokens: zeros
        ``(B, K, C, H)`` on the parameters' device and dtype, ``C = max_length`` or ``min(window,
        max_length)``."""
        c = self.config
        check_init_cache(batch_size, max_length, c)
        C = cache_slots(c, max_length)
        w = self.q_proj.weight
        shape = (batch_size, c.K, C, c.H)
        return KVCache(
            k=torch.zeros(shape, device=w.device, dtype=w.dtype),
            v=torch.zeros(shape, device=w.device, dtype=w.dtype),
            pos=torch.full((C,), -1, device=w.device, dtype=torch.int64),
            valid=torch.zeros((batch_size, C), device=w.device, dtype=torch.bool),
            index=0,
            lead=torch.zeros((batch_size,), device=w.device, dtype=torch.int64),
            max_length=max_length,
        )

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        dropout_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_kv: bool = False,
        shared_kv: SharedKV | None = None,
    ) -> torch.Tensor | tuple:
        """Attend within ``x`` and, with a cache, to the tokens cached before it.

        Args:
          x: ``(B, T, E)``.
          attention_mask: ``(B, T)`` 1/0 (or bool) padding mask of these tokens; None: all real.
          position_ids: ``(B, T)`` integer positions for the rotary embedding (``(3, B, T)`` for a multimodal
            RoPE; ``(B, T)`` there serves all three rows); None: ``index + 0..T-1``. For left padding pass
            positions that skip the pads (transformers: ``cumsum(mask) - 1``).
          cache: a :class:`KVCache` from :meth:`init_cache` or a previous call; None for a full pass.
          dropout_mask: bool keep-mask broadcastable to ``(B, N, T, S)`` (S = T, or C + T with a cache).
          generator: ``torch.Generator`` for the dropout draw; default: the global one.
          return_kv: also return the :class:`SharedKV` this call attended over (a producer layer).
          shared_kv: a ``kv_shared`` layer's keys and values: its producer's :class:`SharedKV` of the same
            call (the consumer's queries attend over them with its own mask; ``attention_mask`` is then only
            checked: the keys' validity and the rows' leading pads are the producer's).

        Returns:
          ``y (B, T, E)`` without a cache; ``(y, new_cache)`` with one; ``shared_kv`` appended with
          ``return_kv``.
        """
        c = self.config
        B, T = check_input(_spec(x), c)
        check_kv_call(shared_kv is not None, cache is not None, return_kv, c)
        if shared_kv is not None:
            kv = shared_kv
            check_shared_kv(
                *(tuple(a.shape) for a in (kv.k, kv.v, kv.pos, kv.valid, kv.q_pos, kv.lead)), B, T, c
            )
        check_dropout_mask(dropout_mask is not None, self.training, c)
        device = x.device
        if attention_mask is not None:
            check_attention_mask(*_spec(attention_mask), B, T)
            valid_BT = attention_mask.to(torch.bool)
        else:
            valid_BT = torch.ones((B, T), device=device, dtype=torch.bool)
        start = 0 if cache is None else int(cache.index)
        if cache is not None:
            check_cache(tuple(cache.k.shape), tuple(cache.v.shape), start, cache.max_length, B, T, c)
        q_pos_T = start + torch.arange(T, device=device) if shared_kv is None else shared_kv.q_pos
        if position_ids is None:
            position_ids = q_pos_T.expand(B, T)
        else:
            check_position_ids(*_spec(position_ids), B, T, config=c)
        lead_B = leading_pads(valid_BT)
        if cache is not None:  # rows that were all padding so far keep counting
            lead_B = torch.where(cache.lead == start, cache.lead + lead_B, cache.lead)
        if shared_kv is not None:
            lead_B = shared_kv.lead

        x_BTE = x  # torch's Linear does not promote: x must have the parameters' dtype
        q = project(self.q_proj, x_BTE)
        if c.kv_shared:  # placeholders: the keys and values are the producer's
            k = v = q.new_zeros((B, T, c.K * c.H))
        else:
            k = project(self.k_proj, x_BTE)
            v = k if c.k_eq_v else project(self.v_proj, x_BTE)  # k_eq_v: the values are the keys' projection
        if c.clip_qkv is not None:
            q, k, v = (clamp(a, c.clip_qkv) for a in (q, k, v))
        if c.output_gate:  # per head: H query channels, then H gate channels
            q_gate = q.view(B, T, c.N, 2 * c.H)
            q, gate_BTD = q_gate[..., : c.H].reshape(B, T, -1), q_gate[..., c.H :].reshape(B, T, -1)
        if c.qk_norm == "full":
            q, k = self.q_norm(q), k if c.kv_shared else self.k_norm(k)
        q_BNTH = q.view(B, T, c.N, c.H).transpose(1, 2)
        k_BKTH = k.view(B, T, c.K, c.H).transpose(1, 2)
        v_BKTH = v.view(B, T, c.K, c.H).transpose(1, 2)
        if c.qk_norm == "head" and not c.qk_norm_after_rope:
            q_BNTH, k_BKTH = self.q_norm(q_BNTH), k_BKTH if c.kv_shared else self.k_norm(k_BKTH)
        elif c.qk_norm == "unit":
            q_BNTH, k_BKTH = unit_rms(q_BNTH, c.qk_norm_eps), unit_rms(k_BKTH, c.qk_norm_eps)
        if c.v_norm:
            v_BKTH = unit_rms(v_BKTH, c.qk_norm_eps)
        if c.rope is not None:
            cos_BTR, sin_BTR = rope_cos_sin(c.rope, c.H, position_ids)
            q_BNTH = apply_rope(q_BNTH, cos_BTR, sin_BTR, c.rope.layout)
            k_BKTH = apply_rope(k_BKTH, cos_BTR, sin_BTR, c.rope.layout)
        if c.qk_norm_after_rope:  # Hunyuan: the rotated heads are normed
            q_BNTH, k_BKTH = self.q_norm(q_BNTH), self.k_norm(k_BKTH)
        if c.attn_temperature is not None:
            scale_T = temperature_scales(c, q_pos_T)[None, None, :, None]
            q_BNTH = (q_BNTH * scale_T).to(q_BNTH.dtype)

        if shared_kv is not None:  # the producer's keys and values (cache included), as it attended
            dt = q_BNTH.dtype
            k_BKSH, v_BKSH = shared_kv.k.to(dt), shared_kv.v.to(dt)
            k_pos_S, k_valid_BS = shared_kv.pos, shared_kv.valid
        elif cache is None:
            k_BKSH, v_BKSH, k_pos_S, k_valid_BS = k_BKTH, v_BKTH, q_pos_T, valid_BT
        else:
            dt = q_BNTH.dtype
            k_BKSH = torch.cat([cache.k.to(dt), k_BKTH], dim=2)
            v_BKSH = torch.cat([cache.v.to(dt), v_BKTH], dim=2)
            k_pos_S = torch.cat([cache.pos, q_pos_T])
            k_valid_BS = torch.cat([cache.valid, valid_BT], dim=1)
        # No padding, cache, window or chunk: the fused kernel's own causal mask (no mask array) serves.
        unmasked = cache is None and shared_kv is None and attention_mask is None
        unmasked = unmasked and c.sliding_window is None and c.chunk_size is None
        plain_causal = unmasked and c.causal
        path = self.implementation
        if path is None:  # chosen from this call's shapes
            fused = None  # the kernel is the fast path on CPU and CUDA, with no mask array or a small one
            if device.type in ("cpu", "cuda") and (plain_causal or B * T * k_BKSH.shape[2] <= FUSED_MASK_MAX):
                fused = "F.scaled_dot_product_attention"
            dropout_on = self.training and c.dropout > 0.0
            choice = choose(c, B=B, T=T, S=k_BKSH.shape[2], dropout=dropout_on, fused=fused)
            self.dispatch.last = choice
            path = choice.implementation
        if path == "blocked":
            # (an explicit 'blocked' with dropout was refused by the constructor; the automatic choice takes
            # blocked only when dropout is off for this call, e.g. an eval-mode layer configured with dropout)
            y_BNTH = _blocked_attention(
                q_BNTH, k_BKSH, v_BKSH, q_pos_T, k_pos_S, k_valid_BS, c, self.sinks, lead_B, unmasked
            )
        else:
            keep_BTS = attention_keep_mask(q_pos_T, k_pos_S, k_valid_BS, c, lead_B)
            if path == "fused" and plain_causal:
                keep_BTS = None  # no padding, window or chunk: the kernel's own causal mask
            bias_NTS = None if c.alibi_slopes is None else alibi_bias(c, q_pos_T, k_pos_S)
            y_BNTH = self._attend(path, q_BNTH, k_BKSH, v_BKSH, keep_BTS, dropout_mask, generator, bias_NTS)
        y_BTD = y_BNTH.transpose(1, 2).reshape(B, T, c.N * c.H)
        if c.output_gate:
            y_BTD = y_BTD * torch.sigmoid(gate_BTD)
        y_BTE = project(self.o_proj, y_BTD)
        kv_out = ()
        if return_kv:
            kv_out = (
                SharedKV(k=k_BKSH, v=v_BKSH, pos=k_pos_S, valid=k_valid_BS, q_pos=q_pos_T, lead=lead_B),
            )
        if cache is None:
            return (y_BTE, *kv_out) if return_kv else y_BTE

        # Write the chunk's last min(T, C) tokens into their ring slots (slot = sequence index mod C).
        C = cache.k.shape[2]
        M = min(T, C)
        slots = (start + torch.arange(T - M, T, device=device)) % C
        new_cache = KVCache(
            k=cache.k.index_copy(2, slots, k_BKTH[:, :, T - M :].to(cache.k.dtype)),
            v=cache.v.index_copy(2, slots, v_BKTH[:, :, T - M :].to(cache.v.dtype)),
            pos=cache.pos.index_copy(0, slots, q_pos_T[T - M :]),
            valid=cache.valid.index_copy(1, slots, valid_BT[:, T - M :]),
            index=start + T,
            lead=lead_B,
            max_length=cache.max_length,
        )
        return (y_BTE, new_cache, *kv_out)

    def _attend(
        self, path, q_BNTH, k_BKSH, v_BKSH, keep_BTS, dropout_mask, generator, bias_NTS=None
    ) -> torch.Tensor:
        c = self.config
        if path == "fused":
            return _fused_attention(q_BNTH, k_BKSH, v_BKSH, keep_BTS, c.logit_scale)
        dropout_p = c.dropout if self.training else 0.0
        return dot_product_attention(
            q_BNTH,
            k_BKSH,
            v_BKSH,
            keep_BTS,
            c.logit_scale,
            softcap=c.softcap,
            sinks_N=self.sinks,
            dropout_p=dropout_p,
            dropout_mask=dropout_mask,
            generator=generator,
            bias_NTS=bias_NTS,
        )

    def torch_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters under transformers' names (the same keys as ``state_dict()``), detached."""
        params = dict(self.named_parameters())
        return {key: params[key].detach().clone() for key in state_dict_shapes(self.config)}

    def load_torch_state_dict(self, state_dict) -> None:
        """Load a state dict (torch tensors or NumPy arrays, e.g. ``jax_attn``'s export) with exactly the
        config's keys and shapes, casting to the parameter dtype; bit-exact when the dtypes agree."""
        tensors = {key: _to_tensor(value) for key, value in state_dict.items()}
        keys = check_state_dict({key: tuple(t.shape) for key, t in tensors.items()}, self.config)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for key in keys:
                params[key].copy_(tensors[key].to(params[key].dtype))


def _to_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    a = np.asarray(value)
    if a.dtype.name == "bfloat16":  # ml_dtypes bf16 from the JAX twin: through fp32, exactly
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))
