"""Report files: the agreement report (``agreement.json``, ``agreement.md``) and the report folder.

Every file is written to a temporary name in its folder and moved into place with ``os.replace``, so an
interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path

from compare.tolerance import policy_table


def new_report_dir(root: str | Path = "reports", stamp: str | None = None) -> Path:
    """``reports/<UTC timestamp>/``, created (a suffix is added if it already exists)."""
    stamp = stamp or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def write_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def is_gradient(quantity: str) -> bool:
    """Gradient quantities are named ``d<input>`` (sdpa, mha) or ``grad_<name>`` (causal)."""
    return quantity.startswith(("d", "grad_"))


def summarize(records: list[dict]) -> list[dict]:
    """One row per (kind, pair, dtype): cases, worst forward and gradient error relative to tolerance."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("skipped"):
            continue
        groups.setdefault((r.get("kind", "sdpa"), r["pair"], r.get("dtype", "?")), []).append(r)
    rows = []
    for (kind, pair, dtype), rs in sorted(groups.items()):
        row = {
            "kind": kind,
            "pair": pair,
            "dtype": dtype,
            "cases": len({r["case"] for r in rs}),
            "checks": len(rs),
            "failures": sum(not r["ok"] for r in rs),
        }
        for label, is_grad in (("forward", False), ("gradients", True)):
            xs = [r for r in rs if "max_abs" in r and is_gradient(r["quantity"]) == is_grad]
            if xs:
                w = max(xs, key=lambda r: r["max_abs"] / r["tol"] if r["tol"] else float("inf"))
                row[label] = {
                    "max_abs": w["max_abs"],
                    "tol": w["tol"],
                    "case": w["case"],
                    "quantity": w["quantity"],
                }
        rows.append(row)
    return rows


def _fmt(x: float) -> str:
    return f"{x:.2e}"


def agreement_markdown(records: list[dict], environment: dict, precision: dict, device: str) -> str:
    """A report a person can read on its own: where it ran, with what, the policy, and the results."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    failures = [r for r in records if not r["ok"]]
    skipped = [r for r in records if r.get("skipped")]
    records = [r for r in records if not r.get("skipped")]
    lines = [
        "# Agreement report",
        "",
        f"Generated {now}. **{'ALL AGREE' if not failures else f'{len(failures)} DISAGREEMENTS'}** "
        f"({len(records)} checks over {len({r['case'] for r in records})} cases).",
        "",
        "Every implementation is compared with the float64 NumPy oracle and with every other "
        "implementation, on the shared vectors in `tests/vectors/`, for the output, the attention weights "
        "(where the implementation returns them) and the gradients (w.r.t. inputs and parameters).",
        "",
        "## Where and with what",
        "",
        "| | |",
        "|---|---|",
        f"| device requested | {device} |",
    ]
    lines += [f"| {k} | {v} |" for k, v in environment.items()]
    lines += ["", "## Precision", "", "| flag | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in precision.items()]
    lines += ["", "## Tolerance policy", "", "| dtype | rule |", "|---|---|"]
    lines += [f"| {r['dtype']} | `{r['rule']}` |" for r in policy_table()]
    lines += [
        "",
        "`m` is 0 for outputs and weights; for gradients it is the size of the terms the gradient sums "
        "(`compare/tolerance.py`). `naive` is the oracle with every intermediate rounded to the dtype.",
        "",
        "## Summary",
        "",
        "| kind | pair | dtype | cases | checks | worst forward (err / tol) | worst gradient (err / tol) | "
        "status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summarize(records):
        cells = []
        for label in ("forward", "gradients"):
            w = row.get(label)
            where = f"({w['case']}:{w['quantity']})" if w else ""
            cells.append(f"{_fmt(w['max_abs'])} / {_fmt(w['tol'])} {where}" if w else "-")
        status = "ok" if not row["failures"] else f"**{row['failures']} FAIL**"
        lines.append(
            f"| {row['kind']} | {row['pair']} | {row['dtype']} | {row['cases']} | {row['checks']} | "
            f"{cells[0]} | {cells[1]} | {status} |"
        )
    if failures:
        lines += ["", "## Disagreements", "", "| case | pair | quantity | detail |", "|---|---|---|---|"]
        for r in failures:
            detail = r.get("error") or (
                f"max_abs {_fmt(r['max_abs'])} > tol {_fmt(r['tol'])}; worst at {tuple(r['worst_index'])}: "
                f"got {r['worst_got']:.6g}, expected {r['worst_expected']:.6g}; non-finite {r['nonfinite']}"
            )
            lines.append(f"| {r['case']} | {r['pair']} | {r.get('quantity', '-')} | {detail} |")
    if skipped:
        by_impl: dict[str, list[str]] = {}
        for r in skipped:
            by_impl.setdefault(r["pair"].removesuffix(" vs oracle"), []).append(r["case"])
        lines += [
            "",
            "## Not applicable",
            "",
            "Implementations that cannot express a case (torch's built-ins with an injected dropout mask or "
            "a fully-masked row where they give NaN; flax with float masks, add_bias_kv/add_zero_attn, "
            "kdim/vdim, or fp16 on XLA:CPU) are not run on it:",
            "",
            "| implementation | cases not run |",
            "|---|---|",
        ]
        lines += [f"| {impl} | {len(cases)}: {', '.join(cases)} |" for impl, cases in sorted(by_impl.items())]
    lines += [
        "",
        "## Every check",
        "",
        "| case | pair | dtype | quantity | max abs | max rel | mean abs | outside tol | tol | non-finite "
        "| ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "max_abs" not in r:
            continue
        lines.append(
            f"| {r['case']} | {r['pair']} | {r['dtype']} | {r['quantity']} | {_fmt(r['max_abs'])} | "
            f"{_fmt(r['max_rel'])} | {_fmt(r['mean_abs'])} | {r['frac_outside']:.1%} | {_fmt(r['tol'])} | "
            f"{r['nonfinite']} | {'yes' if r['ok'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def write_agreement(
    folder: Path, records: list[dict], environment: dict, precision: dict, device: str
) -> list[Path]:
    """Write ``agreement.json`` and ``agreement.md`` into ``folder``; returns their paths."""
    payload = {
        "environment": environment,
        "precision": precision,
        "device": device,
        "tolerance_policy": policy_table(),
        "summary": summarize(records),
        "records": records,
    }
    return [
        write_atomic(Path(folder) / "agreement.json", json.dumps(payload, indent=1) + "\n"),
        write_atomic(
            Path(folder) / "agreement.md", agreement_markdown(records, environment, precision, device)
        ),
    ]
