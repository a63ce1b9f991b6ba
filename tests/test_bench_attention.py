"""The decoder-attention bench entries (compare.bench.impls_attention) build and step on a tiny case, the
attention preset plans only them (decode rows forward only, dense causal prefill not past 4096), and the
credited FLOPs are those counted by hand."""

import pytest

from compare.bench import impls_attention, presets
from compare.bench.flops import FORWARD, FORWARD_BACKWARD
from compare.bench.impls import IMPLS, Context
from compare.bench.presets import Case
from compare.bench.runner import plan_jobs

ENTRIES = [i for i in impls_attention.ATTENTION_IMPLS if i.opt_in is None]


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("impl", ENTRIES, ids=lambda i: i.name)
def test_entry_builds_and_steps(impl, window):
    case = Case(B=1, N=8, T=24, H=4, causal=True, dtype="float32", mode=FORWARD, window=window)
    assert impl.applies(case, "cpu") is None
    prepared = impl.build(case, Context(device="cpu"))
    prepared.sync(prepared.step())
    if impl.family == "attention_decode":  # the ring holds the window, the full cache T slots
        slots = window or 24
        assert prepared.extra["cache_bytes"] == 2 * 1 * 2 * slots * 4 * 4


def test_flops_by_hand():
    case = Case(B=1, N=4, T=5, H=2, causal=True, dtype="float32", mode=FORWARD, window=2)
    # kept pairs 1 + 2 + 2 + 2 + 2 = 9; projections: q, o (E·N·H) and k, v (E·K·H), K = N / 4 = 1
    proj = 2 * 5 * 8 * (2 * 8 + 2 * 2)
    assert impls_attention.prefill_flops(case) == 4 * 4 * 9 * 2 + proj
    assert impls_attention.decode_flops(case) == 4 * 4 * 2 * 2 + 2 * 8 * (2 * 8 + 2 * 2)


def test_attention_preset_plans_only_attention_rows():
    preset = presets.PRESETS["attention"]("cpu")
    jobs = plan_jobs(preset, list(IMPLS) + list(impls_attention.ATTENTION_IMPLS))
    flat = [j for js in jobs.values() for j in js]
    assert {j["impl"] for j in flat} == {i.name for i in impls_attention.ATTENTION_IMPLS}
    for impl in impls_attention.ATTENTION_IMPLS:
        for case in preset.cases:
            reason = impl.applies(case, "cpu")
            decode = impl.family == "attention_decode"
            if decode and case.mode == FORWARD_BACKWARD:
                assert reason == "decode rows: forward only"
            elif not decode and not case.window and case.T > 4096:
                assert "without a window is a decode-only case" in reason
            else:
                assert reason is None
