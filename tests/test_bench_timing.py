"""The timing loop: sync inside every timed region, JAX waited for, compile kept out of steady state."""

import jax
import jax.numpy as jnp
import pytest

from compare.bench import impls, timing
from compare.bench.flops import FORWARD, FORWARD_BACKWARD
from compare.bench.presets import Case

FAST = timing.TimingSettings(warmup_runs=2, warmup_s=0.0, min_runs=5, budget_s=10.0, floor_runs=1)


class FakeLeaf:
    """Stands in for an asynchronously dispatched array: records when it is waited for."""

    def __init__(self, log):
        self.log = log

    def block_until_ready(self):
        self.log.append("block")
        return self


def test_every_sample_waits_before_the_clock_stops():
    log = []

    def clock():
        log.append("clock")
        return len(log) * 1e-3

    def step():
        log.append("step")
        return {"out": FakeLeaf(log), "aux": (FakeLeaf(log), 3)}

    t = timing.measure(step, timing.jax_sync, FAST, clock=clock)
    assert t.n_runs == 5 and t.warmup_runs == 2
    # every step is followed by both leaves being waited for before anything else (the clock) happens
    for i, event in enumerate(log):
        if event == "step":
            assert log[i + 1 : i + 3] == ["block", "block"]
    timed = "".join("c" if e == "clock" else e[0] for e in log)
    assert timed.count("csbbc") == 5


def test_jax_sync_waits_for_real_async_dispatch():
    x = jnp.ones((64, 64))
    out = jax.jit(lambda a: (a @ a, {"b": a + 1}))(x)
    timing.jax_sync(out)  # returns only once every leaf is ready
    assert all(leaf.is_ready() for leaf in jax.tree_util.tree_leaves(out))


def test_torch_sync_on_cuda_synchronises(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a))
    timing.torch_sync("cuda")(None)
    timing.torch_sync("cpu")(None)
    assert len(calls) == 1


def test_quantiles_median_iqr():
    assert timing.quantiles([4.0, 1.0, 3.0, 2.0, 5.0]) == (2.0, 3.0, 4.0)
    assert timing.quantiles([7.0]) == (7.0, 7.0, 7.0)


def test_budget_stops_early_but_not_before_floor():
    ticks = iter(range(10_000))
    settings = timing.TimingSettings(warmup_runs=0, warmup_s=0.0, min_runs=30, budget_s=3.0, floor_runs=4)
    t = timing.measure(lambda: None, lambda o: None, settings, clock=lambda: float(next(ticks)))
    assert 4 <= t.n_runs < 30


def test_jax_compile_is_separate_and_not_repeated():
    traces = []

    def f(a):
        traces.append(1)  # runs only while tracing
        return jnp.tanh(a) @ a

    prepared = impls.jax_compile(f, (jnp.ones((32, 32)),), "test")
    assert len(traces) == 1 and prepared.compile_s > 0.0
    t = timing.measure(prepared.step, prepared.sync, FAST)
    assert t.n_runs == 5
    assert len(traces) == 1, "the timed loop must call the compiled executable, never trace or compile"


@pytest.mark.parametrize("mode", [FORWARD, FORWARD_BACKWARD])
def test_jax_attn_builder_compiles_once(monkeypatch, mode):
    import jax_attn

    calls = []
    real = jax_attn.scaled_dot_product_attention
    monkeypatch.setattr(
        jax_attn, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    case = Case(B=1, N=2, T=8, H=4, causal=True, dtype="float32", mode=mode)
    prepared = impls.build_jax_attn_sdpa(case, impls.Context("cpu"))
    assert prepared.compile_s > 0 and "xla_temp_bytes" in prepared.extra
    traced = len(calls)
    timing.measure(prepared.step, prepared.sync, FAST)
    assert len(calls) == traced
    grads = prepared.step()
    if mode == FORWARD_BACKWARD:
        assert [g.shape for g in grads] == [(1, 2, 8, 4)] * 3
