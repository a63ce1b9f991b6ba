"""What a person reads from the main job (``python -m compare``): the terminal output as a log shows it,
on synthesised records (no implementation runs here), and with a broken implementation on a real case."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import report_fixtures

from compare import agree, cli, env, report, vectors
from compare.bench import runner


def _fake_phases(monkeypatch, records, doc):
    """The main job with its three phases replaced by recorded results (the rendering is the real one)."""
    names = sorted({r["case"] for r in records})
    kinds = {r["case"]: r["kind"] for r in records}
    monkeypatch.setattr(vectors, "check", lambda directory, progress=None: names)
    monkeypatch.setattr(
        vectors, "load_all", lambda d, sel: [SimpleNamespace(name=n, kind=kinds[n]) for n in names]
    )
    monkeypatch.setattr(agree, "run", lambda vecs, progress=None, **kw: copy.deepcopy(records))
    monkeypatch.setattr(env, "select_device", lambda name=None: {"name": "cpu", "jax": "cpu", "torch": "cpu"})
    monkeypatch.setattr(env, "pin_precision", lambda framework_defaults=False: {"pinned": True})
    monkeypatch.setattr(env, "environment", lambda: {"python": "3", "jax": "0", "torch": "2"})
    monkeypatch.setattr(runner, "run_bench", lambda preset, config, on_event: copy.deepcopy(doc))


@pytest.fixture(scope="module")
def good():
    return report_fixtures.records(), report_fixtures.bench_doc()


def test_main_job_log_fits_in_60_lines_verdict_first_and_last(monkeypatch, capsys, tmp_path, good):
    records, doc = good
    _fake_phases(monkeypatch, records, doc)
    assert cli.main(["--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert len(lines) <= 60, "\n".join(lines)
    verdicts = [i for i, line in enumerate(lines) if line.startswith("ALL AGREE")]
    assert len(verdicts) == 2 and verdicts[1] == len(lines) - 1
    # the verdict opens the report (after the one line per phase), the matrices and the speedups follow
    assert verdicts[0] < min(i for i, line in enumerate(lines) if line.startswith("sdpa ("))
    text = "\n".join(lines)
    for kind in report_fixtures.KINDS:
        assert f"{kind} (" in text
    assert "speedup of jax_attn" in text and "T=1024" in text
    assert "bench.md" in text and "agreement.md" in text
    assert {p.name for p in tmp_path.iterdir()} >= {
        "agreement.json", "agreement.md", "agreement.png",
        "bench.json", "bench.md", "bench.png", "bench_all.png", "bench_ratio.png",
    }  # fmt: skip


def test_main_job_lists_every_failure_in_full_and_exits_1(monkeypatch, capsys, tmp_path):
    records = report_fixtures.records(broken=("sdpa", "torch_attn"))
    bad = [r for r in records if not r["ok"]]
    assert len(bad) == 3
    _fake_phases(monkeypatch, records, report_fixtures.bench_doc())
    assert cli.main(["--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    lines = out.rstrip("\n").split("\n")
    assert lines[-1].startswith("DISAGREE: 3 checks outside tolerance in 3 cases")
    fails = [line for line in lines if line.startswith("FAIL ")]
    assert len(fails) == 3
    for r, line in zip(bad, fails):
        for part in (r["case"], "out", "torch_attn vs oracle", f"{r['max_abs']:.3e}", f"{r['tol']:.3e}"):
            assert part in line
    md = (tmp_path / "agreement.md").read_text()
    assert all(r["case"] in md for r in bad) and "3 checks fail" in md


def test_verbose_brings_back_the_long_tables(monkeypatch, capsys, tmp_path, good):
    records, doc = good
    _fake_phases(monkeypatch, records, doc)
    assert cli.main(["--out", str(tmp_path), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "worst max-abs error / tolerance (worst case:quantity)" in out  # every pair × dtype
    # every measurement, every speedup row
    assert "benchmark (quick, cpu)" in out and "speedup of jax_attn (jit) = torch time / jax_attn time" in out
    assert len(out.split("\n")) > 100


def test_matrix_is_generic_over_kinds_and_implementations():
    kinds = {"flex": ["a", "b", "c"], "attention": ["x", "y"]}
    records = report_fixtures.records(kinds=kinds, cases_per_dtype=2)
    ms = report.matrices(records)
    assert [m["kind"] for m in ms] == ["flex", "attention"]
    assert ms[0]["impls"] == ["a", "b", "c"] and ms[1]["dtypes"] == ["float32", "bfloat16", "float16"]
    cell = ms[1]["cells"]["x"]["float32"]
    # x's pairwise checks: one pair (x vs y) × 5 quantities × 2 cases
    assert cell["pair_checks"] == cell["pair_ok"] == 10 and 0 < cell["oracle"] < 1
    assert ms[0]["cells"]["c"]["float32"]["not_applicable"] == 1


def test_a_broken_implementation_fails_the_real_agreement_in_full(monkeypatch, capsys):
    """One kind's implementation perturbed on one small real case: every failing check is printed with
    its case, quantity, pair, error and tolerance, and the exit status is 1."""
    from compare.registry import KINDS

    impls = KINDS["sdpa"].implementations
    real = impls["torch_attn"]

    def perturbed(vec):
        res = real(vec)
        res["out"] = res["out"] + 1e-3
        return res

    monkeypatch.setitem(impls, "torch_attn", perturbed)
    # in this process: a worker process would import the registry afresh, without the perturbation
    assert (
        cli.main(["agree", "--case", "basic", "--dtype", "float32", "--kind", "sdpa", "--workers", "1"]) == 1
    )
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert lines[-1].startswith("DISAGREE") and any(line.startswith("DISAGREE") for line in lines[:3])
    fails = [line for line in lines if line.startswith("FAIL ")]
    # out against the oracle and against each of the other implementations that return it
    assert any("torch_attn vs oracle" in line for line in fails)
    assert all(" out: " in line and "basic" in line and "> tol" in line for line in fails)
    others = [i for i in impls if i != "torch_attn"]
    assert len(fails) == 1 + len(others)


def test_threaded_agreement_gives_the_same_records_in_the_same_order():
    """agree.run(threads=2) on real vectors with cheap stand-in implementations (the oracle's values,
    perturbed differently per implementation): the records equal the single-threaded run's."""
    names = [n for n, (kind, _) in vectors.all_cases().items() if kind == "sdpa"][:6]
    vecs = vectors.load_all(vectors.DEFAULT_DIR, names)

    def stand_in(shift):
        def run(vec):
            return {
                k.removeprefix("expected_"): v + shift
                for k, v in vec.arrays.items()
                if k.startswith("expected_")
            }

        return run

    impls = {"sdpa": {"a": stand_in(0.0), "b": stand_in(1e-9), "c": stand_in(1.0)}}
    one = agree.run(vecs, impls)
    two = agree.run(vecs, impls, threads=2)
    assert one == two and any(not r["ok"] for r in one) and any(r["ok"] for r in one)


