"""The MLA bench entries (compare.bench.impls_mla) build and step on a tiny case, report the measured cache
bytes per token = (kv_lora_rank + qk_rope_head_dim) × dtype size next to a GQA layer's of the same width, and
the mla preset plans only them (decode rows forward only, prefill not past 4096)."""

import pytest

from compare.bench import impls_mla, presets
from compare.bench.flops import FORWARD, FORWARD_BACKWARD
from compare.bench.impls import IMPLS, Context
from compare.bench.presets import Case
from compare.bench.runner import plan_jobs

# The torch entries and the JAX decode one (each JAX entry initialises and compiles a model: seconds).
ENTRIES = [i for i in impls_mla.MLA_IMPLS if i.framework == "torch" or i.name == "jax_attn.mla.decode[jit]"]


@pytest.mark.parametrize("impl", ENTRIES, ids=lambda i: i.name)
def test_entry_builds_and_steps(impl):
    case = Case(B=1, N=2, T=8, H=4, causal=True, dtype="float32", mode=FORWARD)
    assert impl.applies(case, "cpu") is None
    prepared = impl.build(case, Context(device="cpu"))
    prepared.sync(prepared.step())
    if impl.family == "mla_decode":
        c = impls_mla.config(case)  # L = 16, R = 2
        assert prepared.extra["measured_cache_bytes_per_token"] == (c.L + c.R) * 4 == 72
        assert prepared.extra["cache_bytes"] == 8 * 72
        assert prepared.extra["gqa_cache_bytes_per_token"] == 2 * (2 // 4) * 4 * 4
        assert prepared.extra["mha_cache_bytes_per_token"] == 2 * 2 * 4 * 4


def test_preset_sizes_and_plan():
    preset = presets.PRESETS["mla"]("cpu")
    c = impls_mla.config(preset.cases[0])
    assert (c.E, c.N, c.L, c.R, c.D, c.V) == (1024, 16, 256, 32, 64, 64)
    per_token = impls_mla.cache_bytes_per_token(preset.cases[0])
    assert per_token == {
        "cache_bytes_per_token": 288 * 4,
        "gqa_cache_bytes_per_token": 512 * 4,
        "mha_cache_bytes_per_token": 2048 * 4,
    }
    jobs = plan_jobs(preset, list(IMPLS) + list(impls_mla.MLA_IMPLS))
    flat = [j for js in jobs.values() for j in js]
    assert {j["impl"] for j in flat} == {i.name for i in impls_mla.MLA_IMPLS}
    for impl in impls_mla.MLA_IMPLS:
        for case in preset.cases:
            reason = impl.applies(case, "cpu")
            if impl.family == "mla_decode" and case.mode == FORWARD_BACKWARD:
                assert reason == "decode rows: forward only"
            elif impl.family == "mla" and case.T > 4096:
                assert "decode-only" in reason
            else:
                assert reason is None
