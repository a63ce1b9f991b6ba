"""The one timing loop: warm-up, then median and IQR of individually synchronised runs.

Every sample is ``clock(); out = step(); sync(out); clock()``: the sync is *inside* the timed region,
so JAX's asynchronous dispatch (``block_until_ready``) and CUDA's (``torch.cuda.synchronize``) are waited
for. Compilation is not in here at all: builders compile before the loop (``jit(f).lower().compile()``)
and report that time separately, and the warm-up absorbs any remaining first-call cost.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TimingSettings:
    """How long to measure. The loop stops after ``min_runs`` runs once ``min_time_s`` has passed, or
    when ``budget_s`` is spent (but never before ``floor_runs`` runs), or at ``max_runs``."""

    warmup_runs: int = 2  # at least this many untimed runs
    warmup_s: float = 0.05  # ... and keep warming up until this much time has passed
    min_runs: int = 30
    min_time_s: float = 0.0
    budget_s: float = 2.0
    floor_runs: int = 5
    max_runs: int = 10_000


@dataclass(frozen=True)
class Timing:
    """Summary of the timed samples (seconds)."""

    n_runs: int
    warmup_runs: int
    median_s: float
    q1_s: float
    q3_s: float
    iqr_s: float
    min_s: float
    mean_s: float
    total_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def jax_sync(out: Any) -> None:
    """Wait for every array in ``out`` (any pytree): JAX returns before the computation finishes."""
    import jax

    for leaf in jax.tree_util.tree_leaves(out):
        wait = getattr(leaf, "block_until_ready", None)
        if wait is not None:
            wait()


def torch_sync(device: str) -> Callable[[Any], None]:
    """Sync for torch on ``device``: CUDA kernels are asynchronous, CPU eager ops are not."""
    if device.startswith("cuda"):
        import torch

        def sync(_out: Any) -> None:
            torch.cuda.synchronize()

        return sync
    return lambda _out: None


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) by linear interpolation; a single sample gives itself three times."""
    xs = sorted(samples)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def measure(
    step: Callable[[], Any],
    sync: Callable[[Any], None],
    settings: TimingSettings = TimingSettings(),
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Warm up ``step`` and time it; every run is synchronised with ``sync`` before the clock stops."""
    start = clock()
    warm = 0
    while warm < settings.warmup_runs or (clock() - start < settings.warmup_s and warm < 100):
        sync(step())
        warm += 1

    samples: list[float] = []
    began = clock()
    while True:
        t0 = clock()
        out = step()
        sync(out)
        samples.append(clock() - t0)
        n, spent = len(samples), clock() - began
        if n >= settings.max_runs:
            break
        if n >= settings.min_runs and spent >= settings.min_time_s:
            break
        if n >= settings.floor_runs and spent >= settings.budget_s:
            break
    q1, med, q3 = quantiles(samples)
    return Timing(
        n_runs=len(samples),
        warmup_runs=warm,
        median_s=med,
        q1_s=q1,
        q3_s=q3,
        iqr_s=q3 - q1,
        min_s=min(samples),
        mean_s=statistics.fmean(samples),
        total_s=clock() - began,
    )
