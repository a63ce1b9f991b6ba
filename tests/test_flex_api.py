"""The FlexAttention API beyond the kernel, against torch 2.13's own (CPU): ``BlockMask.__getitem__``,
``BlockMask._adjust``, ``flex_attention(..., kernel_options=..., return_aux=AuxRequest(...))`` in both
twins, and the ValueErrors they share (texts from attn_spec.flex)."""

from __future__ import annotations

import collections
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.attention import flex_attention as tflex

import jax_attn
import jax_attn.flex as jf
import torch_attn
import torch_attn.flex as tf
from attn_spec import flex as spec

warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")

B, N, T, S, E = 2, 3, 300, 290, 8  # lengths not multiples of 128: ragged last blocks
KV_TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    """A window that depends on the head and the batch, so every (b, h) has its own tables."""
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 64 * (h + 1) + 32 * b)


MASKS = {"causal": causal, "sliding_window": sliding_window}


def _masks(name, T=T, S=S):
    mod = MASKS[name]
    return (
        tflex.create_block_mask(mod, B, N, T, S, device="cpu"),
        jf.create_block_mask(mod, B, N, T, S),
        tf.create_block_mask(mod, B, N, T, S),
    )


def _dense(num, idx, n_cols):
    """Block-level bool (..., n_rows, n_cols) of ordered tables (numpy)."""
    num, idx = np.asarray(num), np.asarray(idx)
    listed = np.arange(idx.shape[-1]) < num[..., None]
    return ((idx[..., None] == np.arange(n_cols)) & listed[..., None]).any(axis=-2)


