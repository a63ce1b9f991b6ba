"""The parent side of ``python -m compare bench``: plan the jobs, run one worker process per framework
(one after the other, never concurrently: they would share the cores), collect their JSON lines, and turn
a crashed or hung worker into failure rows for the jobs it did not finish, restarting it for the rest.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from compare.bench import worker
from compare.bench.impls import FRAMEWORKS, IMPLS, Impl
from compare.bench.presets import Case, Preset

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class BenchConfig:
    """Everything a run depends on besides the preset (recorded in ``bench.json``)."""

    threads: int
    frameworks: tuple[str, ...] = FRAMEWORKS
    impl_filter: tuple[str, ...] = ()  # substrings; empty = all
    options: dict = field(default_factory=dict)  # {"compile": bool}
    pin_precision: bool = True
    extra_impls: tuple[str, ...] = ()  # "module:ATTR" tuples of Impl, for plug-ins and tests
    job_timeout_s: float = 600.0  # a worker silent for this long is killed; its job becomes "timeout"
    max_restarts: int = 5
    rounds: int = 1  # sweeps, the frameworks taking turns; each row keeps its median round (see merge_rounds)


def detect_device() -> str:
    """``cuda`` when an NVIDIA device is visible, else ``cpu`` (no framework import needed)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "cpu"
    if Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists():
        return "cuda"
    return "cuda" if shutil.which("nvidia-smi") and os.path.exists("/proc/driver/nvidia") else "cpu"


def selected_impls(config: BenchConfig, table: tuple[Impl, ...] = IMPLS) -> tuple[list[Impl], list[dict]]:
    """(impls to plan, impls not run with the reason): opt-in ones, and those the filter leaves out."""
    run, not_run = [], []
    for impl in table:
        if impl.framework not in config.frameworks:
            continue
        if config.impl_filter and not any(s in impl.name for s in config.impl_filter):
            continue
        if impl.opt_in and not config.options.get(impl.opt_in):
            not_run.append({"impl": impl.name, "reason": f"opt-in: pass --{impl.opt_in}"})
            continue
        run.append(impl)
    return run, not_run


def plan_jobs(preset: Preset, impls: list[Impl]) -> dict[str, list[dict]]:
    """Jobs per framework, smallest T first (a time budget then cuts the largest shapes of every
    implementation rather than whole implementations); preset limits become ``skip`` reasons."""
    jobs: dict[str, list[dict]] = {}
    rank = {impl.name: i for i, impl in enumerate(impls)}
    for impl in impls:
        if impl.name in preset.exclude or (
            preset.families is not None and impl.family not in preset.families
        ):
            continue
        for case in preset.cases:
            limit = preset.limit_for(impl.name, impl.family)
            skip = None
            if limit is not None and case.T > limit:
                skip = f"the {preset.name} preset runs this implementation up to T={limit}"
            jobs.setdefault(impl.framework, []).append(
                {
                    "id": f"{impl.name} | {case.label()}",
                    "impl": impl.name,
                    "case": case.as_dict(),
                    "skip": skip,
                }
            )
    for js in jobs.values():
        js.sort(key=lambda j: (j["case"]["T"], *Case(**j["case"]).key(), rank[j["impl"]]))
    return jobs


def _python_path(extra_impls: tuple[str, ...]) -> str:
    """PYTHONPATH for workers: this checkout first, then wherever the extra implementation modules live."""
    import importlib.util

    paths = [str(REPO_ROOT)]
    for spec in extra_impls:
        module = spec.split(":")[0]
        found = importlib.util.find_spec(module.split(".")[0])
        if found is not None and found.origin:
            paths.append(
                str(
                    Path(found.origin).parent
                    if found.submodule_search_locations is None
                    else Path(found.origin).parents[1]
                )
            )
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(dict.fromkeys(paths))


def _skeleton(job: dict, framework: str) -> dict:
    if job["id"].startswith("ceiling:"):
        _, fw, dtype = job["id"].split(":")
        return {
            "impl": f"gemm[{fw}]",
            "family": "ceiling",
            "role": "ceiling",
            "mode": "forward",
            "causal": False,
            "dtype": dtype,
        }
    case = Case(**job["case"])
    return {"impl": job["impl"], "framework": framework, **case.as_dict(), "S": case.S, "E": case.E}


def fallback_meta(device: str, threads: int, pin_precision: bool) -> dict:
    """Metadata for rows a worker never wrote (it crashed before reporting its own)."""
    return {
        "device": device,
        "device_name": worker.cpu_name() if device == "cpu" else "cuda (worker did not report)",
        "platform": __import__("platform").platform(),
        "versions": worker.versions(),
        "threads": {"requested": threads},
        "precision": {"pinned": pin_precision},
    }


