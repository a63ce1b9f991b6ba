"""The harness around the timing loop: failures recorded and the sweep goes on, crashed workers, plans,
ratios, metadata on every record, and the files of an end-to-end run. No timing assertions."""

import json
import os

import pytest

from compare.bench import report, runner, worker
from compare.bench.flops import FORWARD, FORWARD_BACKWARD
from compare.bench.presets import Case, Preset, smoke
from compare.bench.timing import TimingSettings

TINY = TimingSettings(warmup_runs=1, warmup_s=0.0, min_runs=3, budget_s=0.01, floor_runs=3)
META = {
    "device": "cpu",
    "device_name": "test cpu",
    "platform": "test",
    "versions": worker.versions(),
    "threads": {"requested": 1},
    "precision": {"pinned": True},
}
METADATA_KEYS = ("device", "device_name", "versions", "threads", "precision", "framework", "schema", "run_id")


def _cases():
    return [
        Case(B=1, N=2, T=T, H=4, causal=c, dtype="float32", mode=FORWARD)
        for T in (16, 32)
        for c in (False, True)
    ]


def _plan(impl_names, cases=None):
    cases = cases or _cases()
    jobs = [
        {"id": f"{n}|{i}", "impl": n, "case": c.as_dict(), "skip": None}
        for n in impl_names
        for i, c in enumerate(cases)
    ]
    return {
        "framework": "torch",
        "device": "cpu",
        "threads": 1,
        "timing": TINY.__dict__,
        "gemm": {},
        "run_id": "test",
        "options": {},
        "jobs": jobs,
    }


def _fake_table():
    from bench_fake_impls import FAKE_IMPLS

    return {i.name: i for i in FAKE_IMPLS}


def test_failing_implementations_are_recorded_and_the_sweep_continues():
    events = []
    worker.run_jobs(_plan(["fake.oom", "fake.ok", "fake.unsupported"]), _fake_table(), events.append, META)
    recs = [e["record"] for e in events if e["event"] == "record"]
    assert len(recs) == 12, "one record per job, failing or not"
    by = {}
    for r in recs:
        by.setdefault(r["impl"], []).append(r)
    assert {r["status"] for r in by["fake.oom"]} == {"error"}
    assert {r["error_kind"] for r in by["fake.oom"]} == {"oom"}
    assert "out of memory" in by["fake.oom"][0]["error"]
    assert {r["error_kind"] for r in by["fake.unsupported"]} == {"unsupported"}
    assert {r["status"] for r in by["fake.ok"]} == {"ok"}, "the sweep went on after the failures"
    for r in recs:
        for k in METADATA_KEYS:
            assert k in r, k


def test_compile_time_is_reported_apart_from_steady_state():
    steps = []
    from compare.bench.impls import Impl, Prepared

    def build(case, ctx):
        return Prepared(step=lambda: steps.append(1), sync=lambda o: None, backend="b", compile_s=42.0)

    table = {"counted": Impl("counted", "torch", "sdpa", build, "counts its steps")}
    events = []
    worker.run_jobs(_plan(["counted"], _cases()[:1]), table, events.append, META)
    (rec,) = [e["record"] for e in events if e["event"] == "record"]
    assert rec["compile_s"] == 42.0
    assert rec["n_runs"] + rec["warmup_runs"] == len(steps), "only steps are run (and timed) after the build"
    assert rec["median_s"] < 42.0 and rec["flops"] > 0 and rec["gflops"] > 0


def test_skips_record_their_reason():
    from compare.bench.impls import by_name

    table = by_name()
    plan = _plan(["jax.nn.dpa[cudnn]", "torch.F.sdpa[cudnn]"])
    plan["jobs"][0]["skip"] = "preset limit"
    events = []
    worker.run_jobs(plan, table, events.append, META)
    recs = [e["record"] for e in events if e["event"] == "record"]
    assert [r["status"] for r in recs] == ["skipped"] * 8
    assert recs[0]["reason"] == "preset limit"
    assert "CUDA" in recs[1]["reason"]


def test_missing_module_entries_are_skipped_with_import_error(monkeypatch):
    import jax_attn
    from compare.bench.impls import availability, by_name

    monkeypatch.delattr(jax_attn, "CausalSelfAttention", raising=False)
    reason = availability(by_name()["jax_attn.CSA[jit]"])
    assert reason.startswith("not available: ImportError")


