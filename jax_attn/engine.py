"""One blocked online-softmax attention engine (JAX twin of ``torch_attn/engine.py``).

Dimension key (see ``attn_spec``): B batch, K key/value heads, G query heads per key/value head, N = K·G
query heads, T query length, S key length, H q/k head width, V value width.

The engine takes queries grouped by their key/value head and, per ``(b, query head, query block)``, two
tables of key blocks to visit: *partial* blocks, where ``mask_fn`` is evaluated, and *full* blocks, where
every entry is kept and the mask is skipped. Nothing else is computed: a key block that no table lists
costs nothing, forward or backward. An optional elementwise ``score_fn(score, b, h, q_idx, kv_idx)``
rewrites the logits before the mask (FlexAttention's ``score_mod``). Block skipping, the padding of
lengths that are not multiples of the block, fully masked rows (output 0, lse -inf) and the backward
live here once, for FlexAttention's block masks and for sliding windows.

Memory: one ``(G·bt, bs)`` block of logits per step, forward and backward. The backward is a custom VJP
that walks the same block tables (FlashAttention-2's single pass: per query block, recompute each visited
block's probabilities from the saved row max and sum, accumulate dq, dk, dv), honours a cotangent on the
log-sum-exp (``d lse / d s = p``) and pulls the gradient back through ``score_fn`` with ``jax.vjp``, so
float arrays the score function captures (a learned bias table) receive gradients.

Why per row and per block: XLA:CPU runs 2-D GEMMs faster than batched ones (measured 47–70 vs 116
GFLOP/s at 64 heads of 128×512×64, see docs/performance.md), so rows (a key/value head, or one query head
when the tables differ per head) are a ``lax.map`` whose body does ``(G·bt, H) × (H, bs)`` products, and a
query block's visit list is a ``fori_loop`` over its count with key blocks taken by ``dynamic_slice``.

The *dense* plan (``tables=None``) is SDPA's ``implementation="blocked"``: no tables, every key block, or
with ``causal`` only those up to the diagonal; short causal calls unroll the query blocks so each takes
its keys in static ranges (:func:`_key_ranges`). It takes a dense bool or float mask, sliced per block; a
float mask receives its gradient (``d mask = ds`` summed over the mask's size-1 axes).

JAX only: on the CPU backend the dense plan with no mask, fp32 and one key/value row per batch row runs on
a compiled kernel (:mod:`jax_attn.native`, through XLA's FFI) instead of the XLA loops below: the same
online softmax and the same custom VJP, with a parallel loop over whole work items that XLA:CPU's per-op
threading does not give (:data:`NATIVE`, :func:`native_reason`).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attn_spec.blocks import backward_query_block
from attn_spec.flex import cdiv


class BlockTables(NamedTuple):
    """Per ``(b, query head, query block)`` lists of key blocks, torch's BlockMask layout: the first
    ``num[b, h, i]`` entries of ``idx[b, h, i]`` are the blocks to visit. Leading dims ``(B|1, N|1)``.
    ``full_*`` may be None (no full blocks)."""

    kv_num: jnp.ndarray  # (B|1, N|1, n_q) int32
    kv_idx: jnp.ndarray  # (B|1, N|1, n_q, n_kv|…) int32
    full_num: jnp.ndarray | None = None
    full_idx: jnp.ndarray | None = None


def dense_tables(T: int, S: int, bt: int, bs: int) -> BlockTables:
    """Tables that visit every key block: full where the block lies inside ``(T, S)``, partial (only the
    padding masked) for the blocks on the last query or key block that run past the lengths."""
    n_q, n_kv = cdiv(T, bt), cdiv(S, bs)
    full = np.ones((n_q, n_kv), bool)
    if T % bt:
        full[-1, :] = False
    if S % bs:
        full[:, -1] = False
    return tables_from_dense(~full, full)


def tables_from_dense(partial_blocks, full_blocks) -> BlockTables:
    """Tables from block-level bool arrays ``(B|1, N|1, n_q, n_kv)`` (or ``(n_q, n_kv)``): the listed
    blocks first in increasing order, then the others (torch's stable descending sort)."""

    def ordered(dense):
        dense = jnp.asarray(dense)
        dense = dense.reshape((1,) * (4 - dense.ndim) + dense.shape)
        num = jnp.sum(dense, axis=-1, dtype=jnp.int32)
        idx = jnp.argsort(~dense, axis=-1, stable=True).astype(jnp.int32)
        return num, idx

    kv_num, kv_idx = ordered(partial_blocks)
    full_num, full_idx = ordered(full_blocks)
    return BlockTables(kv_num, kv_idx, full_num, full_idx)


class _Cfg(NamedTuple):
    """Static description of one engine call (hashable: custom_vjp's nondiff argument)."""

    T: int
    S: int
    bt: int
    bs: int
    B: int
    K: int
    G: int
    Gp: int  # rows per key/value head (G when the tables differ per query head, else 1)
    Bt: int  # batch size of the tables (1 = broadcast)
    Bk: int  # batch size of k and v (1 = broadcast)
    Nt: int  # heads of the tables (1 = broadcast)
    n_score: int  # how many of the hoisted constants belong to the score function
    scale: float  # logit scale, applied per query block
    dense: bool = False  # no tables: every key block (up to the diagonal when causal), SDPA's plan
    causal: bool = False  # dense only: top-left causal (query t sees keys s <= t)
    mask_kind: int = 0  # dense only: 0 no mask, 1 bool keep-mask, 2 float additive mask (gets a gradient)
    bt_bwd: int = 0  # dense only: the backward's query block (divides bt; 0 = bt), see _engine_bwd
    native: bool = False  # dense only, JAX only: the compiled CPU kernel runs the call (jax_attn.native)


#: Whether the dense plan may run on the compiled CPU kernel where it applies (:func:`native_reason`);
#: tests set it False to exercise the XLA loops on the same inputs.
NATIVE = True


def native_reason(q_dtype, *, mask=None, Bk: int = 1, B: int = 1) -> str:
    """Why a dense-plan call with these facts does not run on the compiled CPU kernel ("" when it does):
    the kernel takes fp32 with no mask on the CPU backend, key/value rows per batch row (no broadcast
    batch), and needs a C++ compiler once (:func:`jax_attn.native.unavailable`)."""
    if not NATIVE:
        return "engine.NATIVE is False"
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}, not cpu"
    if jnp.dtype(q_dtype) != jnp.float32:
        return f"the kernel takes float32, not {jnp.dtype(q_dtype).name}"
    if mask is not None:
        return "a mask array is given"
    if Bk != B:
        return f"a key/value batch of {Bk} broadcast over {B}"
    from jax_attn import native  # noqa: PLC0415 (builds the kernel on first use)

    return native.unavailable()