# What a record *measures* (rounding noise: the same program with other thread counts sums in another
# order) and what it *is* (case, pair, quantity, dtype, tolerance, verdict): only the latter may be equal.
_NOISE = {"max_abs", "max_rel", "mean_abs", "frac_outside", "worst_index", "worst_got", "worst_expected"}


def _same_verdicts(a: list[dict], b: list[dict]) -> list[tuple]:
    """The records of two runs that differ in anything but their measured noise: identity, tolerance (a
    function of the stored inputs and expectations, not of the run) and verdict; each measured error is
    judged against its own tolerance (the verdict), never against the other run's error."""
    diffs = []
    for x, y in zip(a, b, strict=True):
        if x.keys() != y.keys():
            diffs.append((x, y))
            continue
        for key in x.keys() - _NOISE:
            same = (
                abs(x[key] - y[key]) <= 1e-12 * max(abs(x[key]), abs(y[key]))
                if isinstance(x[key], float) and isinstance(y[key], float)
                else x[key] == y[key]
            )
            if not same:
                diffs.append((key, x, y))
                break
    return diffs


def test_worker_processes_give_the_same_records_as_one_process():
    """agree.run(workers=2) with the real implementations (spawned workers, each selecting the device and
    pinning precision like the parent) on vectors of three kinds: the records, in the order of the
    vectors, have the same identities, tolerances and verdicts as those of the run in this process. The
    measured errors are not compared with each other: many are rounding noise (an exact zero such as
    ``grad_k_proj.bias`` computed in fp32), which changes with thread counts and CPUs."""
    cases = vectors.all_cases()
    names = [n for n, (kind, _) in cases.items() if kind == "sdpa"][:3]
    names += [n for n, (kind, _) in cases.items() if kind == "causal"][:1]
    names += [n for n, (kind, _) in cases.items() if kind == "flex"][:1]
    vecs = vectors.load_all(vectors.DEFAULT_DIR, names)
    env.pin_precision()
    device = env.select_device("cpu")["name"]
    one = agree.run(vecs)
    two = agree.run(vecs, workers=2, device=device)
    assert [r["case"] for r in two] == [r["case"] for r in one]
    assert len(two) == len(one)
    assert not _same_verdicts(one, two), _same_verdicts(one, two)[:3]
    assert all(r["ok"] for r in two) and len(two) > 100