def test_plan_jobs_and_opt_in():
    preset = smoke("cpu")
    config = runner.BenchConfig(threads=1)
    impls, not_run = runner.selected_impls(config)
    assert "torch.compile(torch_attn.sdpa)" in {n["impl"] for n in not_run}
    assert "torch.compile(torch_attn.sdpa)" in {
        i.name for i in runner.selected_impls(runner.BenchConfig(threads=1, options={"compile": True}))[0]
    }
    jobs = runner.plan_jobs(preset, impls)
    assert set(jobs) == {"jax", "torch"}
    weights = [j for j in jobs["torch"] if j["impl"] == "torch.nn.MHA[eager,weights]"]
    assert {j["skip"] is None for j in weights if j["case"]["T"] == 16} == {True}
    assert all("T=16" in j["skip"] for j in weights if j["case"]["T"] == 32)
    assert not any(j["impl"] in preset.exclude for js in jobs.values() for j in js)


def test_worker_env_pins_threads():
    env = worker.worker_env(
        "jax", "cpu", 1, base={"XLA_FLAGS": "--xla_foo=1 --xla_cpu_multi_thread_eigen=true"}
    )
    assert env["OMP_NUM_THREADS"] == "1" and env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_cpu_multi_thread_eigen=false"
    assert worker.worker_env("torch", "cpu", 2, base={})["MKL_NUM_THREADS"] == "2"


def test_crashing_worker_becomes_a_row_and_the_rest_still_runs():
    cases = [
        Case(B=1, N=2, T=T, H=4, causal=c, dtype="float32", mode=FORWARD)
        for T in (16, 32)
        for c in (False, True)
    ]
    preset = Preset(name="t", device="cpu", cases=tuple(cases), gemm_n=32, timing=TINY)
    config = runner.BenchConfig(
        threads=1,
        frameworks=("torch",),
        impl_filter=("fake.",),
        extra_impls=("bench_fake_impls:FAKE_IMPLS",),
        job_timeout_s=120,
    )
    impls, _ = runner.selected_impls(config, runner._table(config))
    jobs = runner.plan_jobs(preset, [i for i in impls if i.name in ("fake.ok", "fake.crash")])
    recs = runner.run_framework("torch", jobs["torch"], preset, config, "test")
    assert len(recs) == 1 + 8, "ceiling + one record per job"
    assert recs[0]["impl"] == "gemm[torch]" and recs[0]["status"] == "ok"
    crashed = [r for r in recs if r["status"] == "error"]
    assert len(crashed) == 1 and crashed[0]["impl"] == "fake.crash" and crashed[0]["T"] == 16
    assert crashed[0]["error_kind"] == "crash" and "status 3" in crashed[0]["error"]
    assert sum(r["status"] == "ok" for r in recs) == 8, "the worker was restarted for the remaining jobs"
    for r in recs:
        for k in METADATA_KEYS:
            assert r.get(k) is not None, k
    assert {r["pid"] for r in recs if r["impl"] == "fake.crash"} != {os.getpid()}


def _rec(impl, framework, role, median, T=128, family="sdpa", status="ok"):
    return {
        "impl": impl,
        "framework": framework,
        "role": role,
        "family": family,
        "status": status,
        "median_s": median,
        "mode": FORWARD,
        "causal": False,
        "dtype": "float32",
        "B": 1,
        "N": 8,
        "T": T,
        "H": 64,
        "gflops": 1.0 / median,
        "device": "cpu",
    }


def test_speedups_against_best_torch_and_the_twin():
    recs = [
        _rec("jax_attn.sdpa[jit]", "jax", "jax_attn", 2.0),
        _rec("jax.nn.dpa[xla]", "jax", "", 1.0),
        _rec("torch_attn.sdpa[eager]", "torch", "torch_attn", 8.0),
        _rec("torch.F.sdpa[flash]", "torch", "", 1.0),
        _rec("torch.F.sdpa[math]", "torch", "", 0.5, status="error"),
    ]
    (s,) = report.speedups(recs)
    assert s["best_torch_impl"] == "torch.F.sdpa[flash]"
    assert s["speedup_vs_best_torch"] == pytest.approx(0.5)
    assert s["speedup_vs_torch_attn"] == pytest.approx(4.0)