def _hoist(fn, example_args):
    """``fn`` as a closed jaxpr: returns ``(pure_fn, consts)`` with ``pure_fn(*args, *consts)``. Every
    captured array (traced or not) becomes an explicit argument, so arrays a mod captures under ``jit``
    pass through the custom VJP, and float ones receive gradients."""
    if fn is None:
        return None, []
    closed = jax.make_jaxpr(fn)(*example_args)
    jaxpr, n_in = closed.jaxpr, len(example_args)

    def pure(*args):
        return jax.core.eval_jaxpr(jaxpr, args[n_in:], *args[:n_in])[0]

    return pure, list(closed.consts)


def block_attention(
    q,
    k,
    v,
    tables: BlockTables | None,
    *,
    T,
    S,
    bt,
    bs,
    scale=1.0,
    score_fn=None,
    mask_fn=None,
    causal=False,
    mask=None,
):
    """Attention over the key blocks ``tables`` lists.

    Args:
      q: ``(B, K, G, T, H)``. k: ``(B|1, K, S, H)``. v: ``(B|1, K, S, V)``: a key/value batch of 1
        serves every query batch row (indexed, not copied). One floating compute dtype for all three.
      scale: the logit scale, applied to each query block as it is visited (the backward keeps the
        unscaled ``q`` as its residual: no scaled copy of q in memory).
      tables: :class:`BlockTables` with ``n_q = ceil(T / bt)`` query blocks and key blocks of ``bs``.
      score_fn: ``score_fn(score, b, h, q_idx, kv_idx)`` elementwise on each block's logits, called with
        broadcastable arrays (score ``(G', bt, bs)``, b a scalar, h ``(G', 1, 1)`` query head indices,
        q_idx ``(1, bt, 1)``, kv_idx ``(1, 1, bs)``); applied before the mask.
      mask_fn: ``mask_fn(b, h, q_idx, kv_idx)`` → bool keep (True = may attend), same arguments,
        evaluated on partial blocks only.
      tables=None selects the *dense* plan of SDPA's ``implementation="blocked"``: every key block, or
      with ``causal`` (top-left) only those up to the diagonal (see :func:`_key_ranges`), and ``mask``:
      None or a grouped dense mask ``(B|1, K|1, G|1, T|1, S|1)``, bool (True = may attend) or float
      (added to the scaled logits; it receives its gradient). ``score_fn``/``mask_fn`` must be None then.

    Returns:
      ``(out (B, K, G, T, V), lse (B, K, G, T))``: lse is the natural-log sum of the exponentiated
      logits of the kept keys, -inf for rows with nothing kept (whose output is 0).
    """
    B, K, G = q.shape[:3]
    n_q, n_kv = cdiv(T, bt), cdiv(S, bs)
    Tp, Sp = n_q * bt, n_kv * bs
    dense = tables is None
    if dense:
        if score_fn is not None or mask_fn is not None:
            raise ValueError("block_attention: the dense plan (tables=None) takes no score_fn or mask_fn")
        if not native_reason(q.dtype, mask=mask, Bk=k.shape[0], B=B):
            # the compiled kernel: rows (B·K·G, T, H) against key rows (B·K, S, H), no padding
            cfg = _Cfg(T, S, bt, bs, B, K, G, 1, 1, B, 1, 0, float(scale), True, bool(causal), native=True)
            q3, k3 = q.reshape(B * K * G, T, q.shape[-1]), k.reshape(B * K, S, k.shape[-1])
            out, lse = _engine(cfg, None, None, q3, k3, v.reshape(B * K, S, v.shape[-1]), (), (), None)
            return out.reshape(B, K, G, T, -1), lse.reshape(B, K, G, T)
    mask_kind = 0
    if mask is not None:
        mask_kind = 1 if mask.dtype == jnp.bool_ else 2
        pad_T = 0 if mask.shape[-2] == 1 else Tp - T
        pad_S = 0 if mask.shape[-1] == 1 else Sp - S
        fill = False if mask_kind == 1 else 0.0
        mask = jnp.pad(mask, [(0, 0)] * 3 + [(0, pad_T), (0, pad_S)], constant_values=fill)
        if mask_kind == 2:
            mask = mask.astype(q.dtype)
    Bt, Nt = (1, 1) if dense else tables.kv_num.shape[:2]
    Gp = G if Nt > 1 else 1
    Gi = G // Gp
    if dense:
        # SDPA's trick: the scale fused into q once (one multiply of (T, H), fused with the padding). A
        # scale applied per query block cost the backward 20-30% at T >= 512 (B1 N8 H64, 2-core CPU).
        q, scale = q * jnp.asarray(scale, q.dtype), 1.0
    # rows of (Gi·Tp, H): a plain bitcast of (B, K, G, Tp, H); a separate size-1 Gi axis made XLA:CPU copy q
    q = jnp.pad(q, [(0, 0)] * 3 + [(0, Tp - T), (0, 0)]).reshape(B * K * Gp, Gi * Tp, q.shape[-1])
    Bk = k.shape[0]
    k = jnp.pad(k, [(0, 0)] * 2 + [(0, Sp - S), (0, 0)]).reshape(Bk * K, Sp, k.shape[-1])
    v = jnp.pad(v, [(0, 0)] * 2 + [(0, Sp - S), (0, 0)]).reshape(Bk * K, Sp, v.shape[-1])
    tabs = ()
    if not dense:
        full_num, full_idx = tables.full_num, tables.full_idx
        if full_num is None:
            full_num = jnp.zeros_like(tables.kv_num)
            full_idx = jnp.zeros(tables.kv_num.shape + (1,), jnp.int32)
        tabs = (tables.kv_num, tables.kv_idx, full_num, full_idx)
    score_pure, s_consts, mask_pure, m_consts = None, [], None, []
    if score_fn is not None or mask_fn is not None:  # example arguments of the mods' signature
        ints = jnp.zeros((), jnp.int32)
        idx_args = (ints, jnp.zeros((Gi, 1, 1), jnp.int32), jnp.zeros((1, bt, 1), jnp.int32))
        idx_args += (jnp.zeros((1, 1, bs), jnp.int32),)
        score_pure, s_consts = _hoist(score_fn, (jnp.zeros((Gi, bt, bs), q.dtype), *idx_args))
        mask_pure, m_consts = _hoist(mask_fn, idx_args)
    bt_bwd = backward_query_block(bt, Gi) if dense else 0
    cfg = _Cfg(
        T, S, bt, bs, B, K, G, Gp, Bt, Bk, Nt, len(s_consts), float(scale), dense, bool(causal), mask_kind,
        bt_bwd,
    )  # fmt: skip
    out, lse = _engine(cfg, score_pure, mask_pure, q, k, v, tabs, tuple(s_consts) + tuple(m_consts), mask)
    out = out.reshape(B, K, G, Tp, -1)[..., :T, :]
    return out, lse.reshape(B, K, G, Tp)[..., :T]


