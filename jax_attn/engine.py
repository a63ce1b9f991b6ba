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

Why per row and per block: as in ``jax_attn.functional._blocked_attention``, XLA:CPU runs 2-D GEMMs
faster than batched ones, so rows (a key/value head, or one query head when the tables differ per head)
are a ``lax.map`` whose body does ``(G·bt, H) × (H, bs)`` products, and a query block's visit list is a
``fori_loop`` over its count with key blocks taken by ``dynamic_slice``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def block_attention(q, k, v, tables: BlockTables, *, T, S, bt, bs, scale=1.0, score_fn=None, mask_fn=None):
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

    Returns:
      ``(out (B, K, G, T, V), lse (B, K, G, T))``: lse is the natural-log sum of the exponentiated
      logits of the kept keys, -inf for rows with nothing kept (whose output is 0).
    """
    B, K, G = q.shape[:3]
    n_q, n_kv = cdiv(T, bt), cdiv(S, bs)
    Tp, Sp = n_q * bt, n_kv * bs
    Bt, Nt = tables.kv_num.shape[:2]
    Gp = G if Nt > 1 else 1
    Gi = G // Gp
    # rows of (Gi·Tp, H): a plain bitcast of (B, K, G, Tp, H); a separate size-1 Gi axis made XLA:CPU copy q
    q = jnp.pad(q, [(0, 0)] * 3 + [(0, Tp - T), (0, 0)]).reshape(B * K * Gp, Gi * Tp, q.shape[-1])
    Bk = k.shape[0]
    k = jnp.pad(k, [(0, 0)] * 2 + [(0, Sp - S), (0, 0)]).reshape(Bk * K, Sp, k.shape[-1])
    v = jnp.pad(v, [(0, 0)] * 2 + [(0, Sp - S), (0, 0)]).reshape(Bk * K, Sp, v.shape[-1])
    full_num, full_idx = tables.full_num, tables.full_idx
    if full_num is None:
        full_num = jnp.zeros_like(tables.kv_num)
        full_idx = jnp.zeros(tables.kv_num.shape + (1,), jnp.int32)
    ints = jnp.zeros((), jnp.int32)
    idx_args = (ints, jnp.zeros((Gi, 1, 1), jnp.int32), jnp.zeros((1, bt, 1), jnp.int32))
    idx_args += (jnp.zeros((1, 1, bs), jnp.int32),)
    score_pure, s_consts = _hoist(score_fn, (jnp.zeros((Gi, bt, bs), q.dtype), *idx_args))
    mask_pure, m_consts = _hoist(mask_fn, idx_args)
    cfg = _Cfg(T, S, bt, bs, B, K, G, Gp, Bt, Bk, Nt, len(s_consts), float(scale))
    out, lse = _engine(
        cfg,
        score_pure,
        mask_pure,
        q,
        k,
        v,
        (tables.kv_num, tables.kv_idx, full_num, full_idx),
        tuple(s_consts) + tuple(m_consts),
    )
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
    b = r // (cfg.K * cfg.Gp)
    kvh = (r // cfg.Gp) % cfg.K
    gp = r % cfg.Gp
    Gi = cfg.G // cfg.Gp
    h = kvh * cfg.G + gp * Gi + jnp.arange(Gi, dtype=jnp.int32)
    tb = b if cfg.Bt > 1 else 0
    th = h[0] if cfg.Nt > 1 else 0
    return b, h, tb, th


def _indices(cfg, i, c):
    """Row and column indices of block ``(i, c)`` and the clamped ``(1, bt, 1)``, ``(1, 1, bs)`` indices
    the mods see: mods never see an index past the lengths (they may index arrays of that length)."""
    rows = i * cfg.bt + jnp.arange(cfg.bt, dtype=jnp.int32)[:, None]
    cols = c * cfg.bs + jnp.arange(cfg.bs, dtype=jnp.int32)[None, :]
    return rows, cols, jnp.minimum(rows, cfg.T - 1)[None], jnp.minimum(cols, cfg.S - 1)[None]


def _masked(cfg, mask_pure, consts, s, b, h, rows, cols, q_idx, kv_idx, partial_block):
    """On a partial block: the mask and the padding past T or S as -inf (a block that runs past the
    lengths is never full, so full blocks need neither)."""
    if not partial_block:
        return s
    keep = None
    if cfg.T % cfg.bt or cfg.S % cfg.bs:
        keep = (rows < cfg.T) & (cols < cfg.S)
    if mask_pure is not None:
        m = mask_pure(b, h[:, None, None], q_idx, kv_idx, *consts[cfg.n_score :])
        keep = m if keep is None else keep & m
    return s if keep is None else jnp.where(keep, s, -jnp.inf)


def _logits(cfg, score_pure, mask_pure, consts, q_i, k_c, b, h, i, c, partial_block):
    """Logits ``(G', bt, bs)`` of query block i against key block c, the score function applied
    before the mask."""
    s = jnp.einsum("gth,sh->gts", q_i, k_c)
    rows, cols, q_idx, kv_idx = _indices(cfg, i, c)
    if score_pure is not None:
        s = score_pure(s, b, h[:, None, None], q_idx, kv_idx, *consts[: cfg.n_score])
    return _masked(cfg, mask_pure, consts, s, b, h, rows, cols, q_idx, kv_idx, partial_block)


def _forward(cfg, score_pure, mask_pure, q, k, v, tabs, consts):
    """Rows: output ``(R, G', Tp, V)`` and statistics ``(R, G', Tp, 3)``: the max the row was shifted by
    (0 for rows with nothing kept), the row sum (1 for them) and the lse (-inf for them). Max and sum are
    kept apart for the backward, where ``exp(s - max) / sum`` is exact for every row."""
    kv_num, kv_idx, full_num, full_idx = tabs
    Gi = cfg.G // cfg.Gp
    Tp = q.shape[1] // Gi
    n_q, Vw = Tp // cfg.bt, v.shape[-1]

    def row(r):
        # q is indexed here like k and v rather than sliced by lax.map: as a mapped input XLA:CPU copied
        # it whole (a layout change for the size-1 head axis), a q-sized temporary
        q_r = jax.lax.dynamic_index_in_dim(q, r, 0, keepdims=False).reshape(Gi, Tp, -1)
        k_r = jax.lax.dynamic_index_in_dim(k, _kv_row(cfg, r), 0, keepdims=False)
        v_r = jax.lax.dynamic_index_in_dim(v, _kv_row(cfg, r), 0, keepdims=False)
        b, h, tb, th = _row_ids(cfg, r)

        def query_block(args):
            i, q_i = args
            q_i = q_i * jnp.asarray(cfg.scale, q_i.dtype)

            def visit(idx, partial_block):
                def body(j, carry):
                    m, row_sum, acc = carry
                    c = idx[j]
                    k_c = jax.lax.dynamic_slice_in_dim(k_r, c * cfg.bs, cfg.bs, axis=0)
                    v_c = jax.lax.dynamic_slice_in_dim(v_r, c * cfg.bs, cfg.bs, axis=0)
                    s = _logits(cfg, score_pure, mask_pure, consts, q_i, k_c, b, h, i, c, partial_block)
                    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                    # A row with nothing kept so far has max -inf: shift by 0 so exp gives exact zeros.
                    m_use = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                    p = jnp.exp(s - m_use[..., None])
                    alpha = jnp.exp(m - m_use)
                    row_sum = alpha * row_sum + jnp.sum(p, axis=-1)
                    acc = alpha[..., None] * acc + jnp.einsum("gts,sv->gtv", p, v_c)
                    return m_new, row_sum, acc

                return body

            carry = (
                jnp.full((Gi, cfg.bt), -jnp.inf, q.dtype),
                jnp.zeros((Gi, cfg.bt), q.dtype),
                jnp.zeros((Gi, cfg.bt, Vw), q.dtype),
            )
            carry = jax.lax.fori_loop(0, kv_num[tb, th, i], visit(kv_idx[tb, th, i], True), carry)
            m, row_sum, acc = jax.lax.fori_loop(
                0, full_num[tb, th, i], visit(full_idx[tb, th, i], False), carry
            )
            empty = row_sum == 0.0
            lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, row_sum)))
            row_sum = jnp.where(empty, 1.0, row_sum)
            m = jnp.where(empty, 0.0, m)
            return acc / row_sum[..., None], jnp.stack([m, row_sum, lse], axis=-1)

        q_blocks = jnp.moveaxis(q_r.reshape(Gi, n_q, cfg.bt, -1), 1, 0)
        out, stats = jax.lax.map(query_block, (jnp.arange(n_q, dtype=jnp.int32), q_blocks))
        return jnp.moveaxis(out, 0, 1).reshape(Gi, Tp, Vw), jnp.moveaxis(stats, 0, 1).reshape(Gi, Tp, 3)

    return jax.lax.map(row, jnp.arange(q.shape[0], dtype=jnp.int32))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _engine(cfg, score_pure, mask_pure, q, k, v, tabs, consts):
    out, stats = _forward(cfg, score_pure, mask_pure, q, k, v, tabs, consts)
    return out, stats[..., 2]


def _engine_fwd(cfg, score_pure, mask_pure, q, k, v, tabs, consts):
    out, stats = _forward(cfg, score_pure, mask_pure, q, k, v, tabs, consts)
    return (out, stats[..., 2]), (q, k, v, tabs, consts, out, stats)


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _engine_bwd(cfg, score_pure, mask_pure, residuals, cotangents):
    """One pass per row: a scan over query blocks carrying the row's dk, dv and the gradients of the
    score function's float constants; per query block a loop over the same partial and full key blocks
    recomputes ``p = exp(s - max) / sum`` and adds its share. ``ds = p (dO·vᵀ - rowsum(dO∘O) + d lse)``:
    the last term is the lse cotangent (``d lse / d s = p``)."""
    q, k, v, tabs, consts, out, stats = residuals
    d_out, d_lse = cotangents
    kv_num, kv_idx, full_num, full_idx = tabs
    Gi = cfg.G // cfg.Gp
    Tp = q.shape[1] // Gi
    n_q = Tp // cfg.bt
    d_lse = jnp.where(jnp.isfinite(stats[..., 2]), d_lse, 0.0)
    delta = jnp.sum(d_out * out, axis=-1) - d_lse  # (R, G', Tp)
    s_consts = consts[: cfg.n_score]
    diff_pos = [n for n, c in enumerate(s_consts) if jnp.issubdtype(c.dtype, jnp.inexact)]

    def score_of(s_raw, b, h3, q_idx, kv_idx, diff):
        cs = list(s_consts)
        for n, c in zip(diff_pos, diff, strict=True):
            cs[n] = c
        return score_pure(s_raw, b, h3, q_idx, kv_idx, *cs)

    def row(d_consts, xs):
        r, do_r, st_r, de_r = xs
        q_r = jax.lax.dynamic_index_in_dim(q, r, 0, keepdims=False).reshape(Gi, Tp, -1)  # as forward
        k_r = jax.lax.dynamic_index_in_dim(k, _kv_row(cfg, r), 0, keepdims=False)
        v_r = jax.lax.dynamic_index_in_dim(v, _kv_row(cfg, r), 0, keepdims=False)
        b, h, tb, th = _row_ids(cfg, r)

        def query_block(carry, xs):
            i, q_i, do_i, st_i, de_i = xs
            q_i = q_i * jnp.asarray(cfg.scale, q_i.dtype)  # dq below is w.r.t. this scaled block

            def visit(idx, partial_block):
                def body(j, inner):
                    dq_i, dk_r, dv_r, dc = inner
                    c = idx[j]
                    k_c = jax.lax.dynamic_slice_in_dim(k_r, c * cfg.bs, cfg.bs, axis=0)
                    v_c = jax.lax.dynamic_slice_in_dim(v_r, c * cfg.bs, cfg.bs, axis=0)
                    if score_pure is None:
                        s = _logits(cfg, None, mask_pure, consts, q_i, k_c, b, h, i, c, partial_block)
                    else:
                        s_raw = jnp.einsum("gth,sh->gts", q_i, k_c)
                        rows, cols, q_idx, kv_idx_ = _indices(cfg, i, c)
                        diff = [s_consts[n] for n in diff_pos]
                        s_mod, mod_vjp = jax.vjp(
                            lambda s_, *d: score_of(s_, b, h[:, None, None], q_idx, kv_idx_, d), s_raw, *diff
                        )
                        s = _masked(
                            cfg, mask_pure, consts, s_mod, b, h, rows, cols, q_idx, kv_idx_, partial_block
                        )
                    p = jnp.exp(s - st_i[..., 0:1]) / st_i[..., 1:2]
                    dp = jnp.einsum("gtv,sv->gts", do_i, v_c)
                    ds = p * (dp - de_i[..., None])
                    if score_pure is not None:
                        ds, *d_diff = mod_vjp(ds)
                        dc = tuple(a + g for a, g in zip(dc, d_diff, strict=True))
                    dq_i = dq_i + jnp.einsum("gts,sh->gth", ds, k_c)
                    dk_c = jax.lax.dynamic_slice_in_dim(dk_r, c * cfg.bs, cfg.bs, axis=0)
                    dv_c = jax.lax.dynamic_slice_in_dim(dv_r, c * cfg.bs, cfg.bs, axis=0)
                    dk_c = dk_c + jnp.einsum("gts,gth->sh", ds, q_i)
                    dv_c = dv_c + jnp.einsum("gts,gtv->sv", p, do_i)
                    dk_r = jax.lax.dynamic_update_slice_in_dim(dk_r, dk_c, c * cfg.bs, axis=0)
                    dv_r = jax.lax.dynamic_update_slice_in_dim(dv_r, dv_c, c * cfg.bs, axis=0)
                    return dq_i, dk_r, dv_r, dc

                return body

            dk_r, dv_r, dc = carry
            inner = (jnp.zeros_like(q_i), dk_r, dv_r, dc)
            inner = jax.lax.fori_loop(0, kv_num[tb, th, i], visit(kv_idx[tb, th, i], True), inner)
            dq_i, dk_r, dv_r, dc = jax.lax.fori_loop(
                0, full_num[tb, th, i], visit(full_idx[tb, th, i], False), inner
            )
            return (dk_r, dv_r, dc), dq_i * jnp.asarray(cfg.scale, dq_i.dtype)

        def blocks(x):
            return jnp.moveaxis(x.reshape(Gi, n_q, cfg.bt, *x.shape[2:]), 1, 0)

        xs_r = (jnp.arange(n_q, dtype=jnp.int32), blocks(q_r), blocks(do_r), blocks(st_r), blocks(de_r))
        carry = (jnp.zeros_like(k_r), jnp.zeros_like(v_r), d_consts)
        (dk_r, dv_r, d_consts), dq = jax.lax.scan(query_block, carry, xs_r)
        return d_consts, (jnp.moveaxis(dq, 0, 1).reshape(Gi * Tp, -1), dk_r, dv_r)

    d_consts0 = tuple(jnp.zeros_like(s_consts[n]) for n in diff_pos)
    xs = (jnp.arange(q.shape[0], dtype=jnp.int32), d_out, stats, delta)
    d_consts, (dq, dk, dv) = jax.lax.scan(row, d_consts0, xs)
    dk, dv = _kv_grad(cfg, dk), _kv_grad(cfg, dv)
    d_all = [_zero_cotangent(c) for c in consts]
    for n, g in zip(diff_pos, d_consts, strict=True):
        d_all[n] = g
    return dq, dk, dv, tuple(_zero_cotangent(t) for t in tabs), tuple(d_all)


_engine.defvjp(_engine_fwd, _engine_bwd)
