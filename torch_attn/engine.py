"""One blocked online-softmax attention engine (PyTorch twin of ``jax_attn/engine.py``).

Dimension key (see ``attn_spec``): B batch, K key/value heads, G query heads per key/value head, N = K·G
query heads, T query length, S key length, H q/k head width, V value width.

The same algorithm as the JAX twin, in eager torch loops: for each query block, an online softmax over
the key blocks the tables list for it, *partial* blocks with ``mask_fn`` evaluated and *full* ones
without; fully masked rows give output 0 and lse -inf; the padding of a last block that runs past T or S
is masked. Autograd does the backward (it keeps each visited block's probabilities; the JAX twin
recomputes them in a custom VJP). Where the tables differ per batch row or head, each step gathers the
``(b, h)`` rows' key blocks at once; where they are shared, a step is one slice of K and V.

The *dense* plan (``tables=None``) is SDPA's ``implementation="blocked"``, as in the JAX twin: every key
block, or with ``causal`` only those up to the diagonal, taken in static ranges for calls of at most
``_UNROLL_CAUSAL`` query blocks (:func:`_key_ranges`), and a dense bool or float mask sliced per block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attn_spec.flex import cdiv


class BlockTables(NamedTuple):
    """Per ``(b, query head, query block)`` lists of key blocks, torch's BlockMask layout: the first
    ``num[b, h, i]`` entries of ``idx[b, h, i]`` are the blocks to visit. Leading dims ``(B|1, N|1)``.
    ``full_*`` may be None (no full blocks)."""

    kv_num: torch.Tensor  # (B|1, N|1, n_q) int32
    kv_idx: torch.Tensor  # (B|1, N|1, n_q, n_kv|…) int32
    full_num: torch.Tensor | None = None
    full_idx: torch.Tensor | None = None


def dense_tables(T: int, S: int, bt: int, bs: int) -> BlockTables:
    """Tables that visit every key block: full where the block lies inside ``(T, S)``, partial (only the
    padding masked) for the blocks on the last query or key block that run past the lengths."""
    n_q, n_kv = cdiv(T, bt), cdiv(S, bs)
    full = torch.ones((n_q, n_kv), dtype=torch.bool)
    if T % bt:
        full[-1, :] = False
    if S % bs:
        full[:, -1] = False
    return tables_from_dense(~full, full)


def tables_from_dense(partial_blocks, full_blocks) -> BlockTables:
    """Tables from block-level bool arrays ``(B|1, N|1, n_q, n_kv)`` (or ``(n_q, n_kv)``): the listed
    blocks first in increasing order, then the others (torch's stable descending sort)."""

    def ordered(dense):
        dense = torch.as_tensor(dense, dtype=torch.bool)
        dense = dense.reshape((1,) * (4 - dense.ndim) + tuple(dense.shape))
        num = dense.sum(dim=-1, dtype=torch.int32)
        idx = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx

    kv_num, kv_idx = ordered(partial_blocks)
    full_num, full_idx = ordered(full_blocks)
    return BlockTables(kv_num, kv_idx, full_num, full_idx)


#: The dense causal plan takes a query block's keys in static ranges (see :func:`_key_ranges`) when the
#: call has at most this many query blocks, as the JAX twin's unrolled forward does; else key blocks.
_UNROLL_CAUSAL = 8
#: At most this many keys up to the diagonal for the static ranges (bounded memory beyond).
_ROWS_MAX_KEYS = 2048
_ALIGN_KEYS = 8


class _Cfg(NamedTuple):
    """Static description of one call (the JAX twin's, less what only its row map needs)."""

    T: int
    S: int
    bt: int
    bs: int
    dense: bool = False  # no tables: every key block (up to the diagonal when causal), SDPA's plan
    causal: bool = False  # dense only: top-left causal (query t sees keys s <= t)
    mask_kind: int = 0  # dense only: 0 no mask, 1 bool keep-mask, 2 float additive mask
    static: bool = False  # dense causal: static key ranges (at most _UNROLL_CAUSAL query blocks)


def _key_blocks(cfg, i, n_kv):
    """How many key blocks dense query block ``i`` needs: all, or up to the diagonal when causal."""
    if not cfg.causal:
        return n_kv
    return min(n_kv, ((i + 1) * cfg.bt - 1) // cfg.bs + 1)


def _below_diagonal(cfg, i, c0, n_cols) -> bool:
    """Whether columns ``[c0, c0 + n_cols)`` are all visible to every row of query block i: then the
    causal comparison is skipped."""
    return c0 + n_cols - 1 <= i * cfg.bt


def _key_ranges(cfg, i, n_kv):
    """The ``(c0, n_cols)`` key ranges dense query block i visits: key blocks, or for a causal call with
    static ranges the keys wholly below the diagonal in one range (one GEMM, no causal comparison) and
    the rest up to the diagonal in another."""
    blocks = [(j * cfg.bs, cfg.bs) for j in range(_key_blocks(cfg, i, n_kv))]
    if not (cfg.causal and cfg.static) or cfg.bs * n_kv > _ROWS_MAX_KEYS:
        return blocks
    end = min(cfg.bs * n_kv, (i + 1) * cfg.bt)  # keys past the block's last row are never visible
    full = min(end, i * cfg.bt + 1)  # columns <= the block's first row: visible to all its rows
    full = (full // _ALIGN_KEYS) * _ALIGN_KEYS
    ranges = [(0, full)] if full else []
    if end > full:
        ranges.append((full, end - full))
    return ranges


def _pad_keys(x, n):
    """``x`` with ``n`` zero (False) entries appended on its key axis (-2 for k and v, -1 for a mask)."""
    return x if n == 0 else torch.cat([x, x.new_zeros((*x.shape[:-1], n))], dim=-1)


def _mask_block(mask, t0, t1, c0, n_cols):
    """Rows ``[t0, t1)`` and columns ``[c0, c0 + n_cols)`` of the dense mask (size-1 axes stay size 1)."""
    if mask is None:
        return None
    m = mask
    if m.shape[-2] != 1:
        m = m[..., t0:t1, :]
    if m.shape[-1] != 1:
        m = m[..., c0 : c0 + n_cols]
    return m


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
        serves every query batch row (expanded). One floating compute dtype for all three.
      scale: the logit scale, applied to each query block as it is visited (the backward keeps the
        unscaled ``q`` as its residual: no scaled copy of q in memory).
      tables: :class:`BlockTables` with ``n_q = ceil(T / bt)`` query blocks and key blocks of ``bs``.
      score_fn: ``score_fn(score, b, h, q_idx, kv_idx)`` elementwise on each block's logits, called with
        broadcastable tensors; applied before the mask.
      mask_fn: ``mask_fn(b, h, q_idx, kv_idx)`` → bool keep (True = may attend), evaluated on partial
        blocks only.
      tables=None selects the *dense* plan of SDPA's ``implementation="blocked"``: every key block, or
        with ``causal`` (top-left) only those up to the diagonal (see :func:`_key_ranges`), and ``mask``:
        None or a grouped dense mask ``(B|1, K|1, G|1, T|1, S|1)``, bool (True = may attend) or float
        (added to the scaled logits; autograd gives it its gradient). ``score_fn``/``mask_fn`` must be
        None then.

    Returns:
      ``(out (B, K, G, T, V), lse (B, K, G, T))``: lse is the natural-log sum of the exponentiated
      logits of the kept keys, -inf for rows with nothing kept (whose output is 0); None from the dense
      plan (SDPA does not use it; the JAX twin returns it, where XLA drops it unused).
    """
    B, K, G, _, H = q.shape
    k, v = k.expand(B, *k.shape[1:]), v.expand(B, *v.shape[1:])  # a broadcast key/value batch of 1
    N, Vw, dev, ct = K * G, v.shape[-1], q.device, q.dtype
    n_q, n_kv = cdiv(T, bt), cdiv(S, bs)
    Sp = n_kv * bs
    dense = tables is None
    if dense and (score_fn is not None or mask_fn is not None):
        raise ValueError("block_attention: the dense plan (tables=None) takes no score_fn or mask_fn")
    mask_kind = 0
    if mask is not None:
        mask_kind = 1 if mask.dtype == torch.bool else 2
        if mask.shape[-1] != 1:
            mask = _pad_keys(mask, Sp - S)
        if mask_kind == 2:
            mask = mask.to(ct)
    cfg = _Cfg(T, S, bt, bs, dense, bool(causal), mask_kind, n_q <= _UNROLL_CAUSAL)
    if dense:
        # SDPA's trick, as in the JAX twin: the scale fused into q once (one multiply of (T, H))
        q, scale = q * scale, 1.0
    k_pad = torch.nn.functional.pad(k, (0, 0, 0, Sp - S)) if Sp > S else k  # (B, K, Sp, H)
    v_pad = torch.nn.functional.pad(v, (0, 0, 0, Sp - S)) if Sp > S else v
    shared = True
    if dense:
        lists = None
    else:
        Bt, Nt = tables.kv_num.shape[:2]
        shared = Bt == 1 and Nt == 1
        lists = [(tables.kv_num, tables.kv_idx, True)]
        if tables.full_num is not None:
            lists.append((tables.full_num, tables.full_idx, False))
        if not shared:  # per-row tables gather each row's key block
            k_blocks = k_pad.reshape(B, K, n_kv, bs, H)
            v_blocks = v_pad.reshape(B, K, n_kv, bs, Vw)
        # Per-row tables as (B, N, ...): gathered per step. Shared tables as Python ints: slices.
        lists = [
            (num[0, 0].tolist(), idx[0, 0].tolist(), part)
            if shared
            else (num.expand(B, N, n_q).to(dev), idx.expand(B, N, *idx.shape[2:]).to(dev).long(), part)
            for num, idx, part in lists
        ]
    q_BNTH = q.reshape(B, N, T, H)
    if not dense:  # the mods' and the gathers' indices (the dense plan needs none: fewer eager ops)
        b_ix = torch.arange(B, device=dev).view(B, 1)
        kvh_ix = (torch.arange(N, device=dev) // G).view(1, N)
        b4 = torch.arange(B, device=dev).view(B, 1, 1, 1)
        h4 = torch.arange(N, device=dev).view(1, N, 1, 1)
    outs, lses = [], []
    for i in range(n_q):
        t0, t1 = i * bt, min(T, (i + 1) * bt)
        q_i = q_BNTH[:, :, t0:t1] if scale == 1.0 else q_BNTH[:, :, t0:t1] * scale
        rows = torch.arange(t0, t1, device=dev).view(-1, 1) if cfg.causal or not dense else None
        q_idx = None if dense else rows.view(1, 1, -1, 1)
        m = torch.full(q_i.shape[:-1], -torch.inf, dtype=ct, device=dev)
        row_sum = torch.zeros_like(m)
        acc = torch.zeros(*q_i.shape[:-1], Vw, dtype=ct, device=dev)
        if dense:
            # (c0, n_cols, active, partial_block): the dense plan's key ranges, every one "partial"
            walk = [[(c0, n, None) for c0, n in _key_ranges(cfg, i, n_kv)]]
            parts = [True]
        else:
            walk, parts = [], []
            for num, idx, partial_block in lists:
                if shared:
                    walk.append([(c * bs, bs, None) for c in idx[i][: num[i]]])
                else:
                    n_i = num[:, :, i]
                    walk.append(
                        [
                            (idx[:, :, i, j] * bs, bs, j < n_i)
                            for j in range(int(n_i.max()) if n_i.numel() else 0)
                        ]
                    )
                parts.append(partial_block)
        for steps, partial_block in zip(walk, parts, strict=True):
            for c0, n_cols, active in steps:
                if shared:
                    # one slice of K and V; the G query heads of a key/value head in one product
                    k_c = k_pad[:, :, c0 : c0 + n_cols]  # (B, K, n_cols, H)
                    v_c = v_pad[:, :, c0 : c0 + n_cols]
                    s = torch.einsum("bkgth,bksh->bkgts", q_i.reshape(B, K, G, -1, H), k_c)
                    causal_cmp = cfg.causal and not _below_diagonal(cfg, i, c0, n_cols)
                    cols = None
                    if not dense or causal_cmp or S % bs:
                        cols = (c0 + torch.arange(n_cols, device=dev)).view(1, 1, 1, -1)
                else:
                    c = c0 // bs
                    k_c = k_blocks[b_ix, kvh_ix, c]  # (B, N, bs, H): each row's own block
                    v_c = v_blocks[b_ix, kvh_ix, c]
                    s = torch.einsum("bnth,bnsh->bnts", q_i, k_c)
                    cols = c[..., None, None] * bs + torch.arange(bs, device=dev)
                keep = None if active is None else active[..., None, None]
                if dense:
                    # the causal comparison (unless all columns are below the diagonal), the key
                    # padding and the dense mask block, on the (B, K, G, t, n_cols) logits
                    if causal_cmp:
                        keep = cols <= rows
                    if S % bs:
                        keep = cols < S if keep is None else keep & (cols < S)
                    m_blk = _mask_block(mask, t0, t1, c0, n_cols)
                    if m_blk is not None:
                        if mask_kind == 1:
                            keep = m_blk if keep is None else keep & m_blk
                        else:
                            s = s + m_blk
                    if keep is not None:
                        s = torch.where(keep, s, -torch.inf)
                    s = s.reshape(B, N, -1, n_cols)
                else:
                    if shared:
                        s = s.reshape(B, N, -1, n_cols)
                    # Mods never see an index past the lengths (they may index arrays of that length).
                    kv_idx = cols.clamp(max=S - 1)
                    if score_fn is not None:
                        s = score_fn(s, b4, h4, q_idx, kv_idx)
                    if partial_block:
                        if S % bs:
                            keep = cols < S if keep is None else keep & (cols < S)
                        if mask_fn is not None:
                            mm = mask_fn(b4, h4, q_idx, kv_idx)
                            keep = mm if keep is None else keep & mm
                    if keep is not None:
                        s = torch.where(keep, s, -torch.inf)
                m_new = torch.maximum(m, torch.amax(s, dim=-1)).detach()
                # A row with nothing kept so far has max -inf: shift by 0 so exp gives exact zeros.
                m_use = torch.where(torch.isfinite(m_new), m_new, 0.0)
                p = torch.exp(s - m_use[..., None])
                alpha = torch.exp(m - m_use)
                row_sum = alpha * row_sum + p.sum(dim=-1)
                if shared:
                    pv = torch.einsum("bkgts,bksv->bkgtv", p.reshape(B, K, G, -1, n_cols), v_c).reshape(
                        acc.shape
                    )
                else:
                    pv = torch.einsum("bnts,bnsv->bntv", p, v_c)
                acc = alpha[..., None] * acc + pv
                m = m_new
        empty = row_sum == 0.0
        safe = torch.where(empty, 1.0, row_sum)
        outs.append(acc / safe[..., None])
        if not dense:  # SDPA (the dense plan) never asks for the lse: spare the eager ops
            lses.append(torch.where(empty, -torch.inf, torch.where(empty, 0.0, m) + torch.log(safe)))
    out = torch.cat(outs, dim=2).reshape(B, K, G, T, Vw)
    if torch.is_grad_enabled() and not out.requires_grad:
        # Nothing kept anywhere: the zeros computed no product of the inputs, yet they are a function of
        # them (gradient zero), as in the JAX twin, where every output is.
        out = out + sum(((x * 0).sum() for x in (q, k, v) if x.requires_grad), torch.zeros((), dtype=ct))
    return out, (torch.cat(lses, dim=2).reshape(B, K, G, T) if lses else None)