def run_framework(
    framework: str,
    jobs: list[dict],
    preset: Preset,
    config: BenchConfig,
    run_id: str,
    on_event: Callable[[dict], None] = lambda ev: None,
    deadline_unix: float | None = None,
) -> list[dict]:
    """Run ``jobs`` in worker processes of ``framework``; exactly one record per job (plus ceilings).

    ``deadline_unix``: jobs that would start after this wall-clock time are recorded as skipped."""
    dtypes = sorted({j["case"]["dtype"] for j in jobs})
    ceiling_ids = [f"ceiling:{framework}:{dt}" for dt in dtypes]
    ceiling_jobs = [{"id": cid} for cid in ceiling_ids]
    records: dict[str, dict] = {}
    meta: dict | None = None
    remaining, gemm_dtypes, restarts = list(jobs), list(dtypes), 0
    env = worker.worker_env(framework, preset.device, config.threads)
    env["PYTHONPATH"] = _python_path(config.extra_impls)

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        while remaining or gemm_dtypes:
            plan = {
                "framework": framework,
                "device": preset.device,
                "threads": config.threads,
                "timing": asdict(preset.timing),
                "gemm": {"n": preset.gemm_n, "dtypes": gemm_dtypes},
                "pin_precision": config.pin_precision,
                "options": config.options,
                "run_id": run_id,
                "extra_impls": list(config.extra_impls),
                "deadline_unix": deadline_unix,
                "deadline_reason": f"{preset.name} preset: time budget of {preset.wall_budget_s} s ran out",
                "jobs": remaining,
            }
            plan_path = Path(tmp) / f"plan-{framework}-{restarts}.json"
            plan_path.write_text(json.dumps(plan))
            err_path = Path(tmp) / f"stderr-{framework}-{restarts}.txt"
            current, failure = None, None
            with open(err_path, "w") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "compare.bench.worker", str(plan_path)],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    env=env,
                    text=True,
                    cwd=str(REPO_ROOT),
                )
                lines: queue.Queue = queue.Queue()

                def pump(stream=proc.stdout, lines=lines):
                    for line in stream:
                        lines.put(line)
                    lines.put(None)

                threading.Thread(target=pump, daemon=True).start()
                while True:
                    try:
                        line = lines.get(timeout=config.job_timeout_s)
                    except queue.Empty:
                        failure = ("timeout", f"no progress for {config.job_timeout_s:.0f} s; worker killed")
                        proc.kill()
                        break
                    if line is None:
                        break
                    if not line.startswith(worker.PREFIX):
                        continue
                    ev = json.loads(line[len(worker.PREFIX) :])
                    if ev["event"] == "meta":
                        meta = ev["meta"]
                    elif ev["event"] == "start":
                        current = ev["id"]
                    elif ev["event"] == "record":
                        records[ev["id"]] = ev["record"]
                        current = None
                    on_event({**ev, "framework": framework})
                rc = proc.wait()
            ids_left = [cid for cid in ceiling_ids if cid not in records] + [
                j["id"] for j in remaining if j["id"] not in records
            ]
            if not ids_left:
                break
            tail = err_path.read_text()[-1500:].strip()
            kind, why = failure or ("crash", f"worker exited with status {rc}")
            culprit = current if current is not None else ids_left[0]
            by_id = {j["id"]: j for j in [*ceiling_jobs, *remaining]}
            rec = worker.base_record(
                meta or fallback_meta(preset.device, config.threads, config.pin_precision), framework, run_id
            )
            rec.update(_skeleton(by_id[culprit], framework))
            rec.update(status="error", error_kind=kind, error=f"{why}. stderr tail: {tail}" if tail else why)
            records[culprit] = rec
            on_event({"event": "record", "id": culprit, "record": rec, "framework": framework})
            restarts += 1
            remaining = [j for j in remaining if j["id"] not in records]
            gemm_dtypes = [cid.split(":")[2] for cid in ceiling_ids if cid not in records]
            if restarts > config.max_restarts:
                for cid in [c for c in ids_left if c not in records]:
                    rec = worker.base_record(
                        meta or fallback_meta(preset.device, config.threads, config.pin_precision),
                        framework,
                        run_id,
                    )
                    rec.update(_skeleton(by_id[cid], framework))
                    rec.update(
                        status="error", error_kind="crash", error="not run: worker restart limit reached"
                    )
                    records[cid] = rec
                break
    order = ceiling_ids + [j["id"] for j in jobs]
    return [records[i] for i in order if i in records]


