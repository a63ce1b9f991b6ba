"""Report files: the agreement report (``agreement.json``, ``agreement.md``, ``agreement.png``) and the
report folder.

Records are the plain dicts of :func:`compare.agree.run`, one per (case, pair, quantity). This module
turns them into what a person reads — a verdict, one matrix per vector kind, every failure in full — and
into ``agreement.json`` in a table form without repeated metadata (schema in ``docs/reports.md``).
Nothing here knows a kind or an implementation by name: it iterates what the records say.

Every file is written to a temporary name in its folder and moved into place with ``os.replace``, so an
interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from pathlib import Path

from compare import plots
from compare.plots import fmt_ratio
from compare.tolerance import policy_table

#: version of ``agreement.json``; files without a ``schema`` field are version 1 (a list of record dicts)
SCHEMA = 2
#: significant digits kept for the measured floats in ``agreement.json`` (the verdict, ``ok``, is exact)
DIGITS = 4
#: dtypes in reading order; others follow alphabetically
DTYPE_ORDER = ("float64", "float32", "bfloat16", "float16")
#: the measured fields of a check, in the order of ``agreement.json``'s ``checks.columns``
MEASURED = (
    "max_abs",
    "max_rel",
    "mean_abs",
    "frac_outside",
    "tol",
    "worst_index",
    "worst_got",
    "worst_expected",
    "nonfinite",
    "ok",
)


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
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a report unreadable to others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def is_gradient(quantity: str) -> bool:
    """Gradient quantities are named ``d<input>`` (sdpa, mha) or ``grad_<name>`` (causal)."""
    return quantity.startswith(("d", "grad_"))


# --------------------------------------------------------------------------------------- analysis


def split_pair(pair: str) -> tuple[str, str]:
    """``"a vs b"`` -> ``("a", "b")``; the oracle is ``b == "oracle"``."""
    a, _, b = pair.partition(" vs ")
    return a, b


def ratio(r: dict) -> float:
    """A measured check's worst error relative to its tolerance (1 = on the line; inf: non-finite)."""
    if r.get("nonfinite"):
        return math.inf
    m, tol = r["max_abs"], r["tol"]
    if not math.isfinite(m):
        return math.inf
    if tol > 0:
        return m / tol
    return 0.0 if m == 0 else math.inf


def measured(r: dict) -> bool:
    return "max_abs" in r


def dtype_sort(dtypes) -> list[str]:
    return sorted(set(dtypes), key=lambda d: (DTYPE_ORDER.index(d) if d in DTYPE_ORDER else 99, d))


def kinds_in(records: list[dict]) -> list[str]:
    """Kinds in the order they first appear in the records."""
    return list(dict.fromkeys(r.get("kind", "sdpa") for r in records))


def failures(records: list[dict]) -> list[dict]:
    return [r for r in records if not r["ok"]]


def counts(records: list[dict]) -> dict:
    """Numbers for the verdict."""
    checks = [r for r in records if measured(r)]
    return {
        "checks": len(checks),
        "cases": len({r["case"] for r in records}),
        "kinds": len(kinds_in(records)),
        "failed_checks": sum(not r["ok"] for r in checks),
        "errors": sum(1 for r in records if not measured(r) and not r["ok"]),
        "not_applicable": sum(1 for r in records if r.get("skipped")),
    }


def verdict(records: list[dict]) -> tuple[bool, str]:
    """(everything agrees, one line saying so or saying what does not)."""
    c = counts(records)
    scope = f"{c['checks']} checks over {c['cases']} cases ({c['kinds']} kind{'s' * (c['kinds'] != 1)})"
    if not c["failed_checks"] and not c["errors"]:
        return True, f"ALL AGREE: {scope}"
    bad_cases = len({r["case"] for r in failures(records)})
    parts = []
    if c["failed_checks"]:
        parts.append(f"{c['failed_checks']} checks outside tolerance")
    if c["errors"]:
        parts.append(f"{c['errors']} implementation errors")
    return False, f"DISAGREE: {' and '.join(parts)} in {bad_cases} cases; {scope}"


