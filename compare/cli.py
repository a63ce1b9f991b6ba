"""Command-line interface of ``python -m compare``.

``python -m compare`` with no arguments is the main job: check the shared vectors, run the agreement
suite, and write the report folder (``reports/<timestamp>/``). Subcommands: ``vectors``, ``agree``.
Exit status: 0 when everything agrees within tolerance, 1 when anything does not, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from compare import report
from compare import train as train_mod
from compare import vectors as vectors_mod

# Wide enough for the tables when the output is a log file rather than a terminal.
console = Console(width=None if sys.stdout.isatty() else 150)


def _progress(label: str):
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    )


@contextlib.contextmanager
def phase(con: Console, label: str, total: int | None):
    """A phase of a run: a transient rich progress bar on a terminal, nothing in a log (the caller prints
    the phase's one result line). Yields ``tick(done, description, total=None)``."""
    if not con.is_terminal:
        yield lambda done, description="", total=None: None
        return
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=con,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=total)

        def tick(done, description="", total=None):
            if total is not None:
                bar.update(task, total=total)
            bar.update(task, completed=done, description=escape(str(description)))

        yield tick


def check_vectors(directory: Path, mode: str = "check") -> tuple[int, str]:
    """Check, write (``mode="write"``) or regenerate and compare (``mode="verify"``) the shared vectors;
    (exit status, what happened: one line, or one line per differing vector and a last line)."""
    with phase(console, "vectors", len(vectors_mod.all_cases())) as tick:
        progress = lambda d, t, n: tick(d, n)  # noqa: E731
        try:
            if mode == "write":
                manifest = vectors_mod.write(directory, progress=progress)
                return 0, f"vectors: wrote {len(manifest['cases'])} vectors to {directory}"
            if mode == "verify":
                problems = vectors_mod.verify_regenerate(directory, progress=progress)
                if problems:
                    lines = [f"[red]differs:[/red] {escape(str(p))}" for p in problems]
                    lines.append(
                        f"{len(problems)} regenerated vectors differ from {directory} beyond ulp noise"
                    )
                    return 1, "\n".join(lines)
                return 0, (
                    f"vectors: regenerated {len(vectors_mod.all_cases())}, equal to {directory} by value "
                    "(inputs bit-identical, expectations within a few ulp)"
                )
            names = vectors_mod.check(directory, progress=progress)
            return 0, f"vectors: checked {len(names)} in {directory}: intact, equal to the oracle by value"
        except vectors_mod.VectorError as e:
            return 1, f"[red]vector check failed:[/red] {escape(str(e))}"


def cmd_vectors(args) -> int:
    mode = "write" if args.write else "verify" if args.verify_regenerate else "check"
    status, line = check_vectors(Path(args.dir), mode)
    console.print(line)
    return status


def _select(args) -> list[str]:
    cases = vectors_mod.all_cases()
    names = [n for n in cases if (not args.case or any(s in n for s in args.case))]
    if args.kind:
        names = [n for n in names if cases[n][0] in args.kind]
    if args.dtype:
        names = [n for n in names if cases[n][1].dtype in args.dtype]
    return names


def run_agreement(args) -> tuple[int, list[dict] | None, dict]:
    """The agreement phase: (exit status, records or None on a usage/load error, context for the report
    files: environment, precision, device, seconds)."""
    from compare import agree, env

    try:
        device = env.select_device(args.device)
    except ValueError as e:
        console.print(f"[red]{escape(str(e))}[/red]")
        return 2, None, {}
    precision = env.pin_precision(framework_defaults=args.framework_defaults)
    names = _select(args)
    if not names:
        console.print("[red]no case matches the filters[/red]")
        return 2, None, {}
    try:
        vecs = vectors_mod.load_all(Path(args.dir), names)
    except vectors_mod.VectorError as e:
        console.print(f"[red]vector load failed:[/red] {escape(str(e))}")
        return 1, None, {}
    t0 = time.perf_counter()
    with phase(console, "agreement", len(vecs)) as tick:
        records = agree.run(
            vecs,
            progress=lambda d, t, n: tick(d, n),
            workers=_workers(args.workers, len(vecs), device["name"]),
            device=device["name"],
            framework_defaults=args.framework_defaults,
        )
    seconds = time.perf_counter() - t0
    c = report.counts(records)
    console.print(
        f"agreement: {c['checks']} checks over {c['cases']} cases in {seconds:.0f} s, "
        f"{c['failed_checks'] + c['errors']} failing"
    )
    ctx = {"environment": env.environment(), "precision": precision, "device": device, "seconds": seconds}
    return (0 if all(r["ok"] for r in records) else 1), records, ctx