def _np(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _assert_same_tables(ours, ref):
    assert ours.seq_lengths == tuple(ref.seq_lengths)
    assert tuple(ours.BLOCK_SIZE) == tuple(ref.BLOCK_SIZE)
    assert tuple(ours.shape) == tuple(ref.shape)
    for name in KV_TABLES:
        a, r = _np(getattr(ours, name)), _np(getattr(ref, name))
        assert a.shape == r.shape, (name, a.shape, r.shape)
        np.testing.assert_array_equal(a, r, err_msg=name)
    # the q tables (transposes): the same blocks per (b, h, key block)
    n_q = ref.kv_num_blocks.shape[-1]
    for num, idx in (("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        np.testing.assert_array_equal(
            _dense(_np(getattr(ours, num)), _np(getattr(ours, idx)), n_q),
            _dense(_np(getattr(ref, num)), _np(getattr(ref, idx)), n_q),
            err_msg=num,
        )


INDEXES = {
    "int": 1,
    "negative int": -2,
    "slice": slice(0, 1),
    "tuple of 2": (1, slice(1, 3)),
    "tuple of 2, negative": (-1, -1),
    "tuple of 3": (slice(None), -2, 1),
    "tensor on query blocks": (slice(None), slice(None), torch.tensor([2, 0])),
    "int, slice, tensor": (0, slice(0, 2), torch.tensor([1])),
}


def _for_jax(index):
    index = index if isinstance(index, tuple) else (index,)
    return tuple(jnp.asarray(i.numpy()) if isinstance(i, torch.Tensor) else i for i in index)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("case", list(INDEXES))
def test_getitem_matches_torch(mask, case):
    ref, jb, tb = _masks(mask)
    index = INDEXES[case]
    expected = ref[index]
    for ours in (jb[_for_jax(index)], tb[index]):
        _assert_same_tables(ours, expected)
        assert ours.mask_mod is spec.sliced_mask_mod_error


def test_int_index_keeps_the_dims():
    _, jb, tb = _masks("causal")
    n_q = -(-T // 128)
    assert jb[0].kv_num_blocks.shape == tuple(tb[0].kv_num_blocks.shape) == (1, N, n_q)
    assert jb[-1, -1].kv_indices.shape == tuple(tb[-1, -1].kv_indices.shape) == (1, 1, n_q, -(-S // 128))


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("lengths", [(200, 150), (129, 290), (300, 1)])
def test_adjust_matches_torch(mask, lengths):
    ref, jb, tb = _masks(mask)
    expected = ref._adjust(*lengths)
    for ours, orig in ((jb._adjust(*lengths), jb), (tb._adjust(*lengths), tb)):
        _assert_same_tables(ours, expected)
        assert ours.mask_mod is orig.mask_mod


def _qkv(T=T, S=S, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, N, n, E)).astype(np.float32) for n in (T, S, S))


def _run(twin, qkv, **kw):
    arr = jnp.asarray if twin is jf else torch.from_numpy
    return twin.flex_attention(*(arr(x) for x in qkv), **kw)


def test_adjusted_mask_runs_like_torch():
    """Causal cropped to shorter lengths: the same output and lse as torch's flex with its own adjusted
    mask."""
    ref, jb, tb = _masks("causal")
    qkv = _qkv(200, 150)
    want_out, want_aux = tflex.flex_attention(
        *(torch.from_numpy(x) for x in qkv),
        block_mask=ref._adjust(200, 150),
        return_aux=tflex.AuxRequest(lse=True),
    )
    for twin, bm in ((jf, jb), (tf, tb)):
        out, aux = _run(twin, qkv, block_mask=bm._adjust(200, 150), return_aux=spec.AuxRequest(lse=True))
        np.testing.assert_allclose(_np(out), want_out.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(_np(aux.lse), want_aux.lse.numpy(), atol=1e-5, rtol=0)


def _error(fn):
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


def test_sliced_mask_refused_until_mask_mod_set_back():
    ref, jb, tb = _masks("sliding_window")
    qkv = tuple(x[:1] for x in _qkv())
    # torch's own, its mask_mod set back: the mod sees the batch index of the (batch-1) query, 0
    want = ref[1]
    want.mask_mod = ref.mask_mod
    want = tflex.flex_attention(*(torch.from_numpy(x) for x in qkv), block_mask=want).numpy()
    texts = {}
    for name, twin, bm in (("jax", jf, jb), ("torch", tf, tb)):
        sliced = bm[1]
        texts[name] = _error(lambda t=twin, s=sliced: _run(t, qkv, block_mask=s))
        zero = jnp.zeros((), jnp.int32) if twin is jf else torch.zeros((), dtype=torch.int32)
        assert _error(lambda s=sliced, z=zero: s.mask_mod(z, z, z, z)) == spec.SLICED_MASK_MOD
        sliced.mask_mod = bm.mask_mod
        np.testing.assert_allclose(_np(_run(twin, qkv, block_mask=sliced)), want, atol=1e-5, rtol=0)
    assert texts["jax"] == texts["torch"] == spec.SLICED_MASK_MOD
    assert "sliced BlockMask" in texts["jax"]


def test_query_block_sliced_mask_does_not_fit_the_length():
    _, jb, tb = _masks("causal")
    texts = []
    for twin, bm, arr in ((jf, jb, jnp.asarray), (tf, tb, torch.tensor)):
        sliced = bm[:, :, arr([0])]
        sliced.mask_mod = bm.mask_mod
        texts.append(_error(lambda t=twin, s=sliced: _run(t, _qkv(), block_mask=s)))
    assert texts[0] == texts[1]
    assert "block_mask has 1 query-block rows but q_len=300 needs 3 of 128" in texts[0]


def test_index_with_too_many_entries():
    _, jb, tb = _masks("causal")
    texts = [_error(lambda bm=bm: bm[0, 0, 0, 0]) for bm in (jb, tb)]
    assert texts[0] == texts[1] == "BlockMask index has 4 entries; at most 3 (batch, head, query block)"


@pytest.mark.parametrize("twin", [jf, tf], ids=["jax", "torch"])
def test_kernel_options_accepted_and_ignored(twin):
    qkv = _qkv(40, 30)
    plain = _np(_run(twin, qkv))
    for opts in (None, {}, {"BLOCK_M": 16, "BLOCK_N": 16, "PRESCALE_QK": True}):
        # the same computation again: equal to rounding (a recomputation is not bit-reproducible everywhere)
        np.testing.assert_allclose(_np(_run(twin, qkv, kernel_options=opts)), plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", ["fast", [("BLOCK_M", 16)], 3])
def test_kernel_options_not_a_dict(bad):
    qkv = _qkv(40, 30)
    texts = [_error(lambda t=t: _run(t, qkv, kernel_options=bad)) for t in (jf, tf)]
    assert texts[0] == texts[1]
    assert texts[0].startswith("flex_attention: kernel_options must be a dict or None, got ")


@pytest.mark.parametrize("mask", [None, *MASKS])
def test_return_aux_lse_matches_torch(mask):
    qkv = _qkv()
    ref, jb, tb = _masks(mask) if mask else (None, None, None)
    want_out, want_aux = tflex.flex_attention(
        *(torch.from_numpy(x) for x in qkv), block_mask=ref, return_aux=tflex.AuxRequest(lse=True)
    )
    assert want_aux.max_scores is None
    for twin, bm in ((jf, jb), (tf, tb)):
        out, aux = _run(twin, qkv, block_mask=bm, return_aux=spec.AuxRequest(lse=True))
        assert isinstance(aux, spec.AuxOutput) and aux.max_scores is None
        np.testing.assert_allclose(_np(out), want_out.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(_np(aux.lse), want_aux.lse.numpy(), atol=1e-5, rtol=0)
        # return_lse gives the same lse
        _, lse = _run(twin, qkv, block_mask=bm, return_lse=True)
        np.testing.assert_allclose(_np(lse), _np(aux.lse), atol=1e-6, rtol=0)


@pytest.mark.parametrize("twin", [jf, tf], ids=["jax", "torch"])
def test_return_aux_duck_typed_and_without_lse(twin):
    qkv = _qkv(40, 30)
    out, aux = _run(twin, qkv, return_aux=spec.AuxRequest())
    assert aux == spec.AuxOutput(lse=None, max_scores=None)
    np.testing.assert_allclose(_np(out), _np(_run(twin, qkv)), atol=1e-6, rtol=0)
    Mine = collections.namedtuple("Mine", "lse max_scores")
    for request in (tflex.AuxRequest(lse=True), Mine(lse=True, max_scores=False)):
        _, aux = _run(twin, qkv, return_aux=request)
        assert aux.lse.shape == (B, N, 40)
    assert _error(lambda: _run(twin, qkv, return_aux=True)).startswith(
        "flex_attention: return_aux must be an AuxRequest"
    )


def test_max_scores_and_both_lse_and_aux_refused():
    qkv = _qkv(40, 30)
    for kw, want in (
        ({"return_aux": spec.AuxRequest(lse=True, max_scores=True)}, spec.MAX_SCORES_UNSUPPORTED),
        ({"return_aux": spec.AuxRequest(max_scores=True)}, spec.MAX_SCORES_UNSUPPORTED),
        ({"return_lse": True, "return_aux": spec.AuxRequest(lse=True)}, spec.BOTH_LSE_AND_AUX),
    ):
        texts = [_error(lambda t=t, kw=kw: _run(t, qkv, **kw)) for t in (jf, tf)]
        assert texts[0] == texts[1] == want
    assert "max_scores is not supported" in spec.MAX_SCORES_UNSUPPORTED
    # torch's own text for return_lse together with return_aux
    torch_text = _error(
        lambda: tflex.flex_attention(
            *(torch.from_numpy(x) for x in qkv), return_lse=True, return_aux=tflex.AuxRequest(lse=True)
        )
    )
    assert torch_text == spec.BOTH_LSE_AND_AUX


def test_exports():
    for pkg, twin in ((jax_attn, jf), (torch_attn, tf)):
        assert pkg.AuxRequest is twin.AuxRequest is spec.AuxRequest
        assert pkg.AuxOutput is twin.AuxOutput is spec.AuxOutput
    assert spec.AuxRequest() == (False, False) and spec.AuxOutput() == (None, None)
    assert spec.AuxRequest._fields == tflex.AuxRequest._fields
    assert spec.AuxOutput._fields == tflex.AuxOutput._fields


def test_jax_slicing_under_jit():
    """A BlockMask passed into jit, sliced there (tables traced), used with its mask_mod set back; a sliced
    BlockMask passed in as a pytree keeps its marker (refused at trace time)."""
    ref, jb, _ = _masks("sliding_window")
    q, k, v = (jnp.asarray(x[:1]) for x in _qkv())

    @jax.jit
    def tables(bm):
        s = bm[0, :, jnp.asarray([2, 0])]
        return s.kv_num_blocks, s.kv_indices, s.full_kv_num_blocks, s.full_kv_indices

    want = ref[0, :, torch.tensor([2, 0])]
    for got, name in zip(tables(jb), KV_TABLES):
        np.testing.assert_array_equal(np.asarray(got), getattr(want, name).numpy(), err_msg=name)

    @jax.jit
    def attend(bm, q, k, v):
        s = bm[-1]
        s.mask_mod = bm.mask_mod
        return jf.flex_attention(q, k, v, block_mask=s, return_aux=spec.AuxRequest(lse=True))

    out, aux = attend(jb, q, k, v)
    sliced = ref[-1]
    sliced.mask_mod = ref.mask_mod
    want_out, want_aux = tflex.flex_attention(
        *(torch.from_numpy(np.asarray(x)) for x in (q, k, v)),
        block_mask=sliced,
        return_aux=tflex.AuxRequest(lse=True),
    )
    np.testing.assert_allclose(np.asarray(out), want_out.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(aux.lse), want_aux.lse.numpy(), atol=1e-5, rtol=0)

    marked = jax.tree_util.tree_map(lambda x: x, jb[0])
    assert marked.mask_mod is spec.sliced_mask_mod_error
    assert _error(lambda: jax.jit(lambda bm: jf.flex_attention(q, k, v, block_mask=bm))(marked)) == (
        spec.SLICED_MASK_MOD
    )


def _doc_from(b, h, q_idx, kv_idx):
    """Causal, and batch row b sees keys from 40·b on: the tables differ per batch row."""
    return (q_idx >= kv_idx) & (kv_idx >= 40 * b)


def test_key_value_batch_1_broadcasts_with_a_block_mask_of_the_query_batch():
    """torch allows key/value batch 1 when the block mask has the query's batch: that key/value row
    serves every query row. Both twins' forward against torch's own flex_attention and the float64
    oracle; their gradients against the oracle's, summed over the broadcast batch (hand derivation:
    the gradient of a broadcast is the sum of the per-row gradients)."""
    from compare import oracle_flex

    rng = np.random.default_rng(7)
    Bq, Nq, K, L, H = 2, 4, 2, 200, 16
    q = rng.standard_normal((Bq, Nq, L, H)).astype(np.float32)
    k, v = (rng.standard_normal((1, K, L, H)).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal((Bq, Nq, L, H)).astype(np.float32)
    want_out, _ = oracle_flex.flex_forward(q, np.repeat(k, Bq, 0), np.repeat(v, Bq, 0), mask_mod=_doc_from)
    dq, dk, dv, _ = oracle_flex.flex_backward(
        q, np.repeat(k, Bq, 0), np.repeat(v, Bq, 0), dy, mask_mod=_doc_from
    )
    dk, dv = dk.sum(0, keepdims=True), dv.sum(0, keepdims=True)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    torch_out = tflex.flex_attention(
        tq,
        tk,
        tv,
        block_mask=tflex.create_block_mask(_doc_from, Bq, None, L, L, device="cpu"),
        enable_gqa=True,
    ).numpy()
    np.testing.assert_allclose(torch_out, want_out, atol=2e-5)

    bm_t = tf.create_block_mask(_doc_from, Bq, None, L, L, BLOCK_SIZE=64)
    tq.requires_grad_(True), tk.requires_grad_(True), tv.requires_grad_(True)
    out_t = tf.flex_attention(tq, tk, tv, block_mask=bm_t, enable_gqa=True)
    (out_t * torch.from_numpy(dy)).sum().backward()
    bm_j = jf.create_block_mask(_doc_from, Bq, None, L, L, BLOCK_SIZE=64)

    def loss(q, k, v):
        out = jf.flex_attention(q, k, v, block_mask=bm_j, enable_gqa=True)
        return jnp.sum(out * dy), out

    (_, out_j), grads_j = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    for name, out, grads in (
        ("torch twin", out_t.detach().numpy(), [t.grad.numpy() for t in (tq, tk, tv)]),
        ("jax twin", np.asarray(out_j), [np.asarray(g) for g in grads_j]),
    ):
        np.testing.assert_allclose(out, torch_out, atol=1e-5, err_msg=name)
        for got, want, what in zip(grads, (dq, dk, dv), "qkv", strict=True):
            assert got.shape == want.shape, (name, what)
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"{name} d{what}")


def test_key_value_batch_other_than_the_query_needs_batch_1_and_a_mask_of_the_query_batch():
    """Without a block mask, with a mask of another batch, or with a key/value batch other than 1: the
    same ValueError in both twins."""
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 2, 16, 8)).astype(np.float32)
    texts = []
    for m, arr, bm in (
        (jf, jnp.asarray, lambda B: jf.create_block_mask(causal, B, None, 16, 16, BLOCK_SIZE=8)),
        (tf, torch.from_numpy, lambda B: tf.create_block_mask(causal, B, None, 16, 16, BLOCK_SIZE=8)),
    ):
        cases = []
        for kb, mask in ((1, None), (1, bm(None)), (3, bm(2))):
            kv = rng.standard_normal((kb, 2, 16, 8)).astype(np.float32)
            with pytest.raises(ValueError, match="or key/value have batch 1 with a block_mask") as e:
                m.flex_attention(arr(q), arr(kv), arr(kv.copy()), block_mask=mask)
            cases.append(str(e.value))
        texts.append(cases)
    assert texts[0] == texts[1]
