"""Command-line interface of ``python -m compare``.

``python -m compare`` with no arguments is the main job: check the shared vectors, run the agreement
suite, and write the report folder (``reports/<timestamp>/``). Subcommands: ``vectors``, ``agree``.
Exit status: 0 when everything agrees within tolerance, 1 when anything does not, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
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
    if args.kind:
        names = [n for n in names if cases[n][0] in args.kind]
    if args.dtype:
        names = [n for n in names if cases[n][1].dtype in args.dtype]
    return names


def cmd_agree(args) -> int:
    if args.devices is not None:  # the sharded check: its own process with N (emulated) devices
        from compare import sharded_check

        return sharded_check.main(
            ["--devices", str(args.devices)] + (["--json", args.json] if args.json else [])
        )
    from compare import agree, env

    try:
        device = env.select_device(args.device)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        return 2
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
    environment = env.environment()
    folder = Path(args.out) if args.out else None
    if folder is not None:
        for path in report.write_agreement(folder, records, environment, precision, device["name"]):
            console.print(f"wrote {path}")
    if args.json:
        report.write_atomic(
            args.json,
            json.dumps(
                {"environment": environment, "precision": precision, "device": device, "records": records},
                indent=1,
            ),
        )
        console.print(f"wrote {args.json}")
    bad = [r for r in records if not r["ok"]]
    for r in bad[:30]:
        detail = (
            r.get("error") or f"max_abs={r['max_abs']:.3e} > tol={r['tol']:.3e}, nonfinite={r['nonfinite']}"
        )
        console.print(f"[red]DISAGREE[/red] {r['case']} | {r['pair']} | {r.get('quantity')}: {detail}")
    if len(bad) > 30:
        console.print(f"[red]… and {len(bad) - 30} more disagreements (see the report)[/red]")
    return 1 if bad else 0


def _print_summary(records: list[dict]) -> None:
    table = Table(title="agreement: worst max-abs error / tolerance (worst case:quantity)")
    for col in ("kind", "pair", "dtype", "cases", "forward", "gradients", "status"):
        table.add_column(col, overflow="fold")
    for row in report.summarize(records):
        cells = []
        for label in ("forward", "gradients"):
            w = row.get(label)
            cells.append(f"{w['max_abs']:.1e} / {w['tol']:.0e}" if w else "-")
        status = "[green]ok[/green]" if not row["failures"] else f"[red]{row['failures']} FAIL[/red]"
        table.add_row(row["kind"], row["pair"], row["dtype"], str(row["cases"]), *cells, status)
    console.print(table)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compare",
        description="Attention across frameworks: agreement report (default: all of it, into reports/).",
    )
    parser.add_argument("--out", help="report folder for the default run (default reports/<timestamp>/)")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("vectors", help="write or check the shared test vectors")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate tests/vectors from the registry")
    mode.add_argument("--check", action="store_true", help="verify hashes, recipes and oracle values")
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

    from compare.bench import cli as bench_cli

    bench_cli.add_parser(sub)
    from compare import port_cli

    port_cli.add_parser(sub)
    return parser


def run_default(args) -> int:
    """The main job: vectors check, agreement suite, quick benchmark, all into one report folder."""
    folder = Path(args.out) if args.out else report.new_report_dir()
    console.rule(f"report folder: {folder}")
    parser = build_parser()
    status = cmd_vectors(parser.parse_args(["vectors", "--check"]))
    status = max(status, cmd_agree(parser.parse_args(["agree", "--out", str(folder)])))
    bench_args = parser.parse_args(["bench", "--quick", "--out", str(folder)])
    status = max(status, bench_args.func(bench_args))
    console.rule(f"{'all agree' if status == 0 else 'DISAGREEMENTS'}; report in {folder}")
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        return run_default(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
