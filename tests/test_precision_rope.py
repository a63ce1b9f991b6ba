"""float32 rotary tables at long positions: both twins' cos/sin are within ~1 ulp of the float64 oracle's
(``compare.oracle_attention.rope_tables``) at any position, and a rope layer's gradients at positions up to
~4096 are as close to the float64 oracle as with every position 0.

Before, both twins computed ``p · inv_freq`` in float32 (transformers' arithmetic) from a float32 frequency
table: the angle is off by up to half an ulp of itself and by p times the table's rounding, 1.5e-4 in cos/sin
at p ≈ 4096 and 5e-3 at p ≈ 1e5, which made the q/k projections' gradients ~20x further from float64 at T
4096 than at position 0 (both twins alike, on CPU). Now the angles come from the float64 table as fixed-point
turns, reduced exactly (``attn_spec.rope.fixed_point_turns``, ``cos_sin_of_turns`` in each twin)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from attn_spec.attention import AttentionConfig, state_dict_shapes
from attn_spec.rope import RopeConfig
from compare import oracle_attention
from compare.port_hf import run_jax_port, run_torch_twin
from jax_attn import rope as jrope
from torch_attn import rope as trope

ROPES = {
    "default": RopeConfig(),
    "interleaved": RopeConfig(layout="interleaved", rope_theta=5e5),
    "llama3": RopeConfig(
        rope_type="llama3",
        rope_theta=5e5,
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    "yarn": RopeConfig(rope_type="yarn", rope_theta=15e4, factor=32.0, original_max_position_embeddings=4096),
    "longrope": RopeConfig(
        rope_type="longrope",
        short_factor=tuple(1.0 + 0.05 * i for i in range(16)),
        long_factor=tuple(2.0 + 0.1 * i for i in range(16)),
        original_max_position_embeddings=1024,
        max_position_embeddings=131072,
    ),
    "dynamic": RopeConfig(rope_type="dynamic", factor=2.0, max_position_embeddings=8192),
    "partial": RopeConfig(partial_rotary_factor=0.25),
}


def _oracle_tables(rope: RopeConfig, H: int, pos: np.ndarray):
    c = AttentionConfig(4 * H, 4, head_dim=H, rope=rope)
    return oracle_attention.rope_tables(c, pos)


@pytest.mark.parametrize("max_pos", [4096, 100_000])
@pytest.mark.parametrize("name", list(ROPES))
def test_tables_within_an_ulp_or_two_of_float64(name, max_pos):
    rope, H = ROPES[name], 32
    if name == "dynamic" and max_pos > rope.max_position_embeddings:
        pytest.skip("dynamic past its length: a float32 table computed from the call's length")
    rng = np.random.default_rng(0)
    pos = np.stack([np.sort(rng.integers(0, max_pos, 512)), np.arange(512) - 300])  # negative ones too
    pos[0, -1] = max_pos - 1
    cos64, sin64 = _oracle_tables(rope, H, pos)
    scale = max(1.0, float(np.max(np.abs(cos64))))  # yarn/longrope: times their attention factor
    tables = {
        "jax": jax.jit(lambda p: jrope.rope_cos_sin(rope, H, p))(jnp.asarray(pos)),
        "torch": trope.rope_cos_sin(rope, H, torch.from_numpy(pos)),
    }
    for twin, (cos, sin) in tables.items():
        err = max(np.max(np.abs(np.asarray(cos) - cos64)), np.max(np.abs(np.asarray(sin) - sin64)))
        # float32 cos/sin round at 6e-8; the old tables were off by 1.5e-4 (4096) and 5e-3 (1e5).
        assert err <= 2.5e-7 * scale, (twin, err)


def test_dynamic_past_its_length_no_worse_than_float32_angles():
    # Past max_position_embeddings the rescaled table is float32 (computed from the call's length, as
    # transformers does); its angles are now exact for that table: errors at most those of p · inv in float32.
    rope, H, T = ROPES["dynamic"], 32, 4096
    rope = dataclasses.replace(rope, max_position_embeddings=1024)
    pos = np.arange(T)[None]
    cos64, sin64 = _oracle_tables(rope, H, pos)
    cos32, sin32 = oracle_attention.rope_tables(
        AttentionConfig(4 * H, 4, head_dim=H, rope=rope), pos, "float32"
    )
    floor = max(np.max(np.abs(cos32 - cos64)), np.max(np.abs(sin32 - sin64)))
    for cos, sin in (
        jax.jit(lambda p: jrope.rope_cos_sin(rope, H, p))(jnp.asarray(pos)),
        trope.rope_cos_sin(rope, H, torch.from_numpy(pos)),
    ):
        err = max(np.max(np.abs(np.asarray(cos) - cos64)), np.max(np.abs(np.asarray(sin) - sin64)))
        assert err <= 2.0 * floor, (err, floor)


LAYER = AttentionConfig(64, 4, num_kv_heads=2, head_dim=16, rope=RopeConfig())


def _grad_errors(pos: np.ndarray, implementation: str) -> dict[str, tuple[float, float]]:
    """Relative (Frobenius) errors of the output and every gradient vs the float64 oracle: (jax, torch)."""
    from flax import nnx

    import jax_attn.attention as ja
    import torch_attn.attention as ta

    c = LAYER
    rng = np.random.default_rng(0)
    sd = {}
    for key, shape in state_dict_shapes(c).items():
        w = rng.standard_normal(shape) * 1.5 / np.sqrt(shape[1])
        sd[key] = w.astype(np.float32).astype(np.float64)
    B, T = pos.shape
    x = rng.standard_normal((B, T, c.E)).astype(np.float32).astype(np.float64)
    dy = rng.standard_normal((B, T, c.E)).astype(np.float32).astype(np.float64)
    mask = np.ones((B, T), np.int64)
    ours_j = ja.Attention(c, implementation=implementation, rngs=nnx.Rngs(0))
    ours_j.load_torch_state_dict(sd)
    ours_t = ta.Attention(c, implementation=implementation)
    ours_t.load_torch_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    got_j = run_jax_port(ours_j, x, mask, pos, dy, False)
    got_t = run_torch_twin(ours_t, x, mask, pos, dy, False)
    ref = oracle_attention.attention_backward(x, sd, dy, c, attention_mask=mask, position_ids=pos)
    ref = {"out": ref["out"], "grad_x": ref["x"], **{f"grad_{k}": ref[k] for k in sd}}
    rel = lambda got, r: float(np.linalg.norm(got - r) / np.linalg.norm(r))
    return {q: (rel(got_j[q], r), rel(got_t[q], r)) for q, r in ref.items()}


@functools.cache
def _floor() -> float:
    """The layer's largest relative error with every position 0 (no rotation): the float32 floor."""
    return max(max(e) for e in _grad_errors(np.zeros((1, 128), np.int64), "math").values())


@pytest.mark.parametrize("implementation", ["math", "fused", "blocked"])
def test_long_positions_add_no_error_to_the_gradients(implementation):
    # T 128 at positions 0, 32, ..., 4064 (the angles of a T 4096 call at a fraction of its cost) vs the same
    # layer at position 0 everywhere. Old twins (math, relative error from float64, JAX / torch): output
    # 1.12e-5 / 1.12e-5, q_proj.weight gradient 1.80e-5 / 1.79e-5, against a floor of 5.8e-7; now 3.9e-7 /
    # 4.4e-7 and 5.2e-7 / 5.7e-7.
    long = _grad_errors(32 * np.arange(128)[None], implementation)
    for q, (jax_err, torch_err) in long.items():
        assert jax_err <= 2.0 * torch_err + 1e-7, (q, jax_err, torch_err)  # the JAX port as close as torch's
        assert jax_err <= 2.0 * _floor() and torch_err <= 2.0 * _floor(), (q, jax_err, torch_err, _floor())
