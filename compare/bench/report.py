"""Rendering of a benchmark run: speed ratios, tables, ``bench.json``, ``bench.md``, ``bench.png`` and
``bench_ratio.png``. Files are written to a temporary name and moved into place (``os.replace``), so a
failure never leaves a half-written report behind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from compare.bench.flops import MODES
from compare.fileio import atomic_write  # noqa: F401 (re-exported)

CASE_FIELDS = ("mode", "causal", "dtype", "B", "N", "T", "H", "window")


def case_key(r: dict) -> tuple:
    return tuple(r.get(f) for f in CASE_FIELDS)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def speedups(records: list[dict]) -> list[dict]:
    """Per family and case: ``torch time / jax_attn time`` against the fastest torch implementation of the
    family and against the eager ``torch_attn`` twin (> 1 means the jit-compiled JAX one is faster)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("family") != "ceiling":
            groups.setdefault((r["family"], *case_key(r)), []).append(r)
    out = []
    for (family, *key), rows in groups.items():
        jax_rows = [r for r in rows if r.get("role") == "jax_attn"]
        torch_rows = [r for r in rows if r["framework"] == "torch"]
        if not jax_rows or not torch_rows:
            continue
        jx = jax_rows[0]
        best = min(torch_rows, key=lambda r: r["median_s"])
        twin = next((r for r in torch_rows if r.get("role") == "torch_attn"), None)
        out.append(
            {
                "family": family,
                **dict(zip(CASE_FIELDS, key)),
                "jax_impl": jx["impl"],
                "jax_ms": _ms(jx["median_s"]),
                "best_torch_impl": best["impl"],
                "best_torch_ms": _ms(best["median_s"]),
                "speedup_vs_best_torch": best["median_s"] / jx["median_s"],
                "torch_attn_ms": _ms(twin["median_s"]) if twin else None,
                "speedup_vs_torch_attn": twin["median_s"] / jx["median_s"] if twin else None,
            }
        )
    order = {m: i for i, m in enumerate(MODES)}
    out.sort(
        key=lambda s: (
            s["family"],
            order.get(s["mode"], 9),
            s["causal"],
            s.get("window") or 0,
            s["dtype"],
            s["B"],
            s["N"],
            s["H"],
            s["T"],
        )
    )
    return out


# ------------------------------------------------------------------------------------------ tables


def _mask_label(r: dict) -> str:
    return f"window {r['window']}" if r.get("window") else "causal" if r["causal"] else "full"


