"""Synthesised agreement records and benchmark documents, for the report and terminal tests (no
implementation runs: these test what a person reads, cheaply)."""

from __future__ import annotations

import random

from compare.bench import report as bench_report
from compare.bench.impls import IMPLS
from compare.bench.presets import quick

#: kinds as today's main job has them (and the two that are coming), with made-up implementation names
#: where the real ones do not matter
KINDS = {
    "sdpa": ["jax_attn", "torch_attn", "torch_builtin", "jax_attn_blocked", "jax_attn_fused",
             "torch_attn_blocked", "torch_attn_fused"],
    "mha": ["jax_attn", "torch_attn", "torch_builtin", "flax_nnx"],
    "causal": ["jax_attn", "torch_attn"],
}  # fmt: skip
QUANTITIES = ("out", "weights", "dq", "dk", "dv")
DTYPES = ("float32", "bfloat16", "float16")


def _check(case, kind, dtype, pair, quantity, rng, ok=True):
    tol = 1e-5 if dtype == "float32" else 3e-3
    err = tol * (10 ** rng.uniform(-3, -0.1) if ok else 25.0)
    return {
        "case": case,
        "kind": kind,
        "pair": pair,
        "quantity": quantity,
        "dtype": dtype,
        "max_abs": err,
        "max_rel": err * 3,
        "mean_abs": err / 10,
        "frac_outside": 0.0 if ok else 0.125,
        "tol": tol,
        "worst_index": (0, 1, 2, 3),
        "worst_got": 0.5 + err,
        "worst_expected": 0.5,
        "nonfinite": 0,
        "ok": ok,
    }


def records(kinds=KINDS, cases_per_dtype=5, seed=0, broken=None) -> list[dict]:
    """Records shaped like ``compare.agree.run``'s: every implementation against the oracle and every
    pair, per case and quantity; the last implementation of the first kind is not applicable on the
    first case. ``broken=(kind, impl)``: that implementation fails its oracle check on ``out`` in one
    case per dtype."""
    rng = random.Random(seed)
    out = []
    for kind, impls in kinds.items():
        for dtype in DTYPES:
            for c in range(cases_per_dtype):
                case = f"{kind}_case{c}_{dtype}"
                run = list(impls)
                if c == 0 and kind == next(iter(kinds)):
                    out.append(
                        {"case": case, "kind": kind, "dtype": dtype, "pair": f"{impls[-1]} vs oracle",
                         "quantity": "-", "ok": True, "skipped": True}
                    )  # fmt: skip
                    run = run[:-1]
                for impl in run:
                    for q in QUANTITIES:
                        bad = broken == (kind, impl) and q == "out" and c == 1
                        out.append(_check(case, kind, dtype, f"{impl} vs oracle", q, rng, ok=not bad))
                for i, a in enumerate(run):
                    for b in run[i + 1 :]:
                        for q in QUANTITIES:
                            out.append(_check(case, kind, dtype, f"{a} vs {b}", q, rng))
    return out


def bench_doc(seed=0) -> dict:
    """A ``bench.json`` document of the quick CPU preset: every implementation of the table measured on
    every case it runs, with made-up times."""
    rng = random.Random(seed)
    preset = quick("cpu")
    recs = []
    for fw in ("jax", "torch"):
        recs.append(
            {"impl": f"gemm[{fw}]", "framework": fw, "family": "ceiling", "role": "ceiling",
             "mode": "forward", "causal": False, "dtype": "float32", "status": "ok", "gflops": 90.0,
             "gemm_n": preset.gemm_n, "median_s": 0.02, "device": "cpu", "device_name": "test cpu"}
        )  # fmt: skip
    for impl in IMPLS:
        if impl.opt_in or impl.name in preset.exclude:
            continue
        for case in preset.cases:
            if impl.family == "csa" and not case.causal:
                continue
            limit = preset.limit_for(impl.name, impl.family)
            status = (
                "skipped" if (limit is not None and case.T > limit) or impl.applies(case, "cpu") else "ok"
            )
            median = 1e-3 * case.T / 128 * rng.uniform(0.5, 2.0)
            recs.append(
                {"impl": impl.name, "framework": impl.framework, "family": impl.family, "role": impl.role,
                 **case.as_dict(), "S": case.T, "E": case.E, "status": status, "device": "cpu",
                 "device_name": "test cpu", "reason": "preset limit" if status == "skipped" else None,
                 **({"median_s": median, "iqr_s": median / 20, "n_runs": 30, "gflops": 1.0 / median,
                     "backend": "made up", "compile_s": 0.5 if impl.framework == "jax" else None}
                    if status == "ok" else {})}
            )  # fmt: skip
    doc = {
        "schema": 1,
        "run_id": "test",
        "preset": "quick",
        "device": "cpu",
        "config": {"rounds": 1},
        "timing_settings": {},
        "gemm_n": preset.gemm_n,
        "plot_config": list(preset.plot_config),
        "not_run": [],
        "versions": {"jax": "x", "torch": "y"},
        "wall_s": 100.0,
        "records": recs,
    }
    doc["ratios"] = bench_report.speedups(recs)
    return doc
