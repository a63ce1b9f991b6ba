"""Block sizes of the blocked paths (attn_spec.blocks), by hand: fewest blocks of at most 512, equal sizes
rounded up to 8, smaller query blocks for long causal calls."""

import pytest

from attn_spec.blocks import block_size, block_sizes


@pytest.mark.parametrize(
    ("length", "size"),
    [(1, 1), (7, 7), (512, 512), (513, 264), (600, 304), (1024, 512), (2049, 416), (32768, 512)],
)
def test_block_size(length, size):
    assert block_size(length) == size
    n = -(-length // size)
    assert n * size >= length and (n - 1) * size < length  # covers, with less than one block of padding


def test_causal_query_blocks():
    assert block_sizes(512, 512, causal=True) == (512, 512)  # one block: splitting T=512 measured slower
    assert block_sizes(1024, 1024, causal=True) == (256, 512)  # four query blocks
    assert block_sizes(2048, 2048, causal=True) == (512, 512)
    assert block_sizes(1024, 1024) == (512, 512)


def test_block_size_rejects_nonsense():
    with pytest.raises(ValueError, match="length >= 1"):
        block_size(0)