# ------------------------------------------------------------------------------- the engine


def _kv_row(cfg, r):
    """The ``(b·K + kvh)`` row of k and v that row ``r`` reads (batch 0 for a broadcast key/value)."""
    kv = r // cfg.Gp
    return kv if cfg.Bk > 1 else kv % cfg.K


def _kv_grad(cfg, d):
    """Per-row ``(R, Sp, ·)`` key/value gradients summed into k's rows: over the ``Gp`` rows of one
    key/value head (each holds a share) and, for a broadcast key/value, over the batch."""
    d = d.reshape(cfg.B, cfg.K, cfg.Gp, *d.shape[1:])
    if cfg.Gp > 1:
        d = d.sum(axis=2)
    else:
        d = d[:, :, 0]
    if cfg.Bk == 1 and cfg.B > 1:
        d = d.sum(axis=0, keepdims=True)
    return d.reshape(-1, *d.shape[2:])


def _row_ids(cfg, r):
    """Batch index, query head indices ``(G',)`` and table row of row ``r``."""
    if cfg.dense:  # no mods and no tables: nothing reads them
        return None, None, 0, 0
    b = r // (cfg.K * cfg.Gp)
    kvh = (r // cfg.Gp) % cfg.K
    gp = r % cfg.Gp
    Gi = cfg.G // cfg.Gp
    h = kvh * cfg.G + gp * Gi + jnp.arange(Gi, dtype=jnp.int32)
    tb = b if cfg.Bt > 1 else 0
    th = h[0] if cfg.Nt > 1 else 0
    return b, h, tb, th


#: The forward of a dense causal call with at most this many query blocks unrolls the query-block loop:
#: each block's key loop then has a static trip count (XLA unrolls it like the non-causal one). With a
#: traced count the causal B2 T2048 forward ran slower than the non-causal one despite doing 10 of 16
#: tiles. The backward always loops (see _engine_bwd).
_UNROLL_CAUSAL = 8
#: In such a causal forward, a query block whose keys up to the diagonal number at most this many takes
#: them in (at most) two static ranges, not in key blocks: the keys every row sees in one product without
#: the causal comparison, the diagonal band with it. No online-softmax rescaling between blocks, bigger
#: GEMMs: B2 N8 causal forward 0.66–0.68× torch's fused kernel at T1024/T2048 vs 0.54–0.55× with static
#: 512-key blocks. At T4096 the two are equal and the ranges compile longer (1.9 vs 1.3 s), hence 2048.
#: A non-causal dense call whose keys number more than one block and at most this many takes them in one
#: range too, in the forward and the backward (the query blocks still loop): B2 N8 T2048 H64 JAX forward
#: 0.13-0.15 -> 0.11 s, forward+backward 0.44 -> 0.37 s; GQA B1 N32 K8 T2048 0.21 -> 0.19 s and
#: 0.74 -> 0.63 s (2-core CPU).
_ROWS_MAX_KEYS = 2048
_ALIGN_KEYS = 8
#: Whether the non-causal single range above is taken (the torch twin: False, its rows are batched).
_WHOLE_KEYS = True


def _key_blocks(cfg, i, n_kv):
    """How many key blocks dense query block ``i`` needs: all, or up to the diagonal when causal."""
    if not cfg.causal:
        return n_kv
    if isinstance(i, int):  # static: a Python int keeps the key loop's trip count static
        return min(n_kv, ((i + 1) * cfg.bt - 1) // cfg.bs + 1)
    return jnp.minimum(n_kv, ((i + 1) * cfg.bt - 1) // cfg.bs + 1)


def _below_diagonal(cfg, i, c0, n_cols) -> bool:
    """Whether columns ``[c0, c0 + n_cols)`` are all visible to every row of query block i (known only for
    static indices): then the causal comparison is skipped."""
    if not (isinstance(i, int) and isinstance(c0, int)):
        return False
    return c0 + n_cols - 1 <= i * cfg.bt


def _key_ranges(cfg, i, n_kv):
    """The key column ranges dense query block i visits, as ``(loop count, None)`` or, for a static causal
    block, a list of static ``(c0, n_cols)`` ranges: the keys wholly below the diagonal in one range (one
    GEMM, no causal comparison) and the rest up to the diagonal in another. A non-causal call with more than
    one key block and at most :data:`_ROWS_MAX_KEYS` keys takes them all in one range, ``[(0, Sp)]``, whatever
    i (where :data:`_WHOLE_KEYS`)."""
    if _WHOLE_KEYS and not cfg.causal and 1 < n_kv and cfg.bs * n_kv <= _ROWS_MAX_KEYS:
        return None, [(0, cfg.bs * n_kv)]  # every key in one range (forward and backward, see above)
    if not (cfg.causal and isinstance(i, int)):
        return _key_blocks(cfg, i, n_kv), None
    end = min(cfg.bs * n_kv, (i + 1) * cfg.bt)  # keys past the block's last row are never visible
    if cfg.bs * n_kv > _ROWS_MAX_KEYS:
        return _key_blocks(cfg, i, n_kv), None  # long keys: stay in blocks (bounded memory)
    full = min(end, i * cfg.bt + 1)  # columns <= the block's first row: visible to all its rows
    full = (full // _ALIGN_KEYS) * _ALIGN_KEYS
    ranges = [(0, full)] if full else []
    if end > full:
        ranges.append((full, end - full))
    return None, ranges


def _walk(cfg, tabs, tb, th, i, n_kv, step, carry):
    """``carry`` through ``step(carry, c0, n_cols, partial_block)`` for every key range query block i
    visits: the tables' partial then full blocks, or the dense plan (:func:`_key_ranges`)."""
    if cfg.dense:
        count, ranges = _key_ranges(cfg, i, n_kv)
        if ranges is None:
            return jax.lax.fori_loop(0, count, lambda j, c: step(c, j * cfg.bs, cfg.bs, True), carry)
        for c0, n_cols in ranges:
            carry = step(carry, c0, n_cols, True)
        return carry
    kv_num, kv_idx, full_num, full_idx = tabs

    def visit(idx, partial_block):
        return lambda j, c: step(c, idx[j] * cfg.bs, cfg.bs, partial_block)

    carry = jax.lax.fori_loop(0, kv_num[tb, th, i], visit(kv_idx[tb, th, i], True), carry)
    return jax.lax.fori_loop(0, full_num[tb, th, i], visit(full_idx[tb, th, i], False), carry)


def _mask_row(cfg, mask, r):
    """The dense mask ``(G|1, Tp|1, Sp|1)`` of row ``r`` (= b·K + k) and its (b, k) position in the
    grouped mask ``(B|1, K|1, G|1, Tp|1, Sp|1)``."""
    if mask is None:
        return None, None
    z = r // cfg.K if mask.shape[0] != 1 else 0
    kk = r % cfg.K if mask.shape[1] != 1 else 0
    m = jax.lax.dynamic_index_in_dim(mask, z, axis=0, keepdims=False)
    return jax.lax.dynamic_index_in_dim(m, kk, axis=0, keepdims=False), (z, kk)


def _mask_block(cfg, m_r, i, c0, n_cols):
    """Rows ``[i·bt, i·bt + bt)`` and columns ``[c0, c0 + n_cols)`` of a row's dense mask (size-1 axes
    stay size 1)."""
    if m_r is None:
        return None
    m = m_r
    if m.shape[-2] != 1:
        m = jax.lax.dynamic_slice_in_dim(m, i * cfg.bt, cfg.bt, axis=1)
    if m.shape[-1] != 1:
        m = jax.lax.dynamic_slice_in_dim(m, c0, n_cols, axis=2)
    return m


def _indices(cfg, i, c0, n_cols):
    """Row and column indices of query block i against the ``n_cols`` keys from ``c0``, and the clamped
    ``(1, bt, 1)``, ``(1, 1, n_cols)`` indices the mods see: mods never see an index past the lengths
    (they may index arrays of that length)."""
    rows = i * cfg.bt + jnp.arange(cfg.bt, dtype=jnp.int32)[:, None]
    cols = c0 + jnp.arange(n_cols, dtype=jnp.int32)[None, :]
    return rows, cols, jnp.minimum(rows, cfg.T - 1)[None], jnp.minimum(cols, cfg.S - 1)[None]


def _masked(cfg, mask_pure, consts, s, b, h, i, c0, idx, partial_block, m_blk):
    """Tables: on a partial block, the mask and the padding past T or S as -inf (a block that runs past
    the lengths is never full, so full blocks need neither). Dense: the causal comparison (unless the
    columns are all below the diagonal), the key padding and the dense mask block ``m_blk``."""
    keep = None
    if cfg.dense:  # (idx is None: no mods; the indices are made here where needed)
        n_cols = s.shape[-1]
        causal = cfg.causal and not _below_diagonal(cfg, i, c0, n_cols)
        if causal or cfg.S % cfg.bs:
            rows, cols = _indices(cfg, i, c0, n_cols)[:2]
        if causal:
            keep = cols <= rows
        if cfg.S % cfg.bs:
            valid = cols < cfg.S  # padded keys (padded query rows are sliced off)
            keep = valid if keep is None else keep & valid
        if m_blk is not None:
            if cfg.mask_kind == 1:
                keep = m_blk if keep is None else keep & m_blk
            else:
                s = s + m_blk
        return s if keep is None else jnp.where(keep, s, -jnp.inf)
    rows, cols, q_idx, kv_idx = idx
    if not partial_block:
        return s
    if cfg.T % cfg.bt or cfg.S % cfg.bs:
        keep = (rows < cfg.T) & (cols < cfg.S)
    if mask_pure is not None:
        m = mask_pure(b, h[:, None, None], q_idx, kv_idx, *consts[cfg.n_score :])
        keep = m if keep is None else keep & m
    return s if keep is None else jnp.where(keep, s, -jnp.inf)


def _logits(cfg, score_pure, mask_pure, consts, q_i, k_c, b, h, i, c0, partial_block, m_blk):
    """Logits ``(G', bt, C)`` of query block i against the C keys ``k_c`` from column ``c0``, the score
    function applied before the mask. No batch dimension: one 2-D GEMM ``(G'·bt, H) × (H, C)``."""
    s = jnp.einsum("gth,sh->gts", q_i, k_c)
    idx = None if cfg.dense else _indices(cfg, i, c0, k_c.shape[0])  # the dense plan has no mods
    if score_pure is not None:
        s = score_pure(s, b, h[:, None, None], idx[2], idx[3], *consts[: cfg.n_score])
    return _masked(cfg, mask_pure, consts, s, b, h, i, c0, idx, partial_block, m_blk)


def _forward(cfg, score_pure, mask_pure, q, k, v, tabs, consts, mask):
    """Rows: output ``(R, G', Tp, V)`` and statistics ``(R, G', Tp, 3)``: the max the row was shifted by
    (0 for rows with nothing kept), the row sum (1 for them) and the lse (-inf for them). Max and sum are
    kept apart for the backward, where ``exp((s - max) - log sum)`` is exact for every row (folded into a
    logsumexp, a ``finfo.min`` additive mask would round ``max + log(sum)`` to ``max``). The compiled
    kernel (``cfg.native``) returns the same three, ``(R, T, 3)``."""
    if cfg.native:
        from jax_attn import native  # noqa: PLC0415

        return native.forward(q, k, v, groups=cfg.G, scale=cfg.scale, causal=cfg.causal)
    Gi = cfg.G // cfg.Gp
    Tp = q.shape[1] // Gi
    n_q, n_kv, Vw = Tp // cfg.bt, k.shape[1] // cfg.bs, v.shape[-1]

    def row(r):
        # q is indexed here like k and v rather than sliced by lax.map: as a mapped input XLA:CPU copied
        # it whole (a layout change for the size-1 head axis), a q-sized temporary
        q_r = jax.lax.dynamic_index_in_dim(q, r, 0, keepdims=False).reshape(Gi, Tp, -1)
        k_r = jax.lax.dynamic_index_in_dim(k, _kv_row(cfg, r), 0, keepdims=False)
        v_r = jax.lax.dynamic_index_in_dim(v, _kv_row(cfg, r), 0, keepdims=False)
        m_r, _ = _mask_row(cfg, mask, r)
        b, h, tb, th = _row_ids(cfg, r)

        def query_block(args):
            i, q_i = args
            if cfg.scale != 1.0:
                q_i = q_i * jnp.asarray(cfg.scale, q_i.dtype)

            def step(carry, c0, n_cols, partial_block):
                m, row_sum, acc = carry
                k_c = jax.lax.dynamic_slice_in_dim(k_r, c0, n_cols, axis=0)
                v_c = jax.lax.dynamic_slice_in_dim(v_r, c0, n_cols, axis=0)
                m_blk = _mask_block(cfg, m_r, i, c0, n_cols)
                s = _logits(cfg, score_pure, mask_pure, consts, q_i, k_c, b, h, i, c0, partial_block, m_blk)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                # A row with nothing kept so far has max -inf: shift by 0 so exp gives exact zeros.
                m_use = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_use[..., None])
                alpha = jnp.exp(m - m_use)
                row_sum = alpha * row_sum + jnp.sum(p, axis=-1)
                acc = alpha[..., None] * acc + jnp.einsum("gts,sv->gtv", p, v_c)
                return m_new, row_sum, acc

            carry = (
                jnp.full((Gi, cfg.bt), -jnp.inf, q.dtype),
                jnp.zeros((Gi, cfg.bt), q.dtype),
                jnp.zeros((Gi, cfg.bt, Vw), q.dtype),
            )
            m, row_sum, acc = _walk(cfg, tabs, tb, th, i, n_kv, step, carry)
            empty = row_sum == 0.0
            lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, row_sum)))
            row_sum = jnp.where(empty, 1.0, row_sum)
            m = jnp.where(empty, 0.0, m)
            return acc / row_sum[..., None], jnp.stack([m, row_sum, lse], axis=-1)

        q_blocks = jnp.moveaxis(q_r.reshape(Gi, n_q, cfg.bt, -1), 1, 0)
        if cfg.dense and cfg.causal and n_q <= _UNROLL_CAUSAL:
            # Static block indices give each query block static key ranges (see _UNROLL_CAUSAL).
            outs = [query_block((i, q_blocks[i])) for i in range(n_q)]
            out, stats = (jnp.stack(x) for x in zip(*outs, strict=True))
        else:
            out, stats = jax.lax.map(query_block, (jnp.arange(n_q, dtype=jnp.int32), q_blocks))
        return jnp.moveaxis(out, 0, 1).reshape(Gi, Tp, Vw), jnp.moveaxis(stats, 0, 1).reshape(Gi, Tp, 3)

    return jax.lax.map(row, jnp.arange(q.shape[0], dtype=jnp.int32))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _engine(cfg, score_pure, mask_pure, q, k, v, tabs, consts, mask):
    out, stats = _forward(cfg, score_pure, mask_pure, q, k, v, tabs, consts, mask)
    return out, stats[..., -1]


