"""FlexAttention in JAX: ``torch.nn.attention.flex_attention``'s API and semantics (twin of
``torch_attn/flex.py``).

Dimension key (see ``attn_spec``): B batch, N query heads (torch's Hq), K key/value heads (Hkv),
G = N / K, T query length (L), S key length, H q/k head width (E), V value width (Ev).

- ``score_mod(score, b, h, q_idx, kv_idx)`` rewrites each logit (already scaled) before the mask;
  ``mask_mod(b, h, q_idx, kv_idx)`` returns True where a query may attend. Both are called with
  broadcastable index arrays (not scalars under vmap as in torch), so a mod written with Python operators
  (``q_idx >= kv_idx``, ``score * 2``) or with indexing of captured arrays (``bias[q_idx - kv_idx]``)
  works unchanged; a mod may capture arrays, traced ones included, and a captured float array receives
  gradients.
- :func:`create_block_mask` cuts ``(Q_LEN, KV_LEN)`` into blocks and records, per ``(b, h, query
  block)``, the partial and the full key blocks, exactly torch's tables. :func:`flex_attention` visits
  only those blocks (``jax_attn.engine``), evaluating ``mask_mod`` only on the partial ones.
- A row with nothing kept gives output 0 and lse -inf; lse is in natural log. Computation in float32
  (float64 for float64 inputs), output in the query's dtype.
- :class:`BlockMask` is a pytree (the tables are its children, ``mask_mod`` and the sizes static), so
  it passes into ``jax.jit``; :func:`create_block_mask` works inside ``jit`` too, with a ``mask_mod``
  that captures traced arrays (the tables have static sizes).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from attn_spec.blocks import block_sizes
from attn_spec.flex import (
    DEFAULT_BLOCK_SIZE,
    AuxOutput,
    AuxRequest,
    block_mask_index,
    block_size_pair,
    block_string,
    cdiv,
    check_block_mask_args,
    check_flex,
    check_flex_options,
    check_mod,
    sliced_mask_mod_error,
)
from jax_attn.engine import BlockTables, block_attention, dense_tables, tables_from_dense

logger = logging.getLogger(__name__)


def noop_mask(b, h, q_idx, kv_idx):
    """A mask_mod that keeps everything."""
    return jnp.ones((), dtype=jnp.bool_)


def and_masks(*mask_mods):
    """A mask_mod that keeps what every one of ``mask_mods`` keeps."""
    for mod in mask_mods:
        check_mod(mod, "mask_mod")

    def and_mask(b, h, q_idx, kv_idx):
        result = jnp.ones((), dtype=jnp.bool_)
        for mod in mask_mods:
            result = result & mod(b, h, q_idx, kv_idx)
        return result

    return and_mask


def or_masks(*mask_mods):
    """A mask_mod that keeps what any one of ``mask_mods`` keeps."""
    for mod in mask_mods:
        check_mod(mod, "mask_mod")

    def or_mask(b, h, q_idx, kv_idx):
        result = jnp.zeros((), dtype=jnp.bool_)
        for mod in mask_mods:
            result = result | mod(b, h, q_idx, kv_idx)
        return result

    return or_mask


def _index_grid(B, H, T, S):
    """Broadcastable ``b (B,1,1,1)``, ``h (1,H,1,1)``, ``q_idx (1,1,T,1)``, ``kv_idx (1,1,1,S)``."""
    return (
        jnp.arange(B, dtype=jnp.int32).reshape(B, 1, 1, 1),
        jnp.arange(H, dtype=jnp.int32).reshape(1, H, 1, 1),
        jnp.arange(T, dtype=jnp.int32).reshape(1, 1, T, 1),
        jnp.arange(S, dtype=jnp.int32).reshape(1, 1, 1, S),
    )


def create_mask(mod_fn, B, H, Q_LEN, KV_LEN, device=None) -> jnp.ndarray:
    """The dense ``(B, H, Q_LEN, KV_LEN)`` bool mask of a mask_mod (or, for a score_mod, where it leaves
    the score finite). B or H None → 1. ``device`` is accepted for torch's signature and ignored."""
    B, H, *_ = check_block_mask_args(B, H, Q_LEN, KV_LEN, DEFAULT_BLOCK_SIZE)
    b, h, q, kv = _index_grid(B, H, Q_LEN, KV_LEN)
    try:
        check_mod(mod_fn, "mask_mod")
        keep = mod_fn(b, h, q, kv)
    except ValueError:
        check_mod(mod_fn, "score_mod")
        keep = ~jnp.isneginf(mod_fn(jnp.zeros((B, H, Q_LEN, KV_LEN), jnp.float32), b, h, q, kv))
    return jnp.broadcast_to(keep, (B, H, Q_LEN, KV_LEN))


