"""The whole-layer bench entries (compare.bench.impls_layer): every row builds and steps at a tiny size in
both modes, all rows of a case compute the same output (the twins and the flax row against transformers'
eager module, fp32), their gradients w.r.t. the hidden states and the parameters agree under one cotangent,
the worker records peak memory with the row's starting resident set, and the layer preset plans only these
rows on the issue's shapes."""

import numpy as np
import pytest

from compare.bench import impls_layer, presets, worker
from compare.bench.flops import FORWARD, FORWARD_BACKWARD
from compare.bench.impls import IMPLS, Context
from compare.bench.presets import Case
from compare.bench.runner import plan_jobs

CPU = Context(device="cpu")
RTOL = 1e-4  # fp32: max |row - transformers eager| relative to max |transformers eager|


def tiny(layer: str, mode: str = FORWARD) -> Case:
    N = {"llama": 8, "qwen3": 4}[layer]  # 2 key/value heads either way
    return Case(B=2, N=N, T=12, H=8, causal=True, dtype="float32", mode=mode, layer=layer)


def _np(out):
    import jax

    out = out[0] if isinstance(out, tuple) else out
    if isinstance(out, jax.Array):
        return np.asarray(out)
    return out.detach().numpy()


def _rel(a, ref) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("layer", sorted(impls_layer.LAYERS))
def test_rows_compute_the_same_output(layer):
    case = tiny(layer)
    outs = {}
    for impl in impls_layer.LAYER_IMPLS:
        assert impl.applies(case, "cpu") is None
        prepared = impl.build(case, CPU)
        out = prepared.step()
        prepared.sync(out)
        outs[impl.name] = _np(out)
        assert prepared.extra["rss_before_bytes"] > 0
    ref = outs.pop("transformers[eager]")
    assert ref.shape == (case.B, case.T, case.E)
    assert np.abs(ref).max() > 0
    # transformers[sdpa] is causal through is_causal, the eager row through its additive mask
    for name, out in outs.items():
        assert _rel(out, ref) < RTOL, name


def torch_from(a):
    import torch

    return torch.from_numpy(a)


def _torch_grads(f, params, x, cot):
    import torch

    x = torch.from_numpy(x).requires_grad_(True)
    grads = torch.autograd.grad(f(x), (x, *params), torch.from_numpy(cot))
    return grads[0].numpy(), float(sum((g.double() ** 2).sum() for g in grads[1:]))


def _jax_grads(model, x, cot):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit  # one compile instead of op-by-op dispatch of the vjp (seconds on a small CPU)
    def grads(state, x, cot):
        _, vjp = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
        return vjp(cot)

    g_state, g_x = grads(state, jnp.asarray(x), jnp.asarray(cot))
    leaves = [g for g in jax.tree_util.tree_leaves(g_state) if jnp.issubdtype(g.dtype, jnp.floating)]
    return np.asarray(g_x), float(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in leaves))


@pytest.mark.parametrize("layer", sorted(impls_layer.LAYERS))
def test_gradients_agree(layer):
    """Gradients w.r.t. x elementwise, and w.r.t. all parameters through their total squared norm (the
    twins may store the projections fused or transposed; the norm does not depend on the layout)."""
    import torch_attn.hf

    case = tiny(layer, FORWARD_BACKWARD)
    x = impls_layer.hidden_states(case)
    cot = np.random.default_rng(1).standard_normal(x.shape, dtype=np.float32)
    hf = impls_layer.hf_module(case)
    pe, mask = impls_layer.hf_inputs(case, hf, torch_from(x))
    ref_x, ref_p = _torch_grads(
        lambda x: hf(x, position_embeddings=pe, attention_mask=mask)[0], tuple(hf.parameters()), x, cot
    )
    twin = torch_attn.hf.from_hf(hf)
    rows = {
        "torch_attn": _torch_grads(twin, tuple(twin.parameters()), x, cot),
        "jax_attn": _jax_grads(impls_layer.jax_twin(case), x, cot),
        "flax": _jax_grads(impls_layer.flax_layer(case), x, cot),
    }
    for name, (g_x, g_p) in rows.items():
        assert _rel(g_x, ref_x) < RTOL, name
        assert abs(g_p - ref_p) / ref_p < RTOL, name