def _engine_fwd(cfg, score_pure, mask_pure, q, k, v, tabs, consts, mask):
    out, stats = _forward(cfg, score_pure, mask_pure, q, k, v, tabs, consts, mask)
    return (out, stats[..., -1]), (q, k, v, tabs, consts, mask, out, stats)


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _add_mask_grad(cfg, d_mask, pos, ds, i, c0):
    """``ds`` ``(G', bt, C)`` summed over the float mask's size-1 axes and added to its block of
    ``d_mask`` ``(B|1, K|1, G|1, Tp|1, Sp|1)`` at the row's position ``pos``."""
    if d_mask.shape[2] == 1:
        ds = ds.sum(axis=0, keepdims=True)
    t0 = 0
    if d_mask.shape[3] == 1:
        ds = ds.sum(axis=1, keepdims=True)
    else:
        t0 = i * cfg.bt
    col0 = 0
    if d_mask.shape[4] == 1:
        ds = ds.sum(axis=2, keepdims=True)
    else:
        col0 = c0
    start = tuple(jnp.asarray(x, jnp.int32) for x in (pos[0], pos[1], 0, t0, col0))
    block = jax.lax.dynamic_slice(d_mask, start, (1, 1, *ds.shape))
    return jax.lax.dynamic_update_slice(d_mask, block + ds[None, None], start)


