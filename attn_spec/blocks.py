"""Block sizes of ``implementation="blocked"``, shared by both twins.

A query block of ``bt`` rows meets a key block of ``bs`` columns per step; one head is processed at a
time, so a step's logits are ``G·bt × bs`` floats (G query heads per key/value head). Blocks of up to
512 were the fastest of 128/256/512 on a 2-core XLA:CPU (B8 N8 T512 and B2 N8 T2048, H64): per-head 2-D
matrix products of that size run near the CPU's GEMM rate, while 128-blocks spent their time in per-step
overhead. A length is cut into the fewest blocks of at most ``MAX_BLOCK`` and the blocks are made equal
(rounded up to a multiple of 8), so padding wastes at most 7 rows per block instead of up to a whole block.
"""

from __future__ import annotations

MAX_BLOCK = 512
_ALIGN = 8


def block_size(length: int, max_block: int | None = None) -> int:
    """The block size for a sequence of ``length`` (>= 1): ``length`` itself up to ``max_block`` (default
    :data:`MAX_BLOCK`, read at call time so tests can shrink it to force many blocks), else
    ``ceil(length / n)`` rounded up to a multiple of 8 with ``n = ceil(length / max_block)`` blocks."""
    max_block = MAX_BLOCK if max_block is None else max_block
    if length < 1 or max_block < 1:
        raise ValueError(f"block_size needs length >= 1 and max_block >= 1, got {length} and {max_block}")
    if length <= max_block:
        return length
    n = -(-length // max_block)
    size = -(-length // n)
    return min(max_block, -(-size // _ALIGN) * _ALIGN) if max_block >= _ALIGN else size


def block_sizes(T: int, S: int) -> tuple[int, int]:
    """``(bt, bs)``: query and key block sizes for T queries and S keys."""
    return block_size(T), block_size(S)