@pytest.mark.parametrize("impl", impls_layer.LAYER_IMPLS, ids=lambda i: i.name)
def test_forward_backward_rows_step(impl):
    case = tiny("qwen3", FORWARD_BACKWARD)
    prepared = impl.build(case, CPU)
    grads = prepared.step()
    prepared.sync(grads)
    if impl.framework == "torch":  # (dx, one gradient per parameter)
        assert grads[0].shape == (case.B, case.T, case.E) and len(grads) > 1
    else:  # (d state, dx)
        assert grads[1].shape == (case.B, case.T, case.E)


def test_worker_records_time_and_peak_memory():
    """One torch row through the worker's loop: status ok, peak memory measured per row with the resident
    set at the row's start next to it, the layer name carried into the record."""
    from compare.bench.timing import TimingSettings

    case = tiny("llama")
    plan = {
        "framework": "torch",
        "device": "cpu",
        "threads": 1,
        "timing": TimingSettings(
            warmup_runs=1, warmup_s=0.0, min_runs=2, budget_s=0.01, floor_runs=2
        ).__dict__,
        "gemm": {},
        "run_id": "test",
        "options": {},
        "jobs": [{"id": "row", "impl": "transformers[sdpa]", "case": case.as_dict(), "skip": None}],
    }
    events = []
    table = {i.name: i for i in impls_layer.LAYER_IMPLS}
    worker.run_jobs(plan, table, events.append, {"device": "cpu"})
    (rec,) = [e["record"] for e in events if e["event"] == "record"]
    assert rec["status"] == "ok", rec.get("error")
    assert rec["layer"] == "llama" and rec["flops"] == impls_layer.layer_flops(case)
    # both read from the kernel's resident-set counters, which lag by a few pages (per-thread caching)
    assert rec["rss_before_bytes"] > 0 and rec["peak_mem_bytes"] >= rec["rss_before_bytes"] - 4 * 2**20
    assert "attn_implementation=sdpa" in rec["backend"]


def test_flops_by_hand():
    case = Case(B=1, N=4, T=5, H=2, causal=True, dtype="float32", mode=FORWARD, layer="llama")
    # kept pairs 15; projections q, o (E·N·H) and k, v (E·K·H), E = 8, K = 1
    assert impls_layer.layer_flops(case) == 4 * 4 * 15 * 2 + 2 * 5 * 8 * (2 * 8 + 2 * 2)


def test_layer_preset_plans_only_layer_rows_on_the_issue_shapes():
    preset = presets.PRESETS["layer"]("cpu")
    shapes = {(c.layer, c.B, c.N, c.T, c.H, c.mode) for c in preset.cases}
    assert shapes == {
        (layer, B, N, T, H, m)
        for layer, B, N, T, H in [
            ("llama", 4, 32, 2048, 64),
            ("llama", 1, 32, 4096, 64),
            ("qwen3", 1, 16, 4096, 128),
        ]
        for m in (FORWARD, FORWARD_BACKWARD)
    }
    for c in preset.cases:
        assert c.causal and c.dtype == "float32" and c.E == 2048
        assert impls_layer.kv_heads(c) == 8
        assert Case(**c.as_dict()) == c and c.layer in c.label()
    assert {c.dtype for c in presets.PRESETS["layer"]("cuda").cases} == {"bfloat16"}
    jobs = plan_jobs(preset, list(IMPLS) + list(impls_layer.LAYER_IMPLS))
    flat = [j for js in jobs.values() for j in js]
    assert {j["impl"] for j in flat} == {i.name for i in impls_layer.LAYER_IMPLS}
    assert len(flat) == len(preset.cases) * len(impls_layer.LAYER_IMPLS)
    assert all(i.applies(c, "cpu") is None for i in impls_layer.LAYER_IMPLS for c in preset.cases)


def test_cases_without_a_layer_are_unchanged():
    case = Case(B=1, N=2, T=8, H=4, causal=True, dtype="float32", mode=FORWARD)
    assert "layer" not in case.as_dict() and len(case.key()) == 8
    assert case.label() == "forward causal B1 N2 T8 H4 float32"
    assert impls_layer.LAYER_IMPLS[0].applies(case, "cpu").startswith("layer rows:")
