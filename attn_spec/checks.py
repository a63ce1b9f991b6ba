"""Input checks for scaled dot-product attention, written once for both twins.

Each twin converts its arrays to ``(shape tuple, dtype name)`` and calls these functions at its public
boundary. A failing check raises ``ValueError`` whose message names the offending shapes or values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def fmt_shape(shape) -> str:
    """``(2, 3)`` for any sequence of ints, so messages read the same for torch.Size and tuples."""
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """NumPy broadcasting of several shapes; None when they do not broadcast."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(-rank, 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis} - {1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def check_qkv_dtypes(q_dt: str, k_dt: str, v_dt: str, name: str) -> None:
    """query, key and value: floating, and one dtype for all three."""
    for arg, dt in (("query", q_dt), ("key", k_dt), ("value", v_dt)):
        if dt not in FLOAT_DTYPES:
            raise ValueError(
                f"{name}: {arg} must be floating ({', '.join(FLOAT_DTYPES)}); got {arg}.dtype={dt}"
            )
    if not q_dt == k_dt == v_dt:
        raise ValueError(
            f"{name}: query, key and value must share one dtype; got query.dtype={q_dt}, "
            f"key.dtype={k_dt}, value.dtype={v_dt}"
        )


@dataclass(frozen=True)
class SdpaShapes:
    """What the checks derived from valid inputs.

    Attributes:
      batch: broadcast leading dimensions of the output (``...``), head axis included.
      T, S, H, V: query length, key length, q/k head width, value head width.
      groups: query heads per key/value head (G); 1 without GQA.
      logits: shape of the attention logits and weights, ``(*batch, T, S)``.
      out: shape of the output, ``(*batch, T, V)``.
    """

    batch: tuple[int, ...]
    T: int
    S: int
    H: int
    V: int
    groups: int

    @property
    def logits(self) -> tuple[int, ...]:
        return (*self.batch, self.T, self.S)

    @property
    def out(self) -> tuple[int, ...]:
        return (*self.batch, self.T, self.V)


def check_sdpa(
    *,
    query: tuple[tuple[int, ...], str],
    key: tuple[tuple[int, ...], str],
    value: tuple[tuple[int, ...], str],
    attn_mask: tuple[tuple[int, ...], str] | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    dropout_mask: tuple[tuple[int, ...], str] | None,
    needs_rng: bool = False,
    name: str = "scaled_dot_product_attention",
) -> SdpaShapes:
    """Validate SDPA arguments (torch's semantics) given as ``(shape, dtype_name)`` pairs.

    Args:
      query: ``(..., T, H)``; key: ``(..., S, H)``; value: ``(..., S, V)``. Leading dimensions broadcast
        like torch's matmul. With ``enable_gqa`` the head axis (-3) of key/value may divide the query's.
      attn_mask: bool (True = may attend) or floating (added to logits), broadcastable to
        ``(*batch, T, S)``; None for no mask.
      dropout_mask: bool keep-mask broadcastable to ``(*batch, T, S)``, or None.
      needs_rng: True when ``dropout_p > 0``, no dropout_mask was given and the caller has no random
        key (the JAX twin); the check then fails asking for one.

    Returns:
      The derived :class:`SdpaShapes`.
    """
    (q_shape, q_dt), (k_shape, k_dt), (v_shape, v_dt) = query, key, value
    q_shape, k_shape, v_shape = tuple(q_shape), tuple(k_shape), tuple(v_shape)
    shapes = (
        f"query.shape={fmt_shape(q_shape)}, key.shape={fmt_shape(k_shape)}, value.shape={fmt_shape(v_shape)}"
    )
    check_qkv_dtypes(q_dt, k_dt, v_dt, name)
    min_rank = 3 if enable_gqa else 2
    for arg, shape in (("query", q_shape), ("key", k_shape), ("value", v_shape)):
        if len(shape) < min_rank:
            layout = "(..., heads, length, width)" if enable_gqa else "(..., length, width)"
            raise ValueError(f"{name}: {arg} must have at least {min_rank} dimensions {layout}; got {shapes}")
        if any(d == 0 for d in shape[-2:]):
            raise ValueError(f"{name}: {arg} has an empty length or width axis; got {shapes}")
    if q_shape[-1] != k_shape[-1]:
        raise ValueError(f"{name}: query and key must have the same head width H (last axis); got {shapes}")
    if k_shape[-2] != v_shape[-2]:
        raise ValueError(f"{name}: key and value must have the same length S (axis -2); got {shapes}")

    groups = 1
    if enable_gqa:
        n_q, n_kv = q_shape[-3], k_shape[-3]
        if v_shape[-3] != n_kv:
            raise ValueError(
                f"{name}: enable_gqa: key and value must have the same number of heads (axis -3); "
                f"got {shapes}"
            )
        if n_kv == 0 or n_q % n_kv != 0:
            raise ValueError(
                f"{name}: enable_gqa: query heads ({n_q}) must be a multiple of key/value heads ({n_kv}); "
                f"got {shapes}"
            )
        groups = n_q // n_kv
        # After repeating KV heads G times the head axes agree; broadcast the rest.
        batch = _broadcast([q_shape[:-3], k_shape[:-3], v_shape[:-3]])
        batch = None if batch is None else (*batch, n_q)
    else:
        batch = _broadcast([q_shape[:-2], k_shape[:-2], v_shape[:-2]])
    if batch is None:
        raise ValueError(f"{name}: the leading (batch/head) dimensions do not broadcast; got {shapes}")
    result = SdpaShapes(
        batch=batch, T=q_shape[-2], S=k_shape[-2], H=q_shape[-1], V=v_shape[-1], groups=groups
    )

    if attn_mask is not None:
        m_shape, m_dt = tuple(attn_mask[0]), attn_mask[1]
        if m_dt != "bool" and m_dt not in FLOAT_DTYPES:
            raise ValueError(
                f"{name}: attn_mask must be bool (True = may attend) or floating (added to the logits); "
                f"got attn_mask.dtype={m_dt}"
            )
        if _broadcast([m_shape, result.logits]) != result.logits:
            raise ValueError(
                f"{name}: attn_mask.shape={fmt_shape(m_shape)} does not broadcast to the attention "
                f"logits' shape {fmt_shape(result.logits)} (from {shapes})"
            )
        if is_causal:
            raise ValueError(
                f"{name}: is_causal=True with an explicit attn_mask is not supported (torch raises too); "
                "pass attn_mask=causal_mask(T, S) & attn_mask instead"
            )

    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be a number in [0, 1); got dropout_p={dropout_p!r}")
    if dropout_mask is not None:
        d_shape, d_dt = tuple(dropout_mask[0]), dropout_mask[1]
        if d_dt != "bool":
            raise ValueError(
                f"{name}: dropout_mask must be bool (True = keep); got dropout_mask.dtype={d_dt}"
            )
        if _broadcast([d_shape, result.logits]) != result.logits:
            raise ValueError(
                f"{name}: dropout_mask.shape={fmt_shape(d_shape)} does not broadcast to the attention "
                f"weights' shape {fmt_shape(result.logits)}"
            )
        if dropout_p == 0.0:
            raise ValueError(
                f"{name}: dropout_mask was given with dropout_p=0.0; give the dropout_p it was drawn with "
                "(kept weights are scaled by 1 / (1 - dropout_p))"
            )
    elif dropout_p > 0.0 and needs_rng:
        raise ValueError(
            f"{name}: dropout_p={dropout_p} needs dropout_rng= (a jax.random key) or dropout_mask="
        )
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"{name}: scale must be a finite number or None; got scale={scale!r}")
    return result


