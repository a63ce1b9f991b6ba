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


def run_vector(vec: Vector, implementations=None) -> list[dict]:
    """Every implementation of ``vec``'s kind (or ``implementations[kind]``) on ``vec``: its records."""
    records = []
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
    return records


def _worker_setup(device: str | None, framework_defaults: bool) -> None:
    """A worker process of :func:`run`: the parent's device choice and precision pinning, one torch thread
    (the workers share the CPUs; XLA's compiler, most of the run on CPU, keeps its own threads)."""
    import torch

    from compare import env

    env.select_device(device)
    env.pin_precision(framework_defaults=framework_defaults)
    torch.set_num_threads(1)


def _run_in_processes(vectors, progress, workers: int, device, framework_defaults) -> list[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: the parent has JAX's and torch's threads running, which a fork would not carry
    context = multiprocessing.get_context("spawn")
    # the expensive kinds first, so that the last vectors to finish are short ones
    order = sorted(range(len(vectors)), key=lambda i: -_COST.get(vectors[i].kind, 1.0))
    by_index = {}
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_worker_setup,
        initargs=(device, framework_defaults),
    ) as pool:
        futures = {pool.submit(run_vector, vectors[i]): i for i in order}
        for done, future in enumerate(as_completed(futures), start=1):
            i = futures[future]
            try:
                by_index[i] = future.result()
            except Exception as e:  # a worker that died (or an unpicklable result): recorded, not lost
                by_index[i] = [
                    _unmeasured(vectors[i], "agreement worker", ok=False, error=f"{type(e).__name__}: {e}")
                ]
            if progress:
                progress(done, len(vectors), vectors[i].name)
    return [r for i in range(len(vectors)) for r in by_index[i]]


# relative cost of one vector per kind on CPU (XLA compiles per vector), for the order of submission
_COST = {"attention": 4.0, "mha": 3.0, "causal": 2.5, "flex": 2.0, "sdpa": 1.0}


def run(
    vectors: list[Vector],
    implementations=None,
    progress=None,
    threads: int = 1,
    workers: int = 1,
    device: str | None = None,
    framework_defaults: bool = False,
) -> list[dict]:
    """Run every implementation of each vector's kind (or ``implementations[kind]``) on every vector;
    one record per (case, pair, quantity), in the order of ``vectors``.

    A pair is ``"<impl> vs oracle"`` or ``"<impl_a> vs <impl_b>"``. An implementation that raises is
    recorded with ``ok=False`` and its error, and the run goes on.

    ``workers > 1`` runs the vectors in that many worker processes (spawned; each selects ``device`` and
    pins precision as the parent did, unless ``framework_defaults``): compiling is most of the run on
    CPU, and one process keeps only about 1.5 cores busy (tracing holds the GIL). A vector whose worker
    dies is recorded as an error of ``"agreement worker"``. With ``implementations`` given (callables
    that may not pickle) the run stays in this process. ``threads > 1`` runs that many vectors at a
    time on threads of this process instead. The records are the same either way.
    """
    if workers > 1 and implementations is None and len(vectors) > 1:
        return _run_in_processes(vectors, progress, min(workers, len(vectors)), device, framework_defaults)
    if threads <= 1:
        records = []
        for i, vec in enumerate(vectors):
            records += run_vector(vec, implementations)
            if progress:
                progress(i + 1, len(vectors), vec.name)
        return records
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="agree") as pool:
        futures = {pool.submit(run_vector, vec, implementations): i for i, vec in enumerate(vectors)}
        by_index = {}
        for done, future in enumerate(as_completed(futures), start=1):
            i = futures[future]
            by_index[i] = future.result()
            if progress:
                progress(done, len(vectors), vectors[i].name)
    return [r for i in range(len(vectors)) for r in by_index[i]]
