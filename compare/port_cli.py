"""``python -m compare port DIR [--prompt TEXT ...] [--max-new-tokens N] [--dtype ...] [--out FOLDER]``: the
ports of a local Hugging Face checkpoint checked inside its own model on real prompts
(``compare.port_model``); ``--layer N [--seed S]``: one attention layer on random inputs, with gradients and
decode (``compare.port_hf.check_hf_port``).

The JAX side is ``jax_attn.hf.load_layer(DIR, N)`` (NumPy reads of config.json and the safetensors, no torch)
when ``--dtype`` is the checkpoint's, else ``jax_attn.hf.from_hf`` of the cast module; transformers' side is
the layer of ``AutoModel.from_pretrained(DIR)``. Prints the table, writes ``port.json`` and ``port.md``.
Exit status as ``agree``: 0 all agree, 1 a disagreement, 2 bad arguments (no checkpoint, unsupported knob).
"""

from __future__ import annotations

import json
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "port",
        help="check the ports of a local Hugging Face checkpoint: inside the model on real prompts "
        "(default), or one layer on random inputs (--layer N)",
    )
    p.add_argument(
        "dir", nargs="?", help="checkpoint folder (config.json + safetensors, e.g. from save_pretrained)"
    )
    p.add_argument(
        "--families",
        action="store_true",
        help="no checkpoint: port a tiny layer of every model_type of the installed transformers and print "
        "the coverage table (ported with its worst error vs transformers, or refused with the knob)",
    )
    p.add_argument(
        "--write-docs",
        metavar="MD",
        nargs="?",
        const="docs/porting.md",
        default=None,
        help="with --families: also write the table into MD between its markers (default docs/porting.md)",
    )
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="check this one layer on random inputs, with gradients and decode (default: the whole model on "
        "real prompts)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        help="a prompt (repeat for several: one padded batch); default: three built-in prompts of ~60 to "
        "~420 tokens",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=16, help="greedy tokens compared end to end (default 16)"
    )
    p.add_argument("--dtype", choices=DTYPES, help="cast the model to this dtype (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (--layer)")
    p.add_argument("--out", help="folder for the report files (default reports/<timestamp>/)")
    p.set_defaults(func=cmd_port)


def load_hf_layer(checkpoint_dir, layer: int, dtype: str | None = None):
    """``(attention module, model)`` of layer ``layer`` of ``AutoModel.from_pretrained(checkpoint_dir)``."""
    import torch
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report and progress bars are not ours to print
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(str(checkpoint_dir), attn_implementation="eager")
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    from compare.port_hf import attention_of

    return attention_of(model.eval(), layer), model


def markdown(record) -> str:
    lines = [
        f"# port check: {record.module} ({record.dtype})",
        "",
        f"**{record.verdict()}**",
        "",
        f"family `{record.kind.removeprefix('hf:')}`; "
        f"weights round trip bit-exact: {record.round_trip_bit_exact}. "
        "Each implementation against the float64 reference, and each port against the original module, "
        "with the tolerance policy of `compare/tolerance.py`.",
        "",
        "| pair | quantity | max abs | tol | ok |",
        "|---|---|---|---|---|",
    ]
    for pair, rows in record.agreements.items():
        lines += [
            f"| {pair} | {a.quantity} | {a.max_abs:.2e} | {a.tol:.1e} | {'ok' if a.ok else 'FAIL'} |"
            for a in rows
        ]
    return "\n".join(lines) + "\n"