def matrices(records: list[dict]) -> list[dict]:
    """Per kind: implementations × dtypes, each cell with the worst error / tolerance against the oracle
    (and where), the implementation's pairwise checks passed / run, and its failures; plus, per dtype,
    the worst ratio of every pair (the heatmap's cells).

    Returns ``[{"kind", "cases", "impls", "dtypes", "cells": {impl: {dtype: cell}}, "pairs": {dtype:
    {(a, b): worst ratio}}}]`` with ``b == "oracle"`` for the oracle row; a cell is ``{"oracle":
    worst ratio or None, "where": "case:quantity", "pair_ok", "pair_checks", "failed", "errors",
    "not_applicable", "cases"}``.
    """
    out = []
    for kind in kinds_in(records):
        rs = [r for r in records if r.get("kind", "sdpa") == kind]
        # in the order the run measured them (implementations never measured last)
        seen = [split_pair(r["pair"])[0] for r in rs if measured(r) and split_pair(r["pair"])[1] == "oracle"]
        seen += [n for r in rs for n in split_pair(r["pair"]) if n and n != "oracle"]
        impls: list[str] = list(dict.fromkeys(seen))
        dtypes = dtype_sort(r.get("dtype", "?") for r in rs)
        cells = {i: {} for i in impls}
        pairs: dict[str, dict[tuple[str, str], float]] = {d: {} for d in dtypes}

        def cell(impl, dtype, cells=cells):
            return cells[impl].setdefault(
                dtype,
                {
                    "oracle": None,
                    "where": "",
                    "pair_ok": 0,
                    "pair_checks": 0,
                    "failed": 0,
                    "errors": 0,
                    "not_applicable": 0,
                    "cases": set(),
                },
            )

        for r in rs:
            a, b = split_pair(r["pair"])
            dt = r.get("dtype", "?")
            if not measured(r):
                c = cell(a, dt)
                c["cases"].add(r["case"])
                if r.get("skipped"):
                    c["not_applicable"] += 1
                elif not r["ok"]:
                    c["errors"] += 1
                continue
            x = ratio(r)
            key = (a, b)
            pairs[dt][key] = max(pairs[dt].get(key, 0.0), x)
            for name in (a, b):
                if name == "oracle":
                    continue
                c = cell(name, dt)
                c["cases"].add(r["case"])
                if not r["ok"]:
                    c["failed"] += 1
                if b == "oracle":
                    if c["oracle"] is None or x > c["oracle"]:
                        c["oracle"], c["where"] = x, f"{r['case']}:{r['quantity']}"
                else:
                    c["pair_checks"] += 1
                    c["pair_ok"] += bool(r["ok"])
        for impl in impls:
            for c in cells[impl].values():
                c["cases"] = len(c["cases"])
        out.append(
            {
                "kind": kind,
                "cases": len({r["case"] for r in rs}),
                "dtype_cases": {d: len({r["case"] for r in rs if r.get("dtype", "?") == d}) for d in dtypes},
                "impls": impls,
                "dtypes": dtypes,
                "cells": cells,
                "pairs": pairs,
            }
        )
    return out


def summarize(records: list[dict]) -> list[dict]:
    """One row per (kind, pair, dtype): cases, worst forward and gradient error relative to tolerance
    (the long table of ``--verbose``)."""
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
            xs = [r for r in rs if measured(r) and is_gradient(r["quantity"]) == is_grad]
            if xs:
                w = max(xs, key=ratio)
                row[label] = {
                    "max_abs": w["max_abs"],
                    "tol": w["tol"],
                    "case": w["case"],
                    "quantity": w["quantity"],
                }
        rows.append(row)
    return rows


def failure_line(r: dict) -> str:
    """One failure in full: kind, case, dtype, quantity, pair, error and tolerance (or the exception)."""
    head = f"{r.get('kind', '?')} {r['case']} [{r.get('dtype', '?')}] {r.get('quantity', '-')}: {r['pair']}"
    if not measured(r):
        return f"{head}: raised {r.get('error', '?')}"
    where = tuple(r.get("worst_index") or ())
    return (
        f"{head}: max_abs {r['max_abs']:.3e} > tol {r['tol']:.3e} ({fmt_ratio(ratio(r))}× tol, "
        f"{r['frac_outside']:.1%} of elements outside); worst at {where}: got {r['worst_got']:.6g}, "
        f"expected {r['worst_expected']:.6g}; non-finite {r['nonfinite']}"
    )


def not_applicable(records: list[dict]) -> dict[tuple[str, str], list[str]]:
    """``{(kind, impl): [cases]}`` of implementations not run on a case."""
    out: dict[tuple[str, str], list[str]] = {}
    for r in records:
        if r.get("skipped"):
            out.setdefault((r.get("kind", "sdpa"), split_pair(r["pair"])[0]), []).append(r["case"])
    return out


# ----------------------------------------------------------------------------------------- Markdown


def _fmt(x: float) -> str:
    return f"{x:.2e}"


def _md_cell(c: dict | None) -> str:
    if not c:
        return "-"
    if c["oracle"] is None:
        text = "error" if c["errors"] else "n/a"
    else:
        text = f"{fmt_ratio(c['oracle'])} ({c['where']})"
        if c["pair_checks"]:
            text += f", pairs {c['pair_ok']}/{c['pair_checks']}"
    bad = c["failed"] + c["errors"]
    return f"**{text}, {bad} FAIL**" if bad else text


