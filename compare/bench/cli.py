"""``python -m compare bench``: the benchmark subcommand (``add_parser`` registers it, ``run`` runs it)."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from compare.bench import report, runner
from compare.bench.presets import PRESETS

console = Console()
if not console.is_terminal:  # logs and pipes: wide enough that the tables do not fold
    console = Console(width=200)


def default_out() -> Path:
    return Path("reports") / time.strftime("%Y%m%d-%H%M%S")


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``python -m compare`` subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark jax_attn (jit) against torch, one process per framework",
        description="Time every implementation on a sweep of shapes; write bench.json, bench.md, bench.png "
        "and bench_ratio.png. Exit 0 when the sweep ran (individual failures are recorded in their rows), "
        "1 when no measurement succeeded.",
    )
    p.add_argument("--quick", action="store_true", help="the quick preset (< 3 min on a 2-core CPU)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="quick (default), full, gpu, perf, flex (FlexAttention rows), smoke (harness check)",
    )
    p.add_argument("--out", type=Path, help="output folder (default reports/<timestamp>/)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=_default_threads(), help="threads per worker (CPU)")
    p.add_argument("--framework", action="append", choices=["jax", "torch"], help="only this framework")
    p.add_argument(
        "--impl", action="append", help="only implementations whose name contains this (repeatable)"
    )
    p.add_argument("--compile", action="store_true", help="also torch.compile torch_attn (slow on CPU)")
    p.add_argument(
        "--framework-defaults",
        action="store_true",
        help="leave each framework's default matmul precision (TF32 on GPU) instead of pinning fp32",
    )
    p.add_argument("--job-timeout", type=float, default=600.0, help="kill a worker silent this long (s)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the sweep this many times, frameworks taking turns; each row reports its median round "
        "(steadier ratios on a shared, noisy machine)",
    )
    p.add_argument("--extra-impls", action="append", default=[], help="module:ATTR, a tuple of Impl to add")
    p.add_argument(
        "--mesh",
        help="instead: the sharded MultiheadAttention on a data=D,model=M mesh vs one device (bench/mesh.py)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print every measurement as it lands, and the full measurement and speedup tables",
    )
    p.set_defaults(func=run)
    return p


def _row_line(r: dict) -> str:
    what = escape(r["impl"]) if r.get("family") == "ceiling" else f"{escape(r['impl'])}  {r['mode']} "
    if r.get("family") != "ceiling":
        mask = f"window {r['window']}" if r.get("window") else "causal" if r["causal"] else "full"
        what += f"{mask} B{r['B']} N{r['N']} T{r['T']} H{r['H']} {r['dtype']}"
    if r["status"] == "ok":
        return (
            f"[green]ok[/green]    {what}: {r['median_s'] * 1e3:.3f} ms (IQR {r['iqr_s'] * 1e3:.3f}, "
            f"n={r['n_runs']}) {r['gflops']:.1f} GFLOP/s"
            + (f", compile {r['compile_s']:.2f} s" if r.get("compile_s") is not None else "")
        )
    return f"[red]error[/red] {what}: {r.get('error_kind')}: {escape(str(r.get('error'))[:160])}"


def print_tables(doc: dict, con: Console | None = None) -> None:
    """The long tables (``--verbose``): every measurement and every speedup row."""
    con = con or console
    header, rows = report.measurement_rows(doc["records"])
    table = Table(title=f"benchmark ({doc['preset']}, {doc['device']})", show_lines=False)
    for h in header:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    con.print(table)
    header, rows = report.speedup_rows(doc["ratios"])
    table = Table(title="speedup of jax_attn (jit) = torch time / jax_attn time (> 1: JAX faster)")
    for h in header:
        table.add_column(h)
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    con.print(table)
    _print_skips(doc, con)


def _print_skips(doc: dict, con: Console) -> None:
    for impl, why, n in report.skip_summary(doc["records"]):
        con.print(f"[dim]skipped {escape(impl)} ({n} rows): {escape(why)}[/dim]")
    for n in doc.get("not_run", []):
        con.print(f"[dim]not run {escape(n['impl'])}: {escape(n['reason'])}[/dim]")


def print_headline(doc: dict, con: Console) -> None:
    """The speedup table, one row per family × mode × causality, one column per sequence length."""
    con.print(
        "speedup of jax_attn (jit) = torch time / jax time (> 1: JAX faster), "
        "vs the fastest torch | vs the eager torch_attn twin"
    )
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    families = list(dict.fromkeys(r.get("family") for r in doc["records"] if r.get("family") != "ceiling"))
    header, rows, n_labels = report.speedup_pivot(doc["ratios"], families)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < n_labels else "right")
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    con.print(table)


def print_summary(
    doc: dict, paths: dict, con: Console | None = None, verbose: bool = False, show_files: bool = True
) -> None:
    """The benchmark part of a report: the speedup headline (or, verbose, every table), failures, and
    where the full tables are."""
    con = con or console
    if verbose:
        print_tables(doc, con)
    else:
        print_headline(doc, con)
    errors = [r for r in doc["records"] if r.get("status") == "error"]
    for r in errors:
        con.print(_row_line(r), overflow="fold")
    if paths and show_files:
        folder = next(iter(paths.values())).parent
        con.print(
            f"bench: full tables in {folder}/bench.md; pictures bench.png, bench_all.png, bench_ratio.png"
        )


def run_sweep(args, con: Console | None = None, verbose: bool = False) -> tuple[int, dict | None, dict]:
    """Run the sweep and write its files: (exit status, ``bench.json`` document or None, paths)."""
    con = con or console
    if args.rounds < 1:
        con.print(f"[red]--rounds must be >= 1, got {args.rounds}[/red]")
        return 2, None, {}
    preset_name = "quick" if args.quick or not args.preset else args.preset
    device = runner.detect_device() if args.device == "auto" else args.device
    preset = PRESETS[preset_name](device)
    config = runner.BenchConfig(
        threads=args.threads,
        frameworks=tuple(args.framework or runner.FRAMEWORKS),
        impl_filter=tuple(args.impl or ()),
        options={"compile": bool(args.compile)},
        pin_precision=not args.framework_defaults,
        extra_impls=tuple(args.extra_impls),
        job_timeout_s=args.job_timeout,
        rounds=args.rounds,
    )
    out = Path(args.out) if args.out else default_out()
    what = (
        f"preset {preset.name} on {device}, {len(preset.cases)} cases, {config.threads} thread(s) per "
        f"worker, frameworks {', '.join(config.frameworks)}"
    )
    verbose = verbose or getattr(args, "verbose", False)
    t0 = time.perf_counter()
    if con.is_terminal:
        bar = Progress(
            TextColumn("bench"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=con,
            transient=True,
        )
    else:  # a log: one line for the phase, when it ends (and, verbose, one per measurement)
        bar = None
    with bar if bar is not None else contextlib.nullcontext():
        task = bar.add_task("starting workers", total=None) if bar else None

        def on_event(ev: dict) -> None:
            if ev["event"] == "record" and verbose and ev["record"]["status"] != "skipped":
                con.print(_row_line(ev["record"]))
            if bar is None:
                return
            if ev["event"] == "plan":
                bar.update(task, total=ev["total"])
            elif ev["event"] == "meta":
                bar.update(
                    task, description=f"{ev['framework']} worker up ({ev['meta'].get('import_s', 0):.1f} s)"
                )
            elif ev["event"] == "round":
                bar.update(task, description=f"round {ev['round']}/{ev['rounds']}: {ev['framework']}")
            elif ev["event"] == "start":
                bar.update(task, description=escape(ev["id"]))
            elif ev["event"] == "record":
                bar.advance(task)

        doc = runner.run_bench(preset, config, on_event)
    doc["ratios"] = report.speedups(doc["records"])
    paths = report.write_all(doc, out)
    elapsed = time.perf_counter() - t0
    ok = sum(r["status"] == "ok" for r in doc["records"])
    err = sum(r["status"] == "error" for r in doc["records"])
    skipped = sum(r["status"] == "skipped" for r in doc["records"])
    con.print(f"bench: {ok} measured, {err} failed, {skipped} skipped, in {elapsed:.0f} s; {what}")
    return (0 if ok else 1), doc, paths


def run(args) -> int:
    if getattr(args, "mesh", None):  # the sharded benchmark: its own process with D*M (emulated) devices
        from compare.bench import mesh

        try:
            mesh.parse_mesh(args.mesh)
        except ValueError as e:
            console.print(f"[red]{e}[/red]")
            return 2
        return mesh.main([args.mesh, str(Path(args.out) if args.out else default_out())])
    status, doc, paths = run_sweep(args, console)
    if doc is not None:
        print_summary(doc, paths, console, verbose=args.verbose)
    return status
