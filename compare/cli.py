"""Command-line interface of ``python -m compare``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from compare import vectors as vectors_mod

console = Console(stderr=False)


def _progress(label: str):
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    )


def cmd_vectors(args) -> int:
    directory = Path(args.dir)
    with _progress("vectors") as bar:
        task = bar.add_task("", total=len(vectors_mod.all_cases()))

        def tick(done, total, name):
            bar.update(task, completed=done, description=name)

        try:
            if args.write:
                manifest = vectors_mod.write(directory, progress=tick)
                msg = f"wrote {len(manifest['cases'])} vectors to {directory}"
            else:
                names = vectors_mod.check(directory, progress=tick)
                msg = f"checked {len(names)} vectors in {directory}: all intact and equal to the oracle"
        except vectors_mod.VectorError as e:
            console.print(f"[red]vector check failed:[/red] {e}")
            return 1
    console.print(msg)
    return 0


def _select(args) -> list[str]:
    cases = vectors_mod.all_cases()
    names = [n for n in cases if (not args.case or any(s in n for s in args.case))]
    if args.dtype:
        names = [n for n in names if cases[n][1].dtype in args.dtype]
    return names


def cmd_agree(args) -> int:
    from compare import agree, env

    precision = env.pin_precision(framework_defaults=args.framework_defaults)
    names = _select(args)
    if not names:
        console.print("[red]no case matches the filters[/red]")
        return 2
    try:
        vecs = vectors_mod.load_all(Path(args.dir), names)
    except vectors_mod.VectorError as e:
        console.print(f"[red]vector load failed:[/red] {e}")
        return 1
    with _progress("agreement") as bar:
        task = bar.add_task("", total=len(vecs))
        records = agree.run(vecs, progress=lambda d, t, n: bar.update(task, completed=d, description=n))
    _print_summary(records)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"environment": env.environment(), "precision": precision, "records": records}, indent=1
            )
        )
        console.print(f"wrote {args.json}")
    bad = [r for r in records if not r["ok"]]
    for r in bad[:20]:
        detail = (
            r.get("error") or f"max_abs={r['max_abs']:.3e} > tol={r['tol']:.3e}, nonfinite={r['nonfinite']}"
        )
        console.print(f"[red]DISAGREE[/red] {r['case']} | {r['pair']} | {r.get('quantity')}: {detail}")
    return 1 if bad else 0


def _print_summary(records: list[dict]) -> None:
    table = Table(title="agreement (worst max-abs error / tolerance over cases)")
    for col in ("pair", "dtype", "cases", "forward", "gradients", "status"):
        table.add_column(col)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["pair"], r.get("dtype", "?")), []).append(r)
    for (pair, dtype), rs in sorted(groups.items()):

        def worst(quantities, rs=rs):
            xs = [r for r in rs if r.get("quantity") in quantities]
            if not xs:
                return "-"
            w = max(xs, key=lambda r: r["max_abs"] / r["tol"] if r["tol"] else 0.0)
            return f"{w['max_abs']:.2e} / {w['tol']:.1e}"

        ok = all(r["ok"] for r in rs)
        table.add_row(
            pair,
            dtype,
            str(len({r["case"] for r in rs})),
            worst(("out", "weights")),
            worst(("dq", "dk", "dv")),
            "[green]ok[/green]" if ok else "[red]FAIL[/red]",
        )
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compare", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("vectors", help="write or check the shared test vectors")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate tests/vectors from the registry")
    mode.add_argument("--check", action="store_true", help="verify hashes, recipes and oracle values")
    p.add_argument("--dir", default=str(vectors_mod.DEFAULT_DIR))
    p.set_defaults(func=cmd_vectors)

    p = sub.add_parser("agree", help="run every implementation on the vectors and compare")
    p.add_argument("--case", action="append", help="only cases whose name contains this (repeatable)")
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", help="write the records to this JSON file")
    p.add_argument(
        "--framework-defaults",
        action="store_true",
        help="leave each framework's default matmul precision instead of pinning fp32",
    )
    p.add_argument("--dir", default=str(vectors_mod.DEFAULT_DIR))
    p.set_defaults(func=cmd_agree)

    from compare.bench import cli as bench_cli

    bench_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["vectors", "--check"])
        status = cmd_vectors(args)
        args = parser.parse_args(["agree"])
        status = max(status, cmd_agree(args))
        # --- bench: the quick benchmark after the agreement (default run and report folder may be reshaped)
        args = parser.parse_args(["bench", "--quick"])
        status = max(status, args.func(args))
        # --- end bench
        return status
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
