"""Rotary position embeddings (JAX twin of ``torch_attn/rope.py``).

Dimension key (see ``attn_spec``): B batch, T tokens, N heads, H head width, R rotary width (the first R
channels of each head rotate), F = R // 2 frequencies.

The parameters, their checks, the frequency tables (as fixed-point turns) and the layout permutation live
once in ``attn_spec.rope``; this file turns them into cos/sin for ``position_ids (B, T)`` and applies them
to ``(B, N, T, H)`` in either layout. Tables that depend on the sequence length (``dynamic``, ``longrope``)
are computed from ``max(position_ids) + 1`` inside the traced function, so a jitted call does not
recompile when the length changes.

Angles: ``p · inv_freq`` rounded to float32 is off by up to half an ulp of the angle (2.4e-4 rad at 4096),
and then depends on how the backend's sin/cos reduce a large argument. Here the angle is reduced exactly in
32-bit integer arithmetic from the float64 table (``attn_spec.rope.fixed_point_turns``) to a quarter turn
and a float32 rest in ``[-π/4, π/4]``, whose cos/sin every backend computes to about an ulp: the tables are
within ~1e-7 of the float64 oracle's at any position below 2^24, in both twins (as transformers' own fp32
tables are not at long positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attn_spec.rope import (
    HIGH_12_BITS_MASK,
    TURN_BITS,
    TURNS_PER_RADIAN_PARTS,
    RopeConfig,
    check_head_dim,
    mrope_rows,
    rope_turns,
    rotary_permutation,
)


def _dynamic_inv_freq(config: RopeConfig, R: int, seq_len: jax.Array) -> jax.Array:
    """dynamic NTK's table for a (traced) ``seq_len``, in float32 as transformers computes it."""
    L0, factor = config.max_position_embeddings, config.factor
    seq_len = jnp.maximum(seq_len, L0).astype(jnp.float32)
    base = config.rope_theta * ((factor * seq_len / L0) - (factor - 1)) ** (R / (R - 2))
    exponents = jnp.asarray(np.arange(0, R, 2, dtype=np.int64).astype(np.float32) / np.float32(R))
    return 1.0 / (base.astype(jnp.float32) ** exponents)


