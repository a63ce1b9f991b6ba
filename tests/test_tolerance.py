"""The tolerance policy, checked by hand."""

import numpy as np
import pytest

from compare import tolerance


def test_fp32_rule_is_absolute_for_order_one_values():
    expected = np.array([0.5, -0.25])
    assert tolerance.tolerance("float32", expected) == 1e-5
    assert tolerance.compare_arrays("out", expected + 9e-6, expected, "float32").ok
    assert not tolerance.compare_arrays("out", expected + 2e-5, expected, "float32").ok


def test_fp32_rule_scales_with_magnitude_and_gradient_terms():
    expected = np.array([40.0])
    assert tolerance.tolerance("float32", expected) == pytest.approx(4e-4)
    assert tolerance.tolerance("float32", np.array([0.0]), magnitude=100.0) == pytest.approx(1e-3)


def test_low_precision_rule_by_hand():
    expected = np.array([1.0, 2.0])
    naive = np.array([1.01, 2.0])  # naive error 0.01
    tol = tolerance.tolerance("bfloat16", expected, naive)
    assert tol == pytest.approx(2 * 0.01 + 2.0**-8 * 2.0)
    with pytest.raises(ValueError, match="needs the naive"):
        tolerance.tolerance("float16", expected)


def test_nonfinite_values_fail_and_are_counted():
    a = tolerance.compare_arrays("out", np.array([0.0, np.nan, np.inf]), np.zeros(3), "float32")
    assert not a.ok and a.nonfinite == 2 and a.max_abs == np.inf


def test_worst_element_is_located():
    got = np.zeros((2, 3))
    got[1, 2] = 0.5
    a = tolerance.compare_arrays("out", got, np.zeros((2, 3)), "float32")
    assert a.worst_index == (1, 2) and a.worst_got == 0.5 and a.frac_outside == pytest.approx(1 / 6)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        tolerance.compare_arrays("out", np.zeros(2), np.zeros(3), "float32")


def test_fp32_with_its_naive_evaluation_by_hand():
    """float32 judged like bf16 where the naive float32 evaluation is known: twice its error on this very
    problem plus the 1e-5 slack; float64 ignores a baseline."""
    expected = np.array([300.0, -2.0])
    naive = np.array([300.001, -2.0])  # an ill-conditioned problem: the naive float32 evaluation is 1e-3 off
    assert tolerance.tolerance("float32", expected, naive) == pytest.approx(2 * 1e-3 + 1e-5 * 300.0)
    assert tolerance.tolerance("float32", expected, naive, magnitude=1e4) == pytest.approx(2e-3 + 1e-1)
    assert tolerance.tolerance("float64", expected, naive) == pytest.approx(1e-12 * 300.0)
    got = expected + np.array([4e-3, 0.0])
    assert tolerance.compare_arrays("out", got, expected, "float32", baseline=naive).ok
    assert not tolerance.compare_arrays("out", got, expected, "float32").ok  # without it: 3e-3 only


def test_a_naive_evaluation_that_overflows_grants_nothing():
    expected = np.array([1.0, 2.0])
    naive = np.array([np.inf, 2.0])
    assert tolerance.tolerance("float16", expected, naive) == pytest.approx(2.0**-11 * 2.0)
    with pytest.raises(ValueError, match="baseline shape"):
        tolerance.tolerance("bfloat16", expected, naive[:1])
