"""Input checks for ``MultiheadAttention``, written once for both twins.

Like ``attn_spec.checks`` these take shapes (tuples of ints) and dtype names, never tensors, so that
``jax_attn.MultiheadAttention`` and ``torch_attn.MultiheadAttention`` raise the *same* ``ValueError`` with
the same text. torch's built-in raises ``AssertionError``/``RuntimeError`` for most of these; the twins
raise ``ValueError`` naming the shapes as the caller passed them (``batch_first`` layout included).

Dimension key: N batch, L query length (T elsewhere), S key/value length, E embed_dim, D head width
(``E // num_heads``), ``S_total`` keys after ``add_bias_kv`` / ``add_zero_attn`` (S + 0, 1 or 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from attn_spec.checks import FLOAT_DTYPES, check_qkv_dtypes, fmt_shape

Spec = tuple[tuple[int, ...], str]


def check_mha_init(
    embed_dim: int,
    num_heads: int,
    dropout: float = 0.0,
    kdim: int | None = None,
    vdim: int | None = None,
    name: str = "MultiheadAttention",
) -> tuple[int, int, int]:
    """Validate the constructor's sizes; returns ``(head_dim, kdim, vdim)`` with defaults filled in.

    ``embed_dim`` must split evenly into ``num_heads`` heads (seed 002's failing example is
    ``embed_dim=2, num_heads=4``).
    """
    for arg, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: {arg} must be a positive int; got {arg}={val!r}")
    kdim = embed_dim if kdim is None else kdim
    vdim = embed_dim if vdim is None else vdim
    for arg, val in (("kdim", kdim), ("vdim", vdim)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: {arg} must be a positive int or None; got {arg}={val!r}")
    if embed_dim % num_heads != 0:
        raise ValueError(
            f"{name}: embed_dim must be divisible by num_heads; got embed_dim={embed_dim}, "
            f"num_heads={num_heads} (embed_dim % num_heads = {embed_dim % num_heads})"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be a number in [0, 1); got dropout={dropout!r}")
    return embed_dim // num_heads, kdim, vdim


@dataclass(frozen=True)
class MhaShapes:
    """What :func:`check_mha` derived from valid inputs (sizes in the dimension key)."""

    batched: bool
    N: int
    L: int
    S: int
    E: int
    D: int
    S_total: int

    @property
    def weights(self) -> tuple[int, ...]:
        """Per-head attention weights ``(N, num_heads, L, S_total)`` (without N when unbatched)."""
        heads = (self.N, self.E // self.D) if self.batched else (self.E // self.D,)
        return (*heads, self.L, self.S_total)


def check_mha(
    *,
    query: Spec,
    key: Spec,
    value: Spec,
    key_padding_mask: Spec | None,
    attn_mask: Spec | None,
    dropout_mask: Spec | None,
    embed_dim: int,
    num_heads: int,
    kdim: int,
    vdim: int,
    batch_first: bool,
    is_causal: bool,
    add_bias_kv: bool,
    add_zero_attn: bool,
    name: str = "MultiheadAttention",
) -> MhaShapes:
    """Validate a ``MultiheadAttention`` call (torch's semantics) given ``(shape, dtype_name)`` pairs.

    Args:
      query ``(L, N, E)`` / ``(N, L, E)`` with ``batch_first`` / unbatched ``(L, E)``; key ``(S, N, kdim)``
        and value ``(S, N, vdim)`` in the same layout.
      key_padding_mask: ``(N, S)`` (``(S,)`` unbatched), bool (True = ignore) or floating (additive).
      attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)`` (``(num_heads, L, S)`` unbatched), bool
        (True = masked out) or floating (additive).
      dropout_mask: bool keep-mask of the per-head weights, ``(N, num_heads, L, S_total)``.
      is_causal: torch's hint; it needs ``attn_mask`` (torch raises without one too).

    Returns:
      The derived :class:`MhaShapes`.
    """
    (q_shape, q_dt), (k_shape, k_dt), (v_shape, v_dt) = query, key, value
    q_shape, k_shape, v_shape = tuple(q_shape), tuple(k_shape), tuple(v_shape)
    shapes = (
        f"query.shape={fmt_shape(q_shape)}, key.shape={fmt_shape(k_shape)}, value.shape={fmt_shape(v_shape)}"
    )
    if len(q_shape) not in (2, 3):
        raise ValueError(f"{name}: query must be 3-D (batched) or 2-D (unbatched (L, E)); got {shapes}")
    batched = len(q_shape) == 3
    if len(k_shape) != len(q_shape) or len(v_shape) != len(q_shape):
        raise ValueError(f"{name}: key and value must have the same rank as query; got {shapes}")
    check_qkv_dtypes(q_dt, k_dt, v_dt, name)
    for arg, shape, size, what in (
        ("query", q_shape, embed_dim, "embed_dim"),
        ("key", k_shape, kdim, "kdim"),
        ("value", v_shape, vdim, "vdim"),
    ):
        if shape[-1] != size:
            raise ValueError(f"{name}: {arg}'s feature size (last axis) must be {what}={size}; got {shapes}")
    if batched:
        seq_axis, batch_axis = (1, 0) if batch_first else (0, 1)
        if not q_shape[batch_axis] == k_shape[batch_axis] == v_shape[batch_axis]:
            layout = "(N, L, E)" if batch_first else "(L, N, E)"
            raise ValueError(
                f"{name}: query, key and value must have the same batch size N (layout {layout}, "
                f"batch_first={batch_first}); got {shapes}"
            )
        N = q_shape[batch_axis]
    else:
        seq_axis, N = 0, 1
    L, S = q_shape[seq_axis], k_shape[seq_axis]
    if v_shape[seq_axis] != S:
        raise ValueError(f"{name}: key and value must have the same length S; got {shapes}")
    if min(L, S, N) == 0:
        raise ValueError(f"{name}: empty batch or sequence axis; got {shapes}")
    S_total = S + int(add_bias_kv) + int(add_zero_attn)
    result = MhaShapes(batched=batched, N=N, L=L, S=S, E=embed_dim, D=embed_dim // num_heads, S_total=S_total)

    if key_padding_mask is not None:
        m_shape, m_dt = tuple(key_padding_mask[0]), key_padding_mask[1]
        if m_dt != "bool" and m_dt not in FLOAT_DTYPES:
            raise ValueError(
                f"{name}: key_padding_mask must be bool (True = ignore) or floating (additive); "
                f"got key_padding_mask.dtype={m_dt}"
            )
        want = (N, S) if batched else (S,)
        if m_shape != want:
            raise ValueError(
                f"{name}: key_padding_mask.shape={fmt_shape(m_shape)} must be {fmt_shape(want)} "
                f"({'(N, S)' if batched else '(S,)'}; from {shapes})"
            )
    if attn_mask is not None:
        m_shape, m_dt = tuple(attn_mask[0]), attn_mask[1]
        if m_dt != "bool" and m_dt not in FLOAT_DTYPES:
            raise ValueError(
                f"{name}: attn_mask must be bool (True = masked out) or floating (additive); "
                f"got attn_mask.dtype={m_dt}"
            )
        want_3d = (N * num_heads if batched else num_heads, L, S)
        if m_shape not in ((L, S), want_3d):
            raise ValueError(
                f"{name}: attn_mask.shape={fmt_shape(m_shape)} must be (L, S)={fmt_shape((L, S))} or "
                f"(N * num_heads, L, S)={fmt_shape(want_3d)} (from {shapes}, num_heads={num_heads})"
            )
    elif is_causal:
        raise ValueError(
            f"{name}: is_causal=True is only a hint and needs attn_mask (torch raises too); pass "
            "attn_mask=~causal_mask(L, S) (True = masked out) with it"
        )
    if dropout_mask is not None:
        d_shape, d_dt = tuple(dropout_mask[0]), dropout_mask[1]
        if d_dt != "bool":
            raise ValueError(
                f"{name}: dropout_mask must be bool (True = keep); got dropout_mask.dtype={d_dt}"
            )
        if d_shape != result.weights:
            raise ValueError(
                f"{name}: dropout_mask.shape={fmt_shape(d_shape)} must be the per-head weights' shape "
                f"{fmt_shape(result.weights)} (N, num_heads, L, S_total)"
            )
    return result
