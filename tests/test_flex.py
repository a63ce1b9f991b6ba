"""FlexAttention twins (jax_attn.flex, torch_attn.flex) against torch's own flex_attention (eager,
forward + lse, CPU) and the float64 NumPy oracle (forward and gradients, compare.oracle_flex); block
tables against torch's create_block_mask. Small blocks (4-8) and odd lengths so the multi-block, ragged
and sparse paths all run."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.attention import flex_attention as tflex

import jax_attn.flex as jf
import torch_attn.flex as tf
from attn_spec import blocks
from compare.kinds import flex as fm
from compare.oracle_flex import dense_keep, flex_backward, flex_forward

warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")

B, N, K, H, V = 2, 4, 2, 8, 5  # distinct sizes; N / K = 2 (GQA)


def _atol(ref):
    return 1e-5 * max(1.0, float(np.max(np.abs(ref))))


def _mods(name, xp, arr, T, S, rng_params):
    """(score_factory or None, params (numpy), mask_mod or None, (B, H) of the block mask) of a case,
    arrays made with ``arr`` (the framework's array constructor)."""
    doc = np.sort(np.random.default_rng(1).integers(0, 3, (B, T)), axis=1)
    slopes = 2.0 ** -np.arange(1, N + 1)
    if name == "causal":
        return None, (), fm.causal, (None, None)
    if name == "sliding_window":
        return None, (), fm.generate_sliding_window(5), (None, None)
    if name == "prefix_lm":
        return None, (), fm.generate_prefix_lm(6), (None, None)
    if name == "document":
        return None, (), fm.generate_document(arr(doc)), (B, None)
    if name == "dilated":
        return None, (), fm.generate_dilated_sliding_window(9, 2), (None, None)
    if name == "alibi":
        return (lambda s: fm.generate_alibi(s)), (slopes,), fm.causal, (None, None)
    if name == "softcap":
        return (lambda: fm.generate_tanh_softcap(2.0, xp)), (), fm.generate_sliding_window(7), (None, None)
    if name == "rel_bias":
        table = rng_params.standard_normal(T + S - 1)
        return (lambda t: fm.generate_rel_bias(t, S)), (table,), fm.causal, (None, None)
    if name == "per_head":  # a different window per head: per-head tables
        return None, (), (lambda b, h, q, kv: (q >= kv) & (q - kv < 2 * h + 2)), (None, N)
    if name == "no_mask":
        return (lambda: fm.times_two), (), None, None
    if name == "plain":  # no score_mod, no block mask: the engine's dense plan
        return None, (), None, None
    raise KeyError(name)


CASES = {
    # name: (T, S, BLOCK_SIZE)
    "causal": (13, 13, 4),
    "sliding_window": (21, 21, (4, 8)),
    "prefix_lm": (17, 17, 4),
    "document": (19, 19, 4),
    "dilated": (23, 23, 8),
    "alibi": (13, 13, 4),
    "softcap": (13, 15, (8, 4)),
    "rel_bias": (11, 14, 4),
    "per_head": (12, 16, 4),
    "no_mask": (9, 14, 4),
    "plain": (9, 14, 4),
}


def _inputs(T, S, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, N, T, H)).astype(np.float32)
    k = rng.standard_normal((B, K, S, H)).astype(np.float32)
    v = rng.standard_normal((B, K, S, V)).astype(np.float32)
    d_out = rng.standard_normal((B, N, T, V)).astype(np.float32)
    d_lse = rng.standard_normal((B, N, T)).astype(np.float32)
    return q, k, v, d_out, d_lse, rng


def _oracle(name, T, S):
    q, k, v, d_out, d_lse, rng = _inputs(T, S)
    score_factory, params, mask_mod, _ = _mods(name, np, np.asarray, T, S, rng)
    mod = None if score_factory is None else score_factory(*params)
    out, lse = flex_forward(q, k, v, mod, mask_mod)
    grads = flex_backward(q, k, v, d_out, d_lse, score_factory, params, mask_mod)
    return (q, k, v, d_out, d_lse), params, (out, lse), grads


