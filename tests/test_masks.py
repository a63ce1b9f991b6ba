"""Mask helpers: the same names and results in both twins, and the polarity conversions."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_attn
import torch_attn

HELPERS = [
    "causal_mask",
    "padding_mask",
    "masked_to_keep",
    "keep_to_masked",
    "keep_to_additive",
    "additive_to_keep",
]


@pytest.mark.parametrize("name", HELPERS)
def test_helpers_exist_in_both(name):
    assert callable(getattr(jax_attn, name)) and callable(getattr(torch_attn, name))


@pytest.mark.parametrize("T,S,offset", [(3, 3, 0), (2, 5, 0), (5, 2, 0), (2, 5, 3), (1, 4, 3)])
def test_causal_mask_by_hand(T, S, offset):
    expected = np.array([[s <= t + offset for s in range(S)] for t in range(T)])
    assert np.array_equal(np.asarray(jax_attn.causal_mask(T, S, offset)), expected)
    assert np.array_equal(torch_attn.causal_mask(T, S, offset).numpy(), expected)


def test_causal_mask_equals_torch_tril():
    # seed 002: the MHA-polarity causal mask is ~tril(ones(L, L)).bool()
    L = 6
    mha = ~torch.tril(torch.ones(L, L)).bool()
    assert torch.equal(torch_attn.keep_to_masked(torch_attn.causal_mask(L)), mha)
    assert np.array_equal(np.asarray(jax_attn.keep_to_masked(jax_attn.causal_mask(L))), mha.numpy())


def test_padding_mask_valid_lens_1d_and_2d():
    # d2l's masked_softmax: keys at or past valid_len are ignored; 1-D per sequence, 2-D per query.
    lens1 = np.array([2, 3])
    expected1 = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
    assert np.array_equal(np.asarray(jax_attn.padding_mask(jnp.asarray(lens1), 4)), expected1)
    assert np.array_equal(torch_attn.padding_mask(torch.from_numpy(lens1), 4).numpy(), expected1)
    lens2 = np.array([[1, 3], [2, 4]])
    expected2 = np.arange(4) < lens2[..., None]
    assert np.array_equal(np.asarray(jax_attn.padding_mask(lens2, 4)), expected2)
    assert np.array_equal(torch_attn.padding_mask(torch.from_numpy(lens2), 4).numpy(), expected2)


def test_padding_mask_rejects_float_lengths_in_both():
    for fn, x in ((jax_attn.padding_mask, jnp.array([1.0])), (torch_attn.padding_mask, torch.tensor([1.0]))):
        with pytest.raises(ValueError, match="lengths must be integers; got lengths.dtype=float32"):
            fn(x, 4)


def test_padding_mask_rejects_rank_3_in_both():
    for fn, x in (
        (jax_attn.padding_mask, jnp.zeros((1, 2, 3), jnp.int32)),
        (torch_attn.padding_mask, torch.zeros((1, 2, 3), dtype=torch.int32)),
    ):
        with pytest.raises(ValueError, match=r"lengths.shape=\(1, 2, 3\)"):
            fn(x, 4)


def test_polarity_round_trips():
    keep = np.random.default_rng(0).random((3, 4)) < 0.5
    for lib, conv in ((jax_attn, jnp.asarray), (torch_attn, torch.from_numpy)):
        k = conv(keep)
        masked = np.asarray(lib.keep_to_masked(k))
        assert np.array_equal(masked, ~keep)
        assert np.array_equal(np.asarray(lib.masked_to_keep(lib.keep_to_masked(k))), keep)
        additive = np.asarray(lib.keep_to_additive(k))
        assert np.array_equal(additive, np.where(keep, 0.0, -np.inf))
        assert np.array_equal(np.asarray(lib.additive_to_keep(lib.keep_to_additive(k))), keep)
        fmin = np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)
        assert np.array_equal(np.asarray(lib.additive_to_keep(conv(fmin))), keep)


def test_float_masks_pass_polarity_conversion_unchanged():
    m = np.array([[0.0, -np.inf]], np.float32)
    assert np.array_equal(np.asarray(jax_attn.masked_to_keep(jnp.asarray(m))), m)
    assert np.array_equal(torch_attn.masked_to_keep(torch.from_numpy(m)).numpy(), m)


def test_conversion_dtype_errors_match():
    msgs = []
    for lib, conv in ((jax_attn, jnp.asarray), (torch_attn, torch.from_numpy)):
        with pytest.raises(ValueError) as a:
            lib.keep_to_additive(conv(np.zeros(3, np.float32)))
        with pytest.raises(ValueError) as b:
            lib.additive_to_keep(conv(np.zeros(3, bool)))
        msgs.append((str(a.value), str(b.value)))
    assert msgs[0] == msgs[1]


@pytest.mark.parametrize("T,S", [(0, 3), (3, 0), (2.5, 3)])
def test_causal_mask_bad_sizes(T, S):
    for lib in (jax_attn, torch_attn):
        with pytest.raises(ValueError, match="must be a positive int"):
            lib.causal_mask(T, S)