def agreement_markdown(
    records: list[dict],
    environment: dict,
    precision: dict,
    device: str,
    generated: str | None = None,
    picture: str | None = "agreement.png",
) -> str:
    """A report a person can read on its own: the verdict, where it ran and with what, the policy, one
    matrix per kind, and every failure in full. Every check is in ``agreement.json``."""
    generated = generated or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ok, line = verdict(records)
    bad = failures(records)
    lines = [
        "# Agreement report",
        "",
        f"Generated {generated}. **{line}**.",
        "",
        "Every implementation is compared with the float64 NumPy oracle and with every other "
        "implementation of its kind, on the shared vectors in `tests/vectors/`, for the output, the "
        "attention weights (where the implementation returns them) and the gradients (w.r.t. inputs and "
        "parameters). Every check is in `agreement.json` (schema: `docs/reports.md`).",
        "",
    ]
    if picture:
        lines += [f"![worst error / tolerance per pair]({picture})", ""]
    lines += ["## Summary", ""]
    lines += [
        "Per kind, per implementation and dtype: the worst error / tolerance against the oracle over all "
        "cases and quantities (1 = on the tolerance line; where it is reached in brackets), and the "
        "implementation's pairwise checks against the other implementations passed / run.",
        "",
    ]
    for m in matrices(records):
        lines += [
            f"### {m['kind']} ({m['cases']} cases)",
            "",
            "| implementation | " + " | ".join(m["dtypes"]) + " |",
            "|---|" + "---|" * len(m["dtypes"]),
        ]
        for impl in m["impls"]:
            lines.append(
                f"| {impl} | " + " | ".join(_md_cell(m["cells"][impl].get(d)) for d in m["dtypes"]) + " |"
            )
        lines.append("")
    lines += ["## Failures", ""]
    if bad:
        lines += [f"{len(bad)} checks fail, each in full:", ""]
        lines += [f"- {failure_line(r)}" for r in bad]
    else:
        lines.append("None: every check is within its tolerance.")
    skipped = not_applicable(records)
    if skipped:
        lines += [
            "",
            "## Not applicable",
            "",
            "Implementations that cannot express a case (torch's built-ins with an injected dropout mask or "
            "a fully-masked row where they give NaN; flax with float masks, add_bias_kv/add_zero_attn, "
            "kdim/vdim, or fp16 on XLA:CPU, …) are not run on it, and not counted as agreement:",
            "",
            "| kind | implementation | cases not run |",
            "|---|---|---|",
        ]
        lines += [
            f"| {kind} | {impl} | {len(cases)}: {', '.join(cases)} |"
            for (kind, impl), cases in sorted(skipped.items())
        ]
    lines += ["", "## Where and with what", "", "| | |", "|---|---|", f"| device requested | {device} |"]
    lines += [f"| {k} | {v} |" for k, v in environment.items()]
    lines += ["", "## Precision", "", "| flag | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in precision.items()]
    lines += ["", "## Tolerance policy", "", "| dtype | rule |", "|---|---|"]
    lines += [f"| {r['dtype']} | `{r['rule']}` |" for r in policy_table()]
    lines += [
        "",
        "`m` is 0 for outputs and weights; for gradients it is the size of the terms the gradient sums "
        "(`compare/tolerance.py`). `naive` is the oracle with every intermediate rounded to the dtype.",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ agreement.json


def _round(x):
    if isinstance(x, float) and math.isfinite(x) and x != 0:
        return float(f"{x:.{DIGITS}g}")
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _unround(x):
    if x == "inf":
        return math.inf
    if x == "-inf":
        return -math.inf
    return math.nan if x is None else x


def to_json(records: list[dict], environment: dict, precision: dict, device: str) -> dict:
    """The ``agreement.json`` document (schema :data:`SCHEMA`, described in ``docs/reports.md``): case
    metadata once per case, pairs and quantities once per run, each check a row of a table."""
    cases: dict[str, int] = {}
    case_rows = []
    pairs: dict[str, int] = {}
    quantities: dict[str, int] = {}
    checks, unmeasured = [], []
    for r in records:
        if r["case"] not in cases:
            cases[r["case"]] = len(case_rows)
            case_rows.append([r["case"], r.get("kind", "sdpa"), r.get("dtype", "?")])
        ci = cases[r["case"]]
        pi = pairs.setdefault(r["pair"], len(pairs))
        if not measured(r):
            status = "not_applicable" if r.get("skipped") else ("error" if not r["ok"] else "ok")
            unmeasured.append([ci, split_pair(r["pair"])[0], status, r.get("error")])
            continue
        qi = quantities.setdefault(r["quantity"], len(quantities))
        row = [ci, pi, qi]
        for f in MEASURED:
            v = r[f]
            if f == "worst_index":
                v = list(v)
            elif f == "ok":
                v = int(bool(v))
            elif f != "nonfinite":
                v = _round(float(v))
            row.append(v)
        checks.append(row)
    ok, line = verdict(records)
    return {
        "schema": SCHEMA,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "verdict": {"ok": ok, "line": line, **counts(records)},
        "device": device,
        "environment": environment,
        "precision": precision,
        "tolerance_policy": policy_table(),
        "digits": DIGITS,
        "cases": {"columns": ["case", "kind", "dtype"], "rows": case_rows},
        "pairs": list(pairs),
        "quantities": list(quantities),
        "checks": {"columns": ["case", "pair", "quantity", *MEASURED], "rows": checks},
        "unmeasured": {"columns": ["case", "impl", "status", "error"], "rows": unmeasured},
    }


def from_json(doc: dict) -> dict:
    """``{"records", "environment", "precision", "device", "generated"}`` from an ``agreement.json`` of
    any schema: version 2 (tables) or version 1 (no ``schema`` field: a list of record dicts)."""
    schema = doc.get("schema", 1)
    if schema == 1:
        records = doc["records"]
    elif schema == 2:
        cols = doc["checks"]["columns"]
        case_rows = doc["cases"]["rows"]
        pairs, quantities = doc["pairs"], doc["quantities"]
        records = []
        for row in doc["checks"]["rows"]:
            d = dict(zip(cols, row))
            name, kind, dtype = case_rows[d["case"]]
            rec = {
                "case": name,
                "kind": kind,
                "pair": pairs[d["pair"]],
                "quantity": quantities[d["quantity"]],
            }
            rec["dtype"] = dtype
            for f in MEASURED:
                v = d[f]
                if f == "worst_index":
                    v = tuple(v)
                elif f == "ok":
                    v = bool(v)
                elif f != "nonfinite":
                    v = _unround(v)
                rec[f] = v
            records.append(rec)
        ucols = doc["unmeasured"]["columns"]
        for row in doc["unmeasured"]["rows"]:
            d = dict(zip(ucols, row))
            name, kind, dtype = case_rows[d["case"]]
            rec = {
                "case": name,
                "kind": kind,
                "dtype": dtype,
                "pair": f"{d['impl']} vs oracle",
                "quantity": "-",
            }
            if d["status"] == "not_applicable":
                rec.update(ok=True, skipped=True)
            else:
                rec.update(ok=d["status"] == "ok")
                if d.get("error"):
                    rec["error"] = d["error"]
            records.append(rec)
    else:
        raise ValueError(f"agreement.json: unknown schema {schema!r} (this version reads 1 and {SCHEMA})")
    device = doc.get("device", "?")  # schema 1 from `agree --json`: the device dict
    return {
        "records": records,
        "environment": doc.get("environment", {}),
        "precision": doc.get("precision", {}),
        "device": device["name"] if isinstance(device, dict) else device,
        "generated": doc.get("generated"),
    }


def load_agreement(path: str | Path) -> dict:
    """Read an ``agreement.json`` (any schema) into records and metadata (see :func:`from_json`)."""
    return from_json(json.loads(Path(path).read_text()))


def write_agreement(
    folder: Path,
    records: list[dict],
    environment: dict,
    precision: dict,
    device: str,
    picture: bool = True,
) -> list[Path]:
    """Write ``agreement.json``, ``agreement.md`` (and ``agreement.png``) into ``folder``; returns their
    paths."""
    folder = Path(folder)
    doc = to_json(records, environment, precision, device)
    paths = [
        write_atomic(folder / "agreement.json", json.dumps(doc, separators=(",", ":")) + "\n"),
        write_atomic(
            folder / "agreement.md",
            agreement_markdown(
                records, environment, precision, device, picture="agreement.png" if picture else None
            ),
        ),
    ]
    if picture:
        paths.append(plots.plot_agreement(matrices(records), verdict(records)[1], folder / "agreement.png"))
    return paths


def rerender(folder: str | Path) -> list[Path]:
    """``python -m compare report DIR``: re-render a report folder's Markdown and pictures from its JSON
    files (``agreement.json`` of any schema, ``bench.json``); the JSON files are left as they are."""
    folder = Path(folder)
    written = []
    if (folder / "agreement.json").exists():
        loaded = load_agreement(folder / "agreement.json")
        records = loaded["records"]
        md = agreement_markdown(
            records, loaded["environment"], loaded["precision"], loaded["device"], loaded["generated"]
        )
        written.append(write_atomic(folder / "agreement.md", md))
        written.append(plots.plot_agreement(matrices(records), verdict(records)[1], folder / "agreement.png"))
    if (folder / "bench.json").exists():
        from compare.bench import report as bench_report

        doc = json.loads((folder / "bench.json").read_text())
        written += list(bench_report.write_all(doc, folder, json_too=False).values())
    if not written:
        raise FileNotFoundError(f"{folder}: neither agreement.json nor bench.json")
    return written