def cmd_port(args) -> int:
    from compare.port_mla import cmd_port_mla, is_mla_checkpoint

    if args.families:
        return cmd_port_families(args)
    if args.dir is None:
        from rich.console import Console

        Console().print("[red]compare port: give a checkpoint folder, or --families[/red]")
        return 2
    if is_mla_checkpoint(args.dir):  # multi-head latent attention: compare.port_mla
        return cmd_port_mla(args)
    if args.layer is None:
        return cmd_port_model(args)
    from rich.console import Console
    from rich.markup import escape

    from attn_spec import hf as spec
    from compare import report
    from compare.port_hf import check_hf_port, producer_of

    console = Console()
    folder = Path(args.dir)
    try:
        if not (folder / "config.json").exists():
            raise ValueError(f"no config.json in {folder}")
        import jax_attn.hf as jhf

        _, c, _, ck_dtype = spec.read_layer(folder, args.layer)
        module, model = load_hf_layer(folder, args.layer, args.dtype)
        family = spec.family_of(
            spec.text_config(module.config if hasattr(module, "config") else module.self.config)
        )
        same = args.dtype in (None, ck_dtype)
        jax_port = jhf.load_layer(folder, args.layer, implementation="math") if same else None
        # A key/value-shared layer (Gemma 4) is checked with the layer whose keys and values it reads.
        producer = producer_of(model, args.layer) if c.kv_shared else None
        record = check_hf_port(
            module,
            seed=args.seed,
            post_norm_outside=family == "bert",
            jax_port=jax_port,
            print_table=False,
            producer=producer,
        )
    except (ValueError, OSError) as err:
        console.print(f"[red]compare port: {escape(str(err))}[/red]")
        return 2
    line = f"layer {args.layer} of {folder}: {record.verdict()}"
    style = "bold green" if record.ok else "bold red"
    console.print(f"[{style}]{escape(line)}[/{style}]", soft_wrap=True)
    console.print(record.table())
    out = Path(args.out) if args.out else report.new_report_dir()
    out.mkdir(parents=True, exist_ok=True)
    data = {"checkpoint": str(folder), "layer": args.layer, "jax_port": "load_layer" if same else "from_hf"}
    data.update(record.as_dict())
    data["verdict"] = record.verdict()
    report.write_atomic(out / "port.json", json.dumps(data, indent=1, default=str))
    report.write_atomic(out / "port.md", markdown(record))
    console.print(f"wrote {out / 'port.json'} and {out / 'port.md'}")
    console.print(f"[{style}]{escape(line)}[/{style}]", soft_wrap=True)
    return 0 if record.ok else 1


def cmd_port_model(args) -> int:
    """The port checked inside the model (``compare.port_model``): verdict, per-layer table, end-to-end table,
    files, verdict again."""
    from rich.console import Console
    from rich.markup import escape

    from compare import port_model, report

    console = Console()
    if args.max_new_tokens < 0:
        console.print("[red]compare port: --max-new-tokens must be >= 0[/red]")
        return 2
    status = console.status("") if console.is_terminal else None
    try:
        if status is not None:
            status.start()
        record = port_model.check_model(
            args.dir,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            dtype=args.dtype,
            progress=(lambda msg: status.update(msg)) if status is not None else None,
        )
    except (ValueError, OSError) as err:
        console.print(f"[red]compare port: {escape(str(err))}[/red]")
        return 2
    finally:
        if status is not None:
            status.stop()
    line = f"{args.dir}: {record.verdict()}"
    style = "bold green" if record.ok else "bold red"
    console.print(f"[{style}]{escape(line)}[/{style}]", soft_wrap=True)
    console.print(port_model.layer_table(record))
    console.print(port_model.e2e_table(record))
    out = Path(args.out) if args.out else report.new_report_dir()
    out.mkdir(parents=True, exist_ok=True)
    report.write_atomic(out / "port_model.json", json.dumps(record.as_dict(), indent=1, default=str))
    report.write_atomic(out / "port_model.md", port_model.markdown(record))
    port_model.plot(record, out / "port_model.png")
    console.print(f"wrote {out}/port_model.json, port_model.md, port_model.png")
    console.print(f"[{style}]{escape(line)}[/{style}]", soft_wrap=True)
    return 0 if record.ok else 1


def cmd_port_families(args) -> int:
    """``compare port --families``: the coverage table over the installed transformers
    (``compare.port_hf.coverage_table``), printed and written to ``port_families.md`` / ``.json``; exit 1
    when a family that ports disagrees with transformers."""
    from rich.console import Console

    from compare import port_hf, report

    console = Console()
    dtypes = (args.dtype or "float32",)
    rows, md = port_hf.coverage_table(dtypes=dtypes)
    bad = [r["model_type"] for r in rows if r["ok"] is False]
    ported = sum(r["status"].startswith("ported") for r in rows)
    line = (
        f"{'ALL AGREE' if not bad else 'DISAGREE'}: {ported} of {len(rows)} model_types port "
        f"({dtypes[0]}){'' if not bad else '; disagreeing with transformers: ' + ', '.join(bad)}"
    )
    style = "bold green" if not bad else "bold red"
    console.print(f"[{style}]{line}[/{style}]", soft_wrap=True)
    console.print(md, soft_wrap=True, markup=False)
    out = Path(args.out) if args.out else report.new_report_dir()
    out.mkdir(parents=True, exist_ok=True)
    report.write_atomic(out / "port_families.md", md)
    report.write_atomic(out / "port_families.json", json.dumps(rows, indent=1, default=str))
    console.print(f"wrote {out}/port_families.md and port_families.json")
    if args.write_docs:
        port_hf.write_coverage_docs(md, args.write_docs)
        console.print(f"wrote the table into {args.write_docs}")
    console.print(f"[{style}]{line}[/{style}]", soft_wrap=True)
    return 1 if bad else 0
