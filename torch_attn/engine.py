"""One blocked online-softmax attention engine (PyTorch twin of ``jax_attn/engine.py``).

Dimension key (see ``attn_spec``): B batch, K key/value heads, G query heads per key/value head, N = K·G
query heads, T query length, S key length, H q/k head width, V value width.

The same algorithm as the JAX twin, in eager torch loops: for each query block, an online softmax over
the key blocks the tables list for it, *partial* blocks with ``mask_fn`` evaluated and *full* ones
without; fully masked rows give output 0 and lse -inf; the padding of a last block that runs past T or S
is masked. Autograd does the backward (it keeps each visited block's probabilities; the JAX twin
recomputes them in a custom VJP). Where the tables differ per batch row or head, each step gathers the
``(b, h)`` rows' key blocks at once; where they are shared, a step is one slice of K and V.
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


def block_attention(q, k, v, tables: BlockTables, *, T, S, bt, bs, scale=1.0, score_fn=None, mask_fn=None):
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

    Returns:
      ``(out (B, K, G, T, V), lse (B, K, G, T))``: lse is the natural-log sum of the exponentiated
      logits of the kept keys, -inf for rows with nothing kept (whose output is 0).
    """
    B, K, G, _, H = q.shape
    k, v = k.expand(B, *k.shape[1:]), v.expand(B, *v.shape[1:])  # a broadcast key/value batch of 1
    N, Vw, dev, ct = K * G, v.shape[-1], q.device, q.dtype
    n_q, n_kv = cdiv(T, bt), cdiv(S, bs)
    Sp = n_kv * bs
    k_blocks = torch.nn.functional.pad(k, (0, 0, 0, Sp - S)).reshape(B, K, n_kv, bs, H)
    v_blocks = torch.nn.functional.pad(v, (0, 0, 0, Sp - S)).reshape(B, K, n_kv, bs, Vw)
    Bt, Nt = tables.kv_num.shape[:2]
    shared = Bt == 1 and Nt == 1
    lists = [(tables.kv_num, tables.kv_idx, True)]
    if tables.full_num is not None:
        lists.append((tables.full_num, tables.full_idx, False))
    # Per-row tables as (B, N, ...): gathered per step. Shared tables as Python ints: slices.
    lists = [
        (num[0, 0].tolist(), idx[0, 0].tolist(), part)
        if shared
        else (num.expand(B, N, n_q).to(dev), idx.expand(B, N, *idx.shape[2:]).to(dev).long(), part)
        for num, idx, part in lists
    ]
    q_BNTH = q.reshape(B, N, T, H)
    b_ix = torch.arange(B, device=dev).view(B, 1)
    kvh_ix = (torch.arange(N, device=dev) // G).view(1, N)
    b4 = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h4 = torch.arange(N, device=dev).view(1, N, 1, 1)
    outs, lses = [], []
    for i in range(n_q):
        t0, t1 = i * bt, min(T, (i + 1) * bt)
        q_i = q_BNTH[:, :, t0:t1] * scale
        q_idx = torch.arange(t0, t1, device=dev).view(1, 1, -1, 1)
        m = torch.full(q_i.shape[:-1], -torch.inf, dtype=ct, device=dev)
        row_sum = torch.zeros_like(m)
        acc = torch.zeros(*q_i.shape[:-1], Vw, dtype=ct, device=dev)
        for num, idx, partial_block in lists:
            if shared:
                steps = [(c, None) for c in idx[i][: num[i]]]
            else:
                n_i = num[:, :, i]
                steps = [(idx[:, :, i, j], j < n_i) for j in range(int(n_i.max()) if n_i.numel() else 0)]
            for c, active in steps:
                if shared:
                    # one slice of K and V; the G query heads of a key/value head in one product
                    k_c = k_blocks[:, :, c].unsqueeze(2)  # (B, K, 1, bs, H)
                    v_c = v_blocks[:, :, c].unsqueeze(2)
                    s = torch.einsum("bkgth,bkxsh->bkgts", q_i.reshape(B, K, G, -1, H), k_c).reshape(
                        B, N, -1, bs
                    )
                    cols = (c * bs + torch.arange(bs, device=dev)).view(1, 1, 1, bs)
                else:
                    k_c = k_blocks[b_ix, kvh_ix, c]  # (B, N, bs, H): each row's own block
                    v_c = v_blocks[b_ix, kvh_ix, c]
                    s = torch.einsum("bnth,bnsh->bnts", q_i, k_c)
                    cols = c[..., None, None] * bs + torch.arange(bs, device=dev)
                # Mods never see an index past the lengths (they may index arrays of that length).
                kv_idx = cols.clamp(max=S - 1)
                if score_fn is not None:
                    s = score_fn(s, b4, h4, q_idx, kv_idx)
                keep = None if active is None else active[..., None, None]
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
                    pv = torch.einsum("bkgts,bkxsv->bkgtv", p.reshape(B, K, G, -1, bs), v_c).reshape(
                        acc.shape
                    )
                else:
                    pv = torch.einsum("bnts,bnsv->bntv", p, v_c)
                acc = alpha[..., None] * acc + pv
                m = m_new
        empty = row_sum == 0.0
        safe = torch.where(empty, 1.0, row_sum)
        outs.append(acc / safe[..., None])
        lses.append(torch.where(empty, -torch.inf, torch.where(empty, 0.0, m) + torch.log(safe)))
    out = torch.cat(outs, dim=2).reshape(B, K, G, T, Vw)
    if torch.is_grad_enabled() and not out.requires_grad:
        # Nothing kept anywhere: the zeros computed no product of the inputs, yet they are a function of
        # them (gradient zero), as in the JAX twin, where every output is.
        out = out + sum(((x * 0).sum() for x in (q, k, v) if x.requires_grad), torch.zeros((), dtype=ct))
    return out, torch.cat(lses, dim=2).reshape(B, K, G, T)