def _jax_run(name, T, S, bsz, q, k, v, d_out, d_lse, params):
    score_factory, _, mask_mod_np, bm_bh = _mods(name, jnp, jnp.asarray, T, S, np.random.default_rng(0))

    def loss(q, k, v, params):
        sf, _, mask_mod, _ = _mods(name, jnp, jnp.asarray, T, S, np.random.default_rng(0))
        score_mod = None if sf is None else sf(*params)
        bm = None if mask_mod is None else jf.create_block_mask(mask_mod, *bm_bh, T, S, BLOCK_SIZE=bsz)
        out, lse = jf.flex_attention(q, k, v, score_mod, bm, enable_gqa=True, return_lse=True)
        total = jnp.sum(out * d_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * d_lse, 0.0))
        return total, (out, lse)

    params = tuple(jnp.asarray(p, jnp.float32) for p in params)
    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        q, k, v, params
    )
    return (
        np.asarray(out),
        np.asarray(lse),
        [np.asarray(g) for g in grads[:3]],
        [np.asarray(g) for g in grads[3]],
    )


def _torch_run(name, T, S, bsz, q, k, v, d_out, d_lse, params, impl="twin"):
    q, k, v = (torch.tensor(x, requires_grad=impl == "twin") for x in (q, k, v))
    params = [torch.tensor(p, dtype=torch.float32, requires_grad=impl == "twin") for p in params]
    score_factory, _, mask_mod, bm_bh = _mods(name, torch, torch.as_tensor, T, S, np.random.default_rng(0))
    score_mod = None if score_factory is None else score_factory(*params)
    if impl == "twin":
        bm = None if mask_mod is None else tf.create_block_mask(mask_mod, *bm_bh, T, S, BLOCK_SIZE=bsz)
        out, lse = tf.flex_attention(q, k, v, score_mod, bm, enable_gqa=True, return_lse=True)
    else:  # torch's own, eager, forward only on CPU
        bm = (
            None
            if mask_mod is None
            else tflex.create_block_mask(mask_mod, *bm_bh, T, S, device="cpu", BLOCK_SIZE=bsz)
        )
        with torch.no_grad():
            out, lse = tflex.flex_attention(q, k, v, score_mod, bm, enable_gqa=True, return_lse=True)
        return out.numpy(), lse.numpy(), None, None
    total = (out * torch.from_numpy(d_out)).sum() + torch.where(
        torch.isfinite(lse), lse * torch.from_numpy(d_lse), 0
    ).sum()
    total.backward()
    return (
        out.detach().numpy(),
        lse.detach().numpy(),
        [x.grad.numpy() for x in (q, k, v)],
        [p.grad.numpy() for p in params],
    )


def _check_lse(lse, ref):
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_array_equal(lse[~finite], ref[~finite])  # -inf exactly
    np.testing.assert_allclose(lse[finite], ref[finite], rtol=0, atol=_atol(ref[finite]))


# The catalogue cases run as shared vectors (tests/test_flex_vectors.py); here what they do not cover:
# per-head tables (a mask that depends on h), per-batch tables with a captured array, no mod at all (the
# engine's dense plan, in blocks of 8 so that T = 9 and S = 14 are padded; its XLA loops, not the JAX twin's
# compiled CPU kernel, which tests/test_native.py checks).
@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("name", ["per_head", "document", "rel_bias", "plain"])
def test_forward_and_gradients_vs_oracle(name, framework, monkeypatch):
    if name == "plain":
        import jax_attn.engine

        monkeypatch.setattr(blocks, "MAX_BLOCK", 8)
        monkeypatch.setattr(jax_attn.engine, "NATIVE", False)
    T, S, bsz = CASES[name]
    (q, k, v, d_out, d_lse), params, (out_ref, lse_ref), (dq, dk, dv, dparams) = _oracle(name, T, S)
    run = _jax_run if framework == "jax" else _torch_run
    out, lse, grads, pgrads = run(name, T, S, bsz, q, k, v, d_out, d_lse, params)
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=_atol(out_ref))
    _check_lse(lse, lse_ref)
    for got, ref in zip(grads + pgrads, [dq, dk, dv, *dparams], strict=True):
        np.testing.assert_allclose(got, ref, rtol=0, atol=_atol(ref))


