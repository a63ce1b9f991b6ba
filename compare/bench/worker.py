"""One framework's measurements, in a process of its own: ``python -m compare.bench.worker PLAN.json``.

Why a process per framework: JAX preallocates most of a GPU's memory, and on CPU the two runtimes' thread
pools contend for the same cores. The parent (:mod:`compare.bench.runner`) starts one worker per
framework, one after the other, with the thread count pinned by :func:`worker_env` (environment, read
when the libraries load) and :func:`pin_threads` (CPU affinity, set before they load: XLA:CPU sizes its
Eigen pool from the affinity mask; torch additionally gets ``torch.set_num_threads``).

Protocol: the plan is a JSON file (framework, device, threads, timing settings, ceiling GEMM, jobs).
The worker writes one JSON object per line to its *original* stdout, prefixed with ``@@bench``:
``{"event": "meta", ...}`` once, then ``{"event": "start", "id": ...}`` and ``{"event": "record",
"record": {...}}`` per job. Everything else libraries print goes to stderr (fd 1 is redirected), so a
stray print cannot corrupt the stream. A job that raises becomes a record with ``status="error"``; a job
that kills the process is detected by the parent from the last ``start`` without a ``record``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

PREFIX = "@@bench "
SCHEMA = "compare.bench/1"

# --------------------------------------------------------------------------------- process set-up


def worker_env(framework: str, device: str, threads: int, base: dict | None = None) -> dict:
    """Environment for a worker: thread counts pinned for OpenMP/MKL/XLA, JAX kept off other devices."""
    env = dict(os.environ if base is None else base)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    multi = "true" if threads > 1 else "false"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_cpu_multi_thread_eigen")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_cpu_multi_thread_eigen={multi}"])
    env["TF_CPP_MIN_LOG_LEVEL"] = env.get("TF_CPP_MIN_LOG_LEVEL", "2")
    if framework == "jax":
        # memory figures mean something only without the 75% preallocation
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        if device == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
    if framework == "torch" and device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def pin_threads(threads: int) -> list[int]:
    """Restrict this process to ``threads`` CPUs (the first ones it may use); returns the CPU list."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[: max(1, threads)])
    return sorted(os.sched_getaffinity(0))


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Library versions from package metadata: no framework has to be imported to know them."""
    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "flax", "torch", "numpy"):
        out[dist] = _version(dist)
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------- frameworks


def setup_framework(framework: str, device: str, threads: int, pin_precision: bool) -> dict:
    """Import the framework, pin precision and threads; return the metadata every record carries."""
    meta: dict[str, Any] = {"device": device, "platform": platform.platform(), "versions": versions()}
    if framework == "jax":
        import jax

        if pin_precision:
            jax.config.update("jax_default_matmul_precision", "highest")
        dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
        jax.config.update("jax_default_device", dev)
        meta["device_name"] = dev.device_kind if device == "cuda" else cpu_name()
        meta["jax_device"] = str(dev)
        meta["precision"] = {
            "pinned": pin_precision,
            "jax_default_matmul_precision": jax.config.jax_default_matmul_precision or "default",
        }
    elif framework == "torch":
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set (in-process use)
            pass
        if pin_precision:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        meta["device_name"] = torch.cuda.get_device_name(0) if device == "cuda" else cpu_name()
        meta["precision"] = {
            "pinned": pin_precision,
            "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "torch.get_float32_matmul_precision": torch.get_float32_matmul_precision(),
        }
    else:
        raise ValueError(f"framework must be 'jax' or 'torch', got {framework!r}")
    meta["threads"] = thread_record(framework, threads)
    return meta


def thread_record(framework: str, threads: int) -> dict:
    rec: dict[str, Any] = {
        "requested": threads,
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
    }
    if framework == "torch":
        import torch

        rec["torch_num_threads"] = torch.get_num_threads()
        rec["torch_num_interop_threads"] = torch.get_num_interop_threads()
    return rec


# ----------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of one row: device memory on GPU, process RSS high-water (VmHWM, reset per row) on CPU."""

    def __init__(self, framework: str, device: str):
        self.framework, self.device = framework, device

    def reset(self) -> None:
        if self.device == "cuda" and self.framework == "torch":
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.device == "cpu":
            try:  # Linux: writing 5 resets the peak RSS (VmHWM) of this process
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def read(self) -> tuple[int | None, str]:
        if self.device == "cuda":
            if self.framework == "torch":
                import torch

                return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
            import jax

            stats = jax.devices("gpu")[0].memory_stats() or {}
            return stats.get("peak_bytes_in_use"), "jax peak_bytes_in_use (process lifetime)"
        try:
            with open("/proc/self/status") as f:
                kb = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
            return kb * 1024, "process RSS high-water (VmHWM, reset per row)"
        except (OSError, AttributeError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process ru_maxrss (lifetime)"

    def release(self) -> None:
        gc.collect()
        if self.device == "cuda" and self.framework == "torch":
            import torch

            torch.cuda.empty_cache()


def classify(exc: BaseException) -> str:
    """``oom`` / ``unsupported`` / ``exception``: what kind of failure a row records."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if (
        "outofmemory" in text
        or "out of memory" in text
        or "resource_exhausted" in text
        or isinstance(exc, MemoryError)
    ):
        return "oom"
    unsupported = ("no available kernel", "not supported", "unsupported", "cudnn", "notimplemented")
    if isinstance(exc, NotImplementedError) or any(u in text for u in unsupported):
        return "unsupported"
    return "exception"


# -------------------------------------------------------------------------------------------- jobs


def base_record(meta: dict, framework: str, run_id: str) -> dict:
    return {
        "schema": SCHEMA,
        "run_id": run_id,
        "framework": framework,
        "device": meta.get("device"),
        "device_name": meta.get("device_name"),
        "platform": meta.get("platform"),
        "versions": meta.get("versions"),
        "threads": meta.get("threads"),
        "precision": meta.get("precision"),
        "pid": os.getpid(),
    }


def run_jobs(plan: dict, table: dict, emit: Callable[[dict], None], meta: dict) -> None:
    """Measure the ceiling GEMM(s), then every job of ``plan``; each yields exactly one record."""
    from compare.bench import impls as impls_mod
    from compare.bench.flops import gemm_flops
    from compare.bench.presets import Case
    from compare.bench.timing import TimingSettings, measure

    framework, device = plan["framework"], plan["device"]
    settings = TimingSettings(**plan["timing"])
    ctx = impls_mod.Context(device=device, options=plan.get("options", {}))
    memory = PeakMemory(framework, device)

    def one(job_id, record: dict, build: Callable[[], Any], credited: float) -> None:
        emit({"event": "start", "id": job_id})
        prepared = None
        try:
            memory.reset()
            prepared = build()
            with prepared.context():
                timing = measure(prepared.step, prepared.sync, settings)
            peak, kind = memory.read()
            record.update(
                status="ok",
                backend=prepared.backend,
                compile_s=prepared.compile_s,
                compile_note=prepared.compile_note,
                **timing.as_dict(),
                flops=credited,
                gflops=credited / timing.median_s / 1e9 if timing.median_s > 0 else None,
                peak_mem_bytes=peak,
                peak_mem_kind=kind,
                **prepared.extra,
            )
        except Exception as e:  # one implementation failing must not stop the sweep
            record.update(
                status="error",
                error=f"{type(e).__name__}: {str(e)[:800]}",
                error_kind=classify(e),
                traceback=traceback.format_exc(limit=6)[-2000:],
            )
            if prepared is not None:
                record.setdefault("backend", prepared.backend)
        finally:
            prepared = None
            memory.release()
        # other processes on the machine distort CPU timings (thread pools stall); make that visible
        record["load_avg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        emit({"event": "record", "id": job_id, "record": record})

    gemm = plan.get("gemm") or {}
    for dtype in gemm.get("dtypes", []):
        n = gemm["n"]
        rec = base_record(meta, framework, plan["run_id"])
        rec.update(
            impl=f"gemm[{framework}]",
            family="ceiling",
            role="ceiling",
            mode="forward",
            causal=False,
            dtype=dtype,
            B=None,
            N=None,
            T=None,
            S=None,
            H=None,
            E=None,
            gemm_n=n,
            description=f"({n}×{n}) @ ({n}×{n}) {dtype}",
        )
        one(
            f"ceiling:{framework}:{dtype}",
            rec,
            lambda n=n, dtype=dtype: impls_mod.build_gemm(framework, n, dtype, ctx),
            gemm_flops(n, n, n),
        )

    for job in plan["jobs"]:
        case = Case(**job["case"])
        impl = table[job["impl"]]
        rec = base_record(meta, framework, plan["run_id"])
        rec.update(
            impl=impl.name,
            family=impl.family,
            role=impl.role,
            description=impl.description,
            **case.as_dict(),
            S=case.S,
            E=case.E,
        )
        reason = (
            job.get("skip")
            or (
                f"opt-in: needs --{impl.opt_in}" if impl.opt_in and not ctx.options.get(impl.opt_in) else None
            )
            or impl.applies(case, device)
            or impls_mod.availability(impl)
            or (
                plan.get("deadline_reason")
                if plan.get("deadline_unix") and time.time() > plan["deadline_unix"]
                else None
            )
        )
        if reason:
            emit({"event": "start", "id": job["id"]})
            rec.update(status="skipped", reason=reason, flops=impl.credited_flops(case))
            emit({"event": "record", "id": job["id"], "record": rec})
            continue
        one(
            job["id"],
            rec,
            lambda impl=impl, case=case: impl.build(case, ctx),
            impl.credited_flops(case),
        )


def load_table(extra: list[str]) -> dict:
    """The implementation table plus ``module:ATTR`` extras (a tuple of :class:`Impl`), by name."""
    from compare.bench.impls import IMPLS

    table = {impl.name: impl for impl in IMPLS}
    for spec in extra:
        module, attr = spec.split(":")
        for impl in getattr(importlib.import_module(module), attr):
            table[impl.name] = impl
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare.bench.worker", description=__doc__)
    parser.add_argument("plan", help="plan JSON written by compare.bench.runner")
    args = parser.parse_args(argv)
    with open(args.plan) as f:
        plan = json.load(f)

    # The protocol keeps the real stdout; fd 1 then points at stderr so library prints cannot corrupt it.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(event: dict) -> None:
        proto.write(PREFIX + json.dumps(event, default=str) + "\n")
        proto.flush()

    pin_threads(plan["threads"])  # before the framework loads its thread pools
    t0 = time.perf_counter()
    meta = setup_framework(
        plan["framework"], plan["device"], plan["threads"], plan.get("pin_precision", True)
    )
    meta["import_s"] = time.perf_counter() - t0
    emit({"event": "meta", "meta": meta})
    run_jobs(plan, load_table(plan.get("extra_impls", [])), emit, meta)
    emit({"event": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
