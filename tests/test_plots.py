"""The pictures: which lines bench.png draws, fixed colours, and the agreement heatmap's cells."""

from __future__ import annotations

import math

import report_fixtures

from compare import plots, report
from compare.bench.impls import IMPLS
from compare.bench.impls_attention import ATTENTION_IMPLS
from compare.bench.impls_flex import FLEX_IMPLS


def test_every_implementation_has_its_own_fixed_colour():
    names = [impl.name for impl in (*IMPLS, *FLEX_IMPLS, *ATTENTION_IMPLS)]
    assert all(n in plots.IMPL_COLORS for n in names), [n for n in names if n not in plots.IMPL_COLORS]
    colours = [plots.impl_color(n) for n in names]
    assert len(set(colours)) == len(colours)
    assert plots.impl_color("some.future[impl]") == plots.impl_color("some.future[impl]")


def _figures(monkeypatch):
    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or path)
    return saved


def _labels(ax) -> set[str]:
    return {line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_bench_png_draws_only_the_lines_a_reader_compares_and_bench_all_every_one(monkeypatch):
    doc = report_fixtures.bench_doc()
    saved = _figures(monkeypatch)
    plots.plot_throughput(doc, "bench.png", only_headline=True)
    plots.plot_throughput(doc, "bench_all.png", only_headline=False)
    headline, every = saved
    measured = {r["impl"] for r in plots._plot_records(doc)}
    recs = plots._plot_records(doc)
    for ax_h, ax_a in zip(headline.axes, every.axes):
        if not ax_a.get_lines():
            continue
        mode, causality = ax_h.get_title().split(", ")
        panel = [r for r in recs if r["mode"] == mode and r["causal"] == (causality == "causal")]
        torch_rows = [r for r in panel if r["framework"] == "torch"]
        T = max(r["T"] for r in torch_rows)
        fastest = max((r for r in torch_rows if r["T"] == T), key=lambda r: r["gflops"])["impl"]
        expected = {r["impl"] for r in panel} & {*plots.HEADLINE, fastest}
        assert _labels(ax_h) == expected
        assert len(expected) <= 5 < len(_labels(ax_a))
        # the same colour for an implementation in both figures
        colour = {line.get_label(): line.get_color() for line in ax_a.get_lines()}
        for line in ax_h.get_lines():
            if line.get_label() in colour:
                assert line.get_color() == colour[line.get_label()] == plots.impl_color(line.get_label())
    assert set().union(*(_labels(ax) for ax in every.axes)) == measured


def test_fastest_torch_is_the_best_at_the_largest_length():
    recs = [
        {"impl": "torch.a", "framework": "torch", "T": 128, "gflops": 900.0},
        {"impl": "torch.b", "framework": "torch", "T": 128, "gflops": 10.0},
        {"impl": "torch.b", "framework": "torch", "T": 1024, "gflops": 50.0},
    ]
    assert plots.headline_names(recs) == {*plots.HEADLINE, "torch.b"}


def test_agreement_grid_has_the_oracle_row_and_symmetric_pairs(monkeypatch):
    records = report_fixtures.records(kinds={"k": ["a", "b", "c"]}, cases_per_dtype=2, broken=("k", "b"))
    (m,) = report.matrices(records)
    rows, cols, grid = plots.agreement_grid(m, "float32")
    assert rows == ["oracle", "a", "b", "c"] and cols == ["a", "b", "c"]
    assert grid[0][1] > 1 > grid[0][0]  # b fails against the oracle, a does not
    for i in range(3):
        assert math.isnan(grid[i + 1][i])
        for j in range(3):
            if i != j:
                assert grid[i + 1][j] == grid[j + 1][i]
    saved = _figures(monkeypatch)
    plots.plot_agreement(report.matrices(records), report.verdict(records)[1], "agreement.png")
    (fig,) = saved
    assert len([ax for ax in fig.axes if ax.get_images()]) == 3  # one panel per dtype
