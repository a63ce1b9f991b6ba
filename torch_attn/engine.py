"""One blocked online-softmax attention engine (PyTorch twin of ``jax_attn/engine.py``).

Dimension key (see ``attn_spec``): B batch, K key/value heads, G query heads per key/value head, N = K·G
query heads, T query length, S key length, H q/k head width, V value width.

The engine takes queries grouped by their key/value head and, per ``(b, query head, query block)``, two
tables of key blocks to visit: *partial* blocks, where ``mask_fn`` is evaluated, and *full* blocks, where
every entry is kept and the mask is skipped. Nothing else is computed: a key block that no table lists
costs nothing, forward or backward. An optional elementwise ``score_fn(score, b, h, q_idx, kv_idx)``
rewrites the logits before the mask (FlexAttention's ``score_mod``). Block skipping, the padding of
lengths that are not multiples of the block, fully masked rows (output 0, lse -inf) and the backward
live here once, for FlexAttention's block masks and for sliding windows.

Memory: one ``(R, G'·bt, bs)`` block of logits per step, forward and backward. The backward is a custom
``torch.autograd.Function`` (:class:`_engine`) that walks the same block tables (FlashAttention-2's single
pass: per query block, recompute each visited block's probabilities from the saved row max and sum,
accumulate dq, dk, dv), honours a cotangent on the log-sum-exp (``d lse / d s = p``) and pulls the
gradient back through ``score_fn`` with ``torch.autograd.grad``, so tensors the score function captures
(a learned bias table) receive gradients. Its forward keeps no graph and saves q, k, v, the output and
the row statistics, never a probability. Double backward is not supported: a backward with
``create_graph=True`` raises (its gradients would be constants to autograd).

Where the torch twin differs, and why:

- Rows are batched, not mapped. The JAX twin maps over rows (``lax.map`` over the B·K·G' rows: XLA:CPU
  runs 2-D GEMMs faster than batched ones); an eager Python loop per row would pay torch's per-op overhead
  B·K times per step. Here ``row(r)`` is called once with every row, ``r = arange(R)``: each row is a
  slice of a leading batch dimension R and each step a batched matmul over the rows. Query blocks and key
  ranges are Python loops (the JAX ``lax.map``/``scan``/``fori_loop``) with static indices. Tables shared
  by every row become Python ints (each step one slice of k and v); tables that differ per batch row or
  head are index tensors, and each step gathers every row's own key block (``dynamic_slice`` per row in
  JAX). A row that has fewer blocks than the longest one computes masked steps (``active``).
- ``_hoist`` has no closed jaxpr to build: it records the tensors the score function captures (a
  ``TorchFunctionMode`` around one example call) and the backward asks ``torch.autograd.grad`` for the
  gradient with respect to those very tensors; a score function it cannot account for takes the
  autograd-through-the-forward path instead (exact, but memory like T²; see :func:`_hoist`).
- The dense plan's grouped mask ``(B|1, K|1, G|1, Tp|1, Sp|1)`` meets the logits viewed as
  ``(B, K, G, bt, C)``: broadcast as is, never copied per row.

The *dense* plan (``tables=None``) is SDPA's ``implementation="blocked"``: no tables, every key block, or
with ``causal`` only those up to the diagonal; short causal calls take each query block's keys in static
ranges (:func:`_key_ranges`). It takes a dense bool or float mask, sliced per block; a float mask
receives its gradient (``d mask = ds`` summed over the mask's size-1 axes).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attn_spec.blocks import backward_query_block
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


class _Cfg(NamedTuple):
    """Static description of one engine call (kept on the autograd context for the backward)."""

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
    native: bool = False  # the JAX twin's compiled CPU kernel; never set here (see native_reason)
    static: bool = False  # torch: dense causal with at most _UNROLL_CAUSAL query blocks (JAX: static i)
    device: torch.device | None = None  # torch: where the index tensors live


#: The JAX twin's switch for its compiled CPU kernel; this twin has none.
NATIVE = False


def native_reason(q_dtype, *, mask=None, Bk: int = 1, B: int = 1) -> str:
    """Why the dense plan does not run on a compiled kernel here: always, since this twin's fast path is
    torch's own fused kernel, ``F.scaled_dot_product_attention``, chosen by the dispatch rule before the
    engine (the JAX twin's :func:`native_reason` runs XLA's missing parallel loop as a C++ kernel)."""
    return "the torch twin's compiled kernel is F.scaled_dot_product_attention (the fused path)"


def _hoist(fn, example_args):
    """``fn`` with the tensors it captures made explicit: returns ``(pure_fn, consts)`` with
    ``pure_fn(*args, *consts)``. Torch has no closed jaxpr: ``fn`` is called once on ``example_args``
    under a ``TorchFunctionMode`` that records every tensor requiring grad that a torch call in ``fn``
    receives and that neither the example arguments nor an earlier call in ``fn`` made (captured by a
    closure, a global, a module attribute alike; leaf or not). ``pure_fn`` calls ``fn`` itself: the consts
    are those very tensors, the backward asks ``torch.autograd.grad`` for their gradients and autograd
    carries a non-leaf's on to its leaves.

    ``consts`` is None when the record cannot be shown complete: a path of the example output's graph
    reaches a tensor requiring grad without passing through a recorded tensor (a call the mode did not
    see, or ``fn`` returning a captured tensor untouched). The caller then differentiates through the
    forward with autograd (exact, but it keeps every block's probabilities: memory like T²) rather than
    give a silently wrong gradient. Limit: the record sees the example call only (zero scores, zero
    indices), like ``make_jaxpr`` in the JAX twin; a score function whose Python control flow depends on the
    values and reads a tensor only on the other branch is not supported (jit would reject it in JAX)."""
    if fn is None:
        return None, []
    n_in = len(example_args)

    def flat(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            for y in x:
                yield from flat(y)
        elif isinstance(x, dict):
            for y in x.values():
                yield from flat(y)

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.made = {id(a): a for a in example_args}  # (held: ids stay unique)
            self.found = {}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            for x in flat((args, kwargs)):
                if x.requires_grad and id(x) not in self.made:
                    self.found.setdefault(id(x), x)
            out = func(*args, **kwargs)
            for x in flat(out):
                self.made.setdefault(id(x), x)
            return out

    record = Record()
    with torch.enable_grad(), record:
        out = fn(*example_args)
    consts = list(record.found.values())

    def pure(*args):
        return fn(*args[:n_in])

    if not (isinstance(out, torch.Tensor) and out.requires_grad):
        return pure, consts
    leaves = {id(c) for c in consts if c.grad_fn is None}
    cuts = {(id(c.grad_fn), c.output_nr) for c in consts if c.grad_fn is not None}
    if out.grad_fn is None:
        return pure, consts if id(out) in leaves else None
    todo, seen = [(out.grad_fn, out.output_nr)], set()
    while todo:
        node, nr = todo.pop()
        if node is None or (id(node), nr) in cuts:
            continue
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf reached around the recorded tensors
            if id(node.variable) not in leaves:
                return pure, None
            continue
        if id(node) not in seen:
            seen.add(id(node))
            todo.extend(node.next_functions)
    return pure, consts


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
        serves every query batch row (indexed, not copied, unless the rows are per query head). One
        floating compute dtype for all three.
      scale: the logit scale, applied to each query block as it is visited (the backward keeps the
        unscaled ``q`` as its residual: no scaled copy of q in memory).
      tables: :class:`BlockTables` with ``n_q = ceil(T / bt)`` query blocks and key blocks of ``bs``.
      score_fn: ``score_fn(score, b, h, q_idx, kv_idx)`` elementwise on each block's logits, called with
        broadcastable tensors (score ``(R, G', bt, bs)`` over the R rows, b ``(R, 1, 1, 1)``, h
        ``(R, G', 1, 1)`` query head indices, q_idx ``(1, 1, bt, 1)``, kv_idx ``(1, 1, 1, bs)`` or
        ``(R, 1, 1, bs)`` for per-row tables); applied before the mask. Tensors it captures that require
        grad receive their gradients (see :func:`_hoist`).
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
    mask_kind = 0
    if mask is not None:
        mask_kind = 1 if mask.dtype == torch.bool else 2
        pad_T = 0 if mask.shape[-2] == 1 else Tp - T
        pad_S = 0 if mask.shape[-1] == 1 else Sp - S
        if mask_kind == 2:
            mask = mask.to(q.dtype)
        if pad_T or pad_S:
            mask = F.pad(mask, (0, pad_S, 0, pad_T))  # False / 0.0
    Bt, Nt = (1, 1) if dense else tables.kv_num.shape[:2]
    Gp = G if Nt > 1 else 1
    Gi = G // Gp
    if dense:
        # SDPA's trick: the scale fused into q once (one multiply of (T, H)) rather than once per query
        # block visit
        q, scale = q * scale, 1.0
    # rows of (Gi·Tp, H): a view of (B, K, G, Tp, H)
    q = (F.pad(q, (0, 0, 0, Tp - T)) if Tp > T else q).reshape(B * K * Gp, Gi * Tp, q.shape[-1])
    Bk = k.shape[0]
    k = (F.pad(k, (0, 0, 0, Sp - S)) if Sp > S else k).reshape(Bk * K, Sp, k.shape[-1])
    v = (F.pad(v, (0, 0, 0, Sp - S)) if Sp > S else v).reshape(Bk * K, Sp, v.shape[-1])
    tabs = ()
    if not dense:
        full_num, full_idx = tables.full_num, tables.full_idx
        if full_num is None:
            full_num = torch.zeros_like(tables.kv_num)
            full_idx = torch.zeros((*tables.kv_num.shape, 1), dtype=torch.int32)
        tabs = (tables.kv_num, tables.kv_idx, full_num, full_idx)
    dev = q.device
    score_pure, s_consts, mask_pure, m_consts = None, [], None, []
    if score_fn is not None or mask_fn is not None:  # example arguments of the mods' signature
        ints = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=dev)
        idx_args = (ints, torch.zeros((1, Gi, 1, 1), dtype=torch.long, device=dev))
        idx_args += (torch.zeros((1, 1, bt, 1), dtype=torch.long, device=dev),)
        idx_args += (torch.zeros((1, 1, 1, bs), dtype=torch.long, device=dev),)
        scores = torch.zeros((1, Gi, bt, bs), dtype=q.dtype, device=dev)
        score_pure, s_consts = _hoist(score_fn, (scores, *idx_args))
        mask_pure, m_consts = mask_fn, []  # torch: a bool keep has no gradient and nothing to trace for
    hoisted = s_consts is not None
    s_consts = s_consts if hoisted else []
    static = dense and causal and n_q <= _UNROLL_CAUSAL
    bt_bwd = backward_query_block(bt, Gi) if dense else 0
    cfg = _Cfg(
        T, S, bt, bs, B, K, G, Gp, Bt, Bk, Nt, len(s_consts), float(scale), dense, bool(causal), mask_kind,
        bt_bwd, static, dev,
    )  # fmt: skip
    if Bt == 1 and Nt == 1:  # shared by every row: Python ints, each step one slice of k and v
        tabs = tuple(t[0, 0].tolist() for t in tabs)
    else:  # per row: index tensors, each step a gather (see _walk)
        tabs = tuple(t.to(dev, torch.long) for t in tabs)
    if hoisted:
        out, lse = _engine.apply(cfg, score_pure, mask_pure, q, k, v, tabs, mask, *s_consts, *m_consts)
    else:  # a score function _hoist cannot account for: autograd through the forward (memory like T²)
        out, stats = _forward(cfg, score_pure, mask_pure, q, k, v, tabs, tuple(m_consts), mask)
        lse = stats[..., 2]
    out = out.reshape(B, K, G, Tp, -1)[..., :T, :]
    return out, lse.reshape(B, K, G, Tp)[..., :T]


# ------------------------------------------------------------------------------- the engine


def _kv_row(cfg, r):
    """The ``(b·K + kvh)`` rows of k and v that rows ``r`` read (batch 0 for a broadcast key/value); every
    row at once: ``slice(None)`` where row r reads k's row r (a view, no gather)."""
    if cfg.Gp == 1 and (cfg.Bk > 1 or cfg.B == 1):
        return slice(None)
    kv = r // cfg.Gp
    return kv if cfg.Bk > 1 else kv % cfg.K


def _kv_grad(cfg, d):
    """Per-row ``(R, Sp, ·)`` key/value gradients summed into k's rows: over the ``Gp`` rows of one
    key/value head (each holds a share) and, for a broadcast key/value, over the batch."""
    d = d.reshape(cfg.B, cfg.K, cfg.Gp, *d.shape[1:])
    if cfg.Gp > 1:
        d = d.sum(dim=2)
    else:
        d = d[:, :, 0]
    if cfg.Bk == 1 and cfg.B > 1:
        d = d.sum(dim=0, keepdim=True)
    return d.reshape(-1, *d.shape[2:])


def _row_ids(cfg, r):
    """Batch indices ``(R,)``, query head indices ``(R, G')`` and table rows of rows ``r`` (ints 0 where
    the tables broadcast)."""
    if cfg.dense:  # no mods and no tables: nothing reads them
        return None, None, 0, 0
    b = r // (cfg.K * cfg.Gp)
    kvh = (r // cfg.Gp) % cfg.K
    gp = r % cfg.Gp
    Gi = cfg.G // cfg.Gp
    h = (kvh * cfg.G + gp * Gi)[:, None] + torch.arange(Gi, device=r.device)
    tb = b if cfg.Bt > 1 else 0
    th = h[:, 0] if cfg.Nt > 1 else 0
    return b, h, tb, th


#: A dense causal call with at most this many query blocks takes each query block's keys in static ranges
#: (:func:`_key_ranges`), as the JAX twin's unrolled forward does; else in key blocks up to the diagonal.
#: (Every index is static in torch; the JAX twin's reason for the limit is its compile time.) The backward
#: always takes key blocks (see _engine_bwd).
_UNROLL_CAUSAL = 8
#: In such a causal call, a query block whose keys up to the diagonal number at most this many takes
#: them in (at most) two static ranges, not in key blocks: the keys every row sees in one product without
#: the causal comparison, the diagonal band with it. No online-softmax rescaling between blocks, bigger
#: GEMMs. Beyond, key blocks (bounded memory).
#: A non-causal dense call whose keys number more than one block and at most this many takes them in one
#: range too, in the forward and the backward (the query blocks still loop): B2 N8 T2048 H64 JAX forward
#: 0.13-0.15 -> 0.11 s, forward+backward 0.44 -> 0.37 s; GQA B1 N32 K8 T2048 0.21 -> 0.19 s and
#: 0.74 -> 0.63 s (2-core CPU).
_ROWS_MAX_KEYS = 2048
_ALIGN_KEYS = 8
#: Whether the non-causal single range above is taken. False in torch: every row is batched into one
#: step, so the range's tile is (R, G'·bt, Sp); B2 N8 T2048 forward+backward 0.53-0.54 s with it vs
#: 0.29-0.33 s in key blocks (the JAX twin, one row per step, takes it).
_WHOLE_KEYS = False


def _key_blocks(cfg, i, n_kv):
    """How many key blocks dense query block ``i`` needs: all, or up to the diagonal when causal."""
    if not cfg.causal:
        return n_kv
    return min(n_kv, ((i + 1) * cfg.bt - 1) // cfg.bs + 1)


def _below_diagonal(cfg, i, c0, n_cols) -> bool:
    """Whether columns ``[c0, c0 + n_cols)`` are all visible to every row of query block i: then the
    causal comparison is skipped (every index is static in torch)."""
    return c0 + n_cols - 1 <= i * cfg.bt


def _key_ranges(cfg, i, n_kv):
    """The key column ranges dense query block i visits, as ``(block count, None)`` or, for a causal call with
    static ranges (``cfg.static``), a list of ``(c0, n_cols)`` ranges: the keys wholly below the diagonal in
    one range (one GEMM, no causal comparison) and the rest up to the diagonal in another. A non-causal call
    with more than one key block and at most :data:`_ROWS_MAX_KEYS` keys takes them all in one range, ``[(0,
    Sp)]``, whatever i (where :data:`_WHOLE_KEYS`)."""
    if _WHOLE_KEYS and not cfg.causal and 1 < n_kv and cfg.bs * n_kv <= _ROWS_MAX_KEYS:
        return None, [(0, cfg.bs * n_kv)]  # every key in one range (forward and backward, see above)
    if not (cfg.causal and cfg.static):
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
    """``carry`` through ``step(carry, c0, n_cols, partial_block, active)`` for every key range query block
    i visits: the tables' partial then full blocks, or the dense plan (:func:`_key_ranges`). ``c0`` is an
    int (one slice for every row) or, for per-row tables, an ``(R,)`` tensor (each row's own block);
    ``active`` None or the ``(R,)`` rows that have this step (the others are masked whole)."""
    if cfg.dense:
        count, ranges = _key_ranges(cfg, i, n_kv)
        if ranges is None:
            for j in range(count):
                carry = step(carry, j * cfg.bs, cfg.bs, True, None)
            return carry
        for c0, n_cols in ranges:
            carry = step(carry, c0, n_cols, True, None)
        return carry
    kv_num, kv_idx, full_num, full_idx = tabs

    def visit(num, idx, partial_block, carry):
        if isinstance(num, list):  # shared tables
            for j in range(num[i]):
                carry = step(carry, idx[i][j] * cfg.bs, cfg.bs, partial_block, None)
            return carry
        num, idx = num[tb, th, i], idx[tb, th, i].clamp(0, n_kv - 1)
        for j in range(int(num.max())):
            active = j < num
            carry = step(carry, idx[:, j] * cfg.bs, cfg.bs, partial_block, None if active.all() else active)
        return carry

    carry = visit(kv_num, kv_idx, True, carry)
    return visit(full_num, full_idx, False, carry)


def _mask_row(cfg, mask, r):
    """The dense mask of rows ``r`` and their position in the grouped mask ``(B|1, K|1, G|1, Tp|1,
    Sp|1)``: every row at once, so the grouped mask itself (the logits meet it viewed as ``(B, K, G, ·,
    ·)``, see :func:`_masked`) and no position."""
    if mask is None:
        return None, None
    return mask, None


def _mask_block(cfg, m_r, i, c0, n_cols):
    """Rows ``[i·bt, i·bt + bt)`` and columns ``[c0, c0 + n_cols)`` of the rows' dense mask (size-1 axes
    stay size 1)."""
    if m_r is None:
        return None
    m = m_r
    if m.shape[-2] != 1:
        m = m[..., i * cfg.bt : (i + 1) * cfg.bt, :]
    if m.shape[-1] != 1:
        m = m[..., c0 : c0 + n_cols]
    return m


def _indices(cfg, i, c0, n_cols):
    """Row and column indices of query block i against the ``n_cols`` keys from ``c0``, and the clamped
    ``(1, 1, bt, 1)``, ``(1|R, 1, 1, n_cols)`` indices the mods see: mods never see an index past the
    lengths (they may index arrays of that length)."""
    rows = (i * cfg.bt + torch.arange(cfg.bt, device=cfg.device)).view(1, 1, -1, 1)
    cols = torch.arange(n_cols, device=cfg.device) + (c0 if isinstance(c0, int) else c0.view(-1, 1, 1, 1))
    cols = cols.view(-1, 1, 1, n_cols)
    return rows, cols, rows.clamp(max=cfg.T - 1), cols.clamp(max=cfg.S - 1)


def _masked(cfg, mask_pure, consts, s, b, h, i, c0, idx, partial_block, m_blk, active):
    """Tables: on a partial block, the mask and the padding past T or S as -inf (a block that runs past
    the lengths is never full, so full blocks need neither); rows not ``active`` on this step as -inf.
    Dense: the causal comparison (unless the columns are all below the diagonal), the key padding and the
    dense mask block ``m_blk``."""
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
        shape = s.shape
        if m_blk is not None:
            s = s.reshape(cfg.B, cfg.K, *shape[1:])  # rows as (B, K): the grouped mask broadcasts as is
            if cfg.mask_kind == 1:
                keep = m_blk if keep is None else keep & m_blk
            else:
                s = s + m_blk
        return (s if keep is None else torch.where(keep, s, -torch.inf)).reshape(shape)
    rows, cols, q_idx, kv_idx = idx
    if active is not None:
        keep = active.view(-1, 1, 1, 1)
    if not partial_block:
        return s if keep is None else torch.where(keep, s, -torch.inf)
    if cfg.T % cfg.bt or cfg.S % cfg.bs:
        valid = (rows < cfg.T) & (cols < cfg.S)
        keep = valid if keep is None else keep & valid
    if mask_pure is not None:
        m = mask_pure(b[:, None, None, None], h[..., None, None], q_idx, kv_idx, *consts[cfg.n_score :])
        keep = m if keep is None else keep & m
    return s if keep is None else torch.where(keep, s, -torch.inf)


def _logits(cfg, score_pure, mask_pure, consts, q_i, k_c, b, h, i, c0, partial_block, m_blk, active):
    """Logits ``(R, G', bt, C)`` of query block i against the C keys ``k_c`` ``(R, C, H)`` from column
    ``c0``, the score function applied before the mask. One batched GEMM ``(R, G'·bt, H) × (R, H, C)``."""
    s = (q_i.flatten(1, 2) @ k_c.transpose(1, 2)).unflatten(1, q_i.shape[1:3])  # "rgth,rsh->rgts"
    idx = None if cfg.dense else _indices(cfg, i, c0, k_c.shape[1])  # the dense plan has no mods
    if score_pure is not None:
        s = score_pure(s, b[:, None, None, None], h[..., None, None], idx[2], idx[3], *consts[: cfg.n_score])
    return _masked(cfg, mask_pure, consts, s, b, h, i, c0, idx, partial_block, m_blk, active)


def _forward(cfg, score_pure, mask_pure, q, k, v, tabs, consts, mask):
    """Rows: output ``(R, G', Tp, V)`` and statistics ``(R, G', Tp, 3)``: the max the row was shifted by
    (0 for rows with nothing kept), the row sum (1 for them) and the lse (-inf for them). Max and sum are
    kept apart for the backward, where ``exp((s - max) - log sum)`` is exact for every row (folded into a
    logsumexp, a ``finfo.min`` additive mask would round ``max + log(sum)`` to ``max``). Out of place
    throughout, so that autograd can also differentiate it (the fallback of :func:`_hoist`)."""
    Gi = cfg.G // cfg.Gp
    Tp = q.shape[1] // Gi
    n_q, n_kv, Vw = Tp // cfg.bt, k.shape[1] // cfg.bs, v.shape[-1]
    # torch: the eager steps reuse their block tensors where nothing records a graph (the fallback of
    # _hoist differentiates this function; a score function's output may alias a tensor it holds)
    in_place = not torch.is_grad_enabled() and score_pure is None

    def row(r):
        # every row at once (r = arange(R), see the module docstring): a view of q, k and v where each
        # row reads its own key/value row
        q_r = q.reshape(-1, Gi, Tp, q.shape[-1])
        k_r = k[_kv_row(cfg, r)]
        v_r = v[_kv_row(cfg, r)]
        m_r, _ = _mask_row(cfg, mask, r)
        b, h, tb, th = _row_ids(cfg, r)

        def take(x, c0, n_cols):  # dynamic_slice_in_dim: one slice, or each row's own key block
            if isinstance(c0, int):
                return x[:, c0 : c0 + n_cols]
            return x.unflatten(1, (-1, cfg.bs))[r, c0 // cfg.bs]

        def query_block(args):
            i, q_i = args
            if cfg.scale != 1.0:
                q_i = q_i * cfg.scale
            q_i = q_i.contiguous()  # (R, G', bt, H), flattened for each step's GEMM: one copy at most

            def step(carry, c0, n_cols, partial_block, active):
                m, row_sum, acc = carry
                k_c = take(k_r, c0, n_cols)
                v_c = take(v_r, c0, n_cols)
                m_blk = _mask_block(cfg, m_r, i, c0, n_cols)
                s = _logits(
                    cfg, score_pure, mask_pure, consts, q_i, k_c, b, h, i, c0, partial_block, m_blk, active
                )
                # (the shift is a constant to autograd: any shift gives the same softmax)
                m_new = torch.maximum(m, torch.amax(s, dim=-1)).detach()
                # A row with nothing kept so far has max -inf: shift by 0 so exp gives exact zeros.
                m_use = torch.where(torch.isfinite(m_new), m_new, 0.0)
                if in_place:  # s is this step's own tensor and no graph is recorded
                    p = s.sub_(m_use[..., None]).exp_()
                else:
                    p = torch.exp(s - m_use[..., None])
                alpha = torch.exp(m - m_use)
                row_sum = alpha * row_sum + torch.sum(p, dim=-1)
                # "rgts,rsv->rgtv" added to the rescaled accumulator, one batched GEMM
                acc = torch.baddbmm((alpha[..., None] * acc).flatten(1, 2), p.flatten(1, 2), v_c)
                return m_new, row_sum, acc.unflatten(1, p.shape[1:3])

            carry = (
                torch.full((q_i.shape[0], Gi, cfg.bt), -torch.inf, dtype=q.dtype, device=q.device),
                torch.zeros((q_i.shape[0], Gi, cfg.bt), dtype=q.dtype, device=q.device),
                torch.zeros((q_i.shape[0], Gi, cfg.bt, Vw), dtype=q.dtype, device=q.device),
            )
            m, row_sum, acc = _walk(cfg, tabs, tb, th, i, n_kv, step, carry)
            empty = row_sum == 0.0
            lse = torch.where(empty, -torch.inf, m + torch.log(torch.where(empty, 1.0, row_sum)))
            row_sum = torch.where(empty, 1.0, row_sum)
            m = torch.where(empty, 0.0, m)
            return acc / row_sum[..., None], torch.stack([m, row_sum, lse], dim=-1)

        q_blocks = q_r.unflatten(2, (n_q, cfg.bt)).movedim(2, 0)
        # Python loop over the query blocks, each index static (see cfg.static for the key ranges)
        outs = [query_block((i, q_blocks[i])) for i in range(n_q)]
        if n_q == 1:  # (a cat of one tensor would copy it)
            return outs[0]
        out, stats = (torch.cat(x, dim=2) for x in zip(*outs, strict=True))
        return out, stats

    return row(torch.arange(q.shape[0], device=q.device))


class _engine(torch.autograd.Function):
    """The custom VJP (JAX: ``_engine`` with ``_engine_fwd``): the forward runs :func:`_forward` without a
    graph and saves q, k, v, the output and the statistics (max, sum, lse), never a probability; the
    backward is :func:`_engine_bwd`. ``apply(cfg, score_pure, mask_pure, q, k, v, tabs, mask, *consts)``:
    the consts last, as direct arguments (Function tracks only tensors among those)."""

    @staticmethod
    def forward(ctx, cfg, score_pure, mask_pure, q, k, v, tabs, mask, *consts):
        out, stats = _forward(cfg, score_pure, mask_pure, q, k, v, tabs, consts, mask)
        ctx.save_for_backward(q, k, v, out, stats, mask)
        # The consts as given (the score function reads these very tensors; see _hoist).
        ctx.cfg, ctx.score_pure, ctx.mask_pure = cfg, score_pure, mask_pure
        ctx.tabs, ctx.consts = tabs, consts
        return out, stats[..., -1].contiguous()

    @staticmethod
    def backward(ctx, d_out, d_lse):
        if torch.is_grad_enabled():  # create_graph=True: the gradients would silently be constants
            raise RuntimeError(
                "block_attention: double backward is not supported (the blocked engine's backward is a "
                "custom torch.autograd.Function; differentiate its gradients with implementation='math')"
            )
        q, k, v, out, stats, mask = ctx.saved_tensors
        residuals = (q, k, v, ctx.tabs, ctx.consts, mask, out, stats)
        dq, dk, dv, d_consts, d_mask = _engine_bwd(
            ctx.cfg, ctx.score_pure, ctx.mask_pure, residuals, (d_out, d_lse), ctx.needs_input_grad[7]
        )
        return (None, None, None, dq, dk, dv, None, d_mask, *d_consts)


def _add_mask_grad(cfg, d_mask, pos, ds, i, c0):
    """``ds`` ``(R, G', bt, C)``, viewed as ``(B, K, G', bt, C)``, summed over the float mask's size-1 axes
    and added (in place) to its block of ``d_mask`` ``(B|1, K|1, G|1, Tp|1, Sp|1)``: every row at once,
    so no position ``pos``."""
    ds = ds.reshape(cfg.B, cfg.K, *ds.shape[1:])
    size_1 = [a for a in range(5) if d_mask.shape[a] == 1 and ds.shape[a] != 1]
    if size_1:
        ds = ds.sum(dim=size_1, keepdim=True)
    t0 = 0 if d_mask.shape[3] == 1 else i * cfg.bt
    col0 = 0 if d_mask.shape[4] == 1 else c0
    d_mask[..., t0 : t0 + ds.shape[3], col0 : col0 + ds.shape[4]] += ds
    return d_mask


def _engine_bwd(cfg, score_pure, mask_pure, residuals, cotangents, mask_wanted=True):
    """One pass over every row at once: a loop over query blocks carrying the rows' dk, dv, the gradients
    of the score function's tensors and of a float dense mask; per query block the same key walk as the
    forward recomputes ``p = exp((s - max) - log sum)`` (no division per logit) and adds its share. dk and
    dv are accumulated transposed, ``(H, Sp)`` per row: their products are ``qᵀ·ds`` and ``dOᵀ·p`` with
    ``(H, C)`` results, where XLA:CPU ran the ``(C, H)`` form ``dsᵀ·q`` at about half the rate of the other
    products (512×512×64 tiles: 96 vs 167 GFLOP/s; B2 N8 T2048 H64 forward+backward 0.32 → 0.29 s causal,
    0.50 → 0.44 s full, both changes together, 2-core CPU). torch runs both forms alike; the layout is kept
    for the twin. ``ds = p (dO·vᵀ - rowsum(dO∘O) + d lse)``: the last term is the lse cotangent (``d lse /
    d s = p``). Returns ``(dq, dk, dv, d_consts, d_mask)``: None for the mask when it is bool or
    ``mask_wanted`` is False, and for the mask function's tensors (a bool mask has no gradient). The
    backward's tiles stay ``bt × bs``, but for the non-causal single range of :func:`_key_ranges` (no
    static key ranges, as in the JAX twin: B2 N8 T2048 H64 causal forward+backward 0.28 s with them vs 0.30
    s with the forward's ranges, 2-core CPU). The dense plan's backward takes smaller query blocks where G
    query heads share a step (``cfg.bt_bwd``, :func:`attn_spec.blocks.backward_query_block`), as in the JAX
    twin."""
    if cfg.bt_bwd and cfg.bt_bwd != cfg.bt:
        cfg = cfg._replace(bt=cfg.bt_bwd)
    q, k, v, tabs, consts, mask, out, stats = residuals
    d_out, d_lse = cotangents
    cfg = cfg._replace(static=False)
    Gi = cfg.G // cfg.Gp
    Tp = q.shape[1] // Gi
    n_q, n_kv = Tp // cfg.bt, k.shape[1] // cfg.bs
    d_lse = torch.where(torch.isfinite(stats[..., 2]), d_lse, 0.0)
    delta = torch.sum(d_out * out, dim=-1) - d_lse  # (R, G', Tp)
    s_consts = consts[: cfg.n_score]  # (each requires grad: _hoist keeps no other)
    mask_grad = cfg.mask_kind == 2 and mask_wanted

    def row(carry_r, xs):
        d_consts, d_mask = carry_r
        r, do_r, st_r, de_r = xs
        q_r = q.reshape(-1, Gi, Tp, q.shape[-1])  # as forward
        k_r = k[_kv_row(cfg, r)]
        v_r = v[_kv_row(cfg, r)]
        m_r, pos = _mask_row(cfg, mask, r)
        b, h, tb, th = _row_ids(cfg, r)

        def take(x, c0, n_cols):  # as forward
            if isinstance(c0, int):
                return x[:, c0 : c0 + n_cols]
            return x.unflatten(1, (-1, cfg.bs))[r, c0 // cfg.bs]

        def add(x, c0, n_cols, a, b):  # dynamic_update_slice_in_dim on axis 2: x's columns + a @ b, in place
            if isinstance(c0, int) and n_cols == x.shape[2]:  # every column: one GEMM accumulated in place
                x.baddbmm_(a, b)
            elif isinstance(c0, int):
                x[:, :, c0 : c0 + n_cols] += a @ b  # (baddbmm_ into the strided slice ran 5x slower)
            else:
                col_blocks = x.unflatten(2, (-1, cfg.bs)).transpose(1, 2)  # (R, n_kv, ·, bs)
                col_blocks.index_put_((r, c0 // cfg.bs), a @ b, accumulate=True)
            return x

        def query_block(carry, xs):
            i, q_i, do_i, st_i, de_i = xs
            if cfg.scale != 1.0:
                q_i = q_i * cfg.scale  # dq below is w.r.t. this scaled block
            q_i = q_i.contiguous()  # as forward
            q_f, do_f = q_i.flatten(1, 2), do_i.flatten(1, 2)  # (R, G'·bt, ·)
            log_sum = torch.log(st_i[..., 1:2])  # p = exp((s - max) - log sum): no division per logit

            def step(inner, c0, n_cols, partial_block, active):
                dq_i, dk_r, dv_r, dc, dm = inner
                k_c = take(k_r, c0, n_cols)
                v_c = take(v_r, c0, n_cols)
                m_blk = _mask_block(cfg, m_r, i, c0, n_cols)
                if score_pure is None:
                    s = _logits(
                        cfg, None, mask_pure, consts, q_i, k_c, b, h, i, c0, partial_block, m_blk, active
                    )
                else:
                    s_raw = (q_i.flatten(1, 2) @ k_c.transpose(1, 2)).unflatten(1, q_i.shape[1:3])
                    s_raw.requires_grad_()
                    idx = _indices(cfg, i, c0, n_cols)
                    with torch.enable_grad():
                        s_mod = score_pure(
                            s_raw, b[:, None, None, None], h[..., None, None], idx[2], idx[3], *s_consts
                        )
                    s = _masked(
                        cfg, mask_pure, consts, s_mod.detach(), b, h, i, c0, idx, partial_block, m_blk, active
                    )
                if score_pure is None:
                    p = s.sub_(st_i[..., 0:1]).sub_(log_sum).exp_()  # in place: s is the step's own
                else:  # (s is s_mod's data, which its vjp may still read)
                    p = torch.exp((s - st_i[..., 0:1]).sub_(log_sum))
                dp = (do_i.flatten(1, 2) @ v_c.transpose(1, 2)).view_as(p)  # "rgtv,rsv->rgts"
                ds = dp.sub_(de_i[..., None]).mul_(p)  # p (dp - delta), in place
                if mask_grad:
                    dm = _add_mask_grad(cfg, dm, pos, ds, i, c0)  # the mask is added after the score_fn
                if score_pure is not None:
                    # the vjp of the score function: w.r.t. the raw logits and the tensors it captures
                    wrt = [s_raw, *s_consts]
                    grads = [None] * len(wrt)
                    if s_mod.requires_grad:
                        grads = torch.autograd.grad(s_mod, wrt, ds, retain_graph=True, allow_unused=True)
                    ds = torch.zeros_like(ds) if grads[0] is None else grads[0]
                    dc = tuple(a if g is None else a + g for a, g in zip(dc, grads[1:], strict=True))
                ds = ds.flatten(1, 2)  # (R, G'·bt, C): the GEMMs below, accumulated in place
                dq_i = dq_i.baddbmm_(ds, k_c)  # "rgts,rsh->rgth"
                dk_r = add(dk_r, c0, n_cols, q_f.transpose(1, 2), ds)  # "rgth,rgts->rhs"
                dv_r = add(dv_r, c0, n_cols, do_f.transpose(1, 2), p.flatten(1, 2))  # "rgtv,rgts->rvs"
                return dq_i, dk_r, dv_r, dc, dm

            dk_r, dv_r, dc, dm = carry
            inner = (torch.zeros_like(q_f), dk_r, dv_r, dc, dm)
            dq_i, dk_r, dv_r, dc, dm = _walk(cfg, tabs, tb, th, i, n_kv, step, inner)
            dq_i = dq_i.view_as(q_i)
            if cfg.scale != 1.0:
                dq_i = dq_i * cfg.scale
            return (dk_r, dv_r, dc, dm), dq_i

        def blocks(x):
            return x.unflatten(2, (n_q, cfg.bt)).movedim(2, 0)

        xs_r = (range(n_q), blocks(q_r), blocks(do_r), blocks(st_r), blocks(de_r))
        carry = (k_r.new_zeros(k_r.mT.shape), v_r.new_zeros(v_r.mT.shape), d_consts, d_mask)
        dq = []
        for xs_i in zip(*xs_r):  # the JAX scan over query blocks
            carry, dq_i = query_block(carry, xs_i)
            dq.append(dq_i)
        dk_r, dv_r, d_consts, d_mask = carry
        return (d_consts, d_mask), (torch.cat(dq, dim=2).reshape(q.shape), dk_r, dv_r)

    d_consts0 = tuple(torch.zeros_like(c) for c in s_consts)
    d_mask0 = torch.zeros_like(mask) if mask_grad else None
    xs = (torch.arange(q.shape[0], device=q.device), d_out, stats, delta)
    (d_consts, d_mask), (dq, dk, dv) = row((d_consts0, d_mask0), xs)
    dk, dv = _kv_grad(cfg, dk.mT), _kv_grad(cfg, dv.mT)  # (R, Sp, ·) again
    d_all = [*d_consts] + [None] * (len(consts) - cfg.n_score)
    return dq, dk, dv, tuple(d_all), d_mask
