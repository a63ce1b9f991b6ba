"""The one FLOP formula every benchmark row is credited with (see shared/REFERENCE.md).

Dimension key: B batch, N query heads, T query length, S key length, H head width, E model width.

- attention forward: ``4·B·N·T·S·H`` (two matmuls, ``Q·Kᵀ`` and ``P·V``, of ``2·T·S·H`` each), halved
  for causal. An implementation that computes the full matrix and masks it is still credited half: the
  useful work is what counts, so wasted work shows up as lower throughput.
- backward: 2.5 × forward, so forward+backward is 3.5 × forward.
- each projection (``nn.Linear`` E_in → E_out): ``2·B·T·E_in·E_out``; modules count theirs on top.
- softmax, scaling and masking are not counted (they are O(T·S), not O(T·S·H)).
"""

from __future__ import annotations

FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"
MODES = (FORWARD, FORWARD_BACKWARD)

#: backward costs this many forwards (two matmuls forward, five backward).
BACKWARD_FACTOR = 2.5


def mode_factor(mode: str) -> float:
    """Multiplier from forward FLOPs to the FLOPs of ``mode``."""
    if mode == FORWARD:
        return 1.0
    if mode == FORWARD_BACKWARD:
        return 1.0 + BACKWARD_FACTOR
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def attention_flops(B: int, N: int, T: int, S: int, H: int, causal: bool, mode: str = FORWARD) -> float:
    """FLOPs of scaled dot-product attention over ``(B, N, T, H)`` queries and ``(B, N, S, H)`` keys."""
    forward = 4.0 * B * N * T * S * H
    if causal:
        forward /= 2.0
    return forward * mode_factor(mode)


def projection_flops(B: int, T: int, E_in: int, E_out: int, mode: str = FORWARD) -> float:
    """FLOPs of one linear layer applied to ``(B, T, E_in)``; the bias add is not counted."""
    return 2.0 * B * T * E_in * E_out * mode_factor(mode)


def module_flops(
    B: int, N: int, T: int, H: int, causal: bool, mode: str = FORWARD, num_kv_heads: int | None = None
) -> float:
    """Self-attention module: Q, K, V and output projections plus the attention itself (S = T).

    With ``num_kv_heads`` (grouped-query attention) the K and V projections are ``E → num_kv_heads·H``.
    """
    E = N * H
    kv_width = (num_kv_heads or N) * H
    projections = (
        projection_flops(B, T, E, E, mode)  # query
        + 2 * projection_flops(B, T, E, kv_width, mode)  # key, value
        + projection_flops(B, T, E, E, mode)  # output
    )
    return attention_flops(B, N, T, T, H, causal, mode) + projections


def gemm_flops(M: int, K: int, N: int) -> float:
    """FLOPs of ``(M, K) @ (K, N)``: the ceiling every row is compared to."""
    return 2.0 * M * K * N