def cmd_agree(args) -> int:
    if args.devices is not None:  # the sharded check: its own process with N (emulated) devices
        from compare import sharded_check

        return sharded_check.main(
            ["--devices", str(args.devices)] + (["--json", args.json] if args.json else [])
        )
    status, records, ctx = run_agreement(args)
    if records is None:
        return status
    written = []
    if args.out:
        written += report.write_agreement(
            Path(args.out), records, ctx["environment"], ctx["precision"], ctx["device"]["name"]
        )
    if args.json:
        doc = report.to_json(records, ctx["environment"], ctx["precision"], ctx["device"]["name"])
        doc["device_detail"] = ctx["device"]
        written.append(report.write_atomic(args.json, json.dumps(doc, separators=(",", ":")) + "\n"))
    print_agreement(console, records, verbose=args.verbose)
    if written:
        console.print("wrote " + ", ".join(str(p) for p in written))
    return status


def _matrix_cell(c: dict | None) -> str:
    if not c:
        return "-"
    bad = c["failed"] + c["errors"]
    if c["oracle"] is None:
        text = f"{c['errors']} raised" if c["errors"] else "n/a"
    else:
        text = report.fmt_ratio(c["oracle"])
        if c["pair_checks"]:
            text += f"  {c['pair_ok']}/{c['pair_checks']}"
    if c["not_applicable"] and c["oracle"] is not None:
        text += f" ({c['not_applicable']} n/a)"
    return f"[red]{text} ✗{bad}[/red]" if bad else text


def print_verdict(con: Console, ok: bool, line: str) -> None:
    con.print(f"[bold green]{line}[/bold green]" if ok else f"[bold red]{escape(line)}[/bold red]")


def print_agreement(con: Console, records: list[dict], verbose: bool = False, verdict: bool = True) -> None:
    """The agreement part of the terminal report: verdict, one compact matrix per kind (implementations
    × dtypes: worst error / tolerance against the oracle, pairwise checks passed / run), every failure in
    full, and the verdict again. ``verbose`` adds the long table of every pair × dtype."""
    ok, line = report.verdict(records)
    if verdict:
        print_verdict(con, ok, line)
    con.print(
        "per kind: worst error/tolerance against the oracle (1 = the tolerance line), then the "
        "implementation's pairwise checks passed/run"
    )
    for m in report.matrices(records):
        table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
        table.add_column(f"{m['kind']} ({m['cases']} cases)")
        for dt in m["dtypes"]:
            table.add_column(dt, justify="right")
        for impl in m["impls"]:
            table.add_row(escape(impl), *(_matrix_cell(m["cells"][impl].get(dt)) for dt in m["dtypes"]))
        con.print(table)
    if verbose:
        _print_long_summary(con, records)
    bad = report.failures(records)
    if bad:
        con.print(f"[red]FAILURES: {len(bad)}, each in full:[/red]")
        for r in bad:
            con.print(f"[red]FAIL[/red] {escape(report.failure_line(r))}", overflow="fold")
    if verdict:
        print_verdict(con, ok, line)


def _print_long_summary(con: Console, records: list[dict]) -> None:
    table = Table(title="agreement: worst max-abs error / tolerance (worst case:quantity)")
    for col in ("kind", "pair", "dtype", "cases", "forward", "gradients", "status"):
        table.add_column(col, overflow="fold")
    for row in report.summarize(records):
        cells = []
        for label in ("forward", "gradients"):
            w = row.get(label)
            cells.append(f"{w['max_abs']:.1e} / {w['tol']:.0e} ({w['case']}:{w['quantity']})" if w else "-")
        status = "[green]ok[/green]" if not row["failures"] else f"[red]{row['failures']} FAIL[/red]"
        table.add_row(row["kind"], escape(row["pair"]), row["dtype"], str(row["cases"]), *cells, status)
    con.print(table)