@pytest.mark.parametrize("name", ["per_head", "no_mask"])
def test_torch_flex_forward_agrees(name):
    """torch's own flex_attention (eager, CPU) as the reference library: forward and lse."""
    T, S, bsz = CASES[name]
    (q, k, v, d_out, d_lse), params, _, _ = _oracle(name, T, S)
    out_ref, lse_ref, _, _ = _torch_run(name, T, S, bsz, q, k, v, d_out, d_lse, params, impl="torch")
    for run in (_jax_run, _torch_run):
        out, lse, _, _ = run(name, T, S, bsz, q, k, v, d_out, d_lse, params)
        np.testing.assert_allclose(out, out_ref, rtol=0, atol=_atol(out_ref))
        _check_lse(lse, lse_ref)


def _dense_blocks(num, idx, n_kv):
    """Block-level bool ``(B, H, n_q, n_kv)`` of ordered tables: the semantic content, order-free."""
    num, idx = np.asarray(num), np.asarray(idx)
    out = np.zeros(num.shape + (n_kv,), bool)
    for pos in np.ndindex(num.shape):
        out[pos][idx[pos][: num[pos]]] = True
    return out


MASKS = {
    "causal": fm.causal,
    "sliding_window": fm.generate_sliding_window(6),
    "prefix_lm": fm.generate_prefix_lm(5),
    "dilated": fm.generate_dilated_sliding_window(8, 3),
    "head_batch": lambda b, h, q, kv: (q - kv) <= h + 2 * b,
}


