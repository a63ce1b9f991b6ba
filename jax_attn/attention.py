"""Modern decoder attention (JAX/Flax nnx twin of ``torch_attn/attention.py``): rotary embeddings, grouped
query heads, QK-norm, a logit scale and soft-cap, sliding windows, learned sinks, padding masks and a KV cache
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
A call attends over the C cached slots and its own T tokens (S = C + T, static), then writes the last
``min(T, C)`` of them. Shapes never depend on the index: a jitted call compiles once per chunk length.
Calls never modify the given cache. Overflow (more than ``max_length`` tokens in all) raises ``ValueError``
when the index is concrete; under ``jax.jit`` it cannot raise, so that call's output and every later one's
is NaN (the index stays past ``max_length``), as ``CausalSelfAttention`` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from attn_spec.attention import (
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
from attn_spec.dispatch import Choice, ChoiceLog
from jax_attn.causal import Linear, _assign, _concrete_index, _to_numpy
from jax_attn.engine import block_attention, native_reason
from jax_attn.flex import create_block_mask, flex_attention
from jax_attn.native import NAME as NATIVE_NAME
from jax_attn.rope import apply_rope, rope_cos_sin


def _spec(x) -> tuple[tuple[int, ...], str]:
    return tuple(x.shape), jnp.dtype(x.dtype).name


@struct.dataclass
class KVCache:
    """Cached keys and values (a pytree).

    Attributes:
      k, v: ``(B, K, C, H)``, rotated keys and values.
      pos: int32 ``(C,)``, the sequence index of the token in each slot, -1 for an empty slot.
      valid: bool ``(B, C)``, whether each slot holds a real (non-padding) token.
      index: int32 scalar, the number of tokens seen so far.
      lead: int32 ``(B,)``, each row's padding tokens before its first real one (where chunks start).
      max_length: the most tokens the cache accepts (static).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    valid: jax.Array
    index: jax.Array
    lead: jax.Array
    max_length: int = struct.field(pytree_node=False)


