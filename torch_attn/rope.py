"""Rotary position embeddings (PyTorch twin of ``jax_attn/rope.py``).

Dimension key (see ``attn_spec``): B batch, T tokens, N heads, H head width, R rotary width (the first R
channels of each head rotate), F = R // 2 frequencies.

The parameters, their checks, the float32 frequency tables and the layout permutation live once in
``attn_spec.rope``; this file turns them into cos/sin for ``position_ids (B, T)`` and applies them to
``(B, N, T, H)`` in either layout. Tables that depend on the sequence length (``dynamic``, ``longrope``)
are computed from ``max(position_ids) + 1`` with tensor operations, as in the JAX twin.
"""

from __future__ import annotations

import numpy as np
import torch

from attn_spec.rope import (
    RopeConfig,
    check_head_dim,
    inv_freq,
    longrope_inv_freq,
    rotary_permutation,
)


def _dynamic_inv_freq(config: RopeConfig, R: int, seq_len: torch.Tensor) -> torch.Tensor:
    """dynamic NTK's table for a ``seq_len`` tensor, in float32 as transformers computes it."""
    L0, factor = config.max_position_embeddings, config.factor
    seq_len = torch.clamp(seq_len, min=L0).to(torch.float32)
    base = config.rope_theta * ((factor * seq_len / L0) - (factor - 1)) ** (R / (R - 2))
    exponents = np.arange(0, R, 2, dtype=np.int64).astype(np.float32) / np.float32(R)
    return 1.0 / (base.to(torch.float32) ** torch.from_numpy(exponents).to(seq_len.device))


def rope_cos_sin(
    config: RopeConfig, head_dim: int, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``(B, T, R)`` in float32 for ``position_ids (B, T)``, laid out for ``config.layout``
    and multiplied by the rope type's attention factor (yarn, longrope), as transformers does."""
    R = check_head_dim(config, head_dim)
    pos_BT = torch.as_tensor(position_ids)
    device = pos_BT.device
    if config.rope_type == "dynamic":
        inv_F = _dynamic_inv_freq(config, R, pos_BT.max() + 1)
        factor = 1.0
    elif config.rope_type == "longrope":
        short, factor = inv_freq(config, head_dim)
        long = longrope_inv_freq(config, R, long=True)
        inv_F = torch.where(
            pos_BT.max() + 1 > config.original_max_position_embeddings,
            torch.from_numpy(long).to(device),
            torch.from_numpy(short).to(device),
        )
    else:
        table, factor = inv_freq(config, head_dim)
        inv_F = torch.from_numpy(table).to(device)
    freqs_BTF = pos_BT.to(torch.float32)[..., None] * inv_F
    if config.layout == "half":
        emb_BTR = torch.cat([freqs_BTF, freqs_BTF], dim=-1)
    else:
        emb_BTR = torch.repeat_interleave(freqs_BTF, 2, dim=-1)
    return torch.cos(emb_BTR) * factor, torch.sin(emb_BTR) * factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last axis (the half-split layout)."""
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x[2i], x[2i+1]) -> (-x[2i+1], x[2i])`` for each pair of the last axis (the interleaved layout)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)


def apply_rope(
    x_BNTH: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor, layout: str = "half"
) -> torch.Tensor:
    """Rotate the first R channels of every head of ``x (B, N, T, H)``; the other ``H - R`` pass through.
    Computed in float32 (at least) and cast back to x's dtype."""
    R = cos_BTR.shape[-1]
    dt = torch.promote_types(x_BNTH.dtype, torch.float32)
    x_rot, x_pass = x_BNTH[..., :R].to(dt), x_BNTH[..., R:]
    rotate = rotate_half if layout == "half" else rotate_pairs
    cos, sin = cos_BTR[:, None].to(dt), sin_BTR[:, None].to(dt)
    out = (x_rot * cos + rotate(x_rot) * sin).to(x_BNTH.dtype)
    return torch.cat([out, x_pass], dim=-1) if R < x_BNTH.shape[-1] else out


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
    return w[torch.from_numpy(perm)] if isinstance(w, torch.Tensor) else w[perm]
