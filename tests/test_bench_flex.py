"""The flex bench entries (compare.bench.impls_flex) build and step on a tiny case in each mode, the
flex preset plans only them, and the credited FLOPs count the kept entries (by hand)."""

import pytest

from compare.bench import impls_flex, presets
from compare.bench.flops import FORWARD, FORWARD_BACKWARD
from compare.bench.impls import Context
from compare.bench.presets import Case
from compare.bench.runner import plan_jobs


@pytest.mark.parametrize("mode", [FORWARD, FORWARD_BACKWARD])
@pytest.mark.parametrize("impl", [i for i in impls_flex.FLEX_IMPLS if i.opt_in is None], ids=lambda i: i.name)
def test_entry_builds_and_steps(impl, mode):
    case = Case(B=1, N=2, T=160, H=8, causal=True, dtype="float32", mode=mode, window=48)
    reason = impl.applies(case, "cpu")
    if reason is not None:
        assert mode == FORWARD_BACKWARD and "no backward on CPU" in reason
        return
    prepared = impl.build(case, Context(device="cpu"))
    prepared.sync(prepared.step())


def test_kept_entries_by_hand():
    case = Case(B=1, N=1, T=5, H=1, causal=True, dtype="float32", mode=FORWARD, window=2)
    assert impls_flex.kept_entries(case) == 1 + 2 + 2 + 2 + 2
    assert impls_flex.kept_entries(Case(1, 1, 5, 1, True, "float32", FORWARD)) == 15


def test_flex_preset_plans_only_flex_rows():
    preset = presets.PRESETS["flex"]("cpu")
    from compare.bench.impls import IMPLS

    jobs = plan_jobs(preset, list(IMPLS) + list(impls_flex.FLEX_IMPLS))
    names = {j["impl"] for js in jobs.values() for j in js}
    assert names == {i.name for i in impls_flex.FLEX_IMPLS}
    assert {c.window for c in preset.cases} == {None, 512}
    skips = [
        j for js in jobs.values() for j in js if j["impl"] == "torch.flex[eager]" and j["case"]["T"] > 8192
    ]
    assert skips and all(j["skip"] for j in skips)
