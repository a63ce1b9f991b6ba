"""The tolerance policy, in one place: what "agrees" means, per dtype.

One rule for every dtype, flash-attention's: an implementation is judged by what its dtype can do *on that
very problem*. Its absolute error against the float64 oracle may be at most

    FACTOR · maxabs(naive − oracle) + SLACK[dtype] · max(1, maxabs(oracle), m)

- ``naive`` is the *naive same-dtype evaluation*: the oracle with every intermediate rounded to the dtype
  (``compare.oracle``'s ``dtype=``). Its error is what the dtype costs on these inputs: large logits, a
  softmax that nearly cancels, trained weights fed N(0, 1) inputs. It is required for bf16/fp16, and used
  for float32 wherever the caller has it (the Hugging Face port check always computes it; the stored
  vectors carry it for bf16/fp16 only, so there float32 falls back to the slack term alone).
- ``SLACK`` covers what the naive evaluation does not model: it rounds each *result* once, while a real
  kernel also rounds inside its sums, in an order of its own. 1e-5 for float32 (about 170 units of
  roundoff), one unit of roundoff for bf16/fp16 (whose sums run in fp32), 1e-12 for float64.
- ``m`` is 0 for outputs and weights; for gradients it is the size of the terms the gradient sums before
  they cancel (:func:`gradient_magnitude`, or the port check's per-parameter sums of ``|terms|``): with
  logits of order 1e4 an ulp-level change of a softmax weight moves dq by ~1e-5 while dq itself is ~0, and
  a weight gradient summed over thousands of rows carries the rounding of each.

Non-finite values never pass, and are reported as such.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Absolute error admitted per unit of magnitude, beyond FACTOR times the naive evaluation's error.
SLACK = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2.0**-8, "float16": 2.0**-11}
# Without a naive baseline (stored vectors in float32/float64) the slack term is the whole tolerance.
ATOL = {dt: SLACK[dt] for dt in ("float32", "float64")}
LOW_PRECISION_ULP = {dt: SLACK[dt] for dt in ("bfloat16", "float16")}
FACTOR = 2.0
LOW_PRECISION_FACTOR = FACTOR


def policy_table() -> list[dict]:
    """The policy as rows, for reports."""
    # m: 0 for forward quantities; the gradient's term size for gradients (gradient_magnitude).
    rows = []
    for dt, slack in SLACK.items():
        naive = f"{FACTOR:g} * maxabs(naive_{dt} - oracle) + " if dt != "float64" else ""
        rule = f"maxabs(got - oracle) <= {naive}{slack:g} * max(1, maxabs(oracle), m)"
        if dt == "float32":
            rule += " (naive term where the naive float32 evaluation is computed: port checks)"
        rows.append({"dtype": dt, "rule": rule})
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
    """The largest admissible max-abs error for ``dtype`` (see module docstring). ``baseline`` is the naive
    same-dtype evaluation: required for bf16/fp16, optional for float32, ignored for float64."""
    if dtype not in SLACK:
        raise ValueError(f"tolerance: no policy for dtype {dtype!r}")
    magnitude = max(1.0, float(np.max(np.abs(expected), initial=0.0)), magnitude)
    if baseline is None:
        if dtype in LOW_PRECISION_ULP:
            raise ValueError(f"tolerance: dtype {dtype} needs the naive same-dtype baseline")
        return SLACK[dtype] * magnitude
    if dtype == "float64":
        return SLACK[dtype] * magnitude
    baseline = np.asarray(baseline, np.float64)
    if baseline.shape != np.shape(expected):
        raise ValueError(f"tolerance: baseline shape {baseline.shape} != expected {np.shape(expected)}")
    diff = np.abs(baseline - expected)
    # A naive evaluation that overflows (fp16 and -1e9) is infinitely wrong there: it grants nothing.
    naive_err = float(np.max(np.where(np.isfinite(diff), diff, 0.0), initial=0.0))
    return FACTOR * naive_err + SLACK[dtype] * magnitude


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
