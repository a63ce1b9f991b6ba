"""Bad FlexAttention input: the same ValueError text from both twins (attn_spec.flex)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_attn.flex as jf
import torch_attn.flex as tf
from compare.kinds import flex as fm

TWINS = {"jax": (jf, jnp.asarray), "torch": (tf, torch.from_numpy)}


def _qkv(arr, q=(2, 4, 8, 6), k=(2, 2, 12, 6), v=(2, 2, 12, 5)):
    rng = np.random.default_rng(0)
    return tuple(arr(rng.standard_normal(s).astype(np.float32)) for s in (q, k, v))


def _raises(twin, fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    return str(info.value)


CASES = {
    "mask_mod arity": (
        lambda m, arr: m.create_block_mask(lambda b, h, q: q > 0, None, None, 8, 12, BLOCK_SIZE=4),
        r"mask_mod must take 4 arguments \(b, h, q_idx, kv_idx\); got one taking 3",
    ),
    "score_mod arity": (
        lambda m, arr: m.flex_attention(*_qkv(arr), score_mod=fm.causal, enable_gqa=True),
        r"score_mod must take 5 arguments .*got one taking 4",
    ),
    "and_masks arity": (lambda m, arr: m.and_masks(fm.causal, fm.times_two), r"mask_mod must take 4"),
    "bad block size": (
        lambda m, arr: m.create_block_mask(fm.causal, None, None, 8, 12, BLOCK_SIZE=(4, 0)),
        r"BLOCK_SIZE must be a positive int or a \(q, kv\) pair of them, got \(4, 0\)",
    ),
    "bad length": (
        lambda m, arr: m.create_block_mask(fm.causal, None, None, 0, 12),
        r"create_block_mask: Q_LEN must be a positive int",
    ),
    "mask for other lengths": (
        lambda m, arr: m.flex_attention(
            *_qkv(arr),
            block_mask=m.create_block_mask(fm.causal, None, None, 8, 16, BLOCK_SIZE=4),
            enable_gqa=True,
        ),
        r"block_mask was created for Q_LEN=8, KV_LEN=16 but got q_len=8 and kv_len=12",
    ),
    "mask for other heads": (
        lambda m, arr: m.flex_attention(
            *_qkv(arr),
            block_mask=m.create_block_mask(fm.causal, None, 3, 8, 12, BLOCK_SIZE=4),
            enable_gqa=True,
        ),
        r"block_mask was created for 3 heads but the query has 4 heads",
    ),
    "mask for other batch": (
        lambda m, arr: m.flex_attention(
            *_qkv(arr),
            block_mask=m.create_block_mask(fm.causal, 3, None, 8, 12, BLOCK_SIZE=4),
            enable_gqa=True,
        ),
        r"block_mask was created for batch 3 but the query has batch 2",
    ),
    "gqa without enable_gqa": (
        lambda m, arr: m.flex_attention(*_qkv(arr)),
        r"same number of heads, got Hq=4 and Hkv=2; pass enable_gqa=True",
    ),
    "heads not a multiple": (
        lambda m, arr: m.flex_attention(*_qkv(arr, k=(2, 3, 12, 6), v=(2, 3, 12, 5)), enable_gqa=True),
        r"multiple of key/value heads for GQA, got Hq=4 and Hkv=3",
    ),
    "head width": (
        lambda m, arr: m.flex_attention(*_qkv(arr, k=(2, 2, 12, 7)), enable_gqa=True),
        r"query and key must share the head width; got query \(2, 4, 8, 6\), key \(2, 2, 12, 7\)",
    ),
    "key value length": (
        lambda m, arr: m.flex_attention(*_qkv(arr, v=(2, 2, 11, 5)), enable_gqa=True),
        r"key and value must share heads and length",
    ),
    "batch": (
        lambda m, arr: m.flex_attention(*_qkv(arr, k=(1, 2, 12, 6), v=(1, 2, 12, 5)), enable_gqa=True),
        r"share the batch size",
    ),
    "rank": (
        lambda m, arr: m.flex_attention(*_qkv(arr, q=(4, 8, 6)), enable_gqa=True),
        r"must be 4-D \(B, H, L, E\); got query \(4, 8, 6\)",
    ),
    "not a BlockMask": (
        lambda m, arr: m.flex_attention(*_qkv(arr), block_mask=object(), enable_gqa=True),
        r"block_mask must be a BlockMask or None, got object",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_error_in_both_twins(case):
    fn, match = CASES[case]
    texts = {name: _raises(name, lambda m=m, arr=arr: fn(m, arr), match) for name, (m, arr) in TWINS.items()}
    assert texts["jax"] == texts["torch"]
