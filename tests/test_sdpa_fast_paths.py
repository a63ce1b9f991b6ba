"""The fast SDPA paths (``implementation="blocked"`` / ``"fused"``) on every shared vector they apply to:
against the float64 oracle and against the readable math path of the same framework."""

import functools

import numpy as np
import pytest
from vector_checks import assert_all_ok

from compare import agree
from compare.kinds import sdpa
from compare.kinds.sdpa import SDPA_CASES

FAST = ["jax_attn_blocked", "jax_attn_fused", "torch_attn_blocked", "torch_attn_fused"]
CASES = list(SDPA_CASES)
# Each JAX fast path compiles a forward and a VJP per vector (~1 s each on a 2-core CPU): the tests run
# them on the vectors that exercise every branch (masks of each form and rank, padding to a block,
# fully-masked rows, causal T != S, GQA, low precision); ``python -m compare agree`` runs all of them.
JAX_CASES = [
    "broadcast_batch",
    "mask_additive_min",
    "mask_padding_B11S",
    "fully_masked_keep",
    "fully_masked_additive_min",
    "causal_T_gt_S",
    "gqa_G2_causal_masked",
    "causal_square_bf16",
    "fully_masked_keep_fp16",
]
PAIRS = [(impl, n) for impl in FAST for n in (JAX_CASES if impl.startswith("jax") else CASES)]


@pytest.fixture(scope="module")
def results():
    return {}


def _result(results, vec, impl):
    if (impl, vec.name) not in results:
        results[impl, vec.name] = sdpa.IMPLEMENTATIONS[impl](vec)
    return results[impl, vec.name]


@pytest.mark.parametrize(("impl", "name"), PAIRS)
def test_fast_path_matches_oracle_and_math(all_vectors, results, impl, name):
    vec = all_vectors[name]
    if not sdpa.applies(impl, vec):
        pytest.skip(f"{impl} does not apply to {name} (injected dropout)")
    res = _result(results, vec, impl)
    assert set(res) == {"out", "dq", "dk", "dv"}
    assert_all_ok(agree.against_oracle(vec, res), f"{impl} vs oracle on {name}")
    math = _result(results, vec, impl.rsplit("_", 1)[0])
    assert_all_ok(agree.between(vec, res, math), f"{impl} vs math on {name}")
    if "fully_masked" in name:
        assert all(np.all(np.isfinite(x)) for x in res.values())


# The shared vectors are short (T, S <= 8), so at the default block size (attn_spec.blocks.MAX_BLOCK) the
# blocked paths see one block. Shrinking the block to 3 makes them run many blocks with padding, the
# online-softmax rescaling across key blocks, causal skipping (T != S too) and per-block masks, and the
# JAX custom VJP's accumulation of dk/dv across query blocks. ``unroll=0`` forces the JAX causal path that
# loops over query blocks with a traced index (used when a call has more than 8 query blocks).
BLOCK_CASES = [*JAX_CASES, "causal_T_lt_S", "causal_square", "mask_rank3_NTS", "large_logits"]
CAUSAL_BLOCK_CASES = [n for n in BLOCK_CASES if n.startswith(("causal", "gqa_G2_causal"))]
MULTI_BLOCK = (
    [("jax_attn_blocked", n, None) for n in BLOCK_CASES]
    + [("jax_attn_blocked", n, 0) for n in CAUSAL_BLOCK_CASES]
    + [("torch_attn_blocked", n, None) for n in BLOCK_CASES]
)


def _small_blocks(monkeypatch, max_block, unroll):
    import attn_spec.blocks
    import jax_attn.engine

    monkeypatch.setattr(attn_spec.blocks, "MAX_BLOCK", max_block)
    monkeypatch.setattr(attn_spec.blocks, "MIN_CAUSAL_BLOCK", 2)
    monkeypatch.setattr(jax_attn.engine, "NATIVE", False)  # the XLA loops' blocks (the kernel has its own)
    # a fresh jit for the test: a program traced earlier for the same shapes (default blocks, or the kernel)
    # would otherwise be reused from the cached jit, and the small blocks never run
    fresh = functools.cache(sdpa._jax_forward_backward.__wrapped__)
    monkeypatch.setattr(sdpa, "_jax_forward_backward", fresh)
    if unroll is not None:
        monkeypatch.setattr(jax_attn.engine, "_UNROLL_CAUSAL", unroll)