def attach_ceilings(records: list[dict]) -> None:
    """Give every row the ceiling of its device and dtype (best GEMM of the run) and its % of it."""
    best: dict[tuple, dict] = {}
    for r in records:
        if r.get("family") == "ceiling" and r.get("status") == "ok":
            key = (r.get("device"), r["dtype"])
            if key not in best or r["gflops"] > best[key]["gflops"]:
                best[key] = r
    for r in records:
        ceiling = best.get((r.get("device"), r.get("dtype")))
        r["ceiling_gflops"] = ceiling["gflops"] if ceiling else None
        r["ceiling_impl"] = ceiling["impl"] if ceiling else None
        ok = ceiling and r.get("status") == "ok" and r.get("gflops")
        r["pct_of_ceiling"] = 100.0 * r["gflops"] / ceiling["gflops"] if ok else None


def run_bench(
    preset: Preset, config: BenchConfig, on_event: Callable[[dict], None] = lambda ev: None
) -> dict:
    """Run the whole sweep; returns the ``bench.json`` document (records, settings, environment, wall)."""
    if config.rounds < 1:
        raise ValueError(f"BenchConfig.rounds must be >= 1, got {config.rounds}")
    t0 = time.perf_counter()
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    if preset.extra_impls:  # the tables the preset needs (e.g. the flex implementations)
        config = replace(config, extra_impls=tuple(dict.fromkeys(config.extra_impls + preset.extra_impls)))
    impls, not_run = selected_impls(config, _table(config))
    jobs = plan_jobs(preset, impls)
    total = sum(len(v) + len({j["case"]["dtype"] for j in v}) for v in jobs.values())
    on_event({"event": "plan", "total": total * config.rounds})
    # relative cost of a job: a JAX job also compiles (forward+backward takes seconds on a small CPU)
    weight = {"jax": 2.0, "torch": 1.0}
    rounds = config.rounds
    # (round, framework) turns in order: jax, torch, jax, torch… so that slow drifts of a shared machine's
    # speed hit both frameworks alike instead of whichever ran during the slow minutes
    turns = [(r, fw) for r in range(rounds) for fw in config.frameworks if jobs.get(fw)]
    todo = {t: weight.get(t[1], 1.0) * sum(j["skip"] is None for j in jobs[t[1]]) for t in turns}
    by_round: list[list[dict]] = [[] for _ in range(rounds)]
    for turn in turns:
        r, framework = turn
        deadline = None
        if preset.wall_budget_s is not None:
            # each turn gets the time left in proportion to the (weighted) jobs it has to run
            left = preset.wall_budget_s - (time.perf_counter() - t0)
            share = left * todo[turn] / max(1, sum(todo.values()))
            deadline = time.time() + share
        if rounds > 1:
            on_event({"event": "round", "round": r + 1, "rounds": rounds, "framework": framework})
        by_round[r] += run_framework(framework, jobs[framework], preset, config, run_id, on_event, deadline)
        todo.pop(turn)
    records = merge_rounds(by_round)
    attach_ceilings(records)
    return {
        "schema": worker.SCHEMA,
        "run_id": run_id,
        "preset": preset.name,
        "device": preset.device,
        "config": {**asdict(config), "frameworks": list(config.frameworks)},
        "timing_settings": asdict(preset.timing),
        "gemm_n": preset.gemm_n,
        "plot_config": list(preset.plot_config),
        "not_run": not_run
        + [{"impl": n, "reason": f"not in the {preset.name} preset"} for n in preset.exclude],
        "versions": worker.versions(),
        "wall_s": time.perf_counter() - t0,
        "records": records,
    }


def _row_key(rec: dict) -> tuple:
    return (rec.get("impl"), rec.get("mode"), rec.get("causal"), rec.get("dtype"), *report_case_key(rec))


def report_case_key(rec: dict) -> tuple:
    return tuple(rec.get(k) for k in ("B", "N", "T", "H"))


def merge_rounds(by_round: list[list[dict]]) -> list[dict]:
    """One record per row from several rounds: the ok round with the median time (the lower middle for
    an even count), with every ok round's median kept in ``round_median_s``. A row ok in no round keeps
    its first round's record. One round: the records unchanged."""
    if len(by_round) == 1:
        return by_round[0]
    order: list[tuple] = []
    rows: dict[tuple, list[dict]] = {}
    for recs in by_round:
        for rec in recs:
            key = _row_key(rec)
            if key not in rows:
                order.append(key)
                rows[key] = []
            rows[key].append(rec)
    merged = []
    for key in order:
        ok = sorted((r for r in rows[key] if r.get("status") == "ok"), key=lambda r: r["median_s"])
        if not ok:
            merged.append(rows[key][0])
            continue
        pick = dict(ok[(len(ok) - 1) // 2])
        pick["rounds"] = len(rows[key])
        pick["round_median_s"] = [r["median_s"] for r in rows[key] if r.get("status") == "ok"]
        merged.append(pick)
    return merged


def _table(config: BenchConfig) -> tuple[Impl, ...]:
    if not config.extra_impls:
        return IMPLS
    return tuple(worker.load_table(list(config.extra_impls)).values())