def _fixed_point_turns(inv_F: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``attn_spec.rope.fixed_point_turns`` of a float32 table computed here (dynamic past its length),
    exact for that float32 table: ``inv · 2^32 / 2π`` as six products of inv's 12-bit halves with the parts
    of the constant (the first four exact), each split into its integer part (summed modulo 2^32, i.e.
    whole turns) and its fraction (into lo, below 6 · 2^-32)."""
    inv_F = inv_F.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(inv_F, jnp.uint32) & np.uint32(HIGH_12_BITS_MASK)
    high = jax.lax.bitcast_convert_type(bits, jnp.float32)
    hi_F, lo_F = jnp.zeros(inv_F.shape, jnp.uint32), jnp.zeros(inv_F.shape, jnp.float32)
    for half in (high, inv_F - high):
        for part in TURNS_PER_RADIAN_PARTS:
            term = half * part  # < 2^32
            whole = jnp.floor(term)
            hi_F, lo_F = hi_F + whole.astype(jnp.uint32), lo_F + (term - whole)
    return hi_F, lo_F * np.float32(2.0**-TURN_BITS)


def cos_sin_of_turns(pos_BT: jax.Array, hi_F: jax.Array, lo_F: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 cos and sin ``(B, T, F)`` of the angles ``2π · p · (hi · 2^-32 + lo)`` (see
    ``attn_spec.rope.fixed_point_turns``), reduced exactly to a quarter turn k and a rest in ``[-π/4, π/4]``:
    ``cos(kπ/2 + r)``, ``sin(kπ/2 + r)`` from ``cos r``, ``sin r`` by swaps and signs."""
    p_BT = pos_BT.astype(jnp.int32)
    u = jax.lax.bitcast_convert_type(p_BT, jnp.uint32)[..., None] * hi_F  # p · hi mod 2^32, in 2^-32 turns
    nearest = (u + np.uint32(1 << 29)) >> 30  # the nearest quarter turn (modulo 4 turns' wrap)
    rest = jax.lax.bitcast_convert_type(u - (nearest << 30), jnp.int32)  # in [-2^29, 2^29): 2^-32 turns
    quadrant = nearest & 3
    rest_hi = rest & -256  # two parts exact in float32
    rest_lo = rest - rest_hi
    small = p_BT.astype(jnp.float32)[..., None] * lo_F  # below 0.03 turns for |p| < 2^24
    quarters = rest_hi.astype(jnp.float32) * 2.0**-30 + (rest_lo.astype(jnp.float32) * 2.0**-30 + 4 * small)
    r = quarters * np.float32(np.pi / 2)
    cos_r, sin_r = jnp.cos(r), jnp.sin(r)
    swap = (quadrant & 1) == 1
    cos = jnp.where(swap, sin_r, cos_r)
    sin = jnp.where(swap, cos_r, sin_r)
    cos = jnp.where((quadrant == 1) | (quadrant == 2), -cos, cos)
    sin = jnp.where(quadrant >= 2, -sin, sin)
    return cos, sin


def rope_cos_sin(config: RopeConfig, head_dim: int, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``(B, T, R)`` in float32 for ``position_ids (B, T)`` (or ``(3, B, T)`` with
    ``mrope_section``: each frequency's angle from its row, ``attn_spec.rope.mrope_rows``), laid out for
    ``config.layout`` and multiplied by the rope type's attention factor (yarn, longrope), as transformers
    does; the angles from the float64 tables, reduced exactly (:func:`cos_sin_of_turns`)."""
    R = check_head_dim(config, head_dim)
    pos_BT = jnp.asarray(position_ids)
    table = jnp.asarray  # uint32 hi, float32 lo
    if config.rope_type == "dynamic":  # the default table until the call outgrows max_position_embeddings
        short_hi, short_lo, factor = rope_turns(config, head_dim)
        long_hi, long_lo = _fixed_point_turns(_dynamic_inv_freq(config, R, jnp.max(pos_BT) + 1))
        long = jnp.max(pos_BT) + 1 > config.max_position_embeddings
        hi_F, lo_F = jnp.where(long, long_hi, table(short_hi)), jnp.where(long, long_lo, table(short_lo))
    elif config.rope_type == "longrope":
        short_hi, short_lo, factor = rope_turns(config, head_dim)
        long_hi, long_lo, _ = rope_turns(config, head_dim, long=True)
        long = jnp.max(pos_BT) + 1 > config.original_max_position_embeddings
        hi_F = jnp.where(long, table(long_hi), table(short_hi))
        lo_F = jnp.where(long, table(long_lo), table(short_lo))
    else:
        hi_F, lo_F, factor = rope_turns(config, head_dim)
        hi_F, lo_F = table(hi_F), table(lo_F)
    cos_BTF, sin_BTF = cos_sin_of_turns(pos_BT, hi_F, lo_F)
    rows_F = mrope_rows(config, head_dim)
    if rows_F is not None and pos_BT.ndim == 3:  # (3, B, T): each frequency reads its row's angle
        pick = lambda a: jnp.where(rows_F == 0, a[0], jnp.where(rows_F == 1, a[1], a[2]))
        cos_BTF, sin_BTF = pick(cos_BTF), pick(sin_BTF)
    if config.layout == "half":
        cos_BTR, sin_BTR = (jnp.concatenate([a, a], axis=-1) for a in (cos_BTF, sin_BTF))
    else:
        cos_BTR, sin_BTR = (jnp.repeat(a, 2, axis=-1) for a in (cos_BTF, sin_BTF))
    return cos_BTR * factor, sin_BTR * factor


def rotate_half(x: jax.Array) -> jax.Array:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last axis (the half-split layout)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rotate_pairs(x: jax.Array) -> jax.Array:
    """``(x[2i], x[2i+1]) -> (-x[2i+1], x[2i])`` for each pair of the last axis (the interleaved layout)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x_BNTH: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array, layout: str = "half") -> jax.Array:
    """Rotate the first R channels of every head of ``x (B, N, T, H)``; the other ``H - R`` pass through.
    Computed in float32 (at least) and cast back to x's dtype."""
    R = cos_BTR.shape[-1]
    dt = jnp.result_type(x_BNTH.dtype, jnp.float32)
    x_rot, x_pass = x_BNTH[..., :R].astype(dt), x_BNTH[..., R:]
    rotate = rotate_half if layout == "half" else rotate_pairs
    cos, sin = cos_BTR[:, None].astype(dt), sin_BTR[:, None].astype(dt)
    out = (x_rot * cos + rotate(x_rot) * sin).astype(x_BNTH.dtype)
    return jnp.concatenate([out, x_pass], axis=-1) if R < x_BNTH.shape[-1] else out


def permute_rotary_weights(w, num_heads: int, head_dim: int, rotary_dim: int, src: str, dst: str):
    """A q or k projection's weight ``(heads·H, E)`` or bias ``(heads·H,)`` from rotary layout ``src`` to
    ``dst`` (``"half"``/``"interleaved"``): rows permuted within each head's first ``rotary_dim``
    channels, so the model gives the same output in the other layout."""
    perm = rotary_permutation(num_heads, head_dim, rotary_dim, src, dst)
    if w.shape[0] != perm.shape[0]:
        raise ValueError(
            f"permute_rotary_weights: w's first axis must be num_heads * head_dim = {perm.shape[0]}; "
            f"got w.shape={tuple(w.shape)}"
        )
    return w[perm]