@pytest.mark.parametrize(("impl", "name", "unroll"), MULTI_BLOCK)
def test_blocked_path_with_many_small_blocks(all_vectors, monkeypatch, impl, name, unroll):
    import attn_spec.blocks

    _small_blocks(monkeypatch, 3, unroll)
    vec = all_vectors[name]
    T, S = vec.arrays["q"].shape[-2], vec.arrays["k"].shape[-2]
    assert max(T, S) > 3 and attn_spec.blocks.block_sizes(T, S) == (min(T, 3), min(S, 3))  # several blocks
    res = sdpa.IMPLEMENTATIONS[impl](vec)
    assert_all_ok(agree.against_oracle(vec, res), f"{impl} (3-blocks) vs oracle on {name}")
    if "fully_masked" in name:
        assert all(np.all(np.isfinite(x)) for x in res.values())


@pytest.mark.parametrize("unroll", [None, 0])
@pytest.mark.parametrize("name", ["causal_square", "causal_T_gt_S"])
def test_causal_blocked_path_with_unequal_query_and_key_blocks(all_vectors, monkeypatch, name, unroll):
    """Causal query blocks of 2 against key blocks of 3: the diagonal cuts key blocks mid-way."""
    import attn_spec.blocks

    _small_blocks(monkeypatch, 4, unroll)
    vec = all_vectors[name]
    T, S = vec.arrays["q"].shape[-2], vec.arrays["k"].shape[-2]
    bt, bs = attn_spec.blocks.block_sizes(T, S, causal=True)
    assert bt == 2 and bs == 3  # T = 6 or 7 queries in blocks of 2; S = 6 keys in blocks of 3, or S = 3
    res = sdpa.IMPLEMENTATIONS["jax_attn_blocked"](vec)
    assert_all_ok(agree.against_oracle(vec, res), f"jax_attn_blocked ({bt}x{bs} blocks) vs oracle on {name}")


# The JAX blocked path (jax_attn.engine's dense plan) gives a float attn_mask its gradient: ds summed over
# the mask's broadcast axes, accumulated block by block in the custom VJP. Against the math path (jax.vjp
# through the readable softmax), in float64, with 3-blocks so that every mask is cut into several blocks
# with padding, and with the mask broadcast over each axis in turn.
FLOAT_MASK_SHAPES = [
    ((2, 3, 7, 4), (2, 3, 8, 4), (7, 8), False),
    ((2, 3, 7, 4), (2, 3, 8, 4), (2, 1, 7, 1), False),
    ((2, 3, 7, 4), (2, 3, 8, 4), (3, 1, 8), False),
    ((2, 3, 7, 4), (2, 3, 8, 4), (8,), False),
    ((2, 4, 7, 4), (2, 2, 8, 4), (2, 4, 7, 8), True),
    ((2, 4, 7, 4), (2, 2, 8, 4), (4, 1, 1), True),
]


@pytest.mark.parametrize(("q_shape", "k_shape", "m_shape", "gqa"), FLOAT_MASK_SHAPES)
def test_jax_blocked_float_mask_gradient(monkeypatch, q_shape, k_shape, m_shape, gqa):
    import jax

    from jax_attn.functional import scaled_dot_product_attention

    _small_blocks(monkeypatch, 3, None)
    rng = np.random.default_rng(sum(m_shape))
    q, k = rng.standard_normal(q_shape), rng.standard_normal(k_shape)
    v = rng.standard_normal((*k_shape[:-1], 5))
    mask = rng.standard_normal(m_shape)
    mask[..., 0] = -np.inf  # -inf entries: no gradient through them, none of them NaN
    dout = rng.standard_normal((*q_shape[:-1], 5))
    got = {}
    with jax.enable_x64(True):
        for impl in ("math", "blocked"):

            def f(q, k, v, m, impl=impl):
                return scaled_dot_product_attention(q, k, v, m, enable_gqa=gqa, implementation=impl)

            out, vjp = jax.vjp(f, q, k, v, mask)
            got[impl] = [np.asarray(x) for x in (out, *vjp(dout))]
    for name, a, b in zip(("out", "dq", "dk", "dv", "dmask"), got["blocked"], got["math"], strict=True):
        assert a.shape == b.shape, name
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=name)
    if m_shape[-1] != 1:  # (a mask constant over the keys shifts whole rows: its true gradient is 0)
        assert np.abs(got["blocked"][4]).max() > 0.01  # the mask does get a gradient


