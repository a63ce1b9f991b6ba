"""Rotary embeddings (attn_spec.rope + both twins) against transformers' own code: the frequency tables
of every rope_type vs ``ROPE_INIT_FUNCTIONS``, cos/sin vs GPT-NeoX's rotary module (partial rotary,
sequence-length-dependent types included), the rotation vs ``apply_rotary_pos_emb``; the interleaved
layout vs a complex-number rotation (Meta's formulation); the layout permutation; and the checks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply

from attn_spec.rope import ROPE_TYPES, RopeConfig, inv_freq
from jax_attn import rope as jrope
from torch_attn import rope as trope

L0 = 40  # max_position_embeddings of the test configs


def _hf_params(rope_type: str, F: int) -> dict:
    params = {
        "default": {},
        "linear": {"factor": 4.0},
        "dynamic": {"factor": 2.0},
        "llama3": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        "yarn": {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 24.0, "beta_slow": 2.0},
        "longrope": {
            "short_factor": [1.0 + 0.1 * i for i in range(F)],
            "long_factor": [2.0 + 0.3 * i for i in range(F)],
            "original_max_position_embeddings": 16,
        },
    }[rope_type]
    return {"rope_type": rope_type, "rope_theta": 5e5, **params}


def _hf_config(rope_type: str, H: int, prf: float) -> GPTNeoXConfig:
    params = dict(_hf_params(rope_type, int(H * prf) // 2), partial_rotary_factor=prf)
    return GPTNeoXConfig(
        hidden_size=3 * H, num_attention_heads=3, max_position_embeddings=L0, rope_parameters=params
    )


def _ours(rope_type: str, H: int, prf: float, layout: str = "half") -> RopeConfig:
    params = dict(_hf_params(rope_type, int(H * prf) // 2), partial_rotary_factor=prf)
    return RopeConfig.from_hf(params, max_position_embeddings=L0, layout=layout)


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))))


# GPT-NeoX's rotary module is the reference here; proportional (Gemma 4, a full-width table) has its own test.
NEOX_TYPES = [t for t in ROPE_TYPES if t != "proportional"]
SCALED = [t for t in NEOX_TYPES if t != "default"]
PARTIAL = {"full_H12": (12, 1.0), "partial_H16_quarter": (16, 0.25)}


@pytest.mark.parametrize("shape", list(PARTIAL))
@pytest.mark.parametrize("rope_type", SCALED)
@pytest.mark.parametrize("seq_len", [None, 10, 100], ids=["init", "short", "long"])
def test_inv_freq_matches_transformers(rope_type, shape, seq_len):
    H, prf = PARTIAL[shape]
    want, want_factor = ROPE_INIT_FUNCTIONS[rope_type](_hf_config(rope_type, H, prf), "cpu", seq_len=seq_len)
    got, got_factor = inv_freq(_ours(rope_type, H, prf), H, seq_len=seq_len)
    assert got.dtype == np.float32 and got.shape == tuple(want.shape)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(want_factor, rel=1e-12)


@pytest.mark.parametrize("shape", list(PARTIAL))
def test_default_inv_freq_matches_transformers(shape):
    H, prf = PARTIAL[shape]
    want, _ = GPTNeoXRotaryEmbedding.compute_default_rope_parameters(_hf_config("default", H, prf))
    got, factor = inv_freq(_ours("default", H, prf), H)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
    assert factor == 1.0


def _positions(max_pos: int, B=2, T=5, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.integers(0, max_pos, size=(B, T)), axis=1)
    pos[0, -1] = max_pos - 1  # fixes max(position_ids) + 1 = max_pos: the dynamic/longrope switch
    return pos


@pytest.mark.parametrize("shape", list(PARTIAL))
@pytest.mark.parametrize("rope_type", NEOX_TYPES)
@pytest.mark.parametrize("max_pos", [12, 300], ids=["short", "long"])
def test_cos_sin_and_rotation_match_transformers(rope_type, shape, max_pos):
    """Both twins' cos/sin and rotated q vs GPT-NeoX's rotary module (a fresh one per call: its dynamic
    table is stateful) and its ``apply_rotary_pos_emb`` (partial rotary)."""
    H, prf = PARTIAL[shape]
    pos = _positions(max_pos)
    hf = GPTNeoXRotaryEmbedding(_hf_config(rope_type, H, prf))
    x = torch.zeros(1, dtype=torch.float32)
    cos_ref, sin_ref = hf(x, torch.from_numpy(pos))
    q = np.random.default_rng(1).standard_normal((2, 3, 5, H)).astype(np.float32)
    q_ref, _ = neox_apply(torch.from_numpy(q), torch.from_numpy(q), cos_ref, sin_ref)
    c = _ours(rope_type, H, prf)
    # transformers' float32 angles (p · inv_freq rounded to float32) are ~1e-5 off at p ~ 300; the twins
    # reduce float64 angles exactly: each twin within 1e-5 of transformers plus transformers' own distance
    # from the float64 table, and (tables that do not depend on the call's length) within 1e-6 of it.
    cos64, sin64 = _float64_tables(c, H, pos)
    for twin, cos, sin, rotated in (
        ("torch", *trope.rope_cos_sin(c, H, torch.from_numpy(pos)), None),
        ("jax", *jax.jit(lambda p: jrope.rope_cos_sin(c, H, p))(jnp.asarray(pos)), None),
    ):
        for got, ref, exact in ((cos, cos_ref, cos64), (sin, sin_ref, sin64)):
            assert _rel(got, ref) <= 1e-5 + _rel(ref, exact), twin
            if rope_type != "dynamic":
                assert _rel(got, exact) <= 1e-6, twin
        if twin == "torch":
            rotated = trope.apply_rope(torch.from_numpy(q), cos, sin, "half")
        else:
            rotated = jrope.apply_rope(jnp.asarray(q), cos, sin, "half")
        assert _rel(rotated, q_ref) <= 1e-5, twin


def _float64_tables(c: RopeConfig, H: int, pos: np.ndarray):
    """cos, sin (B, T, R) in float64 from the float64 frequency table (half layout)."""
    inv, factor = inv_freq(c, H, seq_len=int(pos.max()) + 1, dtype=np.float64)
    freqs = pos.astype(np.float64)[..., None] * inv
    emb = np.concatenate([freqs, freqs], -1)
    return np.cos(emb) * factor, np.sin(emb) * factor


def _complex_rotation(x, pos, inv):
    """Meta's interleaved RoPE in float64: pairs (x[2i], x[2i+1]) as complex numbers times e^{i·pos·f_i}."""
    R = 2 * inv.shape[0]
    xc = x[..., :R:2].astype(np.float64) + 1j * x[..., 1:R:2].astype(np.float64)
    rot = xc * np.exp(1j * pos[:, None, :, None].astype(np.float64) * inv.astype(np.float64))
    out = x.astype(np.float64).copy()
    out[..., :R:2], out[..., 1:R:2] = rot.real, rot.imag
    return out


