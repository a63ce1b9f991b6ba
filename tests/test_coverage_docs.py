"""The coverage table in docs/porting.md cannot drift from the code: recomputed over the installed
transformers (``compare.port_hf.coverage_table``: every model_type ported and judged against transformers, or
refused naming the knob), it must list the same model types with the same statuses and verdicts as the copy
``python -m compare port --families --write-docs`` wrote. Error values are not compared (they are rounding
noise of this CPU); every ported family must agree."""

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from compare import port_hf  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "porting.md"


def test_docs_table_is_what_the_code_does():
    rows, md = port_hf.coverage_table()
    got = [
        (r["model_type"], r["status"], "–" if r["ok"] is None else ("yes" if r["ok"] else "NO")) for r in rows
    ]
    assert [r for r in got if r[2] == "NO"] == [], "a ported family disagrees with transformers"
    claimed = port_hf.read_coverage_docs(DOCS)
    assert claimed == got, (
        "docs/porting.md's coverage table is stale: run python -m compare port --families --write-docs"
    )
    ported = sum(status.startswith("ported") for _, status, _ in got)
    assert ported >= 70


def test_write_and_read_back(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text(f"intro\n{port_hf.COVERAGE_BEGIN}\nold\n{port_hf.COVERAGE_END}\noutro\n")
    rows = [
        {"model_type": "llama", "status": "ported", "detail": "", "errors": {"float32": 1e-6}, "ok": True},
        {"model_type": "x", "status": "refused", "detail": "a | knob", "errors": {}, "ok": None},
    ]
    port_hf.write_coverage_docs(port_hf.coverage_markdown(rows), doc)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert port_hf.read_coverage_docs(doc) == [("llama", "ported", "yes"), ("x", "refused", "–")]
    bare = tmp_path / "none.md"
    bare.write_text("no markers")
    with pytest.raises(ValueError, match="lacks the markers"):
        port_hf.write_coverage_docs("| t |", bare)
