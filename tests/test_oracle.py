"""The oracle itself, checked against hand computation and finite differences."""

import numpy as np
import pytest

from compare import oracle


def test_hand_computed_case():
    # One query, two keys, H = 1, scale 1: logits [0, ln 3] -> softmax [1/4, 3/4].
    q = np.array([[1.0]])
    k = np.array([[0.0], [np.log(3.0)]])
    v = np.array([[4.0, 0.0], [0.0, 8.0]])
    res = oracle.sdpa_forward(q, k, v, scale=1.0)
    # 1e-14 (~45 ulp), not 1e-15: np.log/np.exp are only accurate to a few ulp, and their SIMD loops
    # differ between CPUs (AVX512F or not), so exp(ln 3) is 3 within ~7 ulp, not exactly.
    np.testing.assert_allclose(res["weights"], [[0.25, 0.75]], rtol=1e-14)
    np.testing.assert_allclose(res["out"], [[1.0, 6.0]], rtol=1e-14)


def test_default_scale_is_inverse_sqrt_head_width():
    q = np.array([[2.0, 0.0, 0.0, 0.0]])  # H = 4: scale 1/2, logits [0, 1]
    k = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    v = np.array([[0.0], [1.0]])
    res = oracle.sdpa_forward(q, k, v)
    e = np.exp(1.0)
    np.testing.assert_allclose(res["out"], [[e / (1 + e)]], rtol=1e-14)  # exp to a few ulp, see above


def test_fully_masked_row_gives_zeros_and_zero_gradients():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    keep = np.ones((3, 5), bool)
    keep[1] = False
    res = oracle.sdpa_forward(q, k, v, attn_mask=keep)
    assert np.all(res["out"][1] == 0) and np.all(res["weights"][1] == 0)
    grads = oracle.sdpa_backward(q, k, v, np.ones((3, 2)), attn_mask=keep)
    assert np.all(grads["dq"][1] == 0)
    assert all(np.all(np.isfinite(g)) for g in grads.values())


def test_causal_is_top_left():
    keep = oracle.causal_keep(2, 4)
    assert keep.tolist() == [[True, False, False, False], [True, True, False, False]]


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_backward_matches_finite_differences(groups, masked):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, 3, 5))
    k = rng.standard_normal((1, 4 // groups, 6, 5))
    v = rng.standard_normal((1, 4 // groups, 6, 2))
    dout = rng.standard_normal((1, 4, 3, 2))
    mask = rng.random((1, 4, 3, 6)) < 0.7 if masked else None
    drop = rng.random((1, 4, 3, 6)) < 0.8

    def loss(q, k, v):
        out = oracle.sdpa_forward(q, k, v, attn_mask=mask, groups=groups, dropout_mask=drop, dropout_p=0.2)
        return float(np.sum(out["out"] * dout))

    grads = oracle.sdpa_backward(
        q, k, v, dout, attn_mask=mask, groups=groups, dropout_mask=drop, dropout_p=0.2
    )
    eps = 1e-6
    for name, x in (("dq", q), ("dk", k), ("dv", v)):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args = {"dq": (plus, k, v), "dk": (q, plus, v), "dv": (q, k, plus)}[name]
            args_m = {"dq": (minus, k, v), "dk": (q, minus, v), "dv": (q, k, minus)}[name]
            numeric[idx] = (loss(*args) - loss(*args_m)) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, atol=1e-7, err_msg=name)


def test_low_precision_baseline_rounds():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((4, 8)), rng.standard_normal((6, 8)), rng.standard_normal((6, 8))
    exact = oracle.sdpa_forward(q, k, v)["out"]
    for dtype, bound in (("bfloat16", 0.1), ("float16", 0.01)):
        naive = oracle.sdpa_forward(q, k, v, dtype=dtype)["out"]
        err = np.max(np.abs(naive - exact))
        assert 0 < err < bound, (dtype, err)
