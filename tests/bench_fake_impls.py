"""Fake implementations for the benchmark harness tests (loaded by workers via ``--extra-impls``).

Not collected by pytest (no ``test_`` prefix). They touch no framework, so they exercise only the
harness: a fast success, an out-of-memory error, an unsupported backend, and one that kills its process.
"""

import os

from compare.bench.impls import Impl, Prepared


def _ok(case, ctx):
    return Prepared(step=lambda: case.T, sync=lambda out: None, backend="fake backend", compile_s=123.0)


def _oom(case, ctx):
    raise RuntimeError("CUDA out of memory. Tried to allocate 64.00 GiB (fake)")


def _unsupported(case, ctx):
    raise RuntimeError("No available kernel. Aborting execution. (fake)")


def _crash_once(case, ctx):
    # dies on one case only, like a segfault or the OOM killer would
    if case.T == 16 and not case.causal:
        os._exit(3)
    return _ok(case, ctx)


FAKE_IMPLS = (
    Impl("fake.ok", "torch", "sdpa", _ok, "always works", role="torch_attn"),
    Impl("fake.oom", "torch", "sdpa", _oom, "always runs out of memory"),
    Impl("fake.unsupported", "torch", "sdpa", _unsupported, "backend missing"),
    Impl("fake.crash", "torch", "sdpa", _crash_once, "kills its worker on one case"),
)
