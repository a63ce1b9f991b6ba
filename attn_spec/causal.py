"""Checks and weight layouts for causal self-attention, written once for both twins.

``jax_attn.CausalSelfAttention`` and ``torch_attn.CausalSelfAttention`` call these with plain ints, shape
tuples and dtype names, so that the same bad input raises the same ``ValueError`` text in both.

Dimension key (see ``attn_spec``): B batch, T tokens in this call, E model width, N query heads,
K key/value heads, H head width (``E // N``), G query heads per key/value head (``N // K``),
L the KV cache's ``max_length``.

Weight layouts (``layout=`` of ``torch_state_dict`` / ``load_torch_state_dict``), for one attention module's
own keys (strip a model's prefix such as ``transformer.h.0.attn.`` first):

- ``"torch_attn"``: our twins' parameters in torch's ``nn.Linear`` layout (out, in):
  ``q_proj.weight (N·H, E)``, ``k_proj.weight (K·H, E)``, ``v_proj.weight (K·H, E)``,
  ``out_proj.weight (E, N·H)``, and ``.bias`` of each when ``bias=True``.
- ``"hf_gpt2"``: Hugging Face GPT-2 attention. Its ``Conv1D`` stores weights input-major (in, out):
  ``c_attn.weight (E, 3E)`` = ``[Wq | Wk | Wv]`` along the last axis, ``c_attn.bias (3E,)``,
  ``c_proj.weight (E, E)``, ``c_proj.bias (E,)``. GPT-2 always has biases.
- ``"nanogpt"``: nanoGPT's ``CausalSelfAttention``, ``nn.Linear`` (out, in): ``c_attn.weight (3E, E)`` =
  ``[Wq; Wk; Wv]`` along the first axis, ``c_proj.weight (E, E)``, and ``c_attn.bias``/``c_proj.bias``
  when ``bias=True``.

The GPT layouts pack q, k and v at full width, so they exist only for ``num_kv_heads == num_heads``.
"""

from __future__ import annotations

from dataclasses import dataclass

from attn_spec.checks import FLOAT_DTYPES, fmt_shape
from attn_spec.dispatch import AUTO

