"""The tolerance policy, in one place: what "agrees" means, per dtype.

- float32 / float64: absolute error against the float64 oracle at most ``atol · max(1, max|expected|,
  m)``. For attention outputs and weights ``m = 0``, so with values of order 1 that is the plain ``atol``:
  1e-5 for float32. For gradients ``m`` is the size of the terms the gradient sums before they cancel
  (:func:`gradient_magnitude`: e.g. ``scale · max|k| · max|v| · max|dout|`` for dq): with logits of
  order 1e4 an ulp-level change of a softmax weight moves dq by ~1e-5 while dq itself is ~0.
- bfloat16 / float16: an implementation's error against the oracle may be at most ``factor`` (2) times the
  error of a *naive same-dtype* implementation (every intermediate rounded to the dtype; see
  ``compare.oracle``), plus one unit in the last place of the largest expected value. This is the rule of
  flash-attention's test-suite: low precision is judged by what the dtype can do, not by a fixed number.

Non-finite values never pass, and are reported as such.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Relative-to-magnitude absolute tolerance for the full-precision dtypes.
ATOL = {"float32": 1e-5, "float64": 1e-12}
# Unit roundoff (half the machine epsilon) of the low-precision dtypes.
LOW_PRECISION_ULP = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
LOW_PRECISION_FACTOR = 2.0


def policy_table() -> list[dict]:
    """The policy as rows, for reports."""
    # m: 0 for forward quantities; the gradient's term size for gradients (gradient_magnitude).
    rows = [
        {"dtype": dt, "rule": f"maxabs(got - oracle) <= {atol:g} * max(1, maxabs(oracle), m)"}
        for dt, atol in ATOL.items()
    ]
    rows += [
        {
            "dtype": dt,
            "rule": f"maxabs(got - oracle) <= {LOW_PRECISION_FACTOR:g} * maxabs(naive_{dt} - oracle) "
            f"+ {ulp:g} * max(1, maxabs(oracle), m)",
        }
        for dt, ulp in LOW_PRECISION_ULP.items()
    ]
    return rows


@dataclass
class Agreement:
    """One comparison of an implementation's array with the expected (oracle or another implementation)."""

    quantity: str
    dtype: str
    max_abs: float
    max_rel: float
    mean_abs: float
    frac_outside: float
    tol: float
    worst_index: tuple[int, ...]
    worst_got: float
    worst_expected: float
    nonfinite: int
    ok: bool

    def as_dict(self) -> dict:
        return asdict(self)


def gradient_magnitude(quantity: str, q, k, v, dout, scale: float | None) -> float:
    """Size of the terms summed into an attention gradient (0 for forward quantities).

    ``dq = dlogits @ k · scale`` and ``dk = dlogitsᵀ @ q · scale`` with ``|dlogits| <= |dout|·|v|``
    termwise; ``dv = weightsᵀ @ dout`` with weights <= 1.
    """
    amax = [float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0)) for x in (q, k, v, dout)]
    scale = 1.0 / np.sqrt(np.shape(q)[-1]) if scale is None else abs(scale)
    qm, km, vm, dm = amax
    return {"dq": scale * km * vm * dm, "dk": scale * qm * vm * dm, "dv": dm}.get(quantity, 0.0)


def tolerance(
    dtype: str, expected: np.ndarray, baseline: np.ndarray | None = None, magnitude: float = 0.0
) -> float:
    """The largest admissible max-abs error for ``dtype`` (see module docstring)."""
    magnitude = max(1.0, float(np.max(np.abs(expected), initial=0.0)), magnitude)
    if dtype in ATOL:
        return ATOL[dtype] * magnitude
    if dtype in LOW_PRECISION_ULP:
        if baseline is None:
            raise ValueError(f"tolerance: dtype {dtype} needs the naive same-dtype baseline")
        naive_err = float(np.max(np.abs(np.asarray(baseline, np.float64) - expected), initial=0.0))
        return LOW_PRECISION_FACTOR * naive_err + LOW_PRECISION_ULP[dtype] * magnitude
    raise ValueError(f"tolerance: no policy for dtype {dtype!r}")


def compare_arrays(
    quantity: str,
    got,
    expected,
    dtype: str,
    baseline=None,
    tol: float | None = None,
    magnitude: float = 0.0,
) -> Agreement:
    """Measure ``got`` against ``expected`` and judge it with the policy (or an explicit ``tol``)."""
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        raise ValueError(f"{quantity}: shape {got.shape} does not match the expected {expected.shape}")
    tol = tolerance(dtype, expected, baseline, magnitude) if tol is None else tol
    nonfinite = int(np.size(got) - np.count_nonzero(np.isfinite(got)))
    diff = np.abs(got - expected)
    # A non-finite value is infinitely wrong: it must show up as the worst element.
    diff = np.where(np.isfinite(got), diff, np.inf)
    if diff.size == 0:
        return Agreement(quantity, dtype, 0.0, 0.0, 0.0, 0.0, tol, (), 0.0, 0.0, 0, True)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    rel = diff / np.maximum(np.abs(expected), 1e-30)
    max_abs = float(diff[worst])
    return Agreement(
        quantity=quantity,
        dtype=dtype,
        max_abs=max_abs,
        max_rel=float(np.max(np.where(expected != 0, rel, np.where(diff == 0, 0.0, np.inf)))),
        mean_abs=float(np.mean(diff)),
        frac_outside=float(np.mean(diff > tol)),
        tol=tol,
        worst_index=tuple(int(i) for i in worst),
        worst_got=float(got[worst]),
        worst_expected=float(expected[worst]),
        nonfinite=nonfinite,
        ok=bool(nonfinite == 0 and max_abs <= tol),
    )
