"""The automatic choice of an SDPA path (``implementation=None``, the default): ``attn_spec.dispatch``.

The rule's decisions on hand-picked facts; both twins derive the same facts (and so the same choice and
reason) from the same call; default calls pick bounded memory at large T (decided from shapes only, no
attention is run); the auto call equals the float64 reference; the choice is logged and shown in modules.
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn
import torch_attn
from attn_spec.dispatch import LARGE_LOGITS, MATH_MAX_LOGITS, Choice, select

NO_GPU = pytest.mark.skipif(jax.default_backend() == "gpu", reason="facts below assume JAX on CPU")


def facts(**kw):
    base = dict(logits=1024, need_weights=False, dropout=False, float_mask=False, fused=None)
    return {**base, **kw}


# ---------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("kw", "implementation", "reason"),
    [
        ({}, "math", f"small: 1024 logits < {MATH_MAX_LOGITS}"),
        ({"logits": MATH_MAX_LOGITS - 1}, "math", "small"),
        ({"logits": MATH_MAX_LOGITS}, "blocked", f"large: {MATH_MAX_LOGITS} logits >= {MATH_MAX_LOGITS}"),
        ({"logits": 2**33}, "blocked", "bounded memory"),
        ({"need_weights": True, "logits": 2**33}, "math", "attention weights requested"),
        ({"dropout": True, "logits": 2**20}, "math", "dropout active"),
        ({"dropout": True, "fused": "K"}, "math", "dropout active"),
        ({"fused": "K"}, "fused", "K is the fast path here"),
        ({"fused": "K", "logits": 2**33, "float_mask": True}, "fused", "K is the fast path"),
        ({"float_mask": True}, "math", "small"),
        ({"float_mask": True, "logits": MATH_MAX_LOGITS}, "blocked", "float attn_mask gets its gradient"),
        ({"float_mask": True, "logits": LARGE_LOGITS + 1}, "blocked", "float attn_mask gets its gradient"),
    ],
)
def test_rule(kw, implementation, reason):
    choice = select(**facts(**kw))
    assert choice.implementation == implementation
    assert reason in choice.reason
    assert str(choice).startswith(f"{implementation} (")


def test_rule_warns_only_for_dense_paths_above_the_large_bound():
    assert select(**facts(need_weights=True, logits=LARGE_LOGITS)).warning == ""
    for kw in ({"need_weights": True}, {"dropout": True}):
        choice = select(**facts(logits=LARGE_LOGITS + 1, **kw))
        assert choice.implementation == "math"
        assert "dense (..., T, S)" in choice.warning
    assert select(**facts(logits=2**33)).warning == ""


# ------------------------------------------------------------------------------- facts of a call


def _jax_call(shapes, mask_dtype=None, gqa=False):
    (qs, ks, vs), mask = shapes, None
    q, k, v = (jax.ShapeDtypeStruct(s, jnp.float32) for s in (qs, ks, vs))
    if mask_dtype is not None:
        mask = jax.ShapeDtypeStruct(qs[-2:-1] + ks[-2:-1], jnp.dtype(mask_dtype))
    return q, k, v, mask


def _torch_call(shapes, mask_dtype=None, device="meta"):
    (qs, ks, vs), mask = shapes, None
    q, k, v = (torch.empty(s, device=device) for s in (qs, ks, vs))
    if mask_dtype is not None:
        mask = torch.empty(qs[-2:-1] + ks[-2:-1], dtype=getattr(torch, mask_dtype), device=device)
    return q, k, v, mask


CALLS = {
    # name: (q, k, v shapes), mask dtype, kwargs, logits
    "tiny": (((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 4)), None, {}, 2 * 3 * 5 * 7),
    "T128": (((1, 8, 128, 64),) * 3, None, {"is_causal": True}, 8 * 128 * 128),
    "gqa": (
        ((2, 8, 256, 16), (2, 2, 256, 16), (2, 2, 256, 16)),
        "bool",
        {"enable_gqa": True},
        2 * 8 * 256**2,
    ),
    "float_mask_mid": (((4, 8, 1024, 32),) * 3, "float32", {}, 4 * 8 * 1024**2),
    "float_mask_long": (((2, 8, 8192, 32),) * 3, "float32", {}, 2 * 8 * 8192**2),
    "dropout": (((1, 8, 512, 64),) * 3, None, {"dropout_p": 0.1}, 8 * 512**2),
    "weights_long": (((1, 8, 32768, 64),) * 3, None, {"need_weights": True}, 8 * 32768**2),
    "issue_13": (((1, 8, 32768, 64),) * 3, None, {"is_causal": True}, 8 * 32768**2),
}


@NO_GPU
@pytest.mark.parametrize("name", list(CALLS))
def test_both_twins_choose_alike_for_the_same_facts(name):
    """JAX on CPU and torch on the ``meta`` device both lack a fused fast path: same facts, so the same
    choice and reason, and both equal the rule on the facts counted by hand. (The JAX reason adds where
    its blocked path runs on its CPU kernel: no mask array, the kernel built.)"""
    shapes, mask_dtype, kw, logits = CALLS[name]
    expected = select(
        logits=logits,
        need_weights=kw.get("need_weights", False),
        dropout=kw.get("dropout_p", 0.0) > 0,
        float_mask=mask_dtype == "float32",
        fused=None,
    )
    q, k, v, mask = _jax_call(shapes, mask_dtype)
    got_jax = jax_attn.select_implementation(q, k, v, mask, dropout_mask=None, **kw)
    want_jax = expected
    if expected.implementation == "blocked" and not jax_attn.engine.native_reason(jnp.float32, mask=mask):
        want_jax = Choice("blocked", f"{expected.reason}; runs on jax_attn's CPU kernel", expected.warning)
    q, k, v, mask = _torch_call(shapes, mask_dtype)
    got_torch = torch_attn.select_implementation(q, k, v, mask, **kw)
    assert got_torch == expected and got_jax == want_jax


def test_torch_twin_takes_its_fused_kernel_on_cpu():
    logits = CALLS["issue_13"][3]
    # expanded tensors: the shapes of the issue's call without its memory
    q = k = v = torch.empty(1, 1, 1, 64).expand(1, 8, 32768, 64)
    choice = torch_attn.select_implementation(q, k, v, is_causal=True)
    assert choice == Choice(
        "fused", f"F.scaled_dot_product_attention is the fast path here ({logits} logits)"
    )
    assert torch_attn.select_implementation(q, k, v, dropout_p=0.1).implementation == "math"


@NO_GPU
def test_the_issue_call_defaults_to_blocked_in_jax():
    q = jax.ShapeDtypeStruct((1, 8, 32768, 64), jnp.float32)
    assert jax_attn.select_implementation(q, q, q, is_causal=True).implementation == "blocked"
    # bf16 on CPU: still no cuDNN, still blocked
    q = jax.ShapeDtypeStruct((1, 8, 32768, 64), jnp.bfloat16)
    assert jax_attn.select_implementation(q, q, q, is_causal=True).implementation == "blocked"


def test_select_implementation_checks_its_arguments_like_the_call():
    q = jax.ShapeDtypeStruct((1, 2, 4, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 2, 4, 6), jnp.float32)
    with pytest.raises(ValueError) as e_jax:
        jax_attn.select_implementation(q, k, k)
    with pytest.raises(ValueError) as e_torch:
        torch_attn.select_implementation(
            torch.empty(1, 2, 4, 8), torch.empty(1, 2, 4, 6), torch.empty(1, 2, 4, 6)
        )
    assert str(e_jax.value) == str(e_torch.value)


@pytest.mark.parametrize("bad", ["flash", "AUTO", ""])
def test_unknown_implementation_raises_in_both_twins(bad):
    x = np.zeros((1, 2, 3, 4), np.float32)
    message = re.escape(
        "scaled_dot_product_attention: implementation must be None ('auto', see attn_spec.dispatch) or one "
        f"of ('math', 'blocked', 'fused'); got implementation={bad!r}"
    )
    with pytest.raises(ValueError, match=message):
        jax_attn.scaled_dot_product_attention(x, x, x, implementation=bad)
    t = torch.from_numpy(x)
    with pytest.raises(ValueError, match=message):
        torch_attn.scaled_dot_product_attention(t, t, t, implementation=bad)


# ------------------------------------------------------------------------------ results and logs


def _reference(q, k, v, causal):
    """float64 NumPy SDPA (no fully-masked rows in these cases)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if causal:
        T, S = logits.shape[-2:]
        logits = np.where(np.tril(np.ones((T, S), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


def _close(got, ref):
    got = np.asarray(got, np.float64)
    assert np.max(np.abs(got - ref)) <= 1e-5 * max(1.0, np.max(np.abs(ref)))


@pytest.mark.parametrize(
    ("shape", "causal"),
    [((1, 2, 6, 8), False), ((1, 2, 256, 16), True)],
    ids=["small-math", "threshold-blocked"],
)
def test_auto_equals_the_reference_and_the_chosen_path(shape, causal, caplog):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    ref = _reference(q, k, v, causal)
    with caplog.at_level(logging.DEBUG, logger="jax_attn.functional"):
        choice = jax_attn.select_implementation(q, k, v, is_causal=causal)
        auto = jax_attn.scaled_dot_product_attention(q, k, v, is_causal=causal)
        pinned = jax_attn.scaled_dot_product_attention(
            q, k, v, is_causal=causal, implementation=choice.implementation
        )
        assert (
            jax_attn.scaled_dot_product_attention(q, k, v, is_causal=causal, implementation="auto").shape
            == ref.shape
        )
    assert choice.implementation == ("math" if shape[2] == 6 else "blocked")
    assert any(f"implementation=None): {choice}" in r.getMessage() for r in caplog.records)
    _close(auto, ref)
    _close(pinned, ref)
    t = [torch.from_numpy(x) for x in (q, k, v)]
    with caplog.at_level(logging.DEBUG, logger="torch_attn.functional"):
        _close(torch_attn.scaled_dot_product_attention(*t, is_causal=causal), ref)
    assert any("F.scaled_dot_product_attention is the fast path" in r.getMessage() for r in caplog.records)


@NO_GPU
@pytest.mark.parametrize("twin", ["jax", "torch"])
def test_auto_gives_a_float_mask_its_gradient_on_the_blocked_path(twin):
    """A float mask above the small size takes the blocked path (on torch: on the ``meta`` facts, where
    its fused kernel is not the fast path, so called explicitly here), whose gradient reaches the mask and
    equals the explicit math path's."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 256, 16)).astype(np.float32) for _ in range(3))
    bias = rng.standard_normal((256, 256)).astype(np.float32)
    if twin == "jax":
        assert jax_attn.select_implementation(q, k, v, bias).implementation == "blocked"
        grad = lambda impl: np.asarray(  # noqa: E731
            jax.grad(lambda b: jax_attn.scaled_dot_product_attention(q, k, v, b, implementation=impl).sum())(
                bias
            ),
            np.float64,
        )
        auto, math = grad(None), grad("math")
    else:
        meta = [torch.empty(x.shape, device="meta") for x in (q, k, v, bias)]
        assert torch_attn.select_implementation(*meta).implementation == "blocked"

        def grad(impl):
            b = torch.from_numpy(bias).requires_grad_(True)
            t = [torch.from_numpy(x) for x in (q, k, v)]
            torch_attn.scaled_dot_product_attention(*t, b, implementation=impl).sum().backward()
            return b.grad.double().numpy()

        auto, math = grad("blocked"), grad("math")
    assert np.abs(auto).max() > 0.0
    _close(auto, math)


def test_large_weights_request_logs_a_warning(caplog):
    q = jax.ShapeDtypeStruct((1, 8, 8192, 64), jnp.float32)
    with caplog.at_level(logging.WARNING, logger="jax_attn.functional"):
        choice = jax_attn.select_implementation(q, q, q, need_weights=True)
    assert choice.implementation == "math" and choice.warning
    assert any("dense (..., T, S)" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------- modules


def test_jax_modules_note_the_choice_in_repr_and_do_not_retrace():
    m = jax_attn.MultiheadAttention(16, 2, batch_first=True, rngs=nnx.Rngs(0))
    assert m.implementation is None and m.last_choice is None
    assert "not called yet" in repr(m)
    x = jnp.ones((1, 5, 16))
    m(x, x, x, need_weights=True)
    assert m.last_choice.implementation == "math" and "attention weights requested" in m.last_choice.reason
    assert "last call: math (attention weights requested" in repr(m)

    csa = jax_attn.CausalSelfAttention(16, 2, rngs=nnx.Rngs(0))
    traces = []

    @nnx.jit
    def step(module, x):
        traces.append(1)
        return module(x)

    step(csa, x)
    step(csa, x)
    assert len(traces) == 1  # noting the choice does not change the module's static structure
    assert csa.last_choice == jax_attn.select_implementation(
        jax.ShapeDtypeStruct((1, 2, 5, 8), jnp.float32),
        *(jax.ShapeDtypeStruct((1, 2, 5, 8), jnp.float32),) * 2,
        is_causal=True,
        enable_gqa=True,
    )
    assert "last call: math (small" in repr(csa)


@NO_GPU
def test_jax_modules_pick_blocked_at_long_sequences_without_running():
    """``jax.eval_shape`` traces the call (the choice is made at trace time) and computes nothing."""
    csa = jax_attn.CausalSelfAttention(64, 8, rngs=nnx.Rngs(0))
    jax.eval_shape(lambda x: csa(x), jax.ShapeDtypeStruct((1, 32768, 64), jnp.float32))
    assert csa.last_choice.implementation == "blocked"
    mha = jax_attn.MultiheadAttention(64, 8, batch_first=True, rngs=nnx.Rngs(0))
    x = jax.ShapeDtypeStruct((1, 32768, 64), jnp.float32)
    jax.eval_shape(lambda x: mha(x, x, x, need_weights=False)[0], x)
    assert mha.last_choice.implementation == "blocked"


def test_torch_modules_note_the_choice_in_repr():
    m = torch_attn.MultiheadAttention(16, 2, batch_first=True)
    assert "implementation=None (auto; not called yet)" in repr(m)
    x = torch.ones(1, 5, 16)
    m(x, x, x, need_weights=False)
    assert m.last_choice.implementation == "fused"
    assert "implementation=None (auto; last call: fused (F.scaled_dot_product_attention" in repr(m)
    m(x, x, x)  # need_weights=True, torch's default
    assert m.last_choice.implementation == "math"

    csa = torch_attn.CausalSelfAttention(16, 2, dropout=0.1)
    csa(x)  # training mode: dropout active
    assert csa.last_choice.implementation == "math" and "dropout active" in csa.last_choice.reason
    csa.eval()
    csa(x)
    assert csa.last_choice.implementation == "fused"
    assert "implementation=None (auto; last call: fused" in repr(csa)
    assert "implementation='blocked'" in repr(torch_attn.CausalSelfAttention(16, 2, implementation="blocked"))


def test_module_auto_matches_the_math_path():
    """The module's default call equals its explicit math path (same parameters, same input)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    auto = torch_attn.CausalSelfAttention(16, 2, num_kv_heads=1)
    math = torch_attn.CausalSelfAttention(16, 2, num_kv_heads=1, implementation="math")
    math.load_state_dict(auto.state_dict())
    with torch.no_grad():
        ref = math(torch.from_numpy(x)).double().numpy()
        _close(auto(torch.from_numpy(x)).numpy(), ref)
    jauto = jax_attn.CausalSelfAttention(16, 2, num_kv_heads=1, rngs=nnx.Rngs(0))
    jauto.load_torch_state_dict(auto.state_dict())
    _close(jauto(jnp.asarray(x)), ref)


def test_bench_rows_pin_the_path_they_name():
    """The explicit bench rows pass ``implementation=``; the auto rows make the default call."""
    from compare.bench import impls

    for cls in (jax_attn.CausalSelfAttention, jax_attn.MultiheadAttention, torch_attn.MultiheadAttention):
        assert impls._impl_kwargs(cls, "blocked") == {"implementation": "blocked"}
        assert impls._impl_kwargs(cls, None) == {}
    assert impls._impl_kwargs(torch.nn.MultiheadAttention, "math") == {}


@NO_GPU
@pytest.mark.parametrize("causal", [False, True])
def test_under_jit_the_default_call_compiles_to_the_chosen_path(causal):
    """The choice is made at trace time: the default call lowers to exactly the program of the explicit
    path it picked (so under ``jit`` auto costs nothing at run time)."""
    x = jax.ShapeDtypeStruct((1, 2, 256, 16), jnp.float32)

    def lowered(implementation):
        def attention(q, k, v):
            return jax_attn.scaled_dot_product_attention(
                q, k, v, is_causal=causal, implementation=implementation
            )

        return jax.jit(attention).lower(x, x, x).as_text()

    assert jax_attn.select_implementation(x, x, x, is_causal=causal).implementation == "blocked"
    assert lowered(None) == lowered("blocked")
    assert lowered(None) != lowered("math")