@pytest.mark.parametrize(
    ("mask", "bh", "lengths", "bsz"),
    [
        ("causal", (None, None), (13, 13), 4),
        ("sliding_window", (None, None), (29, 37), (8, 4)),
        ("prefix_lm", (None, None), (16, 16), 8),
        ("dilated", (None, None), (37, 30), 8),
        ("head_batch", (2, 3), (13, 17), (4, 8)),
    ],
)
def test_block_tables_match_torch(mask, bh, lengths, bsz):
    """The same operator-only mask_mod object through three create_block_masks: both twins' integer
    tables are identical, and for each (b, h, block) they list the same partial and full blocks as
    torch's own."""
    mod = MASKS[mask]
    ref = tflex.create_block_mask(mod, *bh, *lengths, device="cpu", BLOCK_SIZE=bsz)
    jbm = jf.create_block_mask(mod, *bh, *lengths, BLOCK_SIZE=bsz)
    tbm = tf.create_block_mask(mod, *bh, *lengths, BLOCK_SIZE=bsz)
    assert jbm.BLOCK_SIZE == tbm.BLOCK_SIZE == tuple(ref.BLOCK_SIZE)
    assert jbm.seq_lengths == tbm.seq_lengths == tuple(ref.seq_lengths)
    for name in jf.BlockMask._TABLES:
        np.testing.assert_array_equal(
            np.asarray(getattr(jbm, name)), getattr(tbm, name).numpy(), err_msg=name
        )
        assert getattr(tbm, name).dtype == torch.int32
    for num, idx, n_cols in (
        ("kv_num_blocks", "kv_indices", ref.kv_indices.shape[-1]),
        ("full_kv_num_blocks", "full_kv_indices", ref.kv_indices.shape[-1]),
        ("q_num_blocks", "q_indices", ref.q_indices.shape[-1]),
        ("full_q_num_blocks", "full_q_indices", ref.q_indices.shape[-1]),
    ):
        want = _dense_blocks(getattr(ref, num), getattr(ref, idx), n_cols)
        np.testing.assert_array_equal(
            _dense_blocks(getattr(tbm, num), getattr(tbm, idx), n_cols), want, err_msg=num
        )
    assert tbm.sparsity() == pytest.approx(ref.sparsity())
    assert jbm.sparsity() == pytest.approx(ref.sparsity())
    assert jbm.to_string() == tbm.to_string()
    if bh == (None, None):  # torch's picture (past `limit` pictures it adds a line on indexing)
        assert tbm.to_string() == ref.to_string()
    # to_dense == the block-level reduction of create_mask; create_mask == torch's create_mask
    dense = tflex.create_mask(mod, *bh, *lengths, device="cpu").numpy()
    for twin, bm in ((jf, jbm), (tf, tbm)):
        np.testing.assert_array_equal(np.asarray(twin.create_mask(mod, *bh, *lengths)), dense)
        bq, bkv = bm.BLOCK_SIZE
        n_q, n_kv = -(-lengths[0] // bq), -(-lengths[1] // bkv)
        padded = np.zeros(dense.shape[:2] + (n_q * bq, n_kv * bkv), bool)
        padded[..., : lengths[0], : lengths[1]] = dense
        any_kept = padded.reshape(*dense.shape[:2], n_q, bq, n_kv, bkv).any(axis=(3, 5))
        np.testing.assert_array_equal(np.asarray(bm.to_dense()), any_kept.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(jbm.to_dense()), ref.to_dense().numpy())


def test_fully_masked_rows_give_zero_and_neg_inf():
    mod = fm.generate_prefix_lm(0)  # with prefix 0: causal; rows below 4 see nothing with the and

    def late(b, h, q, kv):
        return (q >= 4) & mod(b, h, q, kv)

    T = S = 10
    q, k, v, d_out, d_lse, _ = _inputs(T, S)
    out_ref, lse_ref = flex_forward(q, k, v, None, late)
    assert np.isneginf(lse_ref[..., :4]).all()
    jbm = jf.create_block_mask(late, None, None, T, S, BLOCK_SIZE=4)
    out, lse = jf.flex_attention(q, k, v, block_mask=jbm, enable_gqa=True, return_lse=True)
    np.testing.assert_array_equal(np.asarray(out)[..., :4, :], 0.0)
    _check_lse(np.asarray(lse), lse_ref)
    grads = jax.grad(lambda q: jnp.sum(jf.flex_attention(q, k, v, block_mask=jbm, enable_gqa=True)))(q)
    assert np.isfinite(np.asarray(grads)).all()
    tbm = tf.create_block_mask(late, None, None, T, S, BLOCK_SIZE=4)
    qt = torch.tensor(q, requires_grad=True)
    out_t, lse_t = tf.flex_attention(
        qt, torch.tensor(k), torch.tensor(v), block_mask=tbm, enable_gqa=True, return_lse=True
    )
    np.testing.assert_array_equal(out_t.detach().numpy()[..., :4, :], 0.0)
    _check_lse(lse_t.detach().numpy(), lse_ref)
    out_t.sum().backward()
    assert torch.isfinite(qt.grad).all()


def test_sinks_on_lse_train():
    """A gpt-oss sink added on top of the lse (``out * sigmoid(lse - sink)``): the lse cotangent flows."""
    T = S = 12
    q, k, v, d_out, _, _ = _inputs(T, S)
    sink = np.linspace(-1, 1, N).astype(np.float32)

    def f(q, sink):
        bm = jf.create_block_mask(fm.causal, None, None, T, S, BLOCK_SIZE=4)
        out, lse = jf.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True)
        return jnp.sum(out * jax.nn.sigmoid(lse - sink[:, None])[..., None] * d_out)

    dq, dsink = jax.grad(f, argnums=(0, 1))(q, sink)
    out, lse = flex_forward(q, k, v, None, fm.causal)
    gate = 1 / (1 + np.exp(-(lse - sink[:, None])))
    d_gate = np.sum(out * d_out, axis=-1) * gate * (1 - gate)
    ref_dq = flex_backward(q, k, v, d_out * gate[..., None], d_gate, None, (), fm.causal)[0]
    np.testing.assert_allclose(np.asarray(dq), ref_dq, rtol=0, atol=_atol(ref_dq))
    np.testing.assert_allclose(np.asarray(dsink), -d_gate.sum(axis=(0, 2)), rtol=0, atol=1e-4)


