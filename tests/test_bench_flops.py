"""The one FLOP formula, checked by hand."""

import pytest

from compare.bench import flops


def test_attention_forward_by_hand():
    # B=2, N=3, T=5, S=7, H=11: two matmuls of 2·T·S·H per (batch, head)
    assert flops.attention_flops(2, 3, 5, 7, 11, causal=False) == 2 * 3 * (2 * 5 * 7 * 11) * 2


def test_causal_is_credited_half():
    full = flops.attention_flops(2, 3, 5, 7, 11, causal=False)
    assert flops.attention_flops(2, 3, 5, 7, 11, causal=True) == full / 2


def test_backward_is_two_and_a_half_forwards():
    fwd = flops.attention_flops(1, 8, 128, 128, 64, causal=True)
    both = flops.attention_flops(1, 8, 128, 128, 64, causal=True, mode=flops.FORWARD_BACKWARD)
    assert both == pytest.approx(3.5 * fwd)


def test_projection_and_module():
    assert flops.projection_flops(2, 5, 12, 12) == 2 * 2 * 5 * 12 * 12
    # N=3 heads of H=4: E=12; four E×E projections plus the attention
    expected = 4 * (2 * 2 * 5 * 12 * 12) + 4 * 2 * 3 * 5 * 5 * 4
    assert flops.module_flops(2, 3, 5, 4, causal=False) == expected
    # grouped-query: K and V project to num_kv_heads·H = 4
    gqa = 2 * (2 * 2 * 5 * 12 * 12) + 2 * (2 * 2 * 5 * 12 * 4) + 4 * 2 * 3 * 5 * 5 * 4
    assert flops.module_flops(2, 3, 5, 4, causal=False, num_kv_heads=1) == gqa


def test_gemm_and_bad_mode():
    assert flops.gemm_flops(2, 3, 5) == 60
    with pytest.raises(ValueError, match="mode"):
        flops.mode_factor("backward")


def test_impl_table_uses_the_formula():
    from compare.bench.impls import by_name
    from compare.bench.presets import Case

    case = Case(B=2, N=3, T=5, H=4, causal=True, dtype="float32", mode=flops.FORWARD_BACKWARD)
    table = by_name()
    assert table["jax_attn.sdpa[jit]"].credited_flops(case) == flops.attention_flops(
        2, 3, 5, 5, 4, True, flops.FORWARD_BACKWARD
    )
    # every sdpa entry is credited the same; every module the same (with projections)
    sdpa = {i.credited_flops(case) for i in table.values() if i.family == "sdpa"}
    modules = {i.credited_flops(case) for i in table.values() if i.family != "sdpa"}
    assert len(sdpa) == 1 and len(modules) == 1
    assert modules == {flops.module_flops(2, 3, 5, 4, True, flops.FORWARD_BACKWARD)}