def cmd_report(args) -> int:
    """Re-render a report folder's Markdown and pictures from its JSON (old schemas too)."""
    try:
        paths = report.rerender(Path(args.folder))
    except (FileNotFoundError, ValueError, KeyError) as e:
        console.print(f"[red]cannot re-render {escape(args.folder)}: {escape(str(e))}[/red]")
        return 2
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_train(args) -> int:
    from attn_spec.gpt import GPTConfig

    train = train_mod

    try:
        model_config = GPTConfig(n_layer=args.layers, n_kv_head=args.kv_heads, tie_weights=not args.untied)
        cfg = train.TrainConfig(
            steps=args.steps,
            lr=args.lr,
            weight_decay=args.weight_decay,
            clip_norm=None if args.no_clip else args.clip_norm,
            seed=args.seed,
            mismatch=args.mismatch,
        )
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        return 2
    folder = Path(args.out) if args.out else report.new_report_dir()
    table = Table(title="training-step agreement: jax (jit + optax) vs torch (eager + torch.optim)")
    for col in (
        "step",
        "loss jax",
        "loss torch",
        "|Δloss|/loss",
        "grad norm jax",
        "grad norm torch",
        "max |Δparam|",
    ):
        table.add_column(col, justify="right")
    with _progress("training") as bar:
        task = bar.add_task("", total=cfg.steps)

        def tick(done, total, row):
            bar.update(task, completed=done, description=f"loss {row['loss_torch']:.4f}")
            if row["step"] % 10 == 0 or done == total:
                table.add_row(
                    str(row["step"]),
                    f"{row['loss_jax']:.6f}",
                    f"{row['loss_torch']:.6f}",
                    f"{row['loss_rel_diff']:.1e}",
                    f"{row['grad_norm_jax']:.5f}",
                    f"{row['grad_norm_torch']:.5f}",
                    f"{row['param_max_abs_diff']:.1e}",
                )

        record = train.run(model_config, cfg, progress=tick)
    console.print(table)
    report.write_atomic(folder / "train.json", json.dumps(record, indent=1) + "\n")
    train.plot(record, folder / "train.png")
    verdict = "[green]paths agree[/green]" if record["ok"] else "[red]PATHS DIVERGE[/red]"
    console.print(
        f"{verdict}: worst loss rel diff {record['worst_loss_rel_diff']:.2e} (tol {train.LOSS_RTOL:g}), "
        f"final max param diff {record['final_param_max_abs_diff']:.2e} (tol {train.PARAM_ATOL:g}; "
        f"zero-gradient key biases {record['final_zero_grad_param_max_abs_diff']:.2e}, "
        f"tol {train.ZERO_GRADIENT_ATOL:g}), "
        f"{record['seconds']:.1f} s; wrote {folder / 'train.json'} and {folder / 'train.png'}"
    )
    if record["mismatch_description"]:
        console.print(f"deliberate mismatch: {record['mismatch_description']}")
    return 0 if record["ok"] else 1


def _workers(requested: int | None, n_vectors: int, device: str = "cpu") -> int:
    """``--workers`` as given; by default, on CPU, the CPUs (at most 4) once there are enough vectors to
    repay starting the workers (each imports JAX and torch, a few seconds), else this process. On an
    accelerator one process: each worker would claim the device's memory (JAX preallocates 75%)."""
    if requested is not None:
        return max(1, requested)
    if device != "cpu":
        return 1
    return _default_workers() if n_vectors >= MIN_VECTORS_FOR_WORKERS else 1


MIN_VECTORS_FOR_WORKERS = 16


def _default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