@pytest.mark.parametrize(("q_shape", "k_shape", "m_shape", "gqa"), FLOAT_MASK_SHAPES)
def test_torch_blocked_float_mask_gradient(monkeypatch, q_shape, k_shape, m_shape, gqa):
    """The torch twin's blocked path (torch_attn.engine's dense plan) against its math path, as above."""
    import torch

    from torch_attn.functional import scaled_dot_product_attention

    _small_blocks(monkeypatch, 3, None)
    rng = np.random.default_rng(sum(m_shape))
    arrays = [rng.standard_normal(q_shape), rng.standard_normal(k_shape)]
    arrays += [rng.standard_normal((*k_shape[:-1], 5)), rng.standard_normal(m_shape)]
    arrays[3][..., 0] = -np.inf
    dout = torch.from_numpy(rng.standard_normal((*q_shape[:-1], 5)))
    got = {}
    for impl in ("math", "blocked"):
        q, k, v, mask = (torch.tensor(a, requires_grad=True) for a in arrays)
        out = scaled_dot_product_attention(q, k, v, mask, enable_gqa=gqa, implementation=impl)
        got[impl] = [out, *torch.autograd.grad(out, (q, k, v, mask), dout)]
    for name, a, b in zip(("out", "dq", "dk", "dv", "dmask"), got["blocked"], got["math"], strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


# The dense plan's backward takes smaller query blocks than its forward when G query heads share a step
# (attn_spec.blocks.backward_query_block). With the tile budget shrunk so that 24-row forward blocks become
# 12-row backward blocks, the gradients still equal the math path's (float64), causal and with a float mask.
@pytest.mark.parametrize("twin", ["jax", "torch"])
@pytest.mark.parametrize("case", ["causal", "float_mask"])
def test_blocked_backward_with_smaller_query_blocks(monkeypatch, twin, case):
    import attn_spec.blocks

    monkeypatch.setattr(attn_spec.blocks, "MAX_BLOCK", 32)
    monkeypatch.setattr(attn_spec.blocks, "MIN_CAUSAL_BLOCK", 24)
    monkeypatch.setattr(attn_spec.blocks, "BACKWARD_TILE_ROWS", 4)
    T, S, G = 40, 37 if case == "causal" else 45, 2
    bt, _ = attn_spec.blocks.block_sizes(T, S, case == "causal")
    assert (bt, attn_spec.blocks.backward_query_block(bt, G)) == (24, 12)
    rng = np.random.default_rng(7)
    q, k, v = (
        rng.standard_normal((2, 4, T, 8)),
        rng.standard_normal((2, 2, S, 8)),
        rng.standard_normal((2, 2, S, 5)),
    )
    mask = None
    if case == "float_mask":
        mask = rng.standard_normal((2, 1, T, S))
        mask[:, :, 3] = -np.inf  # a fully masked row
    dout = rng.standard_normal((2, 4, T, 5))
    kw = dict(is_causal=case == "causal", enable_gqa=True)
    got = {}
    for impl in ("math", "blocked"):
        if twin == "jax":
            import jax

            from jax_attn.functional import scaled_dot_product_attention

            with jax.enable_x64(True):

                def f(q, k, v, m, impl=impl):
                    return scaled_dot_product_attention(q, k, v, m, implementation=impl, **kw)

                out, vjp = jax.vjp(f, q, k, v, mask)
                got[impl] = [np.asarray(x) for x in (out, *vjp(dout)) if x is not None]
        else:
            import torch

            from torch_attn.functional import scaled_dot_product_attention

            ts = [torch.tensor(a, requires_grad=True) for a in (q, k, v) + (() if mask is None else (mask,))]
            m = None if mask is None else ts[3]
            out = scaled_dot_product_attention(*ts[:3], m, implementation=impl, **kw)
            grads = torch.autograd.grad(out, ts, torch.from_numpy(dout))
            got[impl] = [x.detach().numpy() for x in (out, *grads)]
    names = ("out", "dq", "dk", "dv", "dmask")
    assert len(got["blocked"]) == len(got["math"]) == (5 if mask is not None else 4)
    for name, a, b in zip(names, got["blocked"], got["math"], strict=False):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=name)


def test_backward_query_block():
    from attn_spec.blocks import BACKWARD_TILE_ROWS, backward_query_block

    assert BACKWARD_TILE_ROWS == 512
    assert backward_query_block(512, 1) == 512
    assert backward_query_block(512, 2) == 256
    assert backward_query_block(512, 4) == 128
    assert backward_query_block(512, 8) == 64
    assert backward_query_block(264, 4) == 66  # halved while even: 264 -> 132 -> 66, which divide 264
    assert backward_query_block(8, 128) == 8  # at least 16 before halving: never below 8
    with pytest.raises(ValueError, match="bt >= 1 and G >= 1"):
        backward_query_block(0, 1)
