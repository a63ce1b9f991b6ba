"""The report folder's files: agreement.json (schema 2, tables without repeated metadata) and its sizes,
agreement.md (a summary plus every failure), and ``python -m compare report DIR`` on old and new folders."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import report_fixtures

from compare import cli, report
from compare.bench import report as bench_report

OLD = Path(__file__).parent / "data" / "old_report"  # written by the schema-1 writer (main before #17)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), (a, b)
    for k, v in a.items():
        if isinstance(v, float) and math.isfinite(v) and v != 0:
            assert b[k] == pytest.approx(v, rel=10 ** (1 - report.DIGITS)), k
        elif isinstance(v, tuple | list):
            assert list(b[k]) == list(v), k
        else:
            assert b[k] == v, k


def test_json_round_trip_keeps_every_check_and_every_unmeasured_record():
    records = report_fixtures.records(broken=("mha", "flax_nnx"))
    records.append(
        {"case": "mha_case0_float32", "kind": "mha", "dtype": "float32", "pair": "jax_attn vs oracle",
         "quantity": "-", "ok": False, "error": "ValueError: boom"}
    )  # fmt: skip
    doc = json.loads(json.dumps(report.to_json(records, {"jax": "0"}, {"pinned": True}, "cpu")))
    assert doc["schema"] == report.SCHEMA and doc["verdict"]["ok"] is False
    back = report.from_json(doc)
    assert back["device"] == "cpu" and back["environment"] == {"jax": "0"}
    key = lambda r: (r["case"], r["pair"], r["quantity"])  # noqa: E731
    assert len(back["records"]) == len(records)
    for a, b in zip(sorted(records, key=key), sorted(back["records"], key=key)):
        _same(a, b)
    assert report.verdict(back["records"]) == report.verdict(records)


def test_sizes_at_todays_vector_count():
    """At least today's 14698 checks: agreement.json under 2 MB, agreement.md under 100 KB."""
    records = report_fixtures.records(cases_per_dtype=25, broken=("sdpa", "torch_attn"))
    assert sum("max_abs" in r for r in records) >= 14698
    doc = report.to_json(records, {"jax": "0.10"}, {"pinned": True}, "cpu")
    assert len(json.dumps(doc, separators=(",", ":"))) < 2_000_000
    md = report.agreement_markdown(records, {"jax": "0.10"}, {"pinned": True}, "cpu")
    assert len(md.encode()) < 100_000
    assert md.count("\n- sdpa ") == 3  # the failures, each on its line


def test_markdown_summary_then_every_failure_in_full():
    records = report_fixtures.records(broken=("causal", "torch_attn"))
    md = report.agreement_markdown(records, {}, {}, "cpu")
    assert "**DISAGREE: 3 checks outside tolerance in 3 cases" in md
    for kind in report_fixtures.KINDS:
        assert f"### {kind} (" in md
    bad = [r for r in records if not r["ok"]]
    for r in bad:
        assert report.failure_line(r) in md
    assert "## Not applicable" in md


def test_report_rerenders_an_old_format_folder(tmp_path, capsys):
    folder = tmp_path / "old"
    shutil.copytree(OLD, folder)
    old_json = (folder / "agreement.json").read_text()
    assert "schema" not in json.loads(old_json)
    assert cli.main(["report", str(folder)]) == 0
    md = (folder / "agreement.md").read_text()
    assert "DISAGREE: 1 checks outside tolerance in 1 cases" in md
    assert "basic [float32] out: torch_attn vs oracle" in md  # the failure, in full
    assert "mha_fully_masked_row" in md  # not applicable there, listed
    assert (folder / "agreement.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "agreement.json").read_text() == old_json  # the JSON is left as it was


def test_report_rerenders_a_new_folder_with_its_benchmark(tmp_path):
    records = report_fixtures.records(cases_per_dtype=1)
    report.write_agreement(tmp_path, records, {}, {}, "cpu")
    bench_report.write_all(report_fixtures.bench_doc(), tmp_path)
    for name in ("agreement.md", "agreement.png", "bench.md", "bench.png", "bench_all.png"):
        (tmp_path / name).unlink()
    assert cli.main(["report", str(tmp_path)]) == 0
    for name in ("agreement.md", "agreement.png", "bench.md", "bench.png", "bench_all.png"):
        assert (tmp_path / name).exists(), name
    assert "ALL AGREE" in (tmp_path / "agreement.md").read_text()


def test_report_on_a_folder_without_json_or_with_an_unknown_schema_is_a_usage_error(tmp_path):
    assert cli.main(["report", str(tmp_path)]) == 2
    (tmp_path / "agreement.json").write_text(json.dumps({"schema": 99}))
    assert cli.main(["report", str(tmp_path)]) == 2


def test_schema_1_device_may_be_the_agree_json_dict():
    assert report.from_json({"records": [], "device": {"name": "gpu", "jax": "cuda:0"}})["device"] == "gpu"
    assert report.from_json({"records": []})["device"] == "?"