def test_jit_block_mask_from_traced_doc_ids():
    """create_block_mask inside jit with a mask_mod capturing traced document ids, and a BlockMask passed
    into jit as an argument (a pytree): same output as eager and as the oracle."""
    T = S = 19
    q, k, v, *_ = _inputs(T, S)
    doc = np.sort(np.random.default_rng(3).integers(0, 4, (B, T)), axis=1)

    @jax.jit
    def inside(q, doc):
        bm = jf.create_block_mask(fm.generate_document(doc), B, None, T, S, BLOCK_SIZE=4)
        return jf.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)

    ref, _ = flex_forward(q, k, v, None, fm.generate_document(doc))
    np.testing.assert_allclose(np.asarray(inside(q, jnp.asarray(doc))), ref, rtol=0, atol=_atol(ref))
    bm = jf.create_block_mask(fm.generate_document(jnp.asarray(doc)), B, None, T, S, BLOCK_SIZE=4)
    passed = jax.jit(lambda q, bm: jf.flex_attention(q, k, v, block_mask=bm, enable_gqa=True))(q, bm)
    np.testing.assert_allclose(np.asarray(passed), ref, rtol=0, atol=_atol(ref))
    leaves = jax.tree_util.tree_leaves(bm)
    assert len(leaves) == 8 and all(leaf.dtype == jnp.int32 for leaf in leaves)


def test_blocks_outside_the_tables_are_not_visited():
    """A BlockMask that lists fewer blocks than its mask_mod keeps: the unlisted blocks contribute
    nothing (they are skipped, not masked after computing), in both twins."""
    T = S = 8
    q, k, v, *_ = _inputs(T, S)
    num = np.array([[[0, 0]]], np.int32)
    idx = np.array([[[[0, 1], [0, 1]]]], np.int32)
    full_num = np.array([[[1, 1]]], np.int32)  # block row i sees key block 0 only, as full
    jbm = jf.BlockMask.from_kv_blocks(
        jnp.asarray(num), jnp.asarray(idx), jnp.asarray(full_num), jnp.asarray(idx), 4
    )
    tbm = tf.BlockMask.from_kv_blocks(*map(torch.from_numpy, (num, idx, full_num, idx)), BLOCK_SIZE=4)
    ref, _ = flex_forward(q, k, v, None, lambda b, h, qi, kv: kv < 4)
    out_j = np.asarray(jf.flex_attention(q, k, v, block_mask=jbm, enable_gqa=True))
    out_t = tf.flex_attention(*map(torch.from_numpy, (q, k, v)), block_mask=tbm, enable_gqa=True).numpy()
    for out in (out_j, out_t):
        np.testing.assert_allclose(out, ref, rtol=0, atol=_atol(ref))
    np.testing.assert_array_equal(np.asarray(jbm.q_num_blocks), tbm.q_num_blocks.numpy())
    np.testing.assert_array_equal(np.asarray(jbm.full_q_num_blocks), [[[2, 0]]])


def test_dense_keep_oracle_by_hand():
    keep = dense_keep(fm.generate_sliding_window(2), 1, 1, 3, 3)[0, 0]
    np.testing.assert_array_equal(keep, [[1, 0, 0], [1, 1, 0], [0, 1, 1]])