@jax.tree_util.register_pytree_node_class
class BlockMask:
    """torch's ``BlockMask``: per ``(b, h, query block)`` the partial key blocks (``kv_num_blocks``,
    ``kv_indices``: the first ``kv_num_blocks[b, h, i]`` entries of ``kv_indices[b, h, i]``) and the full
    ones (``full_kv_*``), the same per key block for the query blocks (``q_*``, ``full_q_*``),
    ``BLOCK_SIZE = (q, kv)``, ``seq_lengths = (Q_LEN, KV_LEN)`` and the ``mask_mod`` (evaluated on
    partial blocks only). Tables are int32 ``(B|1, H|1, n_q)`` / ``(B|1, H|1, n_q, n_kv)``."""

    _TABLES = (
        "kv_num_blocks",
        "kv_indices",
        "full_kv_num_blocks",
        "full_kv_indices",
        "q_num_blocks",
        "q_indices",
        "full_q_num_blocks",
        "full_q_indices",
    )

    def __init__(
        self,
        seq_lengths,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        q_num_blocks,
        q_indices,
        full_q_num_blocks,
        full_q_indices,
        BLOCK_SIZE,
        mask_mod,
    ):
        self.seq_lengths = tuple(seq_lengths)
        self.kv_num_blocks, self.kv_indices = kv_num_blocks, kv_indices
        self.full_kv_num_blocks, self.full_kv_indices = full_kv_num_blocks, full_kv_indices
        self.q_num_blocks, self.q_indices = q_num_blocks, q_indices
        self.full_q_num_blocks, self.full_q_indices = full_q_num_blocks, full_q_indices
        self.BLOCK_SIZE = tuple(BLOCK_SIZE)
        self.mask_mod = noop_mask if mask_mod is None else mask_mod

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks=None,
        full_kv_indices=None,
        BLOCK_SIZE=DEFAULT_BLOCK_SIZE,
        mask_mod=None,
        seq_lengths=None,
    ) -> BlockMask:
        """A BlockMask from the kv tables alone (the q tables are their transposes). ``seq_lengths``
        defaults to the block grid times the block size."""
        bq, bkv = block_size_pair(BLOCK_SIZE)
        n_q, n_kv = kv_indices.shape[-2], kv_indices.shape[-1]
        if seq_lengths is None:
            seq_lengths = (n_q * bq, n_kv * bkv)
        partial = _ordered_to_dense(kv_num_blocks, kv_indices, n_kv)
        q_num, q_idx = _dense_to_ordered(jnp.swapaxes(partial, -1, -2))
        full_q_num = full_q_idx = None
        if full_kv_num_blocks is not None:
            full = _ordered_to_dense(full_kv_num_blocks, full_kv_indices, n_kv)
            full_q_num, full_q_idx = _dense_to_ordered(jnp.swapaxes(full, -1, -2))
        return cls(
            seq_lengths,
            kv_num_blocks,
            kv_indices,
            full_kv_num_blocks,
            full_kv_indices,
            q_num,
            q_idx,
            full_q_num,
            full_q_idx,
            (bq, bkv),
            mask_mod,
        )

    # pytree: the tables are children (traced under jit), the rest is static
    def tree_flatten(self):
        return tuple(getattr(self, n) for n in self._TABLES), (
            self.seq_lengths,
            self.BLOCK_SIZE,
            self.mask_mod,
        )

    @classmethod
    def tree_unflatten(cls, aux, children):
        seq_lengths, block_size, mask_mod = aux
        return cls(seq_lengths, *children, block_size, mask_mod)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B|1, H|1, Q_LEN, KV_LEN)``."""
        return (*self.kv_num_blocks.shape[:2], *self.seq_lengths)

    def numel(self) -> int:
        B, H, T, S = self.shape
        return B * H * T * S

    def sparsity(self) -> float:
        """Percentage of the ``(B, H, Q_LEN, KV_LEN)`` entries in blocks that are not computed (torch's
        definition: listed blocks count whole, so it can go below 0 with ragged last blocks)."""
        computed = int(jnp.sum(self.kv_num_blocks))
        if self.full_kv_num_blocks is not None:
            computed += int(jnp.sum(self.full_kv_num_blocks))
        return 100 * (1 - computed * self.BLOCK_SIZE[0] * self.BLOCK_SIZE[1] / self.numel())

    def to_dense(self) -> jnp.ndarray:
        """The block-level mask ``(B|1, H|1, n_q, n_kv)`` int32: 1 where a block is partial or full."""
        n_kv = self.kv_indices.shape[-1]
        dense = _ordered_to_dense(self.kv_num_blocks, self.kv_indices, n_kv)
        if self.full_kv_num_blocks is not None:
            dense = dense | _ordered_to_dense(self.full_kv_num_blocks, self.full_kv_indices, n_kv)
        return dense.astype(jnp.int32)

    def to_string(self, grid_size=(20, 20), limit: int = 4) -> str:
        """An ASCII picture of the blocks per ``(b, h)`` (torch's drawing)."""
        return block_string(jax.device_get(self.to_dense()).tolist(), grid_size, limit)

    def __getitem__(self, index) -> BlockMask:
        """torch 2.13's ``BlockMask.__getitem__``: ``index`` (an int, slice or integer array, or a tuple of
        up to 3 of them over ``(batch, head, query block)``) applied to the kv tables; an int keeps its
        dim (``bm[0].kv_num_blocks.shape == (1, H, n_q)``). The result keeps ``BLOCK_SIZE`` and
        ``seq_lengths``; its ``mask_mod`` is a marker that raises (``flex_attention`` refuses it) until
        set back: ``sliced.mask_mod = bm.mask_mod``."""
        index = block_mask_index(index, tuple(self.kv_num_blocks.shape[:3]))
        index = tuple(i if isinstance(i, (int, slice)) else jnp.asarray(i) for i in index)

        def take(table):
            return None if table is None else table[index]

        return BlockMask.from_kv_blocks(
            take(self.kv_num_blocks),
            take(self.kv_indices),
            take(self.full_kv_num_blocks),
            take(self.full_kv_indices),
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=sliced_mask_mod_error,
            seq_lengths=self.seq_lengths,
        )

    def _adjust(self, new_q_len: int, new_kv_len: int) -> BlockMask:
        """torch's ``BlockMask._adjust``: the tables cropped to the block rows and columns of
        ``(new_q_len, new_kv_len)`` and the block counts recounted as torch does (right for masks whose
        kept blocks start at block 0 in each row, such as causal; not for all mask_mods). Keeps
        ``mask_mod``; ``seq_lengths = (new_q_len, new_kv_len)``."""
        n_rows, n_cols = cdiv(new_q_len, self.BLOCK_SIZE[0]), cdiv(new_kv_len, self.BLOCK_SIZE[1])
        kv_num, kv_idx = _adjust_tables(self.kv_num_blocks, self.kv_indices, n_rows, n_cols)
        full_num = full_idx = None
        if self.full_kv_num_blocks is not None:
            full_num, full_idx = _adjust_tables(self.full_kv_num_blocks, self.full_kv_indices, n_rows, n_cols)
        return BlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=self.mask_mod,
            seq_lengths=(new_q_len, new_kv_len),
        )

    def __repr__(self) -> str:
        return (
            f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, "
            f"mask_mod={getattr(self.mask_mod, '__name__', self.mask_mod)})"
        )


def _adjust_tables(num, idx, n_rows, n_cols):
    """torch's ``_adjust_num_blocks_and_indices``: the first ``n_rows`` rows and ``n_cols`` columns, the
    count recounted as the listed entries below the (clamped) old count."""
    idx = idx[:, :, :n_rows, :n_cols]
    num = num[:, :, :n_rows]
    num = jnp.where(num < n_cols, num, n_cols)
    return jnp.sum(idx < num[..., None], axis=-1, dtype=jnp.int32), idx


def _ordered_to_dense(num, idx, n_cols):
    """Block-level bool ``(..., n_rows, n_cols)`` from ordered tables."""
    listed = jnp.arange(idx.shape[-1]) < num[..., None]  # (..., n_rows, n_entries)
    hit = (idx[..., None] == jnp.arange(n_cols)) & listed[..., None]
    return jnp.any(hit, axis=-2)


def _dense_to_ordered(dense):
    tabs = tables_from_dense(dense, dense)
    return tabs.kv_num, tabs.kv_idx


def _block_counts(mask_mod, B, H, T, S, bq, bkv, n_q, n_kv):
    """How many entries of each ``(bq, bkv)`` block ``mask_mod`` keeps, ``(B, H, n_q, n_kv)``, one query
    block of rows at a time (memory ``B·H·bq·S``, never the dense mask). Entries past T or S count as
    masked, so a block that runs past the lengths is never full."""
    b, h, _, _ = _index_grid(B, H, 1, 1)
    cols = jnp.arange(n_kv * bkv, dtype=jnp.int32)
    kv_idx = jnp.minimum(cols, S - 1).reshape(1, 1, 1, -1)

    def one(i):
        rows = i * bq + jnp.arange(bq, dtype=jnp.int32)
        q_idx = jnp.minimum(rows, T - 1).reshape(1, 1, -1, 1)
        valid = (rows[:, None] < T) & (cols[None, :] < S)
        keep = jnp.broadcast_to(mask_mod(b, h, q_idx, kv_idx), (B, H, bq, n_kv * bkv)) & valid
        return jnp.sum(keep.reshape(B, H, bq, n_kv, bkv), axis=(2, 4), dtype=jnp.int32)

    counts = jax.lax.map(one, jnp.arange(n_q, dtype=jnp.int32))  # (n_q, B, H, n_kv)
    return jnp.moveaxis(counts, 0, 2)


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=DEFAULT_BLOCK_SIZE) -> BlockMask:
    """torch's ``create_block_mask``: the BlockMask of ``mask_mod(b, h, q_idx, kv_idx)`` for
    ``(B, H, Q_LEN, KV_LEN)`` (B or H None → 1, broadcast), blocks of ``BLOCK_SIZE`` (an int or a
    ``(q, kv)`` pair). A block whose entries are all kept is full, one with some kept partial; a block
    that runs past Q_LEN or KV_LEN is never full. Works under ``jit`` (static table sizes: ``kv_indices``
    has one entry per key block). ``device`` is accepted for torch's signature and ignored."""
    check_mod(mask_mod, "mask_mod")
    B, H, bq, bkv, n_q, n_kv = check_block_mask_args(B, H, Q_LEN, KV_LEN, BLOCK_SIZE)
    counts = _block_counts(mask_mod, B, H, Q_LEN, KV_LEN, bq, bkv, n_q, n_kv)
    full = counts == bq * bkv
    partial = (counts > 0) & ~full
    kv = tables_from_dense(partial, full)
    q = tables_from_dense(jnp.swapaxes(partial, -1, -2), jnp.swapaxes(full, -1, -2))
    return BlockMask(
        (Q_LEN, KV_LEN),
        kv.kv_num,
        kv.kv_idx,
        kv.full_num,
        kv.full_idx,
        q.kv_num,
        q.kv_idx,
        q.full_num,
        q.full_idx,
        (bq, bkv),
        mask_mod,
    )