def check_causal_mask_args(T: int, S: int | None, name: str = "causal_mask") -> int:
    """Validate causal-mask sizes; returns S (defaulting to T)."""
    S = T if S is None else S
    for arg, val in (("T", T), ("S", S)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: {arg} must be a positive int; got {arg}={val!r}")
    return S


def check_lengths(shape: tuple[int, ...], dtype: str, S: int, name: str = "padding_mask") -> None:
    """Validate per-sequence valid lengths: ``(B,)`` or ``(B, T)`` integers (d2l's ``valid_lens``)."""
    if dtype not in INT_DTYPES:
        raise ValueError(f"{name}: lengths must be integers; got lengths.dtype={dtype}")
    if len(shape) not in (1, 2):
        raise ValueError(
            f"{name}: lengths must be (B,) or (B, T) valid lengths; got lengths.shape={fmt_shape(shape)}"
        )
    if isinstance(S, bool) or not isinstance(S, int) or S < 1:
        raise ValueError(f"{name}: S must be a positive int; got S={S!r}")


#: Explicit ``implementation=`` values of ``scaled_dot_product_attention(_with_weights)`` in both twins
#: (the default, None or ``"auto"``, picks one of them: :mod:`attn_spec.dispatch`):
#: ``"math"`` the readable reference; ``"blocked"`` query/key-blocked online softmax that skips
#: fully-masked causal key blocks and never holds a T×S matrix; ``"fused"`` the framework's kernel
#: (JAX: ``jax.nn.dot_product_attention``, cuDNN on a GPU with fp16/bf16 inputs, else XLA; torch:
#: ``F.scaled_dot_product_attention``).
SDPA_IMPLEMENTATIONS = ("math", "blocked", "fused")


def check_implementation(
    implementation: str,
    *,
    dropout_p: float,
    need_weights: bool,
    name: str = "scaled_dot_product_attention",
) -> None:
    """Validate an ``implementation=`` choice against what the call asks of it.

    Only ``"math"`` materialises the attention weights and takes dropout; the others raise rather than
    silently falling back (the path taken must be explicit). The automatic choice (None / ``"auto"``) is
    resolved by :func:`attn_spec.dispatch.select` before this check.
    """
    if implementation not in SDPA_IMPLEMENTATIONS:
        raise ValueError(
            f"{name}: implementation must be None ('auto', see attn_spec.dispatch) or one of "
            f"{SDPA_IMPLEMENTATIONS}; got implementation={implementation!r}"
        )
    if implementation == "math":
        return
    if need_weights:
        raise ValueError(
            f"{name}: implementation={implementation!r} cannot return attention weights "
            "(need_weights / _with_weights); use implementation='math'"
        )
    if dropout_p > 0.0:
        raise ValueError(
            f"{name}: implementation={implementation!r} does not support attention dropout "
            f"(got dropout_p={dropout_p}); use implementation='math'"
        )