NAME = "CausalSelfAttention"
IMPLEMENTATIONS = ("math", "fused", "blocked")
LAYOUTS = ("torch_attn", "hf_gpt2", "nanogpt")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Causal-mask buffers that real GPT checkpoints carry beside the weights (HF GPT-2's ``attn.bias`` of
# shape (1, 1, P, P) and ``attn.masked_bias``; nanoGPT's ``attn.bias`` without flash). They hold no learned
# value, so loading a GPT layout skips them, as nanoGPT's ``from_pretrained`` does.
IGNORED_BUFFERS = ("bias", "masked_bias")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class CausalConfig:
    """A validated configuration.

    Attributes:
      E, N, K, H: model width, query heads, key/value heads, head width (``E == N * H``).
      bias: whether the four projections have biases.
      dropout: attention-weight dropout probability (training mode only).
      implementation: None / ``"auto"`` (chosen per call, :mod:`attn_spec.dispatch`; dropout is then
        taken by math in training mode), ``"math"`` (the readable SDPA core), ``"fused"`` (the
        framework's kernel) or
        ``"blocked"`` (the SDPA core's blocked online-softmax path: causal blocks skipped, bounded memory).
    """

    E: int
    N: int
    K: int
    H: int
    bias: bool
    dropout: float
    implementation: str | None

    @property
    def G(self) -> int:
        return self.N // self.K


def check_config(
    embed_dim, num_heads, num_kv_heads, bias, dropout, implementation, name: str = NAME
) -> CausalConfig:
    """Validate constructor arguments; ``num_kv_heads=None`` means ``num_heads`` (plain multi-head)."""
    for arg, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
        if not _is_int(val) or val < 1:
            raise ValueError(f"{name}: {arg} must be a positive int; got {arg}={val!r}")
    K = num_heads if num_kv_heads is None else num_kv_heads
    if not _is_int(K) or K < 1:
        raise ValueError(f"{name}: num_kv_heads must be a positive int or None; got num_kv_heads={K!r}")
    if embed_dim % num_heads != 0:
        raise ValueError(
            f"{name}: embed_dim must be divisible by num_heads; got embed_dim={embed_dim}, "
            f"num_heads={num_heads}"
        )
    if num_heads % K != 0:
        raise ValueError(
            f"{name}: num_kv_heads must divide num_heads (grouped-query attention); got "
            f"num_heads={num_heads}, num_kv_heads={K}"
        )
    if not isinstance(bias, bool):
        raise ValueError(f"{name}: bias must be a bool; got bias={bias!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be a number in [0, 1); got dropout={dropout!r}")
    if implementation not in IMPLEMENTATIONS and implementation not in AUTO:
        raise ValueError(
            f"{name}: implementation must be None ('auto', see attn_spec.dispatch) or one of "
            f"{IMPLEMENTATIONS}; got implementation={implementation!r}"
        )
    if implementation not in AUTO and implementation != "math" and dropout > 0.0:
        # jax.nn.dot_product_attention has no dropout, and torch's fused kernel draws its own mask that
        # cannot be injected: dropout lives on the math path only, in both twins.
        raise ValueError(
            f"{name}: implementation={implementation!r} does not support attention dropout "
            f"(got dropout={dropout}); "
            "use implementation='math'"
        )
    return CausalConfig(embed_dim, num_heads, K, embed_dim // num_heads, bias, float(dropout), implementation)


def check_input(x: tuple[tuple[int, ...], str], config: CausalConfig, name: str = NAME) -> tuple[int, int]:
    """Validate ``x (B, T, E)``; returns ``(B, T)``."""
    shape, dtype = tuple(x[0]), x[1]
    if len(shape) != 3:
        raise ValueError(f"{name}: x must be (B, T, E) with batch first; got x.shape={fmt_shape(shape)}")
    if shape[2] != config.E:
        raise ValueError(
            f"{name}: x's last axis must be embed_dim={config.E}; got x.shape={fmt_shape(shape)}"
        )
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name}: x has an empty batch or length axis; got x.shape={fmt_shape(shape)}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: x must be floating ({', '.join(FLOAT_DTYPES)}); got x.dtype={dtype}")
    return shape[0], shape[1]


def check_init_cache(batch_size, max_length, name: str = NAME) -> None:
    for arg, val in (("batch_size", batch_size), ("max_length", max_length)):
        if not _is_int(val) or val < 1:
            raise ValueError(f"{name}.init_cache: {arg} must be a positive int; got {arg}={val!r}")


def check_cache(
    k: tuple[int, ...],
    v: tuple[int, ...],
    index: int | None,
    B: int,
    T: int,
    config: CausalConfig,
    name: str = NAME,
) -> int:
    """Validate a KV cache ``k, v (B, K, L, H)`` against a chunk of ``T`` tokens for batch ``B``.

    ``index`` is the number of cached tokens, or None when it is not known on the host (a traced JAX
    index); overflow (``index + T > L``) raises only when it is known. Returns ``L``.
    """
    k, v = tuple(k), tuple(v)
    want = f"(B, K, L, H) = ({B}, {config.K}, L, {config.H})"
    if len(k) != 4 or k != v or k[1] != config.K or k[3] != config.H:
        raise ValueError(
            f"{name}: cache.k and cache.v must both be {want}; got cache.k.shape={fmt_shape(k)}, "
            f"cache.v.shape={fmt_shape(v)}"
        )
    if k[0] != B:
        raise ValueError(
            f"{name}: cache batch size {k[0]} does not match x's batch size {B}; got "
            f"cache.k.shape={fmt_shape(k)}"
        )
    L = k[2]
    if index is not None and (index < 0 or index + T > L):
        raise ValueError(
            f"{name}: KV cache overflow: {index} cached + {T} new tokens > max_length={L}; "
            "allocate a longer cache with init_cache(batch_size, max_length)"
        )
    return L


def check_dropout_mask(given: bool, training: bool, config: CausalConfig, name: str = NAME) -> None:
    """A ``dropout_mask`` only means something where dropout is applied: the math path in training mode."""
    if given and not (training and config.dropout > 0.0):
        raise ValueError(
            f"{name}: dropout_mask was given, but attention dropout is off (dropout={config.dropout}, "
            f"training={training}); it applies only with dropout > 0 in training mode"
        )


def check_layout(layout, config: CausalConfig, name: str = NAME) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: layout must be one of {LAYOUTS}; got layout={layout!r}")
    if layout != "torch_attn" and config.K != config.N:
        raise ValueError(
            f"{name}: layout={layout!r} packs q, k and v at full width and needs num_kv_heads == num_heads; "
            f"got num_heads={config.N}, num_kv_heads={config.K} (use layout='torch_attn')"
        )
    if layout == "hf_gpt2" and not config.bias:
        raise ValueError(f"{name}: layout='hf_gpt2' always has biases; this module has bias=False")
    return layout


def state_dict_shapes(layout: str, config: CausalConfig) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a state dict in ``layout``, in the order that library writes it."""
    E, N, K, H = config.E, config.N, config.K, config.H
    if layout == "torch_attn":
        outs = {"q_proj": (N * H, E), "k_proj": (K * H, E), "v_proj": (K * H, E), "out_proj": (E, N * H)}
        shapes = {}
        for proj, shape in outs.items():
            shapes[f"{proj}.weight"] = shape
            if config.bias:
                shapes[f"{proj}.bias"] = (shape[0],)
        return shapes
    c_attn, c_proj = ((E, 3 * E), (E, E)) if layout == "hf_gpt2" else ((3 * E, E), (E, E))
    shapes = {"c_attn.weight": c_attn}
    if config.bias:
        shapes["c_attn.bias"] = (3 * E,)
    shapes["c_proj.weight"] = c_proj
    if config.bias:
        shapes["c_proj.bias"] = (E,)
    return shapes


def check_state_dict(
    shapes: dict[str, tuple[int, ...]], layout, config: CausalConfig, name: str = NAME
) -> list[str]:
    """Validate a state dict given as ``{key: shape}``: exactly the layout's keys (plus, for the GPT
    layouts, the ignorable causal-mask buffers), each with its shape. Returns the keys to load."""
    check_layout(layout, config, name)
    want = state_dict_shapes(layout, config)
    ignorable = IGNORED_BUFFERS if layout != "torch_attn" else ()
    missing = [k for k in want if k not in shapes]
    unexpected = [k for k in shapes if k not in want and k not in ignorable]
    if missing or unexpected:
        raise ValueError(
            f"{name}: state dict does not match layout={layout!r}: missing keys {missing}, unexpected keys "
            f"{unexpected}; expected {list(want)}"
        )
    for key, shape in want.items():
        if tuple(shapes[key]) != shape:
            raise ValueError(
                f"{name}: state dict key {key!r} has shape {fmt_shape(shapes[key])}; layout={layout!r} "
                f"needs {fmt_shape(shape)} (embed_dim={config.E}, num_heads={config.N}, "
                f"num_kv_heads={config.K})"
            )
    return list(want)