@pytest.mark.parametrize("shape", list(PARTIAL))
def test_interleaved_rotation_matches_complex_multiplication(shape):
    H, prf = PARTIAL[shape]
    c = _ours("llama3", H, prf, layout="interleaved")
    pos = _positions(50)
    x = np.random.default_rng(2).standard_normal((2, 3, 5, H)).astype(np.float32)
    want = _complex_rotation(x, pos, inv_freq(c, H)[0])
    got_t = trope.apply_rope(
        torch.from_numpy(x), *trope.rope_cos_sin(c, H, torch.from_numpy(pos)), "interleaved"
    )
    got_j = jrope.apply_rope(jnp.asarray(x), *jrope.rope_cos_sin(c, H, jnp.asarray(pos)), "interleaved")
    assert _rel(got_t, want) <= 1e-5 and _rel(got_j, want) <= 1e-5
    np.testing.assert_array_equal(np.asarray(got_j)[..., c.rotary_dim(H) :], x[..., c.rotary_dim(H) :])


@pytest.mark.parametrize("shape", list(PARTIAL))
@pytest.mark.parametrize("src", ["interleaved", "half"])
def test_permuted_weights_give_the_same_logits_in_the_other_layout(shape, src):
    """q·k logits of a projection in layout ``src`` equal those of the permuted projection in the other."""
    H, prf = PARTIAL[shape]
    dst = "half" if src == "interleaved" else "interleaved"
    N, E, T = 3, 10, 6
    R = int(H * prf)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, T, E)).astype(np.float32)
    wq, wk = (rng.standard_normal((N * H, E)).astype(np.float32) for _ in range(2))
    pos = np.arange(T)[None]

    def logits(twin, wq, wk, layout):
        c = _ours("default", H, prf, layout=layout)
        if twin == "torch":
            cs = trope.rope_cos_sin(c, H, torch.from_numpy(pos))
            q = torch.from_numpy(x) @ torch.as_tensor(wq).T
            k = torch.from_numpy(x) @ torch.as_tensor(wk).T
            split = lambda a: a.reshape(1, T, N, H).transpose(1, 2)
            q, k = trope.apply_rope(split(q), *cs, layout), trope.apply_rope(split(k), *cs, layout)
            return (q @ k.transpose(-1, -2)).numpy()
        cs = jrope.rope_cos_sin(c, H, jnp.asarray(pos))
        split = lambda a: a.reshape(1, T, N, H).transpose(0, 2, 1, 3)
        q = jrope.apply_rope(split(jnp.asarray(x) @ jnp.asarray(wq).T), *cs, layout)
        k = jrope.apply_rope(split(jnp.asarray(x) @ jnp.asarray(wk).T), *cs, layout)
        return np.asarray(q @ k.transpose(0, 1, 3, 2))

    for twin, permute in (("torch", trope.permute_rotary_weights), ("jax", jrope.permute_rotary_weights)):
        arr = torch.from_numpy if twin == "torch" else jnp.asarray
        wq2 = np.asarray(permute(arr(wq), N, H, R, src, dst))
        wk2 = np.asarray(permute(arr(wk), N, H, R, src, dst))
        want = logits(twin, wq, wk, src)
        assert _rel(logits(twin, wq2, wk2, dst), want) <= 1e-5, twin
        assert _rel(logits(twin, wq, wk, dst), want) > 1e-2, twin  # without the permutation: different
        back = np.asarray(permute(arr(wq2), N, H, R, dst, src))
        np.testing.assert_array_equal(back, wq)