def _add_agree_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--case", action="append", help="only cases whose name contains this (repeatable)")
    p.add_argument("--kind", action="append", help="only vectors of this kind (sdpa, …; repeatable)")
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", choices=["cpu", "gpu", "tpu"], help="default: the best available")
    p.add_argument(
        "--framework-defaults",
        action="store_true",
        help="leave each framework's default matmul precision (TF32 etc.) instead of pinning full fp32",
    )
    p.add_argument("--dir", default=str(vectors_mod.DEFAULT_DIR), help="vector folder")
    p.add_argument("--verbose", action="store_true", help="also the long table of every pair and dtype")
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes that run vectors side by side (XLA compiles are most of the run on CPU and "
        "one process keeps about 1.5 cores busy); default on CPU: the CPUs available, at most 4, from "
        f"{MIN_VECTORS_FOR_WORKERS} vectors on; on a GPU/TPU and with 1: in this process",
    )
    p.add_argument("--threads", dest="workers", type=int, help=argparse.SUPPRESS)  # the old name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compare",
        description="Attention across frameworks: agreement report (default: all of it, into reports/).",
    )
    parser.add_argument("--out", help="report folder for the default run (default reports/<timestamp>/)")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="the long tables: every pair × dtype, every benchmark measurement, every speedup row",
    )
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("vectors", help="write or check the shared test vectors")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--write",
        action="store_true",
        help="regenerate tests/vectors from the registry (a file whose values agree with the new ones by "
        "value, as in --check, is kept byte for byte)",
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="verify each file's sha256 against the manifest (corruption, tampering), then regenerate "
        "every case in memory and judge it by value: inputs bit-identical, oracle expectations within "
        f"{vectors_mod.ULPS} ulp of the array's scale, widened by {vectors_mod.ULPS}x what one-ulp input "
        "noise moves them in the oracle "
        "(float64 BLAS results differ by a few ulp across CPUs, so hashes of regenerated files may not)",
    )
    mode.add_argument(
        "--verify-regenerate",
        action="store_true",
        help="write the whole set afresh into a temporary folder, as --write would from scratch, and "
        "compare it with the committed one by value (manifest fields but sha256, and every array)",
    )
    p.add_argument("--dir", default=str(vectors_mod.DEFAULT_DIR))
    p.set_defaults(func=cmd_vectors)

    p = sub.add_parser("agree", help="run every implementation on the vectors and compare")
    _add_agree_arguments(p)
    p.add_argument("--json", help="also write the records to this JSON file")
    p.add_argument("--out", help="write agreement.json and agreement.md into this folder")
    p.add_argument(
        "--devices",
        type=int,
        help="instead: sharded JAX (meshes 1xN, 2xN/2, Nx1) vs one device vs torch (compare.sharded_check)",
    )
    p.set_defaults(func=cmd_agree)

    p = sub.add_parser("train", help="train the same tiny GPT with optax and torch.optim and compare paths")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--no-clip", action="store_true", help="no gradient clipping on either side")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA: key/value heads (default: all 4)")
    p.add_argument("--untied", action="store_true", help="separate output head instead of tied embeddings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mismatch",
        choices=sorted(train_mod.MISMATCHES),
        help="introduce a deliberate difference on the torch side (to see it detected)",
    )
    p.add_argument("--out", help="folder for train.json and train.png (default reports/<timestamp>/)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "report", help="re-render a report folder's Markdown and pictures from its JSON (old formats too)"
    )
    p.add_argument("folder", help="a report folder, e.g. reports/<timestamp>/")
    p.set_defaults(func=cmd_report)

    from compare.bench import cli as bench_cli

    bench_cli.add_parser(sub)
    from compare import port_cli

    port_cli.add_parser(sub)
    return parser


def run_default(args) -> int:
    """The main job: vectors check, agreement suite, quick benchmark, all into one report folder; then
    the report: verdict, one matrix per kind, every failure, the speedup table, verdict again."""
    from compare.bench import cli as bench_cli

    t0 = time.perf_counter()
    folder = Path(args.out) if args.out else report.new_report_dir()
    console.print(f"main job: vectors check, agreement, quick benchmark → {folder}/")
    parser = build_parser()
    vec_status, vec_line = check_vectors(vectors_mod.DEFAULT_DIR)
    console.print(vec_line)
    agree_args = parser.parse_args(["agree"])
    agree_status, records, ctx = run_agreement(agree_args)
    written = []
    if records is not None:
        written = report.write_agreement(
            folder, records, ctx["environment"], ctx["precision"], ctx["device"]["name"]
        )
    bench_args = parser.parse_args(["bench", "--quick", "--out", str(folder)])
    bench_status, doc, bench_paths = bench_cli.run_sweep(bench_args, console, verbose=args.verbose)
    status = max(vec_status, agree_status, bench_status)

    ok, line = report.verdict(records) if records is not None else (False, "agreement did not run")
    ok = ok and status == 0
    if ok:
        line = f"{line}; vectors intact; benchmark measured"
    elif vec_status or bench_status:
        line = f"{line}; " + "; ".join(
            what
            for bad, what in ((vec_status, "VECTOR CHECK FAILED"), (bench_status, "BENCHMARK FAILED"))
            if bad
        )
    if console.is_terminal:  # in a log the verdict line itself separates the phases from the summary
        console.rule()
    print_verdict(console, ok, line)
    if records is not None:
        print_agreement(console, records, verbose=args.verbose, verdict=False)
    if doc is not None:
        bench_cli.print_summary(doc, bench_paths, console, verbose=args.verbose, show_files=False)
    names = [p.name for p in [*written, *bench_paths.values()]]
    files = ", ".join(n for n in names if not n.endswith(".png"))
    pictures = sum(n.endswith(".png") for n in names)
    console.print(
        f"report in {folder}/ after {time.perf_counter() - t0:.0f} s: {files} and {pictures} pictures"
    )
    print_verdict(console, ok, line)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        return run_default(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