@struct.dataclass
class SharedKV:
    """What a producer layer's call attended over (``attn(..., return_kv=True)``), for the key/value-sharing
    consumers of the same call (``AttentionConfig.kv_shared``; Gemma 4's ``shared_kv_states``); a pytree.

    Attributes:
      k, v: ``(B, K, S, H)``, the normed and rotated keys and the values: the cache slots then this call's
        tokens (S = C + T), or this call's tokens (S = T) without a cache.
      pos: int32 ``(S,)``, each key's sequence index (-1: an empty cache slot).
      valid: bool ``(B, S)``, whether each key is a real token.
      q_pos: int32 ``(T,)``, the call's query sequence indices.
      lead: int32 ``(B,)``, each row's leading pads (where chunks start).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    valid: jax.Array
    q_pos: jax.Array
    lead: jax.Array


def unit_rms(x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis without a weight (``qk_norm="unit"``, Llama 4), in float32, cast back."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def clamp(x: jax.Array, limit: float) -> jax.Array:
    """``x`` clamped to ``[-limit, limit]`` (the limit in x's dtype) with torch's gradient: 1 inside the
    closed interval, 0 outside (``jnp.clip`` gives 0.5 where x equals the limit, a tie bf16 often makes)."""
    lim = jnp.asarray(limit, x.dtype)
    return jnp.where(x > lim, lim, jnp.where(x < -lim, -lim, x))


def leading_pads(valid_BT: jax.Array) -> jax.Array:
    """int32 ``(B,)``: each row's padding tokens before its first real one."""
    return jnp.sum(jnp.cumsum(valid_BT.astype(jnp.int32), axis=1) == 0, axis=1).astype(jnp.int32)


def temperature_scales(config: AttentionConfig, index_T: jax.Array) -> jax.Array:
    """float32 ``(T,)``: Llama 4's query scales ``1 + attn_scale · log1p(floor((i + 1) / floor_scale))``
    for sequence indices i, in float32 as transformers computes them."""
    floor_scale, attn_scale = config.attn_temperature
    i = index_T.astype(jnp.float32)
    return jnp.log1p(jnp.floor((i + 1.0) / floor_scale)) * attn_scale + 1.0


def alibi_bias(config: AttentionConfig, q_pos_T: jax.Array, k_pos_S: jax.Array) -> jax.Array:
    """float32 ``(N, T, S)``: ``slope_n · (s - t)`` (``AttentionConfig.alibi_slopes``)."""
    slopes = jnp.asarray(config.alibi_slopes, jnp.float32)[:, None, None]
    return slopes * (k_pos_S[None, None, :] - q_pos_T[None, :, None]).astype(jnp.float32)


def per_head(w: jax.Array) -> jax.Array:
    """A norm's weight or bias in float32, shaped for ``x (B, heads, T, H)``: a per-head ``(heads, H)`` one
    broadcast over the tokens; a 1-D one as it is."""
    w = w.astype(jnp.float32)
    return w[:, None, :] if w.ndim == 2 else w


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis in float32, scaled by ``offset + weight`` and cast back. ``size``: the
    weight's shape (an int: ``(size,)``; ``(heads, H)``: a weight per head of ``x (B, heads, T, H)``)."""

    def __init__(self, size: int | tuple[int, ...], eps: float, offset: float, *, param_dtype):
        self.eps, self.offset = eps, offset
        self.weight = nnx.Param(jnp.full(size, 1.0 - offset, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (self.offset + per_head(self.weight[...]))).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis in float32 (the mean subtracted, then divided by ``sqrt(variance +
    eps)``), scaled by ``offset + weight``, plus ``bias`` when it has one, and cast back once (as Cohere's
    ``CohereLayerNorm`` and torch's ``nn.LayerNorm`` on bf16 inputs compute it). ``size`` as in
    :class:`RMSNorm`; the bias has the weight's shape."""

    def __init__(self, size: int | tuple[int, ...], eps: float, offset: float, bias: bool, *, param_dtype):
        self.eps, self.offset = eps, offset
        self.weight = nnx.Param(jnp.full(size, 1.0 - offset, param_dtype))
        self.bias = nnx.data(nnx.Param(jnp.zeros(size, param_dtype)) if bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + self.eps)
        y = normed * (self.offset + per_head(self.weight[...]))
        if self.bias is not None:
            y = y + per_head(self.bias[...])
        return y.astype(x.dtype)


def project(linear: Linear, x: jax.Array) -> jax.Array:
    """``x @ weight.T + bias`` as torch's ``F.linear`` (addmm) computes it: the products summed in float32 (at
    least) with the bias added before the one rounding to x's dtype. In the backward the weight's gradient
    (a sum over the B·T rows, ``dot_general`` with a float32 result) and the bias's (a row sum of the float32
    cotangent) are float32 reductions too, rounded once to the parameter's dtype; bf16/fp16 sums of rows
    would lose ~log2(B·T) bits. float32 inputs: the same arithmetic as ``x @ weight.T + bias``."""
    acc = jnp.result_type(x.dtype, jnp.float32)
    w = linear.weight[...].astype(x.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=acc)
    if linear.bias is not None:
        y = y + linear.bias[...].astype(acc)
    return y.astype(x.dtype)


def attention_keep_mask(
    q_pos_T: jax.Array,
    k_pos_S: jax.Array,
    k_valid_BS: jax.Array,
    config: AttentionConfig,
    lead_B: jax.Array | None = None,
) -> jax.Array:
    """bool ``(B, T, S)``, True = may attend: a filled, valid key slot, causal (key index ≤ query index),
    inside the window (distance < w; ``|distance| < w`` when bidirectional) and in the query's chunk
    (chunks counted from each row's ``lead_B`` padding tokens; None: none)."""
    q, k = q_pos_T[:, None], k_pos_S[None, :]
    keep_TS = k >= 0
    if config.causal:
        keep_TS &= k <= q
    if config.sliding_window is not None:
        dist = q - k if config.causal else jnp.abs(q - k)
        keep_TS &= dist < config.sliding_window
    keep_BTS = keep_TS[None] & k_valid_BS[:, None, :]
    if config.chunk_size is not None:
        lead = 0 if lead_B is None else lead_B[:, None, None]
        keep_BTS &= (q[None] - lead) // config.chunk_size == (k[None] - lead) // config.chunk_size
    return keep_BTS


def dot_product_attention(
    q_BNTH: jax.Array,
    k_BKSH: jax.Array,
    v_BKSH: jax.Array,
    keep_BTS: jax.Array,
    scale: float,
    softcap: float | None = None,
    sinks_N: jax.Array | None = None,
    dropout_p: float = 0.0,
    dropout_mask: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    bias_NTS: jax.Array | None = None,
) -> jax.Array:
    """The readable dense core: ``softmax(cap(scale · q·k) + bias masked, with sinks) · v`` in float32
    (float64 inputs: float64).

    Args:
      q_BNTH: queries; k_BKSH, v_BKSH: keys and values, key/value head ``n // G`` serving query head n.
      keep_BTS: bool, True = may attend. Fully masked rows give zeros.
      scale: the logit scale; softcap: ``c`` in ``c · tanh(x / c)``, applied before the mask.
      sinks_N: one logit per query head joining every row's softmax denominator, with no value.
      dropout_p, dropout_mask (bool keep-mask broadcastable to (B, N, T, S)), dropout_rng: weight dropout.
      bias_NTS: added to the (soft-capped) logits (ALiBi), or None.

    Returns:
      ``(B, N, T, H)`` in q's dtype.
    """
    B, N, T, H = q_BNTH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    G = N // K
    acc = jnp.result_type(q_BNTH.dtype, jnp.float32)  # fp32 at least: bf16/fp16 logits never round
    q_BKGTH = q_BNTH.astype(acc).reshape(B, K, G, T, H)
    logits = jnp.einsum("bkgth,bksh->bkgts", q_BKGTH, k_BKSH.astype(acc)) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    if bias_NTS is not None:
        logits = logits + bias_NTS.astype(acc).reshape(1, K, G, T, S)
    keep = keep_BTS[:, None, None]
    logits = jnp.where(keep, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    if sinks_N is not None:
        sink = sinks_N.astype(acc).reshape(1, K, G, 1, 1)
        m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))  # fully masked row: any shift works
    e = jnp.where(keep, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    if sinks_N is not None:
        denom = denom + jnp.exp(sink - m)
    p = e / jnp.where(denom > 0, denom, 1.0)  # fully masked without sinks: zeros
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = jax.random.bernoulli(dropout_rng, 1.0 - dropout_p, (B, N, T, S))
        keep_drop = jnp.broadcast_to(dropout_mask, (B, N, T, S)).reshape(B, K, G, T, S)
        p = jnp.where(keep_drop, p / (1.0 - dropout_p), 0.0)
    out = jnp.einsum("bkgts,bksh->bkgth", p, v_BKSH.astype(acc))
    return out.reshape(B, N, T, H).astype(q_BNTH.dtype)


def _fused_attention(q_BNTH, k_BKSH, v_BKSH, keep_BTS, scale) -> jax.Array:
    """The fused kernel; ``keep_BTS`` None: plain causal attention (``is_causal``, no mask array)."""
    out_BTNH = jax.nn.dot_product_attention(
        q_BNTH.transpose(0, 2, 1, 3),
        k_BKSH.transpose(0, 2, 1, 3),
        v_BKSH.transpose(0, 2, 1, 3),
        mask=None if keep_BTS is None else keep_BTS[:, None],
        scale=scale,
        is_causal=keep_BTS is None,
        implementation="xla",
    )
    if keep_BTS is None:  # every causal row sees at least itself
        return out_BTNH.transpose(0, 2, 1, 3).astype(q_BNTH.dtype)
    # XLA averages the values of a fully masked row; our convention (and torch's fused kernel) is zeros.
    any_BT = jnp.any(keep_BTS, axis=-1)
    return jnp.where(any_BT[:, None, :, None], out_BTNH.transpose(0, 2, 1, 3), 0.0).astype(q_BNTH.dtype)


def _blocked_attention(
    q_BNTH, k_BKSH, v_BKSH, q_pos_T, k_pos_S, k_valid_BS, config, sinks_N, lead_B, unmasked=False
) -> jax.Array:
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
        ct = jnp.promote_types(q_BNTH.dtype, jnp.float32)
        q_BKGTH = q_BNTH.astype(ct).reshape(B, c.K, c.G, T, -1)
        out, lse = block_attention(
            q_BKGTH, k_BKSH.astype(ct), v_BKSH.astype(ct), None, T=T, S=S, bt=bt, bs=bs,
            scale=c.logit_scale, causal=c.causal,
        )  # fmt: skip
        return _with_sinks(out.reshape(B, N, T, -1), lse.reshape(B, N, T), sinks_N).astype(q_BNTH.dtype)

    def mask_mod(b, h, q_idx, kv_idx):
        q, k = q_pos_T[q_idx], k_pos_S[kv_idx]
        keep = (k >= 0) & k_valid_BS[b, kv_idx]
        if c.causal:
            keep &= k <= q
        if c.sliding_window is not None:
            keep &= (q - k if c.causal else jnp.abs(q - k)) < c.sliding_window
        if c.chunk_size is not None:
            keep &= (q - lead_B[b]) // c.chunk_size == (k - lead_B[b]) // c.chunk_size
        return keep

    score_mod = None
    if c.softcap is not None or c.alibi_slopes is not None:
        slopes_N = None if c.alibi_slopes is None else jnp.asarray(c.alibi_slopes, jnp.float32)

        def score_mod(score, b, h, q_idx, kv_idx):
            if c.softcap is not None:
                score = c.softcap * jnp.tanh(score / c.softcap)
            if slopes_N is not None:
                dist = (k_pos_S[kv_idx] - q_pos_T[q_idx]).astype(score.dtype)
                score = score + slopes_N[h].astype(score.dtype) * dist
            return score

    block_mask = create_block_mask(mask_mod, B, None, T, S)
    out_BNTH, lse_BNT = flex_attention(
        q_BNTH, k_BKSH, v_BKSH, score_mod, block_mask, c.logit_scale, enable_gqa=c.G > 1, return_lse=True
    )
    return _with_sinks(out_BNTH, lse_BNT, sinks_N).astype(q_BNTH.dtype)


def _with_sinks(out_BNTH, lse_BNT, sinks_N) -> jax.Array:
    """``out · sigmoid(lse − sink)``: the rows' share left after each head's sink (None: ``out``)."""
    if sinks_N is None:
        return out_BNTH
    return out_BNTH * jax.nn.sigmoid(lse_BNT - sinks_N.astype(lse_BNT.dtype)[None, :, None])[..., None]


class Attention(nnx.Module):
    """A decoder attention layer configured by :class:`attn_spec.attention.AttentionConfig`.

    Args:
      config: the layer (heads, head width, biases, rope, QK-norm, scale, soft-cap, window, sinks, causal,
        dropout).
      implementation: None or ``"auto"`` (``attn_spec.attention.choose``, the one dispatch rule of
        ``attn_spec.dispatch``, on each call's ``B·N·T·S`` logits: math when small, blocked above, since
        XLA's fused path is not a fast path on CPU; the choice and its reason in ``last_choice`` and
        ``repr``), ``"math"`` (the readable dense core, every knob), ``"fused"``
        (``jax.nn.dot_product_attention``, XLA: no soft-cap, sinks or dropout) or ``"blocked"``.
      rngs: ``nnx.Rngs`` for the initialization (``params``) and dropout (``dropout``) streams.
      dtype: computation dtype; None promotes the input's with the parameters'.
      param_dtype: parameter dtype.

    Parameters (``torch_state_dict()`` keys, transformers' names, ``nn.Linear`` layout):
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
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        c = self.config = config
        self.implementation = check_implementation(implementation, c)
        self.dispatch = ChoiceLog()  # the last automatic choice (implementation=None), shown in repr
        self.dtype, self.param_dtype = dtype, param_dtype
        kw = {"rngs": rngs, "param_dtype": param_dtype}
        self.q_proj = Linear(c.E, c.N * c.H * (2 if c.output_gate else 1), c.q_bias, **kw)
        self.k_proj = nnx.data(None if c.kv_shared else Linear(c.E, c.K * c.H, c.k_bias, **kw))
        no_v = c.k_eq_v or c.kv_shared
        self.v_proj = nnx.data(None if no_v else Linear(c.E, c.K * c.H, c.v_bias, **kw))
        self.o_proj = Linear(c.N * c.H, c.E, c.o_bias, **kw)
        q_norm = k_norm = None
        if c.qk_norm in ("head", "full"):
            shape_q, shape_k = qk_norm_shapes(c)
            if c.qk_norm_kind == "layer":
                eps, offset, bias = c.qk_norm_eps, c.qk_norm_offset, c.qk_norm_bias
                q_norm = LayerNorm(shape_q, eps, offset, bias, param_dtype=param_dtype)
                if not c.kv_shared:
                    k_norm = LayerNorm(shape_k, eps, offset, bias, param_dtype=param_dtype)
            else:
                q_norm = RMSNorm(shape_q, c.qk_norm_eps, c.qk_norm_offset, param_dtype=param_dtype)
                if not c.kv_shared:
                    k_norm = RMSNorm(shape_k, c.qk_norm_eps, c.qk_norm_offset, param_dtype=param_dtype)
        self.q_norm, self.k_norm = nnx.data(q_norm), nnx.data(k_norm)
        self.sinks = nnx.data(nnx.Param(jnp.zeros((c.N,), param_dtype)) if c.sinks else None)
        self.deterministic = False  # training mode, as a fresh torch module; eval() sets True
        self.rngs = rngs["dropout"].fork() if c.dropout > 0.0 else None

    @property
    def last_choice(self):
        """The :class:`attn_spec.dispatch.Choice` of the last call (the traced call under ``jit``) when
        ``implementation`` is None / ``"auto"``; None before the first call or with an explicit path."""
        return self.dispatch.last

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_length`` tokens: zeros
        ``(B, K, C, H)`` in the computation dtype, ``C = max_length`` or ``min(window, max_length)``."""
        c = self.config
        check_init_cache(batch_size, max_length, c)
        C = cache_slots(c, max_length)
        zeros = jnp.zeros((batch_size, c.K, C, c.H), self.dtype or self.param_dtype)
        return KVCache(
            k=zeros,
            v=zeros,
            pos=jnp.full((C,), -1, jnp.int32),
            valid=jnp.zeros((batch_size, C), bool),
            index=jnp.zeros((), jnp.int32),
            lead=jnp.zeros((batch_size,), jnp.int32),
            max_length=max_length,
        )

    def __call__(
        self,
        x: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        dropout_mask: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        return_kv: bool = False,
        shared_kv: SharedKV | None = None,
    ) -> jax.Array | tuple:
        """Attend within ``x`` and, with a cache, to the tokens cached before it.

        Args:
          x: ``(B, T, E)``.
          attention_mask: ``(B, T)`` 1/0 (or bool) padding mask of these tokens; None: all real.
          position_ids: ``(B, T)`` integer positions for the rotary embedding (``(3, B, T)`` for a multimodal
            RoPE; ``(B, T)`` there serves all three rows); None: ``index + 0..T-1``. For left padding pass
            positions that skip the pads (transformers: ``cumsum(mask) - 1``).
          cache: a :class:`KVCache` from :meth:`init_cache` or a previous call; None for a full pass.
          dropout_mask: bool keep-mask broadcastable to ``(B, N, T, S)`` (S = T, or C + T with a cache).
          dropout_rng: key for the dropout draw; default: the module's ``dropout`` stream.
          return_kv: also return the :class:`SharedKV` this call attended over (a producer layer).
          shared_kv: a ``kv_shared`` layer's keys and values: its producer's :class:`SharedKV` of the same
            call (the consumer's queries attend over them with its own mask; ``attention_mask`` is then only
            checked: the keys' validity and the rows' leading pads are the producer's).

        Returns:
          ``y (B, T, E)`` without a cache; ``(y, new_cache)`` with one; ``shared_kv`` appended with
          ``return_kv``.
        """
        x = jnp.asarray(x)
        c = self.config
        B, T = check_input(_spec(x), c)
        check_kv_call(shared_kv is not None, cache is not None, return_kv, c)
        if shared_kv is not None:
            kv = shared_kv
            check_shared_kv(*(a.shape for a in (kv.k, kv.v, kv.pos, kv.valid, kv.q_pos, kv.lead)), B, T, c)
        check_dropout_mask(dropout_mask is not None, not self.deterministic, c)
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            check_attention_mask(*_spec(attention_mask), B, T)
            valid_BT = attention_mask.astype(bool)
        else:
            valid_BT = jnp.ones((B, T), bool)
        start = 0 if cache is None else cache.index
        if cache is not None:
            check_cache(cache.k.shape, cache.v.shape, _concrete_index(cache.index), cache.max_length, B, T, c)
        q_pos_T = start + jnp.arange(T, dtype=jnp.int32) if shared_kv is None else shared_kv.q_pos
        if position_ids is None:
            position_ids = jnp.broadcast_to(q_pos_T, (B, T))
        else:
            position_ids = jnp.asarray(position_ids)
            check_position_ids(*_spec(position_ids), B, T, config=c)
        lead_B = leading_pads(valid_BT)
        if cache is not None:  # rows that were all padding so far keep counting
            lead_B = jnp.where(cache.lead == cache.index, cache.lead + lead_B, cache.lead)
        if shared_kv is not None:
            lead_B = shared_kv.lead

        x_BTE = x.astype(self.dtype or jnp.result_type(x.dtype, self.param_dtype))
        q = project(self.q_proj, x_BTE)
        if c.kv_shared:  # placeholders: the keys and values are the producer's
            k = v = jnp.zeros((B, T, c.K * c.H), q.dtype)
        else:
            k = project(self.k_proj, x_BTE)
            v = k if c.k_eq_v else project(self.v_proj, x_BTE)  # k_eq_v: the values are the keys' projection
        if c.clip_qkv is not None:
            q, k, v = (clamp(a, c.clip_qkv) for a in (q, k, v))
        if c.output_gate:  # per head: H query channels, then H gate channels
            q_gate = q.reshape(B, T, c.N, 2 * c.H)
            q, gate_BTD = q_gate[..., : c.H].reshape(B, T, -1), q_gate[..., c.H :].reshape(B, T, -1)
        if c.qk_norm == "full":
            q, k = self.q_norm(q), k if c.kv_shared else self.k_norm(k)
        q_BNTH = q.reshape(B, T, c.N, c.H).transpose(0, 2, 1, 3)
        k_BKTH = k.reshape(B, T, c.K, c.H).transpose(0, 2, 1, 3)
        v_BKTH = v.reshape(B, T, c.K, c.H).transpose(0, 2, 1, 3)
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
            q_BNTH = (q_BNTH * scale_T).astype(q_BNTH.dtype)

        if shared_kv is not None:  # the producer's keys and values (cache included), as it attended
            dt = q_BNTH.dtype
            k_BKSH, v_BKSH = shared_kv.k.astype(dt), shared_kv.v.astype(dt)
            k_pos_S, k_valid_BS = shared_kv.pos, shared_kv.valid
        elif cache is None:
            k_BKSH, v_BKSH, k_pos_S, k_valid_BS = k_BKTH, v_BKTH, q_pos_T, valid_BT
        else:
            dt = q_BNTH.dtype
            k_BKSH = jnp.concatenate([cache.k.astype(dt), k_BKTH], axis=2)
            v_BKSH = jnp.concatenate([cache.v.astype(dt), v_BKTH], axis=2)
            k_pos_S = jnp.concatenate([cache.pos, q_pos_T])
            k_valid_BS = jnp.concatenate([cache.valid, valid_BT], axis=1)
        # No padding, cache, window or chunk: the fused kernel's own causal mask (no mask array) serves.
        unmasked = cache is None and shared_kv is None and attention_mask is None
        unmasked = unmasked and c.sliding_window is None and c.chunk_size is None
        plain_causal = unmasked and c.causal
        path = self.implementation
        if path is None:  # chosen from this call's shapes (static under jit: at trace time)
            dropout_on = not self.deterministic and c.dropout > 0.0
            choice = choose(c, B=B, T=T, S=k_BKSH.shape[2], dropout=dropout_on, fused=None)
            dense_plan = unmasked and c.softcap is None and c.alibi_slopes is None  # see _blocked_attention
            ct = jnp.promote_types(q_BNTH.dtype, jnp.float32)
            if choice.implementation == "blocked" and dense_plan and not native_reason(ct):
                choice = Choice("blocked", f"{choice.reason}; runs on {NATIVE_NAME}", choice.warning)
            self.dispatch.last = choice
            path = choice.implementation
        if path == "blocked":
            # (an explicit 'blocked' with dropout was refused by the constructor; the automatic choice takes
            # blocked only when dropout is off for this call, e.g. an eval-mode layer configured with dropout)
            sinks_N = None if self.sinks is None else self.sinks[...]
            y_BNTH = _blocked_attention(
                q_BNTH, k_BKSH, v_BKSH, q_pos_T, k_pos_S, k_valid_BS, c, sinks_N, lead_B, unmasked
            )
        else:
            keep_BTS = attention_keep_mask(q_pos_T, k_pos_S, k_valid_BS, c, lead_B)
            if path == "fused" and plain_causal:
                keep_BTS = None  # no padding, window or chunk: the kernel's own causal mask
            bias_NTS = None if c.alibi_slopes is None else alibi_bias(c, q_pos_T, k_pos_S)
            y_BNTH = self._attend(path, q_BNTH, k_BKSH, v_BKSH, keep_BTS, dropout_mask, dropout_rng, bias_NTS)
        y_BTD = y_BNTH.transpose(0, 2, 1, 3).reshape(B, T, c.N * c.H)
        if c.output_gate:
            y_BTD = y_BTD * jax.nn.sigmoid(gate_BTD)
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
        slots = (start + jnp.arange(T - M, T, dtype=jnp.int32)) % C
        new_cache = KVCache(
            k=cache.k.at[:, :, slots].set(k_BKTH[:, :, T - M :].astype(cache.k.dtype)),
            v=cache.v.at[:, :, slots].set(v_BKTH[:, :, T - M :].astype(cache.v.dtype)),
            pos=cache.pos.at[slots].set(q_pos_T[T - M :]),
            valid=cache.valid.at[:, slots].set(valid_BT[:, T - M :]),
            index=cache.index + T,
            lead=lead_B,
            max_length=cache.max_length,
        )
        # A traced index cannot raise: an overflowing call yields NaN, and so does every later call.
        y_BTE = jnp.where(new_cache.index <= cache.max_length, y_BTE, jnp.nan)
        return (y_BTE, new_cache, *kv_out)

    def _attend(
        self, path, q_BNTH, k_BKSH, v_BKSH, keep_BTS, dropout_mask, dropout_rng, bias_NTS=None
    ) -> jax.Array:
        c = self.config
        if path == "fused":
            return _fused_attention(q_BNTH, k_BKSH, v_BKSH, keep_BTS, c.logit_scale)
        dropout_p = 0.0 if self.deterministic else c.dropout
        if dropout_p > 0.0 and dropout_mask is None and dropout_rng is None:
            dropout_rng = self.rngs()
        return dot_product_attention(
            q_BNTH,
            k_BKSH,
            v_BKSH,
            keep_BTS,
            c.logit_scale,
            softcap=c.softcap,
            sinks_N=None if self.sinks is None else self.sinks[...],
            dropout_p=dropout_p,
            dropout_mask=dropout_mask,
            dropout_rng=dropout_rng,
            bias_NTS=bias_NTS,
        )

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """The parameters under transformers' names (see the class docstring), as NumPy arrays in the
        parameter dtype (``ml_dtypes.bfloat16`` for bf16)."""
        return {key: np.array(self._param(key)[...]) for key in state_dict_shapes(self.config)}

    def load_torch_state_dict(self, state_dict) -> None:
        """Load a state dict (torch tensors or NumPy arrays) with exactly the config's keys and shapes,
        casting to the parameter dtype; bit-exact when the dtypes agree."""
        arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
        for key in check_state_dict({key: a.shape for key, a in arrays.items()}, self.config):
            param = self._param(key)
            _assign(param, jnp.asarray(arrays[key], dtype=param.dtype))

    def _param(self, key: str) -> nnx.Param:
        obj = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj
