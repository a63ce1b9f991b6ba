"""FlexAttention checks and block-table rules, written once for both twins.

``flex_attention`` takes ``query (B, N, T, H)``, ``key (B, K, S, H)``, ``value (B, K, S, V)`` (torch's
``(B, Hq, L, E)``, ``(B, Hkv, S, E)``, ``(B, Hkv, S, Ev)``), an optional ``score_mod(score, b, h, q_idx,
kv_idx)`` and an optional ``BlockMask``. A BlockMask cuts the ``(T, S)`` plane into blocks of
``BLOCK_SIZE = (bq, bkv)`` and lists, per ``(b, h, query block)``, the key blocks that are *partial* (the
``mask_mod`` is evaluated there) and *full* (every entry kept, the mask_mod is skipped). A block that runs
past ``T`` or ``S`` is never full. Both twins raise the same ``ValueError`` text from here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, NamedTuple

from attn_spec.checks import FLOAT_DTYPES, fmt_shape

#: torch's default block size.
DEFAULT_BLOCK_SIZE = 128


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class AuxRequest(NamedTuple):
    """Which auxiliary outputs ``flex_attention(..., return_aux=...)`` returns (torch's ``AuxRequest``).
    Only ``lse`` is supported; ``max_scores=True`` raises."""

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    """The auxiliary outputs of ``flex_attention(..., return_aux=...)`` (torch's ``AuxOutput``): ``lse``
    ``(B, N, T)`` when requested, else None; ``max_scores`` always None (not supported)."""

    lse: Any = None
    max_scores: Any = None


SLICED_MASK_MOD = (
    "Cannot use mask_mod from a sliced BlockMask: slicing a BlockMask with [] resets its mask_mod to a "
    "marker that raises. Set it from the original BlockMask before use, e.g. "
    "sliced.mask_mod = block_mask.mask_mod (or a function of block_mask.mask_mod, not of sliced.mask_mod)"
)
BOTH_LSE_AND_AUX = (
    "Cannot specify both return_lse and return_aux. "
    "return_lse is deprecated, please use return_aux=AuxRequest(lse=True) instead."
)
MAX_SCORES_UNSUPPORTED = (
    "flex_attention: return_aux=AuxRequest(max_scores=True): max_scores is not supported, only lse; "
    "use return_aux=AuxRequest(lse=True)"
)


def sliced_mask_mod_error(b, h, q_idx, kv_idx):
    """The ``mask_mod`` of a sliced BlockMask (``BlockMask.__getitem__``): raises ``ValueError`` when
    called; ``flex_attention`` refuses a BlockMask that still carries it."""
    raise ValueError(SLICED_MASK_MOD)


def check_flex_options(*, block_mask_mod, return_lse, return_aux, kernel_options) -> bool:
    """``flex_attention``'s options beyond the tensors, checked before them: a sliced BlockMask whose
    ``mask_mod`` was not set back, ``kernel_options`` (None or a dict, accepted and ignored: it tunes
    torch's Triton/C++ kernels), ``return_aux`` (anything with boolean ``lse`` / ``max_scores``, such as
    :class:`AuxRequest`; ``max_scores`` not supported) and not both ``return_lse`` and ``return_aux``.
    Returns whether the lse is wanted."""
    name = "flex_attention"
    if block_mask_mod is sliced_mask_mod_error:
        raise ValueError(SLICED_MASK_MOD)
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise ValueError(
            f"{name}: kernel_options must be a dict or None, got {type(kernel_options).__name__} "
            "(they tune torch's Triton/C++ kernels and are ignored here)"
        )
    if return_lse and return_aux is not None:
        raise ValueError(BOTH_LSE_AND_AUX)
    if return_aux is None:
        return bool(return_lse)
    if not (hasattr(return_aux, "lse") and hasattr(return_aux, "max_scores")):
        raise ValueError(
            f"{name}: return_aux must be an AuxRequest (fields lse, max_scores) or None, "
            f"got {type(return_aux).__name__}"
        )
    if return_aux.max_scores:
        raise ValueError(MAX_SCORES_UNSUPPORTED)
    return bool(return_aux.lse)


def block_mask_index(index, sizes) -> tuple:
    """``BlockMask.__getitem__``'s index over ``(batch, head, query block)`` of sizes ``sizes``, as
    torch 2.13 makes it: up to 3 entries (int, slice or integer array), the rest ``:``; an int ``i``
    becomes the length-1 slice ``i:i+1`` (negative ints counted from the end), so the dims are kept."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > 3:
        raise ValueError(f"BlockMask index has {len(index)} entries; at most 3 (batch, head, query block)")
    padded = (*index, slice(None), slice(None), slice(None))[:3]
    out = []
    for i, n in zip(padded, sizes):
        if isinstance(i, int) and not isinstance(i, bool):
            out.append(slice(i + n, i + n + 1) if -n <= i < 0 else slice(i, i + 1))
        else:
            out.append(i)
    return tuple(out)


def check_mod(fn, kind: str) -> None:
    """A ``score_mod`` must take 5 positional arguments ``(score, b, h, q_idx, kv_idx)``, a ``mask_mod`` 4
    ``(b, h, q_idx, kv_idx)``: counted as torch does, the parameters without a default."""
    wanted = {"score_mod": 5, "mask_mod": 4}[kind]
    if not callable(fn):
        raise ValueError(f"{kind} must be callable, got {type(fn).__name__}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: trust the caller
        return
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return
    n = sum(
        1 for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    )
    if n != wanted:
        args = "(score, b, h, q_idx, kv_idx)" if kind == "score_mod" else "(b, h, q_idx, kv_idx)"
        raise ValueError(f"{kind} must take {wanted} arguments {args}; got one taking {n}")


def block_size_pair(BLOCK_SIZE) -> tuple[int, int]:
    """``BLOCK_SIZE`` (an int or a ``(q, kv)`` pair of positive ints) as ``(bq, bkv)``."""
    pair = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    if len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in pair):
        raise ValueError(f"BLOCK_SIZE must be a positive int or a (q, kv) pair of them, got {BLOCK_SIZE!r}")
    return pair


def check_block_mask_args(B, H, Q_LEN, KV_LEN, BLOCK_SIZE) -> tuple[int, int, int, int, int, int]:
    """``create_block_mask``'s sizes: returns ``(B, H, bq, bkv, n_q_blocks, n_kv_blocks)``, B and H
    None → 1 (broadcast over batch / heads)."""
    B = 1 if B is None else B
    H = 1 if H is None else H
    for name, val in (("B", B), ("H", H), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(
                f"create_block_mask: {name} must be a positive int (or None for B, H), got {val!r}"
            )
    bq, bkv = block_size_pair(BLOCK_SIZE)
    return B, H, bq, bkv, cdiv(Q_LEN, bq), cdiv(KV_LEN, bkv)


@dataclass(frozen=True)
class FlexShapes:
    """What the checks derived: B batch, N query heads, K key/value heads, G = N / K, T query length,
    S key length, H q/k head width, V value width."""

    B: int
    N: int
    K: int
    T: int
    S: int
    H: int
    V: int

    @property
    def G(self) -> int:
        return self.N // self.K


def check_flex(
    *,
    query: tuple[tuple[int, ...], str],
    key: tuple[tuple[int, ...], str],
    value: tuple[tuple[int, ...], str],
    enable_gqa: bool,
    scale,
    block_mask: tuple | None,
) -> FlexShapes:
    """``flex_attention``'s inputs; ``block_mask`` as ``((B, H, T, S) of its shape, BLOCK_SIZE)`` or
    ``(shape, BLOCK_SIZE, n_q)`` with ``n_q`` the query-block rows of its tables (checked against T)."""
    (qs, q_dt), (ks, k_dt), (vs, v_dt) = query, key, value
    name = "flex_attention"
    if not (len(qs) == len(ks) == len(vs) == 4):
        raise ValueError(
            f"{name}: query, key and value must be 4-D (B, H, L, E); got query {fmt_shape(qs)}, "
            f"key {fmt_shape(ks)}, value {fmt_shape(vs)}"
        )
    for arg, dt in (("query", q_dt), ("key", k_dt), ("value", v_dt)):
        if dt not in FLOAT_DTYPES:
            raise ValueError(
                f"{name}: {arg} must be floating ({', '.join(FLOAT_DTYPES)}); got {arg}.dtype={dt}"
            )
    if not q_dt == k_dt == v_dt:
        raise ValueError(f"{name}: query, key and value must share one dtype; got {q_dt}, {k_dt}, {v_dt}")
    B, N, T, H = qs
    if ks[0] != vs[0]:
        raise ValueError(
            f"{name}: key and value must share the batch size; got key {fmt_shape(ks)}, value {fmt_shape(vs)}"
        )
    if ks[0] != B:
        # torch: a key/value batch other than the query's needs a block mask of the query's batch; the
        # key/value batch 1 then serves every query batch row (broadcast)
        mB = None if block_mask is None else block_mask[0][0]
        if ks[0] != 1 or mB != B:
            raise ValueError(
                f"{name}: query, key and value must share the batch size, or key/value have batch 1 with a "
                f"block_mask of the query's batch; got query {fmt_shape(qs)}, key {fmt_shape(ks)}, value "
                f"{fmt_shape(vs)}, block_mask batch {mB}"
            )
    if ks[1] != vs[1] or ks[2] != vs[2]:
        raise ValueError(
            f"{name}: key and value must share heads and length; got key {fmt_shape(ks)}, "
            f"value {fmt_shape(vs)}"
        )
    if ks[3] != H:
        raise ValueError(
            f"{name}: query and key must share the head width; got query {fmt_shape(qs)}, key {fmt_shape(ks)}"
        )
    K, S, V = ks[1], ks[2], vs[3]
    if min(qs + ks + vs) < 1:
        raise ValueError(
            f"{name}: empty input; got query {fmt_shape(qs)}, key {fmt_shape(ks)}, value {fmt_shape(vs)}"
        )
    if not enable_gqa and N != K:
        raise ValueError(
            f"{name}: query and key/value must have the same number of heads, got Hq={N} and Hkv={K}; "
            "pass enable_gqa=True for grouped-query attention"
        )
    if N % K:
        raise ValueError(
            f"{name}: query heads must be a multiple of key/value heads for GQA, got Hq={N} and Hkv={K}"
        )
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"{name}: scale must be a Python number or None, got {type(scale).__name__}")
    if block_mask is not None:
        (mB, mH, mT, mS), bsz, *rows = block_mask
        if (mT, mS) != (T, S):
            raise ValueError(
                f"{name}: block_mask was created for Q_LEN={mT}, KV_LEN={mS} but got q_len={T} and "
                f"kv_len={S}; create a block mask for these lengths (or crop one with "
                "block_mask._adjust(q_len, kv_len))"
            )
        bq = block_size_pair(bsz)[0]
        if rows and rows[0] != cdiv(T, bq):
            raise ValueError(
                f"{name}: block_mask has {rows[0]} query-block rows but q_len={T} needs {cdiv(T, bq)} "
                f"of {bq} (was it sliced on the query-block dim?)"
            )
        if mB not in (1, B):
            raise ValueError(
                f"{name}: block_mask was created for batch {mB} but the query has batch {B} "
                "(use B=None to broadcast)"
            )
        if mH not in (1, N):
            raise ValueError(
                f"{name}: block_mask was created for {mH} heads but the query has {N} heads "
                "(use H=None to broadcast)"
            )
    return FlexShapes(B=B, N=N, K=K, T=T, S=S, H=H, V=V)


def block_string(dense, grid_size=(20, 20), limit: int = 4) -> str:
    """``BlockMask.to_string``: one picture per ``(b, h)`` of the block-level mask ``dense`` (nested lists
    ``[B][H][n_q][n_kv]`` of 0/1), ``█`` all kept, ``░`` some, blank none, each cell of the picture
    summarising ``ceil(n / grid)`` blocks (torch's drawing)."""
    if isinstance(grid_size, int):
        grid_size = (grid_size, grid_size) if grid_size != -1 else (10**9, 10**9)
    pictures = []
    for b, per_b in enumerate(dense):
        for h, rows in enumerate(per_b):
            if len(pictures) == limit:
                pictures += ["...", "To print out more, set BlockMask.to_string(limit=N)"]
                return "\n".join(pictures)
            n_r, n_c = len(rows), len(rows[0]) if rows else 0
            rs, cs = max(1, cdiv(n_r, grid_size[0])), max(1, cdiv(n_c, grid_size[1]))
            lines = [f"({b}, {h})"]
            for r in range(0, n_r, rs):
                line = ""
                for c in range(0, n_c, cs):
                    cell = [x for row in rows[r : r + rs] for x in row[c : c + cs]]
                    frac = sum(cell) / len(cell)
                    line += 2 * ("█" if frac == 1 else " " if frac == 0 else "░")
                lines.append(line)
            pictures.append("\n".join(lines) + "\n")
    return "\n".join(pictures)
