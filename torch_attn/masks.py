"""Attention-mask helpers (PyTorch twin of ``jax_attn/masks.py``).

Three mask conventions meet in a port, and mixing them up silently inverts a mask:

- *keep* (SDPA, flax, ``jax.nn``): bool, True = this query may attend to this key. This is the one
  convention used inside the project.
- *masked* (``torch.nn.MultiheadAttention``'s ``attn_mask`` / ``key_padding_mask``): bool, True = ignore.
- *additive*: float, added to the logits; 0 keeps, -inf (or a very negative number) removes.

Dimension key: see ``attn_spec``. ``T`` query length, ``S`` key length, ``B`` batch.
"""

from __future__ import annotations

import torch

from attn_spec import check_causal_mask_args, check_lengths


def _dtype_name(x) -> str:
    return str(x.dtype).removeprefix("torch.")


def causal_mask(T: int, S: int | None = None, offset=0, device=None) -> torch.Tensor:
    """Keep-mask ``keep_TS`` for causal attention: query t may attend to key s when ``s <= t + offset``.

    ``offset=0`` is torch's top-left alignment (``tril`` of a ``(T, S)`` matrix, also when T != S);
    ``offset=S - T`` aligns the last query with the last key (bottom-right), which is what decoding the
    last T of S tokens needs. ``offset`` may be a tensor (a KV-cache position).

    Returns:
      bool ``(T, S)``.
    """
    S = check_causal_mask_args(T, S)
    t_T1 = torch.arange(T, device=device)[:, None]
    s_1S = torch.arange(S, device=device)[None, :]
    return s_1S <= t_T1 + offset


def padding_mask(lengths, S: int) -> torch.Tensor:
    """Keep-mask from valid lengths (d2l's ``valid_lens``): key s is kept when ``s < length``.

    Args:
      lengths: integer ``(B,)`` (one length per sequence) or ``(B, T)`` (one per query).
      S: key length.

    Returns:
      bool ``(B, S)`` or ``(B, T, S)``. Insert a head axis to use it with SDPA, e.g.
      ``mask[:, None, None, :]`` for ``(B, N, T, S)`` logits.
    """
    lengths = torch.as_tensor(lengths)
    check_lengths(tuple(lengths.shape), _dtype_name(lengths), S)
    return torch.arange(S, device=lengths.device) < lengths[..., None]


def masked_to_keep(mask: torch.Tensor) -> torch.Tensor:
    """torch-MHA polarity (bool True = ignore) to keep polarity (True = may attend).

    A float mask is additive in both conventions and is returned unchanged.
    """
    mask = torch.as_tensor(mask)
    return torch.logical_not(mask) if mask.dtype == torch.bool else mask


def keep_to_masked(mask: torch.Tensor) -> torch.Tensor:
    """Keep polarity (True = may attend) to torch-MHA polarity (True = ignore); float passes through."""
    return masked_to_keep(mask)


def keep_to_additive(keep: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Bool keep-mask to an additive float mask: 0 where kept, -inf where not."""
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool:
        raise ValueError(f"keep_to_additive: keep must be bool; got keep.dtype={_dtype_name(keep)}")
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, -torch.inf)


def additive_to_keep(mask: torch.Tensor) -> torch.Tensor:
    """Additive float mask to a bool keep-mask: positions at or below the dtype's most negative finite
    value (``finfo.min`` fills, -inf) are masked; any other value counts as kept.

    Finite biases (e.g. ALiBi slopes) cannot be expressed as a bool mask and are lost.
    """
    mask = torch.as_tensor(mask)
    if not mask.is_floating_point():
        raise ValueError(f"additive_to_keep: mask must be floating; got mask.dtype={_dtype_name(mask)}")
    return mask > torch.finfo(mask.dtype).min
