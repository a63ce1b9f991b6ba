"""The ``Attention`` twins as modules: the sliding-window boundary, the checks (same ValueError text in
both twins), bit-exact state-dict round trips, fused == math, injected dropout, the interleaved ↔ half-split
weight permutation, and JAX gradients == torch gradients."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn.attention as jatt
import torch_attn.attention as tatt
from attn_spec.attention import AttentionConfig, choose
from attn_spec.dispatch import LARGE_LOGITS, MATH_MAX_LOGITS
from attn_spec.rope import RopeConfig, rotary_permutation

TWINS = ["jax", "torch"]
B, T, E, N, K, H = 2, 7, 20, 4, 2, 6


def _config(**kw) -> AttentionConfig:
    base = dict(hidden_size=E, num_heads=N, num_kv_heads=K, head_dim=H)
    return AttentionConfig(**{**base, **kw})


def _random_sd(c: AttentionConfig, seed=0) -> dict[str, np.ndarray]:
    from attn_spec.attention import state_dict_shapes

    rng = np.random.default_rng(seed)
    return {k: (0.4 * rng.standard_normal(s)).astype(np.float32) for k, s in state_dict_shapes(c).items()}


def _module(twin, c, sd=None, implementation="math", dtype=None):
    if twin == "jax":
        m = jatt.Attention(
            c, implementation=implementation, rngs=nnx.Rngs(0), param_dtype=dtype or jnp.float32
        )
        m.deterministic = True
    else:
        m = tatt.Attention(c, implementation=implementation, dtype=dtype).eval()
    if sd is not None:
        m.load_torch_state_dict(sd)
    return m


def _run(twin, m, x, mask=None, pos=None, **kw):
    if twin == "jax":
        a = lambda v: None if v is None else jnp.asarray(v)
        return np.asarray(m(a(x), a(mask), a(pos), **kw), np.float64)
    t = lambda v: None if v is None else torch.from_numpy(v)
    with torch.no_grad():
        return m(t(x), t(mask), t(pos), **kw).double().numpy()


def _x(seed=1, T=T):
    return np.random.default_rng(seed).standard_normal((B, T, E)).astype(np.float32)


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_sliding_window_boundary(twin, causal):
    """w = 3: query t sees keys t-2, t-1, t (transformers' count), and |t - s| < 3 when bidirectional."""
    c = _config(sliding_window=3, causal=causal, rope=None)
    mod = jatt if twin == "jax" else tatt
    arr = jnp.asarray if twin == "jax" else torch.from_numpy
    pos = np.arange(6, dtype=np.int64)
    keep = np.asarray(mod.attention_keep_mask(arr(pos), arr(pos), arr(np.ones((1, 6), bool)), c))[0]
    q, s = np.meshgrid(pos, pos, indexing="ij")
    want = (q - s < 3) & (s <= q) if causal else np.abs(q - s) < 3
    np.testing.assert_array_equal(keep, want)
    assert keep[4, 2] and not keep[4, 1]  # the boundary: distance 2 in, distance 3 out


BAD_CONFIGS = {
    "heads_do_not_divide": (
        {"num_heads": 4, "num_kv_heads": 3},
        "Attention: num_kv_heads must divide num_heads (grouped-query attention); got num_heads=4, "
        "num_kv_heads=3",
    ),
    "hidden_not_divisible": (
        {"hidden_size": 10, "num_heads": 4, "head_dim": None, "num_kv_heads": None},
        "hidden_size must be divisible by num_heads when head_dim is None; got hidden_size=10, num_heads=4",
    ),
    "odd_rotary": (
        {"head_dim": 5},
        "Attention: the rotary width must be even and >= 2; got rotary_dim=int(head_dim=5 * "
        "partial_rotary_factor=1.0)=5",
    ),
    "window_zero": ({"sliding_window": 0}, "sliding_window must be an int >= 1 or None"),
    "cap_zero": ({"softcap": 0.0}, "softcap must be a number > 0 or None; got softcap=0.0"),
    "cap_negative": ({"softcap": -50.0}, "softcap must be a number > 0 or None; got softcap=-50.0"),
    "qk_norm": (
        {"qk_norm": "layer"},
        "qk_norm must be one of ('none', 'head', 'full', 'unit'); got qk_norm='layer'",
    ),
    "clip_zero": ({"clip_qkv": 0.0}, "clip_qkv must be a number > 0 or None; got clip_qkv=0.0"),
    "chunk_with_window": (
        {"chunk_size": 4, "sliding_window": 3},
        "chunk_size needs a causal layer without sliding_window; got chunk_size=4, sliding_window=3",
    ),
    "chunk_zero": ({"chunk_size": 0}, "chunk_size must be an int >= 1 or None; got chunk_size=0"),
    "temperature": (
        {"attn_temperature": (0.0, 0.1)},
        "attn_temperature must be (floor_scale > 0, attn_scale) or None; got attn_temperature=(0.0, 0.1)",
    ),
    "alibi_count": (
        {"alibi_slopes": (0.5, 0.25)},
        "alibi_slopes must be one number per query head (num_heads=4) or None",
    ),
    "scale_and_scalar": (
        {"scale": 0.1, "query_pre_attn_scalar": 8},
        "give scale or query_pre_attn_scalar, not both",
    ),
    "dropout": ({"dropout": 1.0}, "dropout must be a number in [0, 1); got dropout=1.0"),
    "bias_type": ({"q_bias": 1}, "q_bias must be a bool; got q_bias=1"),
    "rope_type": ({"rope": "llama3"}, "rope must be a RopeConfig or None; got rope='llama3'"),
}


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_raises(twin, case):
    kwargs, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        _module(twin, _config(**kwargs))


def _call_error(twin, c, x, mask=None, pos=None, implementation="math"):
    m = _module(twin, c, implementation=implementation)
    return _run(twin, m, x, mask, pos)


BAD_CALLS = {
    "mask_shape": (
        {},
        {"mask": np.ones((B, T + 1), np.int64)},
        "Attention: attention_mask must be the (B, T) = (2, 7) padding mask of this call's tokens "
        "(1 = token, 0 = padding); got attention_mask.shape=(2, 8)",
    ),
    "mask_4d": ({}, {"mask": np.ones((B, 1, T, T), bool)}, "got attention_mask.shape=(2, 1, 7, 7)"),
    "mask_float": (
        {},
        {"mask": np.ones((B, T), np.float32)},
        "must be bool or integer 1/0; got attention_mask.dtype=float32",
    ),
    "positions_shape": (
        {},
        {"pos": np.zeros((1, T), np.int64)},
        "position_ids must be (B, T) = (2, 7); got position_ids.shape=(1, 7)",
    ),
    "x_width": (
        {},
        {"x": np.zeros((B, T, E + 1), np.float32)},
        "x's last axis must be hidden_size=20; got x.shape=(2, 7, 21)",
    ),
}


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_raises(twin, case):
    ckw, args, message = BAD_CALLS[case]
    x = args.get("x", _x())
    with pytest.raises(ValueError, match=re.escape(message)):
        _call_error(twin, _config(**ckw), x, args.get("mask"), args.get("pos"))


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize(
    "kw, implementation, message",
    [
        (
            {"softcap": 30.0, "sinks": True},
            "fused",
            "implementation='fused' (torch F.scaled_dot_product_attention / "
            "jax.nn.dot_product_attention) does not support ['softcap', 'sinks']; use implementation='math'",
        ),
        (
            {"dropout": 0.1},
            "blocked",
            "implementation='blocked' does not support dropout; use implementation='math'",
        ),
        (
            {},
            "flash",
            "implementation must be None (auto) or one of ('math', 'fused', 'blocked'); got "
            "implementation='flash'",
        ),
    ],
    ids=["fused_knobs", "blocked_dropout", "unknown"],
)
def test_bad_implementation_raises(twin, kw, implementation, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _module(twin, _config(**kw), implementation=implementation)


@pytest.mark.parametrize("twin", TWINS)
def test_cache_errors(twin):
    m = _module(twin, _config(causal=False))
    with pytest.raises(ValueError, match=re.escape("Attention.init_cache: a KV cache needs a causal layer")):
        m.init_cache(B, 8)
    m = _module(twin, _config())
    with pytest.raises(
        ValueError, match=re.escape("init_cache: max_length must be a positive int; got max_length=0")
    ):
        m.init_cache(B, 0)


def test_auto_counts_every_logit_of_the_call():
    """The one dispatch rule (attn_spec.dispatch.select) on B·N·T·S logits: the Llama-style layer of issue 24
    (B4, 32 heads, T 2048: 2^29 logits) must not take the dense math path, whatever T·S per head is."""
    c = AttentionConfig(hidden_size=2048, num_heads=32, num_kv_heads=8, head_dim=64)
    assert choose(c, B=4, T=2048, S=2048, dropout=False, fused=None).implementation == "blocked"
    assert choose(c, B=1, T=8, S=8, dropout=False, fused=None).implementation == "math"  # 2048 logits
    assert 1 * 32 * 8 * 8 < MATH_MAX_LOGITS < 4 * 32 * 2048 * 2048 <= LARGE_LOGITS * 4
    fused = "F.scaled_dot_product_attention"
    assert choose(c, B=4, T=2048, S=2048, dropout=False, fused=fused).implementation == "fused"
    for knob in ({"softcap": 30.0}, {"sinks": True}, {"alibi_slopes": (0.5,) * 32}):  # not in the kernel
        c2 = AttentionConfig(hidden_size=2048, num_heads=32, num_kv_heads=8, head_dim=64, **knob)
        assert choose(c2, B=4, T=2048, S=2048, dropout=False, fused=fused).implementation == "blocked"
    assert choose(c, B=4, T=2048, S=2048, dropout=True, fused=fused).implementation == "math"


@pytest.mark.parametrize("twin", TWINS)
def test_last_choice_and_repr_name_the_path(twin):
    m = _module(twin, _config(), implementation=None)
    assert m.last_choice is None
    _run(twin, m, _x())
    want = "fused" if twin == "torch" else "math"  # torch's F.sdpa is the fast path on CPU; XLA's is not
    assert m.last_choice.implementation == want
    assert f"last call: {want}" in repr(m)


FULL = dict(
    q_bias=True,
    k_bias=True,
    v_bias=True,
    o_bias=True,
    qk_norm="full",
    sinks=True,
    rope=RopeConfig(rope_theta=1e4, partial_rotary_factor=2 / 3),
)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_dict_round_trips_are_bit_exact(dtype):
    c = _config(**FULL)
    t = tatt.Attention(c, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
    j = jatt.Attention(c, rngs=nnx.Rngs(0), param_dtype=getattr(jnp, dtype))
    j.load_torch_state_dict(t.state_dict())
    sd_j = j.torch_state_dict()
    assert list(sd_j) == list(t.torch_state_dict()) and set(sd_j) == set(t.state_dict())
    for key, value in t.state_dict().items():
        want = value.float().numpy()
        assert sd_j[key].dtype == (ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
        np.testing.assert_array_equal(sd_j[key].astype(np.float32), want)
    t2 = tatt.Attention(c, dtype=getattr(torch, dtype))
    t2.load_torch_state_dict(sd_j)
    for key, value in t.state_dict().items():
        assert torch.equal(t2.state_dict()[key], value)


def test_jax_state_dict_loads_into_an_abstract_module():
    """A module built with ``nnx.eval_shape`` (no random init) takes a state dict and then computes what
    the concretely built one does, compared with torch's twin on the same weights."""
    c = _config(**FULL)
    sd = _random_sd(c)
    abstract = nnx.eval_shape(lambda: jatt.Attention(c, rngs=nnx.Rngs(0)))
    abstract.load_torch_state_dict(sd)
    abstract.deterministic = True
    leaves = jax.tree_util.tree_leaves(nnx.state(abstract))
    assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    for key, value in abstract.torch_state_dict().items():
        np.testing.assert_array_equal(np.asarray(value), sd[key])
    got = _run("jax", abstract, _x())
    want = _run("torch", _module("torch", c, sd), _x())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("twin", TWINS)
def test_state_dict_wrong_keys_raise(twin):
    c = _config(qk_norm="head")
    sd = _random_sd(c)
    del sd["k_norm.weight"]
    sd["o_proj.bias"] = np.zeros(E, np.float32)
    with pytest.raises(
        ValueError, match=re.escape("missing keys ['k_norm.weight'], unexpected keys ['o_proj.bias']")
    ):
        _module(twin, c, sd)


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("window", [None, 3])
def test_fused_equals_math(twin, window):
    c = _config(sliding_window=window, qk_norm="head", rope=RopeConfig(rope_theta=1e4))
    sd = _random_sd(c)
    mask = np.ones((B, T), np.int64)
    mask[1, :2] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    want = _run(twin, _module(twin, c, sd), _x(), mask, pos)
    got = _run(twin, _module(twin, c, sd, implementation="fused"), _x(), mask, pos)
    assert np.abs(got - want).max() <= 1e-5 * max(1, np.abs(want).max())


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize(
    "knobs", [{}, {"causal": False}, {"sinks": True}, {"softcap": 3.0}, {"sinks": True, "causal": False}]
)
def test_blocked_without_a_mask_equals_math(monkeypatch, twin, knobs):
    """A call with no padding, cache, window or chunk takes the engine's dense plan on the blocked path (no
    soft-cap: a soft-cap keeps the block mask's score_mod); forward and gradients w.r.t. x and every
    parameter equal the math path's, with 4-row blocks so that several blocks and the causal diagonal
    are crossed."""
    import attn_spec.blocks

    monkeypatch.setattr(attn_spec.blocks, "MAX_BLOCK", 4)
    monkeypatch.setattr(attn_spec.blocks, "MIN_CAUSAL_BLOCK", 2)
    c = _config(qk_norm="head", rope=RopeConfig(rope_theta=1e4), **knobs)
    sd = _random_sd(c, seed=3)
    if c.sinks:
        sd["sinks"] = np.linspace(-1.0, 1.0, N).astype(np.float32)
    x, dy = _x(seed=4, T=11), np.random.default_rng(6).standard_normal((B, 11, E)).astype(np.float32)
    got = {}
    for impl in ("math", "blocked"):
        m = _module(twin, c, sd, implementation=impl)
        if twin == "jax":
            graphdef, params, rest = nnx.split(m, nnx.Param, ...)

            def f(params, x):
                return nnx.merge(graphdef, params, rest)(x)

            out, vjp = jax.vjp(f, params, jnp.asarray(x))
            d_params, dx = vjp(jnp.asarray(dy))
            grads = {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(d_params)}
            got[impl] = (np.asarray(out), np.asarray(dx), grads)
        else:
            xt = torch.from_numpy(x).requires_grad_(True)
            out = m(xt)
            out.backward(torch.from_numpy(dy))
            grads = {k: p.grad.numpy() for k, p in m.named_parameters()}
            got[impl] = (out.detach().numpy(), xt.grad.numpy(), grads)
    (out_b, dx_b, g_b), (out_m, dx_m, g_m) = got["blocked"], got["math"]
    np.testing.assert_allclose(out_b, out_m, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(dx_b, dx_m, rtol=2e-5, atol=2e-5)
    assert set(g_b) == set(g_m) and len(g_b) >= 5
    for k in g_m:
        np.testing.assert_allclose(g_b[k], g_m[k], rtol=2e-4, atol=2e-5, err_msg=k)


def test_injected_dropout_is_the_same_in_both_twins():
    c = _config(dropout=0.3, sinks=True, softcap=3.0)
    sd = _random_sd(c)
    keep = np.random.default_rng(5).random((B, N, T, T)) > 0.3
    x = _x()
    j = jatt.Attention(c, rngs=nnx.Rngs(0))
    j.load_torch_state_dict(sd)
    t = tatt.Attention(c)  # training mode
    t.load_torch_state_dict(sd)
    got_j = np.asarray(j(jnp.asarray(x), dropout_mask=jnp.asarray(keep)))
    got_t = t(torch.from_numpy(x), dropout_mask=torch.from_numpy(keep)).detach().numpy()
    assert np.abs(got_j - got_t).max() <= 1e-5 * max(1, np.abs(got_t).max())
    t.eval()
    without = t(torch.from_numpy(x)).detach().numpy()
    assert np.abs(without - got_t).max() > 1e-3  # dropout did something


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("prf", [1.0, 2 / 3], ids=["full", "partial"])
def test_permuted_weights_in_the_other_layout_give_the_same_output(twin, prf):
    """A Meta-style (interleaved) layer equals the half-split layer with permuted q/k rows (and biases)."""
    kw = dict(q_bias=True, k_bias=True)
    c_int = _config(rope=RopeConfig(rope_theta=1e4, partial_rotary_factor=prf, layout="interleaved"), **kw)
    c_half = _config(rope=RopeConfig(rope_theta=1e4, partial_rotary_factor=prf, layout="half"), **kw)
    sd = _random_sd(c_int)
    R = c_int.R
    sd_half = dict(sd)
    for proj, heads in (("q_proj", N), ("k_proj", K)):
        perm = rotary_permutation(heads, H, R, "interleaved", "half")
        for part in ("weight", "bias"):
            sd_half[f"{proj}.{part}"] = sd[f"{proj}.{part}"][perm]
    x = _x()
    want = _run(twin, _module(twin, c_int, sd), x)
    got = _run(twin, _module(twin, c_half, sd_half), x)
    assert np.abs(got - want).max() <= 1e-5 * max(1, np.abs(want).max())
    unpermuted = _run(twin, _module(twin, c_half, sd), x)
    assert np.abs(unpermuted - want).max() > 1e-3


def test_gradients_agree_between_twins():
    c = _config(**FULL, softcap=2.0, sliding_window=4)
    sd = _random_sd(c)
    x = _x()
    mask = np.ones((B, T), np.int64)
    mask[0, :2] = 0
    dy = np.random.default_rng(7).standard_normal((B, T, E)).astype(np.float32)
    t = tatt.Attention(c).eval()
    t.load_torch_state_dict(sd)
    xt = torch.from_numpy(x).requires_grad_()
    (t(xt, torch.from_numpy(mask)) * torch.from_numpy(dy)).sum().backward()
    j = jatt.Attention(c, rngs=nnx.Rngs(0))
    j.load_torch_state_dict(sd)
    j.deterministic = True
    graphdef, state = nnx.split(j)

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x, jnp.asarray(mask)) * dy)

    g_state, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, jnp.asarray(x))
    g = nnx.merge(graphdef, g_state)
    assert np.abs(np.asarray(g_x) - xt.grad.numpy()).max() <= 1e-5 * max(1, np.abs(xt.grad.numpy()).max())
    params = dict(t.named_parameters())
    for key in sd:
        want = params[key].grad.numpy()
        got = np.asarray(g._param(key)[...])
        assert np.abs(got - want).max() <= 1e-5 * max(1, np.abs(want).max()), key


@pytest.mark.parametrize("twin", TWINS)
def test_blocked_equals_math_across_many_blocks(twin):
    """T = 300 (three 128-blocks, the last partial), window 70, sinks, soft-cap, left padding: the blocked
    path (BlockMask of causal ∧ window ∧ padding) gives the math path's output."""
    c = _config(sliding_window=70, sinks=True, softcap=3.0, rope=RopeConfig(rope_theta=1e4))
    sd = _random_sd(c)
    x = _x(T=300)
    mask = np.ones((B, 300), np.int64)
    mask[1, :150] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    want = _run(twin, _module(twin, c, sd), x, mask, pos)
    got = _run(twin, _module(twin, c, sd, implementation="blocked"), x, mask, pos)
    assert np.abs(got - want).max() <= 1e-5 * max(1, np.abs(want).max())


def test_torch_builds_no_large_mask_for_its_fused_kernel(monkeypatch):
    """The torch twin calls F.scaled_dot_product_attention automatically with no mask array (plain causal)
    or a small one; a call whose (B, T, S) mask would pass FUSED_MASK_MAX does not build it (math when small,
    as here, blocked when large)."""
    m = _module("torch", _config(), implementation=None)
    x = _x()
    mask = np.ones((B, T), np.int64)
    mask[1, :2] = 0
    _run("torch", m, x)
    assert m.last_choice.implementation == "fused"
    _run("torch", m, x, mask)
    assert m.last_choice.implementation == "fused"  # B·T·S is tiny here
    monkeypatch.setattr(tatt, "FUSED_MASK_MAX", B * T * T - 1)
    y_blocked = _run("torch", m, x, mask)
    assert m.last_choice.implementation == "math"
    _run("torch", m, x)
    assert m.last_choice.implementation == "fused"  # plain causal: no mask array at all
    ref = _run("torch", _module("torch", _config(), sd=dict(m.state_dict())), x, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(y_blocked[real], ref[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("twin", TWINS)
def test_position_ids_shapes_name_what_the_layer_takes(twin):
    """(3, B, T) positions only for a multimodal RoPE; anything else raises naming both accepted shapes."""
    mrope = _config(rope=RopeConfig(mrope_section=(1, 1, 1)))
    x = _x()
    pos2 = np.broadcast_to(np.arange(T), (B, T)).astype(np.int64)
    pos3 = np.stack([pos2, pos2 // 2, pos2 % 3])
    y3 = _run(twin, _module(twin, mrope, sd=_random_sd(mrope)), x, pos=pos3)
    assert np.all(np.isfinite(y3))
    m = _module(twin, mrope, sd=_random_sd(mrope))  # three equal rows: plain RoPE, as a (B, T) call
    np.testing.assert_allclose(
        _run(twin, m, x, pos=np.stack([pos2] * 3)), _run(twin, m, x, pos=pos2), atol=1e-6
    )
    with pytest.raises(ValueError, match=re.escape(f"position_ids must be (B, T) = ({B}, {T}); got")):
        _run(twin, _module(twin, _config()), x, pos=pos3)
    want = f"position_ids must be (B, T) = ({B}, {T}) or (3, B, T) = (3, {B}, {T}); got position_ids.shape="
    with pytest.raises(ValueError, match=re.escape(want)):
        _run(twin, _module(twin, mrope), x, pos=pos3[:2])


@pytest.mark.parametrize("twin", TWINS)
def test_eval_layer_with_dropout_may_take_the_blocked_path(twin, monkeypatch):
    """A layer configured with dropout (BERT's 0.1) in eval mode: dropout is off for the call, so the
    automatic choice may take the blocked path, and it must run there (it used to raise)."""
    import attn_spec.dispatch as dispatch

    monkeypatch.setattr(dispatch, "MATH_MAX_LOGITS", 1)  # tiny sizes take blocked as large ones would
    c = _config(dropout=0.1)
    sd = _random_sd(c)
    m = _module(twin, c, sd=sd, implementation=None)
    if twin == "torch":
        monkeypatch.setattr(tatt, "FUSED_MASK_MAX", 0)
    mask = np.ones((B, T), np.int64)
    mask[1, :2] = 0
    y = _run(twin, m, _x(), mask)
    assert m.last_choice.implementation == "blocked"
    ref = _run(twin, _module(twin, c, sd=sd), _x(), mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(y[real], ref[real], rtol=1e-5, atol=1e-5)