def test_ceiling_percentages():
    recs = [
        {**_rec("gemm[jax]", "jax", "ceiling", 1.0, family="ceiling"), "gflops": 100.0},
        {**_rec("gemm[torch]", "torch", "ceiling", 1.0, family="ceiling"), "gflops": 120.0},
        {**_rec("x", "jax", "", 1.0), "gflops": 30.0},
    ]
    runner.attach_ceilings(recs)
    assert recs[2]["ceiling_gflops"] == 120.0 and recs[2]["pct_of_ceiling"] == pytest.approx(25.0)


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "bench.json"
    target.write_text("old")

    def broken(p):
        p.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        report.atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_end_to_end_writes_json_md_png(tmp_path):
    from compare import cli

    out = tmp_path / "r"
    argv = [
        "bench",
        "--preset",
        "smoke",
        "--threads",
        "1",
        "--out",
        str(out),
        "--impl",
        "jax_attn.auto.sdpa",
        "--impl",
        "torch_attn.sdpa",
        "--impl",
        "F.sdpa[flash]",
    ]
    assert cli.main(argv) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert {p.name for p in out.iterdir()} == {
        "bench.json",
        "bench.md",
        "bench.png",
        "bench_all.png",
        "bench_ratio.png",
    }
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    recs = doc["records"]
    assert {r["impl"] for r in recs} == {
        "gemm[jax]",
        "gemm[torch]",
        "jax_attn.auto.sdpa[jit]",
        "torch_attn.sdpa[eager]",
        "torch.F.sdpa[flash]",
    }
    assert all(r["status"] == "ok" for r in recs)
    modes = {r["mode"] for r in recs}
    assert modes == {FORWARD, FORWARD_BACKWARD}
    for r in recs:
        for k in (
            *METADATA_KEYS,
            "backend",
            "median_s",
            "iqr_s",
            "gflops",
            "pct_of_ceiling",
            "peak_mem_bytes",
        ):
            assert r.get(k) is not None, (r["impl"], k)
        assert (
            r["threads"]["requested"] == 1 and r["threads"]["affinity"] and len(r["threads"]["affinity"]) == 1
        )
        assert r["versions"]["jax"] and r["versions"]["torch"]
    flash = [r for r in recs if r["impl"] == "torch.F.sdpa[flash]"]
    assert all("flash_attention" in r["backend"] for r in flash)
    assert all(r["threads"]["torch_num_threads"] == 1 for r in recs if r["framework"] == "torch")
    assert all(r["compile_s"] > 0 for r in recs if r["framework"] == "jax")
    assert all(r["precision"]["pinned"] for r in recs)
    assert len(doc["ratios"]) == 8 and all(s["speedup_vs_torch_attn"] > 0 for s in doc["ratios"])
    md = (out / "bench.md").read_text()
    assert "Speed ratios" in md and "jax_attn.auto.sdpa[jit]" in md


def test_time_budget_skips_the_remaining_jobs():
    events = []
    plan = _plan(["fake.ok"])
    plan.update(deadline_unix=1.0, deadline_reason="budget ran out")
    worker.run_jobs(plan, _fake_table(), events.append, META)
    recs = [e["record"] for e in events if e["event"] == "record"]
    assert [r["reason"] for r in recs] == ["budget ran out"] * 4


def test_jobs_run_smallest_sequence_first():
    jobs = runner.plan_jobs(smoke("cpu"), runner.selected_impls(runner.BenchConfig(threads=1))[0])
    Ts = [j["case"]["T"] for j in jobs["jax"]]
    assert Ts == sorted(Ts)


def test_merge_rounds_keeps_the_median_round_of_each_row():
    a, b = _rec("x", "jax", "", 3.0), _rec("y", "torch", "", 1.0, T=256)
    rounds = [
        [a, b],
        [{**a, "median_s": 1.0}, {**b, "status": "error", "median_s": None}],
        [{**a, "median_s": 2.0}, {**b, "median_s": 5.0}],
    ]
    merged = runner.merge_rounds(rounds)
    assert [m["impl"] for m in merged] == ["x", "y"]
    assert merged[0]["median_s"] == 2.0 and merged[0]["round_median_s"] == [3.0, 1.0, 2.0]
    # two ok rounds of three: the lower middle (the faster), and the failed round is not counted
    assert merged[1]["median_s"] == 1.0 and merged[1]["round_median_s"] == [1.0, 5.0]
    assert merged[0]["rounds"] == merged[1]["rounds"] == 3
    failed = [{**b, "status": "error"}] * 2
    assert runner.merge_rounds([failed[:1], failed[1:]])[0]["status"] == "error"
    assert runner.merge_rounds([[a, b]]) == [a, b]  # one round: untouched


def test_rounds_alternate_the_frameworks():
    preset = Preset(name="t", device="cpu", cases=tuple(_cases()[:1]), gemm_n=32, timing=TINY)
    config = runner.BenchConfig(
        threads=1,
        frameworks=("torch",),
        impl_filter=("fake.ok",),
        extra_impls=("bench_fake_impls:FAKE_IMPLS",),
        rounds=2,
    )
    events = []
    doc = runner.run_bench(preset, config, events.append)
    assert [(e["round"], e["framework"]) for e in events if e["event"] == "round"] == [
        (1, "torch"),
        (2, "torch"),
    ]
    assert events[0] == {"event": "plan", "total": 2 * (1 + 1)}
    rows = [r for r in doc["records"] if r["impl"] == "fake.ok"]
    assert len(rows) == 1 and rows[0]["rounds"] == 2 and len(rows[0]["round_median_s"]) == 2
    assert "rounds: 2" in report.markdown({**doc, "ratios": report.speedups(doc["records"])})


def test_run_bench_rejects_zero_rounds():
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        runner.run_bench(smoke("cpu"), runner.BenchConfig(threads=1, rounds=0))
