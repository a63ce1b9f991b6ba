"""Modern decoder attention: one frozen configuration and its checks, written once for both twins
(``jax_attn.attention`` / ``torch_attn.attention``).

Dimension key (see ``attn_spec``): B batch, T tokens in this call, S keys attended, E model width
(``hidden_size``), N query heads, K key/value heads, G = N // K, H head width (``head_dim``, may differ from
E // N), R rotary width, C cache slots (``max_length``, or the window for a sliding-window layer).

One :class:`AttentionConfig` describes the attention layer of each decoder family (transformers' names in
brackets):

=============  ===============================================================================================
Llama 3.x      ``rope=RopeConfig(rope_type="llama3", rope_theta=5e5, ...)``, ``num_kv_heads < num_heads``
Mistral        ``sliding_window=4096``
Qwen2/2.5      ``q_bias=k_bias=v_bias=True`` (o without)
Qwen3          ``qk_norm="head"`` (``q_norm``/``k_norm`` of size H) and ``qk_norm_eps`` [rms_norm_eps]
Gemma 2        ``softcap=50.0`` [attn_logit_softcapping], ``query_pre_attn_scalar``, ``head_dim``,
               ``sliding_window`` on local layers
Gemma 3        local/global layers: two configs (``rope_theta`` 1e4 with a window, 1e6 without);
               ``qk_norm="head"`` with ``qk_norm_offset=1.0`` (Gemma's RMSNorm scales by ``1 + weight``)
Phi-3          ``rope=RopeConfig(rope_type="longrope", ...)``, ``partial_rotary_factor``
OLMo 2         ``qk_norm="full"`` (``q_norm`` of size N·H, ``k_norm`` of size K·H, before the head split)
GPT-NeoX       ``partial_rotary_factor=0.25`` [rotary_pct], all four biases
gpt-oss        ``rope_type="yarn"``, ``sinks=True``, ``sliding_window`` on alternate layers, biases
Cohere         ``qk_norm="head"``, ``qk_norm_kind="layer"``, ``qk_norm_per_head=True`` [use_qk_norm,
               layer_norm_eps] (CohereLayerNorm: a weight per head and channel, no bias); interleaved rope
StableLM       the same norm [qk_layernorm] (StableLmLayerNormPerHead: one LayerNorm without bias per head)
Phi/Persimmon  ``qk_norm="head"``, ``qk_norm_kind="layer"``, ``qk_norm_bias=True`` [qk_layernorm] (one
               LayerNorm over each head's H channels, shared by the heads, with a bias)
=============  ===============================================================================================

Conventions (both twins, the oracle and the vectors):

- **sliding window** ``w``: a query sees itself and the ``w - 1`` keys before it (transformers' count;
  FlashAttention's ``window_size=(w - 1, 0)``); bidirectional layers see ``|q - k| < w``.
- **soft-cap** ``c``: logits become ``c · tanh(logits / c)`` after scaling and before the mask.
- **sinks**: one learned logit per query head joins each row's softmax denominator and carries no value
  (the row's weights sum to less than one).
- **fully masked rows** (a left-pad query sees no valid key) give zeros, never NaN.
- masking follows the *sequence index* of each token (its slot in the padded batch, like transformers'
  ``cache_position``); ``position_ids`` only feed the rotary embedding.
- ``attention_mask (B, T)``: the 1/0 padding mask of this call's tokens (1 = a real token); with a cache,
  earlier tokens' validity is remembered in the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from attn_spec.checks import FLOAT_DTYPES, INT_DTYPES, fmt_shape
from attn_spec.dispatch import Choice, select
from attn_spec.rope import RopeConfig, check_head_dim

NAME = "Attention"
IMPLEMENTATIONS = ("math", "fused", "blocked")
QK_NORMS = ("none", "head", "full", "unit")
QK_NORM_KINDS = ("rms", "layer")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
BLOCKED_AVAILABLE = True  # the FlexAttention engine of ``jax_attn.flex`` / ``torch_attn.flex``


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class AttentionConfig:
    """One decoder attention layer (validated on construction: bad values raise ``ValueError``).

    Attributes:
      hidden_size: E, the model width (input and output).
      num_heads: N, query heads.
      num_kv_heads: K, key/value heads dividing N (None: K = N; 1: multi-query).
      head_dim: H (None: E // N, which must then divide).
      q_bias, k_bias, v_bias, o_bias: a bias on each projection.
      rope: rotary settings (:class:`attn_spec.rope.RopeConfig`) or None for no positions.
      qk_norm: ``"none"``, ``"head"`` (RMSNorm over each head's H channels, weight (H,); before RoPE),
        ``"full"`` (RMSNorm over the projected N·H / K·H width, before the head split) or ``"unit"``
        (RMSNorm over each head without a weight: Llama 4's L2 norm; it commutes with the rotation, so its
        place before or after RoPE gives the same result). ``qk_norm_kind="layer"`` makes the weighted
        kinds LayerNorms.
      qk_norm_eps: the norm's epsilon.
      qk_norm_offset: the norm scales by ``offset + weight`` (0: Llama-style ``weight``; 1: Gemma's
        ``1 + weight``, whose weights start at zero).
      scale: the logit scale (None: ``query_pre_attn_scalar ** -0.5`` if given, else ``head_dim ** -0.5``).
      query_pre_attn_scalar: Gemma 2/3's scale denominator; exclusive with ``scale``.
      softcap: logit soft-cap c > 0, or None.
      sliding_window: w >= 1 (a query sees itself and w - 1 keys before it), or None.
      sinks: one learned sink logit per query head (``sinks (N,)``).
      causal: causal (decoder) or bidirectional.
      dropout: attention-weight dropout probability, training mode only.
      clip_qkv: q, k and v clamped to ``[-clip_qkv, clip_qkv]`` right after their projections (OLMo, DBRX),
        or None.
      output_gate: the sigmoid-gated output of Qwen3-Next / Qwen3.5 full-attention layers: ``q_proj`` gives
        ``2·N·H`` features, per head ``H`` query channels then ``H`` gate channels; the merged attention
        output is multiplied by ``sigmoid(gate)`` before ``o_proj``.
      chunk_size: chunked attention (Llama 4's ``attention_chunk_size``): a query sees only the causal keys
        of its own chunk of ``chunk_size`` tokens, chunks counted from each row's first real token (after
        its left padding), or None.
      attn_temperature: ``(floor_scale, attn_scale)``: Llama 4's attention-temperature tuning (on its NoPE
        layers): queries multiplied by ``1 + attn_scale · log1p(floor((i + 1) / floor_scale))`` for the
        token's sequence index ``i``, in float32; or None.
      alibi_slopes: ALiBi (Bloom, MPT, Falcon): one slope per query head, and ``slope_n · (s - t)`` added to
        the scaled logits of query index t and key index s (a per-row constant away from the families' own
        biases, which softmax cannot see); or None.
      v_norm: an RMSNorm without a weight over each head of the values (Gemma 4; ``qk_norm_eps``).
      k_eq_v: no ``v_proj``: the values are the key projection's output before the key norm and rotary
        (Gemma 4's full layers with ``attention_k_eq_v``).
      qk_norm_after_rope: the per-head qk-norm (``qk_norm="head"``) applies to the rotated q and k (Hunyuan)
        instead of before the rotation.
      qk_norm_kind: the weighted qk-norm (``qk_norm="head"``/``"full"``) is an RMSNorm (``"rms"``) or a
        LayerNorm (``"layer"``: the mean subtracted first, then divided by ``sqrt(variance + qk_norm_eps)``;
        Cohere, StableLM, Phi, Persimmon). Both compute in float32 and round once to the input's dtype.
      qk_norm_per_head: ``qk_norm="head"`` with a weight (and bias) per head and channel, ``q_norm.weight
        (N, H)`` and ``k_norm.weight (K, H)`` (Cohere, StableLM), instead of one ``(H,)`` shared by the heads.
      qk_norm_bias: the LayerNorm adds a bias ``q_norm.bias``/``k_norm.bias`` shaped like its weight (Phi,
        Persimmon); ``qk_norm_kind="layer"`` only.
      kv_shared: a key/value-sharing consumer (Gemma 4's last ``num_kv_shared_layers`` layers): no ``k_proj``,
        ``v_proj`` nor ``k_norm``; its keys and values (already normed, rotated and cache-updated) are those a
        producer layer attended over in the same call (``attn(x, ..., return_kv=True)`` returns them as a
        ``SharedKV``; the consumer is called with ``shared_kv=``). It keeps its own q_proj, q_norm, o_proj,
        mask (causal, window, chunk) and scale, and takes no cache of its own.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False
    rope: RopeConfig | None = RopeConfig()
    qk_norm: str = "none"
    qk_norm_eps: float = 1e-6
    qk_norm_offset: float = 0.0
    scale: float | None = None
    query_pre_attn_scalar: float | None = None
    softcap: float | None = None
    sliding_window: int | None = None
    sinks: bool = False
    causal: bool = True
    dropout: float = 0.0
    clip_qkv: float | None = None
    output_gate: bool = False
    chunk_size: int | None = None
    attn_temperature: tuple[float, float] | None = None
    alibi_slopes: tuple[float, ...] | None = None
    v_norm: bool = False
    k_eq_v: bool = False
    qk_norm_after_rope: bool = False
    qk_norm_kind: str = "rms"
    qk_norm_per_head: bool = False
    qk_norm_bias: bool = False
    kv_shared: bool = False

    def __post_init__(self):
        for name in ("attn_temperature", "alibi_slopes"):  # lists (JSON) become hashable tuples
            val = getattr(self, name)
            if isinstance(val, list):
                object.__setattr__(self, name, tuple(val))
        check_config(self)

    @property
    def E(self) -> int:
        return self.hidden_size

    @property
    def N(self) -> int:
        return self.num_heads

    @property
    def K(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def G(self) -> int:
        return self.N // self.K

    @property
    def H(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def R(self) -> int:
        """Rotary width (0 without rope)."""
        return 0 if self.rope is None else self.rope.rotary_dim(self.H)

    @property
    def logit_scale(self) -> float:
        if self.scale is not None:
            return float(self.scale)
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return self.H**-0.5


def check_config(c: AttentionConfig, name: str = NAME) -> None:
    for arg in ("hidden_size", "num_heads"):
        val = getattr(c, arg)
        if not _is_int(val) or val < 1:
            raise ValueError(f"{name}: {arg} must be a positive int; got {arg}={val!r}")
    if c.num_kv_heads is not None and (not _is_int(c.num_kv_heads) or c.num_kv_heads < 1):
        raise ValueError(
            f"{name}: num_kv_heads must be a positive int or None; got num_kv_heads={c.num_kv_heads!r}"
        )
    if c.num_heads % c.K:
        raise ValueError(
            f"{name}: num_kv_heads must divide num_heads (grouped-query attention); got "
            f"num_heads={c.num_heads}, num_kv_heads={c.K}"
        )
    if c.head_dim is None:
        if c.hidden_size % c.num_heads:
            raise ValueError(
                f"{name}: hidden_size must be divisible by num_heads when head_dim is None; got hidden_size="
                f"{c.hidden_size}, num_heads={c.num_heads} (or give head_dim)"
            )
    elif not _is_int(c.head_dim) or c.head_dim < 1:
        raise ValueError(f"{name}: head_dim must be a positive int or None; got head_dim={c.head_dim!r}")
    for arg in (
        "q_bias",
        "k_bias",
        "v_bias",
        "o_bias",
        "sinks",
        "causal",
        "output_gate",
        "v_norm",
        "k_eq_v",
        "kv_shared",
    ):
        if not isinstance(getattr(c, arg), bool):
            raise ValueError(f"{name}: {arg} must be a bool; got {arg}={getattr(c, arg)!r}")
    if c.rope is not None:
        if not isinstance(c.rope, RopeConfig):
            raise ValueError(f"{name}: rope must be a RopeConfig or None; got rope={c.rope!r}")
        check_head_dim(c.rope, c.H, name)
    if c.qk_norm not in QK_NORMS:
        raise ValueError(f"{name}: qk_norm must be one of {QK_NORMS}; got qk_norm={c.qk_norm!r}")
    if not _is_number(c.qk_norm_eps) or c.qk_norm_eps <= 0:
        raise ValueError(f"{name}: qk_norm_eps must be a number > 0; got qk_norm_eps={c.qk_norm_eps!r}")
    if not _is_number(c.qk_norm_offset):
        raise ValueError(f"{name}: qk_norm_offset must be a number; got qk_norm_offset={c.qk_norm_offset!r}")
    if c.scale is not None and c.query_pre_attn_scalar is not None:
        raise ValueError(
            f"{name}: give scale or query_pre_attn_scalar, not both; got scale={c.scale}, "
            f"query_pre_attn_scalar={c.query_pre_attn_scalar}"
        )
    for arg in ("scale", "query_pre_attn_scalar"):
        val = getattr(c, arg)
        if val is not None and (not _is_number(val) or val <= 0):
            raise ValueError(f"{name}: {arg} must be a number > 0 or None; got {arg}={val!r}")
    if c.softcap is not None and (not _is_number(c.softcap) or c.softcap <= 0):
        raise ValueError(f"{name}: softcap must be a number > 0 or None; got softcap={c.softcap!r}")
    if c.sliding_window is not None and (not _is_int(c.sliding_window) or c.sliding_window < 1):
        raise ValueError(
            f"{name}: sliding_window must be an int >= 1 or None (a query sees itself and window - 1 earlier "
            f"keys); got sliding_window={c.sliding_window!r}"
        )
    d = c.dropout
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
        raise ValueError(f"{name}: dropout must be a number in [0, 1); got dropout={d!r}")
    if c.clip_qkv is not None and (not _is_number(c.clip_qkv) or c.clip_qkv <= 0):
        raise ValueError(f"{name}: clip_qkv must be a number > 0 or None; got clip_qkv={c.clip_qkv!r}")
    if c.chunk_size is not None:
        if not _is_int(c.chunk_size) or c.chunk_size < 1:
            raise ValueError(
                f"{name}: chunk_size must be an int >= 1 or None; got chunk_size={c.chunk_size!r}"
            )
        if c.sliding_window is not None or not c.causal:
            raise ValueError(
                f"{name}: chunk_size needs a causal layer without sliding_window; got "
                f"chunk_size={c.chunk_size}, sliding_window={c.sliding_window}, causal={c.causal}"
            )
    t = c.attn_temperature
    if t is not None and (
        not isinstance(t, tuple) or len(t) != 2 or not all(_is_number(v) for v in t) or t[0] <= 0
    ):
        raise ValueError(
            f"{name}: attn_temperature must be (floor_scale > 0, attn_scale) or None; got "
            f"attn_temperature={t!r}"
        )
    if not isinstance(c.qk_norm_after_rope, bool) or (c.qk_norm_after_rope and c.qk_norm != "head"):
        raise ValueError(
            f"{name}: qk_norm_after_rope must be a bool, True only with qk_norm='head'; got "
            f"qk_norm_after_rope={c.qk_norm_after_rope!r}, qk_norm={c.qk_norm!r}"
        )
    if c.k_eq_v and c.v_bias:
        raise ValueError(f"{name}: k_eq_v (values = the key projection) takes no v_bias; got v_bias=True")
    a = c.alibi_slopes
    if a is not None and (not isinstance(a, tuple) or len(a) != c.N or not all(_is_number(v) for v in a)):
        raise ValueError(
            f"{name}: alibi_slopes must be one number per query head (num_heads={c.N}) or None; got "
            f"alibi_slopes={a!r}"
        )
    if c.qk_norm_kind not in QK_NORM_KINDS:
        raise ValueError(
            f"{name}: qk_norm_kind must be one of {QK_NORM_KINDS}; got qk_norm_kind={c.qk_norm_kind!r}"
        )
    for arg in ("qk_norm_per_head", "qk_norm_bias"):
        if not isinstance(getattr(c, arg), bool):
            raise ValueError(f"{name}: {arg} must be a bool; got {arg}={getattr(c, arg)!r}")
    if c.qk_norm_kind == "layer" and c.qk_norm not in ("head", "full"):
        raise ValueError(
            f"{name}: qk_norm_kind='layer' (a LayerNorm with a weight) needs qk_norm='head' or 'full'; got "
            f"qk_norm={c.qk_norm!r}"
        )
    if c.qk_norm_per_head and c.qk_norm != "head":
        raise ValueError(
            f"{name}: qk_norm_per_head=True (a weight per head and channel) needs qk_norm='head'; got "
            f"qk_norm={c.qk_norm!r}"
        )
    if c.qk_norm_bias and c.qk_norm_kind != "layer":
        raise ValueError(
            f"{name}: qk_norm_bias=True needs qk_norm_kind='layer' (an RMSNorm has no bias); got "
            f"qk_norm_kind={c.qk_norm_kind!r}, qk_norm={c.qk_norm!r}"
        )
    if c.kv_shared:
        bad = [
            f"{knob}={getattr(c, knob)!r}"
            for knob in ("k_bias", "v_bias", "k_eq_v", "v_norm", "clip_qkv")
            if getattr(c, knob) not in (False, None)
        ]
        if bad:
            raise ValueError(
                f"{name}: kv_shared=True (keys and values taken from a producer layer: no k_proj, v_proj nor "
                f"k_norm) makes the key/value knobs meaningless; got {', '.join(bad)}"
            )


def check_implementation(implementation, config: AttentionConfig, name: str = NAME) -> str | None:
    """Validate the constructor's ``implementation`` (None or ``"auto"``: :func:`choose`)."""
    if implementation == "auto":
        implementation = None
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{name}: implementation must be None (auto) or one of {IMPLEMENTATIONS}; got "
            f"implementation={implementation!r}"
        )
    if implementation == "fused":
        unsupported = [
            knob
            for knob, on in (
                ("softcap", config.softcap is not None),
                ("sinks", config.sinks),
                ("dropout", config.dropout > 0),
                ("alibi_slopes", config.alibi_slopes is not None),
            )
            if on
        ]
        if unsupported:
            raise ValueError(
                f"{name}: implementation='fused' (torch F.scaled_dot_product_attention / "
                f"jax.nn.dot_product_attention) does not support {unsupported}; use implementation='math'"
            )
    if implementation == "blocked":
        check_blocked(config, name)
    return implementation


def check_blocked(config: AttentionConfig, name: str = NAME) -> None:
    if not BLOCKED_AVAILABLE:
        raise ValueError(
            f"{name}: implementation='blocked' is not available yet (it needs the FlexAttention engine, "
            "not merged); use implementation='math' or 'fused'"
        )
    if config.dropout > 0:
        raise ValueError(
            f"{name}: implementation='blocked' does not support dropout; use implementation='math'"
        )


#: The largest dense ``(B, T, S)`` boolean mask (bytes) a twin builds to call its fused kernel automatically
#: (padding, a cache, windows, chunks); above it the automatic choice takes the blocked path, whose memory is
#: bounded by a block (plain causal calls need no mask array and stay fused).
FUSED_MASK_MAX = 2**27


def fused_allowed(config: AttentionConfig) -> bool:
    """Whether the layer's math fits a fused kernel (``F.scaled_dot_product_attention``,
    ``jax.nn.dot_product_attention``): a boolean mask and a plain softmax, so no soft-cap, sinks or ALiBi."""
    return config.softcap is None and not config.sinks and config.alibi_slopes is None


def choose(config: AttentionConfig, *, B: int, T: int, S: int, dropout: bool, fused: str | None) -> Choice:
    """The automatic path of a call (``implementation=None``): :func:`attn_spec.dispatch.select`, the one
    rule of every layer, on this call's facts: ``B·N·T·S`` logits, no weights returned, ``dropout`` active,
    no float mask (ALiBi is a ``score_mod`` on the blocked path), and ``fused``, the twin's fused kernel when
    it is the fast path here and the layer's math allows it (:func:`fused_allowed`)."""
    return select(
        logits=B * config.N * T * S,
        need_weights=False,
        dropout=dropout,
        float_mask=False,
        fused=fused if fused_allowed(config) else None,
    )


def check_input(x: tuple[tuple[int, ...], str], config: AttentionConfig, name: str = NAME) -> tuple[int, int]:
    """Validate ``x (B, T, E)``; returns ``(B, T)``."""
    shape, dtype = tuple(x[0]), x[1]
    if len(shape) != 3:
        raise ValueError(f"{name}: x must be (B, T, E) with batch first; got x.shape={fmt_shape(shape)}")
    if shape[2] != config.E:
        raise ValueError(
            f"{name}: x's last axis must be hidden_size={config.E}; got x.shape={fmt_shape(shape)}"
        )
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name}: x has an empty batch or length axis; got x.shape={fmt_shape(shape)}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: x must be floating ({', '.join(FLOAT_DTYPES)}); got x.dtype={dtype}")
    return shape[0], shape[1]


def check_attention_mask(shape: tuple[int, ...], dtype: str, B: int, T: int, name: str = NAME) -> None:
    """The ``(B, T)`` 1/0 padding mask of this call's tokens (bool or integer; 1/True = a real token)."""
    if tuple(shape) != (B, T):
        raise ValueError(
            f"{name}: attention_mask must be the (B, T) = ({B}, {T}) padding mask of this call's tokens "
            f"(1 = token, 0 = padding); got attention_mask.shape={fmt_shape(shape)}"
        )
    if dtype != "bool" and dtype not in INT_DTYPES:
        raise ValueError(
            f"{name}: attention_mask must be bool or integer 1/0; got attention_mask.dtype={dtype}"
        )


def check_position_ids(
    shape: tuple[int, ...],
    dtype: str,
    B: int,
    T: int,
    name: str = NAME,
    config: AttentionConfig | None = None,
) -> None:
    """``(B, T)``, or ``(3, B, T)`` for a multimodal RoPE (``rope.mrope_section``), integers."""
    mrope = config is not None and config.rope is not None and config.rope.mrope_section is not None
    if tuple(shape) != (B, T) and not (mrope and tuple(shape) == (3, B, T)):
        want = f"(B, T) = ({B}, {T})" + (f" or (3, B, T) = (3, {B}, {T})" if mrope else "")
        raise ValueError(f"{name}: position_ids must be {want}; got position_ids.shape={fmt_shape(shape)}")
    if dtype not in INT_DTYPES:
        raise ValueError(f"{name}: position_ids must be integers; got position_ids.dtype={dtype}")


def temperature_scales(config: AttentionConfig, index_T):
    """Llama 4's query scales for the sequence indices ``index_T`` (NumPy, float64 for the oracle): see
    ``AttentionConfig.attn_temperature``."""
    floor_scale, attn_scale = config.attn_temperature
    return np.log1p(np.floor((np.asarray(index_T, np.float64) + 1.0) / floor_scale)) * attn_scale + 1.0


def left_pads(valid_BT):
    """int ``(B,)``: each row's leading padding tokens (before its first real one) — where its chunks start
    (transformers' ``left_padding_tokens`` of ``create_chunked_causal_mask``). NumPy."""
    return (np.cumsum(np.asarray(valid_BT).astype(np.int64), axis=1) == 0).sum(axis=1)


def check_dropout_mask(given: bool, training: bool, config: AttentionConfig, name: str = NAME) -> None:
    if given and not (training and config.dropout > 0.0):
        raise ValueError(
            f"{name}: dropout_mask was given, but attention dropout is off (dropout={config.dropout}, "
            f"training={training}); it applies only with dropout > 0 in training mode"
        )


def cache_slots(config: AttentionConfig, max_length: int) -> int:
    """C, the cache's slots: ``max_length``, or for a sliding-window (chunked) layer at most ``window``
    (``chunk_size``), a ring: no query sees further back than that."""
    w = config.sliding_window if config.chunk_size is None else config.chunk_size
    return max_length if w is None else min(w, max_length)


def check_init_cache(batch_size, max_length, config: AttentionConfig, name: str = NAME) -> None:
    for arg, val in (("batch_size", batch_size), ("max_length", max_length)):
        if not _is_int(val) or val < 1:
            raise ValueError(f"{name}.init_cache: {arg} must be a positive int; got {arg}={val!r}")
    if not config.causal:
        raise ValueError(f"{name}.init_cache: a KV cache needs a causal layer; this one has causal=False")
    if config.kv_shared:
        raise ValueError(
            f"{name}.init_cache: a kv_shared layer keeps no cache (it reads its producer's keys and values, "
            "shared_kv=); give the producer the cache"
        )


def check_cache(
    k: tuple[int, ...],
    v: tuple[int, ...],
    index: int | None,
    max_length: int,
    B: int,
    T: int,
    config: AttentionConfig,
    name: str = NAME,
) -> None:
    """Validate a cache ``k, v (B, K, C, H)`` against a chunk of ``T`` tokens for batch ``B``; ``index``
    None when it is traced (JAX under jit), when overflow cannot raise."""
    k, v = tuple(k), tuple(v)
    C = cache_slots(config, max_length)
    want = f"(B, K, C, H) = ({B}, {config.K}, {C}, {config.H})"
    if k != v or k != (B, config.K, C, config.H):
        raise ValueError(
            f"{name}: cache.k and cache.v must both be {want}; got cache.k.shape={fmt_shape(k)}, "
            f"cache.v.shape={fmt_shape(v)}"
        )
    if index is not None and (index < 0 or index + T > max_length):
        raise ValueError(
            f"{name}: KV cache overflow: {index} cached + {T} new tokens > max_length={max_length}; "
            "allocate a longer cache with init_cache(batch_size, max_length)"
        )


def check_shared_kv(
    k: tuple[int, ...],
    v: tuple[int, ...],
    pos: tuple[int, ...],
    valid: tuple[int, ...],
    q_pos: tuple[int, ...],
    lead: tuple[int, ...],
    B: int,
    T: int,
    config: AttentionConfig,
    name: str = NAME,
) -> int:
    """Validate the producer's keys/values (``SharedKV``) against a consumer's call of ``B`` rows and ``T``
    tokens; returns S. ``k, v (B, K, S, H)``, ``pos (S,)``, ``valid (B, S)``, ``q_pos (T,)``,
    ``lead (B,)``."""
    k, v, pos, valid, q_pos, lead = (tuple(a) for a in (k, v, pos, valid, q_pos, lead))
    S = k[2] if len(k) == 4 else -1
    want = {
        "k": (B, config.K, S, config.H),
        "v": (B, config.K, S, config.H),
        "pos": (S,),
        "valid": (B, S),
        "q_pos": (T,),
        "lead": (B,),
    }
    got = {"k": k, "v": v, "pos": pos, "valid": valid, "q_pos": q_pos, "lead": lead}
    if S < 1 or any(got[n] != want[n] for n in want):
        raise ValueError(
            f"{name}: shared_kv does not fit this call (B={B}, T={T}, K={config.K}, H={config.H}): needs "
            + ", ".join(f"{n} {fmt_shape(w)}" for n, w in want.items())
            + "; got "
            + ", ".join(f"{n} {fmt_shape(g)}" for n, g in got.items())
            + " (the producer's return_kv of the same call: same batch and tokens, the consumer's kv heads "
            "and head width)"
        )
    return S


def check_kv_call(shared_given: bool, cache_given: bool, return_kv: bool, config, name: str = NAME) -> None:
    """A consumer (``kv_shared``) needs ``shared_kv`` and takes no cache; a producer takes no
    ``shared_kv``."""
    if config.kv_shared:
        if cache_given:
            raise ValueError(
                f"{name}: a kv_shared layer has no cache of its own (its keys and values are the producer's, "
                "cache included); call it with shared_kv= only, cache=None"
            )
        if not shared_given:
            raise ValueError(
                f"{name}: a kv_shared layer needs shared_kv= (the SharedKV that its producer layer returned "
                "with return_kv=True in the same call)"
            )
        if return_kv:
            raise ValueError(f"{name}: return_kv=True is for producer layers; this one has kv_shared=True")
    elif shared_given:
        raise ValueError(
            f"{name}: shared_kv= is for kv_shared layers; this one computes its own keys and values "
            "(kv_shared=False)"
        )


def qk_norm_shapes(config: AttentionConfig) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The shapes of ``q_norm.weight`` and ``k_norm.weight`` (and of their biases): ``(H,)`` each for
    ``qk_norm="head"``, ``(N, H)`` / ``(K, H)`` with ``qk_norm_per_head``, ``(N·H,)`` / ``(K·H,)`` for
    ``"full"``; None without weighted qk-norm."""
    c = config
    if c.qk_norm == "head":
        return ((c.N, c.H), (c.K, c.H)) if c.qk_norm_per_head else ((c.H,), (c.H,))
    if c.qk_norm == "full":
        return (c.N * c.H,), (c.K * c.H,)
    return None


def state_dict_shapes(config: AttentionConfig) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the state dict, torch ``nn.Linear`` layout (out, in), transformers' names."""
    c = config
    E, N, K, H = c.E, c.N, c.K, c.H
    shapes: dict[str, tuple[int, ...]] = {}
    for proj, out, inp, bias in (
        ("q_proj", N * H * (2 if c.output_gate else 1), E, c.q_bias),
        *((("k_proj", K * H, E, c.k_bias),) if not c.kv_shared else ()),
        *((("v_proj", K * H, E, c.v_bias),) if not (c.k_eq_v or c.kv_shared) else ()),
        ("o_proj", E, N * H, c.o_bias),
    ):
        shapes[f"{proj}.weight"] = (out, inp)
        if bias:
            shapes[f"{proj}.bias"] = (out,)
    norm_shapes = qk_norm_shapes(c)
    if norm_shapes is not None:
        for which, shape in zip(("q_norm", "k_norm")[: 1 if c.kv_shared else 2], norm_shapes):
            shapes[f"{which}.weight"] = shape
            if c.qk_norm_bias:
                shapes[f"{which}.bias"] = shape
    if c.sinks:
        shapes["sinks"] = (N,)
    return shapes


def check_state_dict(
    shapes: dict[str, tuple[int, ...]], config: AttentionConfig, name: str = NAME
) -> list[str]:
    want = state_dict_shapes(config)
    missing = [k for k in want if k not in shapes]
    unexpected = [k for k in shapes if k not in want]
    if missing or unexpected:
        raise ValueError(
            f"{name}: state dict does not match the config: missing keys {missing}, unexpected keys "
            f"{unexpected}; expected {list(want)}"
        )
    for key, shape in want.items():
        if tuple(shapes[key]) != shape:
            raise ValueError(
                f"{name}: state dict key {key!r} has shape {fmt_shape(shapes[key])}; needs {fmt_shape(shape)}"
            )
    return list(want)