def test_jit_does_not_recompile_when_the_length_switches_the_table():
    c = _ours("longrope", 12, 1.0)
    traces = []

    @jax.jit
    def f(pos):
        traces.append(pos.shape)
        return jrope.rope_cos_sin(c, 12, pos)

    short, long = f(jnp.asarray(_positions(12))), f(jnp.asarray(_positions(300)))
    assert len(traces) == 1
    want_short = trope.rope_cos_sin(c, 12, torch.from_numpy(_positions(12)))
    want_long = trope.rope_cos_sin(c, 12, torch.from_numpy(_positions(300)))
    assert _rel(short[0], want_short[0]) <= 1e-5 and _rel(long[0], want_long[0]) <= 1e-5


BAD = {
    "unknown_rope_type": (
        {"rope_type": "ntk"},
        "RopeConfig: unknown rope_type='ntk'; known rope types: "
        "('default', 'linear', 'dynamic', 'llama3', 'yarn', 'longrope', 'proportional')",
    ),
    "missing_factor": ({"rope_type": "linear"}, "rope_type='linear' needs ['factor']; missing ['factor']"),
    "missing_llama3": (
        {"rope_type": "llama3", "factor": 8.0},
        "missing ['low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings']",
    ),
    "unread_parameter": ({"factor": 2.0}, "rope_type='default' does not use ['factor']"),
    "theta": ({"rope_theta": 0.5}, "rope_theta must be a number > 1; got rope_theta=0.5"),
    "partial": ({"partial_rotary_factor": 0.0}, "partial_rotary_factor must be in (0, 1]"),
    "layout": ({"layout": "neox"}, "layout must be one of ('half', 'interleaved'); got layout='neox'"),
    "factor_below_1": ({"rope_type": "linear", "factor": 0.5}, "factor must be >= 1"),
    "negative_factor": ({"rope_type": "linear", "factor": -2.0}, "factor must be a positive number"),
    "llama3_bands": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 4.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8,
        },
        "llama3 needs high_freq_factor > low_freq_factor",
    ),
    "longrope_lengths": (
        {
            "rope_type": "longrope",
            "short_factor": [1.0],
            "long_factor": [1.0, 2.0],
            "original_max_position_embeddings": 8,
            "factor": 2.0,
        },
        "short_factor and long_factor must have one value per frequency each; got 1 and 2 values",
    ),
    "yarn_no_factor": (
        {"rope_type": "yarn", "original_max_position_embeddings": 8},
        "without factor needs max_position_embeddings",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_raises(case):
    kwargs, message = BAD[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        RopeConfig(**kwargs)


def test_unknown_hf_key_raises():
    with pytest.raises(ValueError, match=re.escape("unsupported rope parameters ['ntk_alpha']")):
        RopeConfig.from_hf({"rope_type": "default", "rope_theta": 1e4, "ntk_alpha": 2.0})
    with pytest.raises(ValueError, match=re.escape("mrope_section must be three ints >= 0")):
        RopeConfig.from_hf({"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2]})


@pytest.mark.parametrize("H, prf, factor", [(12, 1.0, None), (16, 0.25, None), (16, 0.5, 2.0)])
def test_proportional_inv_freq_matches_transformers(H, prf, factor):
    """Gemma 4's proportional RoPE: a table as wide as the head, θ^(-2i/H) for the first int(prf · H / 2)
    frequencies and zeros after (those channel pairs do not rotate), divided by ``factor``."""
    params = {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": prf}
    if factor is not None:
        params["factor"] = factor
    cfg = GPTNeoXConfig(hidden_size=3 * H, num_attention_heads=3, max_position_embeddings=L0)
    cfg.rope_parameters = params
    want, want_factor = ROPE_INIT_FUNCTIONS["proportional"](cfg, "cpu")
    c = RopeConfig.from_hf(params, max_position_embeddings=L0)
    got, got_factor = inv_freq(c, H)
    assert c.rotary_dim(H) == H and got.shape == tuple(want.shape) == (H // 2,)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
    assert np.count_nonzero(got) == int(prf * H // 2) and got_factor == want_factor == 1.0


@pytest.mark.parametrize("twin", ["jax", "torch"])
@pytest.mark.parametrize(
    "head_dim, prf, message",
    [
        (
            7,
            1.0,
            "rotary width must be even and >= 2; got "
            "rotary_dim=int(head_dim=7 * partial_rotary_factor=1.0)=7",
        ),
        (
            12,
            0.25,
            "rotary width must be even and >= 2; got "
            "rotary_dim=int(head_dim=12 * partial_rotary_factor=0.25)=3",
        ),
    ],
    ids=["odd_head", "odd_partial"],
)
def test_odd_rotary_width_raises_in_both_twins(twin, head_dim, prf, message):
    c = RopeConfig(partial_rotary_factor=prf)
    pos = np.zeros((1, 2), np.int64)
    with pytest.raises(ValueError, match=re.escape("RopeConfig: the " + message)):
        if twin == "jax":
            jrope.rope_cos_sin(c, head_dim, jnp.asarray(pos))
        else:
            trope.rope_cos_sin(c, head_dim, torch.from_numpy(pos))


@pytest.mark.parametrize("twin", ["jax", "torch"])
def test_permute_wrong_rows_raises_in_both_twins(twin):
    w = np.zeros((10, 4), np.float32)
    permute = jrope.permute_rotary_weights if twin == "jax" else trope.permute_rotary_weights
    arr = jnp.asarray(w) if twin == "jax" else torch.from_numpy(w)
    with pytest.raises(
        ValueError, match=re.escape("w's first axis must be num_heads * head_dim = 12; got w.shape=(10, 4)")
    ):
        permute(arr, 2, 6, 6, "interleaved", "half")