def _engine_bwd(cfg, score_pure, mask_pure, residuals, cotangents):
    """One pass per row: a scan over query blocks carrying the row's dk, dv, the gradients of the score
    function's float constants and of a float dense mask; per query block the same key walk as the forward
    recomputes ``p = exp((s - max) - log sum)`` (no division per logit) and adds its share. dk and dv are
    accumulated transposed, ``(H, Sp)`` per row: their products are ``qᵀ·ds`` and ``dOᵀ·p`` with ``(H, C)``
    results, where XLA:CPU ran the ``(C, H)`` form ``dsᵀ·q`` at about half the rate of the other products
    (512×512×64 tiles: 96 vs 167 GFLOP/s; B2 N8 T2048 H64 forward+backward 0.32 → 0.29 s causal, 0.50 → 0.44 s
    full, both changes together, 2-core CPU). ``ds = p (dO·vᵀ - rowsum(dO∘O) + d lse)``: the last term is the
    lse cotangent (``d lse / d s = p``). The backward's query blocks are always a scan with a traced index:
    its tiles stay ``bt × bs``, but for the non-causal single range of :func:`_key_ranges` (unrolling it into
    the dense causal forward's static ranges gave bigger working sets and was slower at T >= 2048: B2 T2048
    causal forward+backward 0.48× torch unrolled vs 0.58× looped, and compiled longer). The dense plan's
    backward takes smaller query blocks where G query heads share a step (``cfg.bt_bwd``,
    :func:`attn_spec.blocks.backward_query_block`): the rows are independent given the saved statistics."""
    if cfg.bt_bwd and cfg.bt_bwd != cfg.bt:
        cfg = cfg._replace(bt=cfg.bt_bwd)
    q, k, v, tabs, consts, mask, out, stats = residuals
    d_out, d_lse = cotangents
    if cfg.native:  # the compiled kernel: same delta, its own loops
        from jax_attn import native  # noqa: PLC0415

        lse = stats[..., -1]
        delta = jnp.sum(d_out * out, axis=-1) - jnp.where(jnp.isfinite(lse), d_lse, 0.0)
        dq, dk, dv = native.backward(
            q, k, v, stats, d_out, delta, groups=cfg.G, scale=cfg.scale, causal=cfg.causal
        )  # fmt: skip
        return dq, dk, dv, (), (), None
    Gi = cfg.G // cfg.Gp
    Tp = q.shape[1] // Gi
    n_q, n_kv = Tp // cfg.bt, k.shape[1] // cfg.bs
    d_lse = jnp.where(jnp.isfinite(stats[..., 2]), d_lse, 0.0)
    delta = jnp.sum(d_out * out, axis=-1) - d_lse  # (R, G', Tp)
    s_consts = consts[: cfg.n_score]
    diff_pos = [n for n, c in enumerate(s_consts) if jnp.issubdtype(c.dtype, jnp.inexact)]
    mask_grad = cfg.mask_kind == 2

    def score_of(s_raw, b, h3, q_idx, kv_idx, diff):
        cs = list(s_consts)
        for n, c in zip(diff_pos, diff, strict=True):
            cs[n] = c
        return score_pure(s_raw, b, h3, q_idx, kv_idx, *cs)

    def row(carry_r, xs):
        d_consts, d_mask = carry_r
        r, do_r, st_r, de_r = xs
        q_r = jax.lax.dynamic_index_in_dim(q, r, 0, keepdims=False).reshape(Gi, Tp, -1)  # as forward
        k_r = jax.lax.dynamic_index_in_dim(k, _kv_row(cfg, r), 0, keepdims=False)
        v_r = jax.lax.dynamic_index_in_dim(v, _kv_row(cfg, r), 0, keepdims=False)
        m_r, pos = _mask_row(cfg, mask, r)
        b, h, tb, th = _row_ids(cfg, r)

        def query_block(carry, xs):
            i, q_i, do_i, st_i, de_i = xs
            if cfg.scale != 1.0:
                q_i = q_i * jnp.asarray(cfg.scale, q_i.dtype)  # dq below is w.r.t. this scaled block
            log_sum = jnp.log(st_i[..., 1:2])  # p = exp((s - max) - log sum): no division per logit

            def step(inner, c0, n_cols, partial_block):
                dq_i, dk_r, dv_r, dc, dm = inner
                k_c = jax.lax.dynamic_slice_in_dim(k_r, c0, n_cols, axis=0)
                v_c = jax.lax.dynamic_slice_in_dim(v_r, c0, n_cols, axis=0)
                m_blk = _mask_block(cfg, m_r, i, c0, n_cols)
                if score_pure is None:
                    s = _logits(cfg, None, mask_pure, consts, q_i, k_c, b, h, i, c0, partial_block, m_blk)
                else:
                    s_raw = jnp.einsum("gth,sh->gts", q_i, k_c)
                    idx = _indices(cfg, i, c0, n_cols)
                    diff = [s_consts[n] for n in diff_pos]
                    s_mod, mod_vjp = jax.vjp(
                        lambda s_, *d: score_of(s_, b, h[:, None, None], idx[2], idx[3], d), s_raw, *diff
                    )
                    s = _masked(cfg, mask_pure, consts, s_mod, b, h, i, c0, idx, partial_block, m_blk)
                p = jnp.exp((s - st_i[..., 0:1]) - log_sum)
                dp = jnp.einsum("gtv,sv->gts", do_i, v_c)
                ds = p * (dp - de_i[..., None])
                if mask_grad:
                    dm = _add_mask_grad(cfg, dm, pos, ds, i, c0)  # the mask is added after the score_fn
                if score_pure is not None:
                    ds, *d_diff = mod_vjp(ds)
                    dc = tuple(a + g for a, g in zip(dc, d_diff, strict=True))
                dq_i = dq_i + jnp.einsum("gts,sh->gth", ds, k_c)
                dk_c = jax.lax.dynamic_slice_in_dim(dk_r, c0, n_cols, axis=1)
                dv_c = jax.lax.dynamic_slice_in_dim(dv_r, c0, n_cols, axis=1)
                dk_c = dk_c + jnp.einsum("gth,gts->hs", q_i, ds)
                dv_c = dv_c + jnp.einsum("gtv,gts->vs", do_i, p)
                dk_r = jax.lax.dynamic_update_slice_in_dim(dk_r, dk_c, c0, axis=1)
                dv_r = jax.lax.dynamic_update_slice_in_dim(dv_r, dv_c, c0, axis=1)
                return dq_i, dk_r, dv_r, dc, dm

            dk_r, dv_r, dc, dm = carry
            inner = (jnp.zeros_like(q_i), dk_r, dv_r, dc, dm)
            dq_i, dk_r, dv_r, dc, dm = _walk(cfg, tabs, tb, th, i, n_kv, step, inner)
            if cfg.scale != 1.0:
                dq_i = dq_i * jnp.asarray(cfg.scale, dq_i.dtype)
            return (dk_r, dv_r, dc, dm), dq_i

        def blocks(x):
            return jnp.moveaxis(x.reshape(Gi, n_q, cfg.bt, *x.shape[2:]), 1, 0)

        xs_r = (jnp.arange(n_q, dtype=jnp.int32), blocks(q_r), blocks(do_r), blocks(st_r), blocks(de_r))
        carry = (jnp.zeros_like(k_r.T), jnp.zeros_like(v_r.T), d_consts, d_mask)
        (dk_r, dv_r, d_consts, d_mask), dq = jax.lax.scan(query_block, carry, xs_r)
        return (d_consts, d_mask), (jnp.moveaxis(dq, 0, 1).reshape(Gi * Tp, -1), dk_r, dv_r)

    d_consts0 = tuple(jnp.zeros_like(s_consts[n]) for n in diff_pos)
    d_mask0 = jnp.zeros_like(mask) if mask_grad else None
    xs = (jnp.arange(q.shape[0], dtype=jnp.int32), d_out, stats, delta)
    (d_consts, d_mask), (dq, dk, dv) = jax.lax.scan(row, (d_consts0, d_mask0), xs)
    dk, dv = _kv_grad(cfg, dk.mT), _kv_grad(cfg, dv.mT)  # (R, Sp, ·) again
    d_all = [_zero_cotangent(c) for c in consts]
    for n, g in zip(diff_pos, d_consts, strict=True):
        d_all[n] = g
    if mask is not None and not mask_grad:
        d_mask = _zero_cotangent(mask)
    return dq, dk, dv, tuple(_zero_cotangent(t) for t in tabs), tuple(d_all), d_mask


_engine.defvjp(_engine_fwd, _engine_bwd)