def _spec(x):
    return (tuple(x.shape), jnp.dtype(x.dtype).name)


def flex_attention(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    score_mod=None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict | None = None,
    *,
    return_aux: AuxRequest | None = None,
):
    """``torch.nn.attention.flex_attention.flex_attention`` in JAX.

    Args:
      query: ``(B, N, T, H)``. key: ``(B, K, S, H)``. value: ``(B, K, S, V)``.
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` → new score, applied before the mask.
      block_mask: a :class:`BlockMask` for ``(T, S)`` (batch and heads 1 or as the query's); None keeps
        everything.
      scale: logit scale; default ``1 / sqrt(H)``.
      enable_gqa: query head n uses key/value head ``n // G``.
      return_lse: also return the log-sum-exp ``(B, N, T)`` (natural log, -inf for empty rows);
        deprecated in torch for ``return_aux``, and not allowed together with it.
      kernel_options: None or a dict; accepted for torch's signature and ignored (it tunes torch's
        Triton/C++ kernels).
      return_aux: an :class:`AuxRequest` (or any object with ``lse`` and ``max_scores``):
        ``AuxRequest(lse=True)`` returns ``(out, AuxOutput(lse=lse, max_scores=None))``;
        ``max_scores=True`` is not supported (ValueError).

    Returns:
      ``(B, N, T, V)`` in the query's dtype; with ``return_lse`` also the lse in the compute dtype, with
      ``return_aux`` also an :class:`AuxOutput` (its ``lse`` None unless requested).
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if score_mod is not None:
        check_mod(score_mod, "score_mod")
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        raise ValueError(
            f"flex_attention: block_mask must be a BlockMask or None, got {type(block_mask).__name__}"
        )
    want_lse = check_flex_options(
        block_mask_mod=None if block_mask is None else block_mask.mask_mod,
        return_lse=return_lse,
        return_aux=return_aux,
        kernel_options=kernel_options,
    )
    shapes = check_flex(
        query=_spec(query),
        key=_spec(key),
        value=_spec(value),
        enable_gqa=enable_gqa,
        scale=scale,
        block_mask=None
        if block_mask is None
        else (block_mask.shape, block_mask.BLOCK_SIZE, block_mask.kv_num_blocks.shape[-1]),
    )
    B, N, K, T, S, H = shapes.B, shapes.N, shapes.K, shapes.T, shapes.S, shapes.H
    ct = jnp.promote_types(query.dtype, jnp.float32)
    scale = 1.0 / (H**0.5) if scale is None else scale
    # the engine scales each query block as it visits it: one multiply of (bt, H) per block instead of one
    # per block of logits, and no scaled copy of q kept for the backward
    q = query.astype(ct).reshape(B, K, shapes.G, T, H)
    if block_mask is None:
        bt, bs = block_sizes(T, S)
        # nothing masked: without a score_mod the engine's dense plan (SDPA's), else every block listed
        tables, mask_fn = (None if score_mod is None else dense_tables(T, S, bt, bs)), None
    else:
        bt, bs = block_mask.BLOCK_SIZE
        tables = BlockTables(
            block_mask.kv_num_blocks,
            block_mask.kv_indices,
            block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices,
        )
        mask_fn = None if block_mask.mask_mod is noop_mask else block_mask.mask_mod
    out, lse = block_attention(
        q,
        key.astype(ct),
        value.astype(ct),
        tables,
        T=T,
        S=S,
        bt=bt,
        bs=bs,
        scale=scale,
        score_fn=score_mod,
        mask_fn=mask_fn,
    )
    out = out.reshape(B, N, T, shapes.V).astype(query.dtype)
    lse = lse.reshape(B, N, T) if want_lse else None
    if return_aux is not None:
        return out, AuxOutput(lse=lse, max_scores=None)
    return (out, lse) if return_lse else out
