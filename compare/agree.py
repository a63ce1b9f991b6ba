"""Agreement of implementations on the shared vectors: each against the oracle, and pairwise.

Records are plain dicts (JSON-ready) so that the CLI, the tests and the reports share them.
"""

from __future__ import annotations

from compare.kinds.base import Vector
from compare.registry import KINDS
from compare.tolerance import Agreement, compare_arrays, tolerance


def _magnitude(vec: Vector, quantity: str) -> float:
    return KINDS[vec.kind].magnitude(vec.case, vec.arrays, quantity)


def _quantities(vec: Vector) -> list[str]:
    """What the oracle provides for this vector: ``expected_<quantity>`` arrays."""
    return [k.removeprefix("expected_") for k in sorted(vec.arrays) if k.startswith("expected_")]


def against_oracle(vec: Vector, result: dict) -> list[Agreement]:
    """Each quantity the implementation produced, judged against the float64 oracle."""
    return [
        compare_arrays(
            q,
            result[q],
            vec.arrays[f"expected_{q}"],
            vec.case.dtype,
            baseline=vec.arrays.get(f"naive_{q}"),
            magnitude=_magnitude(vec, q),
        )
        for q in _quantities(vec)
        if q in result
    ]


def between(vec: Vector, result_a: dict, result_b: dict) -> list[Agreement]:
    """Two implementations against each other, at the tolerance the policy grants against the oracle."""
    out = []
    for q in _quantities(vec):
        if q in result_a and q in result_b:
            tol = tolerance(
                vec.case.dtype,
                vec.arrays[f"expected_{q}"],
                vec.arrays.get(f"naive_{q}"),
                _magnitude(vec, q),
            )
            out.append(compare_arrays(q, result_a[q], result_b[q], vec.case.dtype, tol=tol))
    return out


def _unmeasured(vec: Vector, impl: str, **fields) -> dict:
    """The record of an implementation that produced no numbers on ``vec`` (not applicable, or raised)."""
    return {
        "case": vec.name,
        "kind": vec.kind,
        "dtype": vec.case.dtype,
        "pair": f"{impl} vs oracle",
        "quantity": "-",
        **fields,
    }


def run(vectors: list[Vector], implementations=None, progress=None) -> list[dict]:
    """Run every implementation of each vector's kind (or ``implementations[kind]``) on every vector;
    one record per (case, pair, quantity).

    A pair is ``"<impl> vs oracle"`` or ``"<impl_a> vs <impl_b>"``. An implementation that raises is
    recorded with ``ok=False`` and its error, and the run goes on.
    """
    records = []
    for i, vec in enumerate(vectors):
        kind = KINDS[vec.kind]
        results = {}
        impls = kind.implementations if implementations is None else implementations.get(vec.kind, {})
        for impl, fn in impls.items():
            if not kind.applies(impl, vec):
                # Listed in the report as not applicable (e.g. torch's built-in with an injected dropout
                # mask, flax with a float mask); never counted as agreement.
                records.append(_unmeasured(vec, impl, ok=True, skipped=True))
                continue
            try:
                results[impl] = fn(vec)
            except Exception as e:  # recorded, not hidden: the report shows it as a failure
                records.append(_unmeasured(vec, impl, ok=False, error=f"{type(e).__name__}: {e}"))
        for impl, res in results.items():
            for a in against_oracle(vec, res):
                pair = f"{impl} vs oracle"
                records.append({"case": vec.name, "kind": vec.kind, "pair": pair, **a.as_dict()})
        names = list(results)
        for j, a_name in enumerate(names):
            for b_name in names[j + 1 :]:
                for a in between(vec, results[a_name], results[b_name]):
                    records.append(
                        {"case": vec.name, "kind": vec.kind, "pair": f"{a_name} vs {b_name}", **a.as_dict()}
                    )
        if progress:
            progress(i + 1, len(vectors), vec.name)
    return records
