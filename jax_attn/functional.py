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
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from attn_spec import check_implementation, check_sdpa
from attn_spec.blocks import block_sizes
from attn_spec.dispatch import AUTO, Choice, select
from jax_attn.masks import causal_mask

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
        diagonal skipped, memory bounded by one block; no dropout, no gradient for a float mask) or
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
    """Flash-attention style SDPA, one key/value head at a time: for each block of ``bt`` queries (all G
    query heads of the group together), a loop over blocks of ``bs`` keys keeping a running row max, row
    sum and unnormalised output (online softmax). With ``is_causal`` the loop stops at the diagonal: key
    blocks wholly above it are never computed. Memory: one block of logits per step instead of
    ``(..., T, S)``. The backward pass (custom VJP) recomputes each block's logits from the saved row
    statistics, so it is bounded too. No gradient flows into a float ``attn_mask`` (it is treated as a
    constant). Block sizes: :func:`attn_spec.blocks.block_sizes`.

    Why per head: XLA:CPU runs a batched matrix product (a batch of heads) at about half the rate of the
    same work as plain 2-D products (measured 47–70 vs 116 GFLOP/s at 64 heads of 128×512×64), so the
    heads are a sequential ``lax.map`` whose body does 2-D products of ``G·bt × H`` by ``H × bs``."""
    ct = _compute_dtype(query.dtype)
    T, S = shapes.T, shapes.S
    q, k, v, mask = _grouped(query.astype(ct), key.astype(ct), value.astype(ct), attn_mask, shapes)
    bt, bs = block_sizes(T, S, bool(is_causal))
    Tp, Sp = -(-T // bt) * bt, -(-S // bs) * bs
    Z, K, G = q.shape[:3]
    # One row per key/value head; the scale is fused into q (one multiply of (T, H), not of (T, S)).
    q = jnp.pad(q * jnp.asarray(scale, ct), [(0, 0)] * 3 + [(0, Tp - T), (0, 0)]).reshape(Z * K, G, Tp, -1)
    k = jnp.pad(k, [(0, 0)] * 2 + [(0, Sp - S), (0, 0)]).reshape(Z * K, Sp, -1)
    v = jnp.pad(v, [(0, 0)] * 2 + [(0, Sp - S), (0, 0)]).reshape(Z * K, Sp, -1)
    if mask is not None:
        pad_T = 0 if mask.shape[-2] == 1 else Tp - T
        pad_S = 0 if mask.shape[-1] == 1 else Sp - S
        fill = False if mask.dtype == jnp.bool_ else 0.0
        mask = jnp.pad(mask, [(0, 0)] * 3 + [(0, pad_T), (0, pad_S)], constant_values=fill)
        if mask.dtype != jnp.bool_:
            mask = mask.astype(ct)
    cfg = _BlockConfig(T=T, S=S, bt=bt, bs=bs, causal=bool(is_causal), K=K)
    out = _flash(cfg, q, k, v, mask)[..., :T, :]
    return out.reshape(shapes.out).astype(query.dtype)


#: The forward of a causal call with at most this many query blocks unrolls the query-block loop: each
#: block's key loop then has a static trip count (XLA unrolls it like the non-causal one). With a traced
#: count the causal B2 T2048 forward ran slower than the non-causal one despite doing 10 of 16 tiles.
#: The backward always loops (see _flash_bwd).
_UNROLL_CAUSAL = 8
#: In such a causal forward, a query block whose keys up to the diagonal number at most this many takes
#: them in (at most) two static ranges, not in key blocks: the keys every row sees in one product without
#: the causal comparison, the diagonal band with it. No online-softmax rescaling between blocks, bigger
#: GEMMs: B2 N8 causal forward 0.66–0.68× torch's fused kernel at T1024/T2048 vs 0.54–0.55× with static
#: 512-key blocks. At T4096 the two are equal and the ranges compile longer (1.9 vs 1.3 s), hence 2048.
_ROWS_MAX_KEYS = 2048
_ALIGN_KEYS = 8


class _BlockConfig(tuple):
    """Static description of a blocked call (hashable, for ``custom_vjp``'s ``nondiff_argnums``)."""

    def __new__(cls, *, T, S, bt, bs, causal, K):
        return super().__new__(cls, (T, S, bt, bs, causal, K))

    T = property(lambda self: self[0])
    S = property(lambda self: self[1])
    bt = property(lambda self: self[2])
    bs = property(lambda self: self[3])
    causal = property(lambda self: self[4])
    K = property(lambda self: self[5])  # key/value heads per batch row (to find a head's mask)

    def key_blocks(self, i, n_s: int):
        """How many key blocks query block ``i`` needs: all, or up to the diagonal when causal
        (top-left: query t sees keys s <= t)."""
        if not self.causal:
            return n_s
        if isinstance(i, int):  # static: a Python int keeps the key loop's trip count static
            return min(n_s, ((i + 1) * self.bt - 1) // self.bs + 1)
        return jnp.minimum(n_s, ((i + 1) * self.bt - 1) // self.bs + 1)


def _head_mask(cfg, mask, h):
    """The mask ``(G|1, T|1, S|1)`` of key/value head row ``h`` (= z·K + k), taken from the grouped mask
    ``(Z|1, K|1, G|1, T|1, S|1)``."""
    if mask is None:
        return None
    z = h // cfg.K if mask.shape[0] != 1 else 0
    kk = h % cfg.K if mask.shape[1] != 1 else 0
    return jax.lax.dynamic_index_in_dim(
        jax.lax.dynamic_index_in_dim(mask, z, axis=0, keepdims=False), kk, axis=0, keepdims=False
    )


def _block_logits(cfg, q_i, k_c, mask_h, i, c0):
    """Logits ``(G, bt, C)`` of query block i (``(G, bt, H)``) against the C keys ``k_c`` that start at
    column ``c0`` (static or traced), masked entries -inf. No batch dimension: the product is one 2-D GEMM
    ``(G·bt, H) × (H, C)``."""
    n_cols = k_c.shape[0]
    s = jnp.einsum("gth,sh->gts", q_i, k_c)
    rows = i * cfg.bt + jnp.arange(cfg.bt)[:, None]
    cols = c0 + jnp.arange(n_cols)[None, :]
    keep = None
    if cfg.causal and not _below_diagonal(cfg, i, c0, n_cols):
        keep = cols <= rows
    if cfg.S % cfg.bs:
        valid = cols < cfg.S  # padded keys
        keep = valid if keep is None else keep & valid
    if mask_h is not None:
        m = mask_h
        if m.shape[-2] != 1:
            m = jax.lax.dynamic_slice_in_dim(m, i * cfg.bt, cfg.bt, axis=1)
        if m.shape[-1] != 1:
            m = jax.lax.dynamic_slice_in_dim(m, c0, n_cols, axis=2)
        if m.dtype == jnp.bool_:
            keep = m if keep is None else keep & m
        else:
            s = s + m
    return s if keep is None else jnp.where(keep, s, -jnp.inf)


def _below_diagonal(cfg, i, c0, n_cols) -> bool:
    """Whether columns ``[c0, c0 + n_cols)`` are all visible to every row of query block i (known only for
    static indices): then the causal comparison is skipped."""
    if not (isinstance(i, int) and isinstance(c0, int)):
        return False
    return c0 + n_cols - 1 <= i * cfg.bt


def _key_ranges(cfg, i, n_s):
    """The key column ranges query block i visits, as ``(traced loop count, None)`` or, for a static causal
    block, a list of static ``(c0, n_cols)`` ranges: the keys wholly below the diagonal in one range
    (one GEMM, no causal comparison) and the rest up to the diagonal in another."""
    if not (cfg.causal and isinstance(i, int)):
        return cfg.key_blocks(i, n_s), None
    end = min(cfg.bs * n_s, (i + 1) * cfg.bt)  # keys past the block's last row are never visible
    if cfg.bs * n_s > _ROWS_MAX_KEYS:
        return cfg.key_blocks(i, n_s), None  # long keys: stay in blocks (bounded memory)
    full = min(end, i * cfg.bt + 1)  # columns <= the block's first row: visible to all its rows
    full = (full // _ALIGN_KEYS) * _ALIGN_KEYS
    ranges = [(0, full)] if full else []
    if end > full:
        ranges.append((full, end - full))
    return None, ranges


def _over_keys(cfg, i, n_s, keys, carry):
    """``carry`` through ``keys(carry, c0, n_cols)`` for every key range query block i visits: a loop over
    key blocks, or the static ranges of :func:`_key_ranges`."""
    count, ranges = _key_ranges(cfg, i, n_s)
    if ranges is None:
        return jax.lax.fori_loop(0, count, lambda j, c: keys(c, j * cfg.bs, cfg.bs), carry)
    for c0, n_cols in ranges:
        carry = keys(carry, c0, n_cols)
    return carry


def _blocks(x, size, axis):
    """``x`` cut into blocks of ``size`` along ``axis``, the block index moved to the front."""
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x, axis):
    """Inverse of :func:`_blocks`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _flash_forward(cfg, q, k, v, mask):
    """Output ``(ZK, G, Tp, V)`` and the row statistics ``(ZK, G, Tp, 2)``: the max the row was shifted by
    (0 for rows with no key) and the row sum (1 for rows with no key). They are kept apart, not folded into
    a logsumexp: with a ``finfo.min`` additive mask, ``max + log(sum)`` rounds to ``max``."""
    G, Tp = q.shape[1:3]
    n_t, n_s = Tp // cfg.bt, k.shape[1] // cfg.bs
    Vw = v.shape[-1]

    def head(args):
        h, q_h, k_h, v_h = args
        mask_h = _head_mask(cfg, mask, h)

        def query_block(args):
            i, q_i = args

            def keys(carry, c0, n_cols):
                m, row_sum, acc = carry
                k_c = jax.lax.dynamic_slice_in_dim(k_h, c0, n_cols, axis=0)
                v_c = jax.lax.dynamic_slice_in_dim(v_h, c0, n_cols, axis=0)
                s = _block_logits(cfg, q_i, k_c, mask_h, i, c0)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                # A row with nothing kept so far has max -inf: shift by 0 so exp gives exact zeros.
                m_use = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_use[..., None])
                alpha = jnp.exp(m - m_use)
                row_sum = alpha * row_sum + jnp.sum(p, axis=-1)
                acc = alpha[..., None] * acc + jnp.einsum("gts,sv->gtv", p, v_c)
                return m_new, row_sum, acc

            carry = (
                jnp.full((G, cfg.bt), -jnp.inf, q.dtype),
                jnp.zeros((G, cfg.bt), q.dtype),
                jnp.zeros((G, cfg.bt, Vw), q.dtype),
            )
            m, row_sum, acc = _over_keys(cfg, i, n_s, keys, carry)
            empty = row_sum == 0.0
            row_sum = jnp.where(empty, 1.0, row_sum)
            stats = jnp.stack([jnp.where(empty, 0.0, m), row_sum], axis=-1)
            return acc / row_sum[..., None], stats

        q_blocks = _blocks(q_h, cfg.bt, 1)
        if cfg.causal and n_t <= _UNROLL_CAUSAL:
            # Static block indices give each query block static key ranges (see _UNROLL_CAUSAL).
            outs = [query_block((i, q_blocks[i])) for i in range(n_t)]
            out, stats = (jnp.stack(x) for x in zip(*outs))
        else:
            out, stats = jax.lax.map(query_block, (jnp.arange(n_t), q_blocks))
        return _unblocks(out, 1), _unblocks(stats, 1)

    return jax.lax.map(head, (jnp.arange(q.shape[0]), q, k, v))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, mask):
    return _flash_forward(cfg, q, k, v, mask)[0]


def _flash_fwd(cfg, q, k, v, mask):
    out, stats = _flash_forward(cfg, q, k, v, mask)
    return out, (q, k, v, mask, out, stats)


def _flash_bwd(cfg, residuals, d_out):
    """FlashAttention-2 backward in one pass per head: for each query block (a scan carrying the head's dk
    and dv), a loop over its key blocks recomputes ``p = exp(s - max) / sum`` and adds that block's share
    to dq, dk and dv. The heads and blocks run in sequence, so the accumulations need no atomics and no
    second pass."""
    q, k, v, mask, out, stats = residuals
    n_s = k.shape[1] // cfg.bs
    delta = jnp.sum(d_out * out, axis=-1)  # (ZK, G, Tp): rowsum(dO ∘ O)

    def head(args):
        h, q_h, k_h, v_h, do_h, st_h, delta_h = args
        mask_h = _head_mask(cfg, mask, h)

        def query_block(carry, xs):
            i, q_i, do_i, st_i, delta_i = xs

            def keys(inner, c0, n_cols):
                dq_i, dk_h, dv_h = inner
                k_c = jax.lax.dynamic_slice_in_dim(k_h, c0, n_cols, axis=0)
                v_c = jax.lax.dynamic_slice_in_dim(v_h, c0, n_cols, axis=0)
                s = _block_logits(cfg, q_i, k_c, mask_h, i, c0)
                p = jnp.exp(s - st_i[..., 0:1]) / st_i[..., 1:2]
                dp = jnp.einsum("gtv,sv->gts", do_i, v_c)
                ds = p * (dp - delta_i[..., None])
                dq_i = dq_i + jnp.einsum("gts,sh->gth", ds, k_c)
                dk_c = jax.lax.dynamic_slice_in_dim(dk_h, c0, n_cols, axis=0)
                dv_c = jax.lax.dynamic_slice_in_dim(dv_h, c0, n_cols, axis=0)
                dk_c = dk_c + jnp.einsum("gts,gth->sh", ds, q_i)
                dv_c = dv_c + jnp.einsum("gts,gtv->sv", p, do_i)
                dk_h = jax.lax.dynamic_update_slice_in_dim(dk_h, dk_c, c0, axis=0)
                dv_h = jax.lax.dynamic_update_slice_in_dim(dv_h, dv_c, c0, axis=0)
                return dq_i, dk_h, dv_h

            dk_h, dv_h = carry
            dq_i, dk_h, dv_h = _over_keys(cfg, i, n_s, keys, (jnp.zeros_like(q_i), dk_h, dv_h))
            return (dk_h, dv_h), dq_i

        n_t = q_h.shape[1] // cfg.bt
        xs = (
            jnp.arange(n_t),
            _blocks(q_h, cfg.bt, 1),
            _blocks(do_h, cfg.bt, 1),
            _blocks(st_h, cfg.bt, 1),
            _blocks(delta_h, cfg.bt, 1),
        )
        # A scan with a traced block index: the backward's tiles stay 512×512 (unrolling it into the
        # forward's static key ranges gave bigger working sets and was slower at T >= 2048: B2 T2048
        # causal forward+backward 0.48× torch unrolled vs 0.58× looped, and compiled longer).
        carry = (jnp.zeros_like(k_h), jnp.zeros_like(v_h))
        (dk_h, dv_h), dq = jax.lax.scan(query_block, carry, xs)
        return _unblocks(dq, 1), dk_h, dv_h

    dq, dk, dv = jax.lax.map(head, (jnp.arange(q.shape[0]), q, k, v, d_out, stats, delta))
    if mask is None:
        d_mask = None
    elif mask.dtype == jnp.bool_:
        d_mask = np.zeros(mask.shape, jax.dtypes.float0)
    else:
        d_mask = jnp.zeros_like(mask)  # the mask is a constant here (see _blocked_attention)
    return dq, dk, dv, d_mask


_flash.defvjp(_flash_fwd, _flash_bwd)


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
