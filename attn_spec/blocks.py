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
#: Causal calls longer than one block cut the queries into about this many blocks (each at least
#: MIN_CAUSAL_BLOCK rows, at most MAX_BLOCK) so that the tiles above the diagonal are skipped: at T = 1024,
#: four 256-blocks compute 10 of 16 query×key tiles where two 512-blocks compute 3 of 4. Measured on the
#: 2-core CPU (B2 N8 T1024 H64): forward 0.75× torch's fused kernel with four blocks vs 0.61× with two. At
#: T = 512 one block stays fastest (smaller blocks lose more GEMM efficiency than the skipping saves).
CAUSAL_QUERY_BLOCKS = 4
MIN_CAUSAL_BLOCK = 256
_ALIGN = 8
#: The backward of the dense plan keeps at most this many tile rows (G query heads × its query block):
#: each step works one ``(G·bt', bs)`` tile through five products and several elementwise passes, and a
#: ``(2048, 512)`` tile (G = 4 with 512-row blocks, 4 MiB per temporary) falls out of cache. Measured on the
#: 2-core CPU (B1, 8 key/value heads × G4, T4096, H64, causal, jit forward+backward): 512-row backward
#: blocks 4.7 s, 128-row 2.4–2.5 s; the forward is fastest with the large blocks (0.53 s vs 0.70 s).
BACKWARD_TILE_ROWS = 512


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


def block_sizes(T: int, S: int, causal: bool = False) -> tuple[int, int]:
    """``(bt, bs)``: query and key block sizes for T queries and S keys (smaller query blocks when causal,
    see :data:`CAUSAL_QUERY_BLOCKS`)."""
    if not causal or T <= MAX_BLOCK:
        return block_size(T), block_size(S)
    wanted = max(MIN_CAUSAL_BLOCK, -(-T // CAUSAL_QUERY_BLOCKS))
    return block_size(T, min(MAX_BLOCK, wanted)), block_size(S)


def backward_query_block(bt: int, G: int) -> int:
    """The query block of the dense plan's backward: ``bt`` halved while ``G · bt`` exceeds
    :data:`BACKWARD_TILE_ROWS` (and it stays even and at least 16), so that it divides ``bt``: the
    forward's padded length is a whole number of backward blocks."""
    if bt < 1 or G < 1:
        raise ValueError(f"backward_query_block needs bt >= 1 and G >= 1, got {bt} and {G}")
    b = bt
    while G * b > BACKWARD_TILE_ROWS and b % 2 == 0 and b >= 16:
        b //= 2
    return b