def _fmt(x, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _varying(records: list[dict], fields=("B", "N", "H", "dtype")) -> list[str]:
    return [f for f in fields if len({r.get(f) for r in records if r.get("family") != "ceiling"}) > 1]


def measurement_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the measurement table (ok and error rows; skips are summarised separately)."""
    shown = [r for r in records if r.get("status") != "skipped"]
    extra = _varying(shown)
    header = [
        "mode",
        "causal",
        *extra,
        "T",
        "impl",
        "median ms",
        "IQR ms",
        "runs",
        "GFLOP/s",
        "% ceil",
        "compile s",
        "peak MiB",
        "backend / error",
    ]
    order = {m: i for i, m in enumerate(MODES)}
    ceilings = [r for r in shown if r.get("family") == "ceiling"]
    rest = sorted(
        (r for r in shown if r.get("family") != "ceiling"),
        key=lambda r: (
            order.get(r["mode"], 9),
            r["causal"],
            r.get("window") or 0,
            *(str(r.get(f)) for f in extra),
            r["T"],
            r["impl"],
        ),
    )
    rows = []
    for r in ceilings + rest:
        ok = r.get("status") == "ok"
        is_ceiling = r.get("family") == "ceiling"
        rows.append(
            [
                "GEMM ceiling" if is_ceiling else r["mode"],
                "" if is_ceiling else _mask_label(r),
                *(str(r.get(f)) for f in extra),
                f"n={r.get('gemm_n')}" if is_ceiling else str(r["T"]),
                r["impl"],
                _fmt(_ms(r.get("median_s")), ".3f") if ok else "-",
                _fmt(_ms(r.get("iqr_s")), ".3f") if ok else "-",
                str(r.get("n_runs", "-")),
                _fmt(r.get("gflops"), ".1f"),
                _fmt(r.get("pct_of_ceiling"), ".0f"),
                _fmt(r.get("compile_s"), ".2f"),
                _fmt(r["peak_mem_bytes"] / 2**20, ".0f") if r.get("peak_mem_bytes") else "-",
                r.get("backend", "")[:80]
                if ok
                else f"ERROR ({r.get('error_kind')}): {r.get('error', '')[:120]}",
            ]
        )
    return header, rows


def speedup_rows(ratios: list[dict]) -> tuple[list[str], list[list[str]]]:
    extra = _varying(ratios)
    header = [
        "family",
        "mode",
        "causal",
        *extra,
        "T",
        "jax_attn ms",
        "best torch",
        "best torch ms",
        "speedup vs best",
        "torch_attn ms",
        "speedup vs torch_attn",
    ]
    rows = [
        [
            s["family"],
            s["mode"],
            _mask_label(s),
            *(str(s.get(f)) for f in extra),
            str(s["T"]),
            _fmt(s["jax_ms"], ".3f"),
            s["best_torch_impl"],
            _fmt(s["best_torch_ms"], ".3f"),
            _fmt(s["speedup_vs_best_torch"], ".2f") + "×",
            _fmt(s["torch_attn_ms"], ".3f"),
            (_fmt(s["speedup_vs_torch_attn"], ".2f") + "×") if s["speedup_vs_torch_attn"] else "-",
        ]
        for s in ratios
    ]
    return header, rows


def speedup_pivot(
    ratios: list[dict], families: list[str] | None = None
) -> tuple[list[str], list[list[str]], int]:
    """The headline: one row per family × mode × causality (× whatever else varies), one column per
    sequence length, each cell ``vs fastest torch | vs eager twin``; families in the order given (else
    as they come). Returns (header, rows, number of label columns)."""
    if families:
        rank = {f: i for i, f in enumerate(families)}
        ratios = sorted(ratios, key=lambda s: rank.get(s["family"], len(rank)))
    Ts = sorted({s["T"] for s in ratios})
    extra = [f for f in ("dtype", "N", "H") if len({s.get(f) for s in ratios}) > 1]
    # B joins the row key only if one row would otherwise hold two batch sizes at one T (on GPU presets
    # B is a function of T, one per column)
    cell_Bs: dict[tuple, set] = {}
    for s in ratios:
        k = (s["family"], s["mode"], s["causal"], *(s.get(f) for f in extra), s["T"])
        cell_Bs.setdefault(k, set()).add(s["B"])
    if any(len(b) > 1 for b in cell_Bs.values()):
        extra.append("B")
    rows: dict[tuple, dict[int, dict]] = {}
    for s in ratios:
        k = (s["family"], s["mode"], "causal" if s["causal"] else "full", *(str(s.get(f)) for f in extra))
        rows.setdefault(k, {})[s["T"]] = s
    header = ["family", "mode", "causal", *extra, *(f"T={T}" for T in Ts)]

    def cell(s):
        if s is None:
            return "-"
        twin = s.get("speedup_vs_torch_attn")
        return f"{_fmt(s['speedup_vs_best_torch'], '.2f')} | {_fmt(twin, '.2f') if twin else '-'}"

    out = [[*k, *(cell(cells.get(T)) for T in Ts)] for k, cells in rows.items()]
    return header, out, 3 + len(extra)


def skip_summary(records: list[dict]) -> list[tuple[str, str, int]]:
    """(impl, reason, number of rows) for skipped rows."""
    counts: dict[tuple[str, str], int] = {}
    for r in records:
        if r.get("status") == "skipped":
            k = (r["impl"], r.get("reason", ""))
            counts[k] = counts.get(k, 0) + 1
    return [(i, why, n) for (i, why), n in counts.items()]


# ------------------------------------------------------------------------------------------- files


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    recs = doc["records"]
    first = next((r for r in recs if r.get("device_name")), {})
    v = doc.get("versions", {})
    threads = {r["framework"]: r.get("threads") for r in recs if r.get("threads")}
    lines = [
        f"# Benchmark: preset `{doc['preset']}` on {doc['device']}",
        "",
        f"- run `{doc['run_id']}`, wall time {doc['wall_s']:.1f} s",
        f"- device: {first.get('device_name')} ({first.get('platform')})",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        "- threads: " + "; ".join(f"{fw}: {t}" for fw, t in threads.items()),
        "- precision: "
        + "; ".join(
            f"{r['framework']}: {r.get('precision')}" for r in {r["framework"]: r for r in recs}.values()
        ),
        f"- timing: {doc['timing_settings']}",
        _rounds_note(doc),
        _load_note(recs),
        "- FLOPs: attention 4·B·N·T·S·H (causal credited half), backward 2.5× forward, "
        "projections 2·B·T·E·E per linear; speedup = torch time / jax_attn time (> 1: jax_attn faster)",
        "",
        "## Speed ratios (jax_attn under jax.jit vs torch)",
        "",
        _md_table(*speedup_rows(doc["ratios"])),
        "",
        "## Measurements",
        "",
        _md_table(*measurement_rows(recs)),
        "",
    ]
    skips = skip_summary(recs)
    not_run = doc.get("not_run", [])
    if skips or not_run:
        lines += ["## Not measured", ""]
        lines += [f"- `{i}`: {why} ({n} rows)" for i, why, n in skips]
        lines += [f"- `{n['impl']}`: {n['reason']}" for n in not_run]
        lines.append("")
    return "\n".join(lines)


def _rounds_note(doc: dict) -> str:
    rounds = doc.get("config", {}).get("rounds", 1)
    if rounds <= 1:
        return "- rounds: 1 (each framework's rows measured in one pass)"
    return (
        f"- rounds: {rounds}, the frameworks taking turns (jax, torch, jax, …); each row shows its median "
        "round (`round_median_s` in bench.json lists them all)"
    )


def _load_note(recs: list[dict]) -> str:
    loads = [r["load_avg_1m"] for r in recs if r.get("load_avg_1m") is not None]
    cpus = max((len((r.get("threads") or {}).get("affinity") or []) for r in recs), default=0)
    if not loads:
        return "- load average: not recorded"
    note = f"- 1-minute load average during the rows: {min(loads):.1f} to {max(loads):.1f}"
    if cpus and max(loads) > cpus + 0.5:
        note += (
            f" (above the {cpus} pinned CPUs: other processes competed for the cores; CPU timings are noisy)"
        )
    return note


def write_all(doc: dict, out_dir: Path, json_too: bool = True) -> dict[str, Path]:
    """Write bench.json, bench.md, bench.png (the lines a reader compares), bench_all.png (every
    implementation) and bench_ratio.png into ``out_dir``; returns their paths. ``json_too=False``
    re-renders the rest from an existing bench.json (``python -m compare report``)."""
    from compare import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc.setdefault("ratios", speedups(doc["records"]))
    paths = {
        k: out_dir / f
        for k, f in (
            ("json", "bench.json"),
            ("md", "bench.md"),
            ("png", "bench.png"),
            ("all_png", "bench_all.png"),
            ("ratio_png", "bench_ratio.png"),
        )
    }
    if json_too:
        atomic_write(paths["json"], lambda p: p.write_text(json.dumps(doc, indent=1, default=str)))
    else:
        del paths["json"]
    atomic_write(paths["md"], lambda p: p.write_text(markdown(doc)))
    plots.plot_throughput(doc, paths["png"], only_headline=True)
    plots.plot_throughput(doc, paths["all_png"], only_headline=False)
    plots.plot_ratio(doc, paths["ratio_png"])
    return paths
