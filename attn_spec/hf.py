"""Hugging Face attention layers as :class:`attn_spec.attention.AttentionConfig`: the framework-neutral part
of ``jax_attn.hf`` / ``torch_attn.hf`` (config → config by mechanism, weight names and fused layouts both
ways).

Nothing here imports torch or transformers: a config is read duck-typed (a ``transformers`` config object, or
the ``config.json`` dict of a checkpoint), weights are NumPy arrays. Weight conversion only moves data
(slices, transposes, concatenations), so it is bit-exact in any dtype (bf16 may travel as its raw 16-bit
pattern).

**One reader, families as table entries.** :func:`attention_config` reads the knobs of the mechanisms
``AttentionConfig`` expresses (heads, kv heads, head width, biases, qk-norm kind, rotary parameters and
layout, partial rotary, layer types, windows, soft-cap, logit scale, sinks, NoPE layers, ALiBi) through a
family's :class:`Family` entry (:data:`FAMILY_TABLE`), which says *which* knobs the family's modeling code
reads and under which names, where its weights live and what its config leaves implicit. A knob counts only
where the family's modeling code reads it: Llama's rotary embedding never reads ``partial_rotary_factor``, so
a LlamaConfig carrying one ports without partial rotary, as transformers runs it. MoE variants share their
dense sibling's entry (their attention is the same module).

Weight layouts (prefix = the module):

==========  ============================================================================================
separate    ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (renamed: ``dense`` for Phi, ``out_proj`` GPT-J),
            (+ ``q_norm``/``k_norm``, ``q_layernorm``/``k_layernorm`` for Phi, StableLM, Persimmon,
            StableLM's per head as ``norms.{i}``; ``sinks``), transformers' ``nn.Linear`` layout (out, in)
qkv_rows    Phi-3 ``qkv_proj.weight (N·H + 2·K·H, E)``: q, k, v stacked by rows; ``o_proj`` (ModernBERT:
            ``Wqkv`` (+ its bias, the same rows) and ``Wo``; MPT: ``Wqkv``, ``out_proj``)
neox        GPT-NeoX, Bloom ``query_key_value.weight (N·3·H, E)``: per head, q, k, v (``(N, 3, H)`` rows);
            ``dense``
grouped     Falcon ``query_key_value.weight ((N + 2·K)·H, E)``: ``(K, N/K + 2, H)`` rows, each key/value
            group's queries, then its key and its value (classic Falcon: K = N; ``multi_query``: K = 1);
            ``dense``
conv1d      GPT-2 ``c_attn.weight (E, 3E)`` (``Conv1D``: (in, out), columns [q | k | v]); ``c_proj (E, E)``
bert        ``BertAttention`` (BERT, RoBERTa, XLM-R, CamemBERT, Data2VecText, ERNIE, ELECTRA,
            BertGeneration, RoCBert): ``self.query/key/value``, ``output.dense`` (+
            ``output.LayerNorm``, not ported: see :data:`BERT_POST_NORM`); YOLOS:
            ``attention.query/key/value``, ``output.dense`` (no LayerNorm)
==========  ============================================================================================

**A model_type with no entry** ports when its attention *module* fits (:func:`describe_module`; a bare
config of an unknown model_type is refused): its parameters must be exactly ``q_proj``/``k_proj``/
``v_proj``/``o_proj`` (weights, optional biases) and optionally ``q_norm``/``k_norm`` RMSNorms of width H
(per head) or N·H (full), with shapes that match the config's heads, kv heads and head width; the logit
scale is the module's own ``scaling`` and the window its own ``sliding_window``; the rotary layout is
rotate-half over the full head; and the config may set none of :data:`UNKNOWN_FAMILY_KNOBS` (knobs whose
use only the family's code could tell). Anything else raises ``ValueError`` naming the parameter or knob.

Every config knob that changes the attention and that ``AttentionConfig`` cannot express raises
``ValueError`` naming it (:func:`attention_config`). Knobs that do not change the attention layer's math
(``attn_implementation``, ``pretraining_tp``, MLP and embedding settings) are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from attn_spec.attention import AttentionConfig, state_dict_shapes
from attn_spec.rope import RopeConfig

NAME = "from_hf"
BERT_POST_NORM = (
    "BertAttention ends in BertSelfOutput: dropout, the residual add and LayerNorm(y + x) (post-LN), which "
    "Attention does not express; pass post_norm_outside=True to port it up to output.dense and apply "
    "output.LayerNorm(y + x) yourself"
)
# Legacy/alias names of config.json keys (the config objects resolve them through their attribute_map).
_ALIASES = {
    "hidden_size": ("n_embd", "n_embed", "d_model"),
    "num_attention_heads": ("n_head", "n_heads"),
    "num_hidden_layers": ("n_layer", "n_layers"),
    "max_position_embeddings": ("n_positions",),
}
# Where a layer's attention lives in a checkpoint's keys (after an optional model prefix).
LAYER_INFIXES = (
    "layers.{i}.self_attn.",
    "layers.{i}.attention.",
    "h.{i}.attn.",
    "layer.{i}.attention.",
    "layers.{i}.attn.",
    "h.{i}.self_attention.",  # Bloom, Falcon
    "blocks.{i}.attn.",  # MPT
    "blocks.{i}.norm_attn_norm.attn.",  # DBRX
)


def _every_other(cfg, n):
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]


def _all_sliding_if_window(cfg, n):
    return ["sliding_attention" if cfg.get("sliding_window") else "full_attention"] * n


def _cohere2_layer_types(cfg, n):
    p = cfg.get("sliding_window_pattern", 4)
    return ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]


def _exaone4_layer_types(cfg, n):
    p = cfg.get("sliding_window_pattern", 4) if cfg.get("sliding_window") else 0
    p = len(p) if isinstance(p, str) else p  # legacy "LLLG"
    return ["sliding_attention" if p and (i + 1) % p else "full_attention" for i in range(n)]


def _qwen_layer_types(cfg, n):
    w = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    first = cfg.get("max_window_layers", 28)
    return ["sliding_attention" if w is not None and i >= first else "full_attention" for i in range(n)]


def _qwen2_moe_layer_types(cfg, n):
    on, last = cfg.get("use_sliding_window", False), cfg.get("max_window_layers", 28)
    return ["sliding_attention" if (i + 1) % 2 and i < last and on else "full_attention" for i in range(n)]


def _gemma3_layer_types(cfg, n):
    p = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]


def _gemma4_layer_types(cfg, n):
    return ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]


def _gpt_neo_layers(cfg, n):
    """GPT-Neo's ``attention_layers`` ("global"/"local" per layer), or their expansion of ``attention_types``
    (``[[["global", "local"], repeat], ...]``) as its config class does."""
    layers = cfg.get("attention_layers")
    if layers:
        return list(layers)
    out = []
    for kinds, repeat in cfg.get("attention_types") or [[["global", "local"], n // 2]]:
        out += list(kinds) * repeat
    return out


def _dots1_layer_types(cfg, n):
    w, first = cfg.get("sliding_window"), cfg.get("max_window_layers", 62)
    return ["sliding_attention" if w is not None and i >= first else "full_attention" for i in range(n)]


def _cwm_layer_types(cfg, n):
    return ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n)]


def _olmo3_layer_types(cfg, n):
    return ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n)]


def _smollm3_layer_types(cfg, n):
    rope = _nope_list(cfg, n)
    on = cfg.get("use_sliding_window", False) and cfg.get("sliding_window") is not None
    return ["sliding_attention" if on and not rope[i] else "full_attention" for i in range(n)]


def _llama4_layer_types(cfg, n):
    rope, chunk = _nope_list(cfg, n), cfg.get("attention_chunk_size")
    return ["chunked_attention" if r and chunk is not None else "full_attention" for r in rope]


def _hybrid_layer_types(cfg, n):
    """Qwen3-Next / Qwen3.5: every ``full_attention_interval``-th layer is softmax attention, the others
    Gated DeltaNet (``linear_attention``)."""
    k = cfg.get("full_attention_interval", 4)
    return ["linear_attention" if (i + 1) % k else "full_attention" for i in range(n)]


def _modernbert_layer_types(cfg, n):
    """ModernBERT (encoder and decoder): the legacy ``global_attn_every_n_layers`` (default 3), layer 0
    global."""
    k = cfg.get("global_attn_every_n_layers", 3)
    return ["sliding_attention" if i % k else "full_attention" for i in range(n)]


def _modernbert_window(cfg):
    """ModernBERT's ``local_attention`` is the whole symmetric window: the model's mask
    (``create_bidirectional_sliding_window_mask`` with ``config.sliding_window = local_attention // 2``) keeps
    ``|q - k| <= local_attention // 2``, i.e. ``|q - k| < local_attention // 2 + 1`` (the module's own
    ``sliding_window``, what flash attention gets)."""
    la = cfg.get("local_attention")
    return la // 2 + 1 if la else None


def _modernbert_decoder_window(cfg):
    """ModernBERT-decoder: its config sets ``sliding_window = local_attention // 2`` (-1 without
    ``local_attention``) and the causal mask keeps ``q - sliding_window < k <= q``, our convention as is."""
    w = cfg.get("sliding_window")
    if w is None:
        la = cfg.get("local_attention")
        w = la // 2 if la else -1
    return w if w > 0 else None


def _nope_list(cfg, n):
    """SmolLM3's ``no_rope_layers``: 1 = the layer rotates, 0 = NoPE (default: every 4th layer is NoPE)."""
    lst = cfg.get("no_rope_layers")
    if lst is None:
        k = cfg.get("no_rope_layer_interval", 4)
        lst = [int((i + 1) % k != 0) for i in range(n)]
    return list(lst)


# ALiBi slopes, as each family's modeling code computes them (float32 arithmetic, as transformers does).


def bloom_alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """Bloom's (and Falcon's) ``build_alibi_tensor`` slopes: for the largest power of two ``p <= N``, the
    float32 base ``2^(-8/p)`` to the powers ``1..p``; the remaining ``N - p`` heads take the odd powers
    ``1, 3, 5, ...`` of the base ``2^(-8/(2p))`` (each power of the float32 base rounded to float32, as
    ``torch.pow`` gives it)."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{NAME}: ALiBi needs num_heads >= 1; got {num_heads!r}")
    p = 2 ** math.floor(math.log2(num_heads))
    base = float(np.float32(2 ** (-(2 ** -(math.log2(p) - 3)))))
    slopes = [float(np.float32(base**i)) for i in range(1, p + 1)]
    if p != num_heads:
        extra = float(np.float32(2 ** (-(2 ** -(math.log2(2 * p) - 3)))))
        slopes += [float(np.float32(extra**i)) for i in range(1, 1 + 2 * min(p, num_heads - p), 2)]
    return tuple(slopes)


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = 8) -> tuple[float, ...]:
    """MPT's ``build_mpt_alibi_tensor`` slopes: for the power of two ``q >= N``, ``1 / 2^(i · max / q)`` for
    ``i = 1..q`` (float32), then, when ``q != N``, the odd-indexed ones followed by the even-indexed ones,
    the first ``N`` of them."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{NAME}: ALiBi needs num_heads >= 1; got {num_heads!r}")
    q = 2 ** math.ceil(math.log2(num_heads))
    step = np.float32(alibi_bias_max / q)
    exps = [np.float32(np.float32(i) * step) for i in range(1, q + 1)]  # float32 base · (max / q)
    slopes = [float(np.float32(1.0) / np.float32(2.0 ** float(b))) for b in exps]
    if q != num_heads:
        slopes = (slopes[1::2] + slopes[0::2])[:num_heads]
    return tuple(slopes)


def _round_bf16(x: float) -> float:
    """``x`` (a float32 value) rounded to bfloat16, to nearest even, as ``torch.Tensor.bfloat16``."""
    bits = int(np.array(x, np.float32).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return float(np.array(bits, np.uint32).view(np.float32))


def falcon_alibi_slopes(num_heads: int, head_dim: int) -> tuple[float, ...]:
    """Falcon's ALiBi as our slopes: Bloom's slopes rounded to bfloat16 (``slopes.bfloat16()`` in its
    ``build_alibi_tensor``) and divided by ``sqrt(head_dim)`` (``FalconModel`` adds ``alibi / sqrt(H)`` to
    the mask, after the logits were scaled).

    Not expressed: Falcon's ``build_alibi_tensor`` multiplies in bfloat16 (in every model dtype): the key
    position is rounded to bf16, then the product, so its bias is linear in the position only while both fit
    bf16's 8 significant bits: with power-of-two slopes (up to 8 heads) up to position 256, otherwise only up
    to position 2 (32 heads, H = 64: up to 0.06 logit off by position 256, 0.9 by 2048; at most
    ``2^-7 · |slope · position| / sqrt(H)``). The port is exact ALiBi with these slopes."""
    return tuple(_round_bf16(s) / math.sqrt(head_dim) for s in bloom_alibi_slopes(num_heads))


def _falcon_kv_heads(cfg, n_heads: int, family: str) -> int:
    """``FalconAttention``'s key/value heads: ``num_kv_heads`` with ``new_decoder_architecture``, else one
    with ``multi_query``, else one per query head."""
    kv = cfg.get("num_kv_heads") or n_heads
    if cfg.get("new_decoder_architecture"):
        return kv
    if cfg.get("multi_query"):
        return 1
    if kv != n_heads:
        raise _unsupported(
            family,
            "num_kv_heads",
            kv,
            "without multi_query or new_decoder_architecture FalconAttention's query_key_value has one key "
            "head per query head, which its repeat_kv over num_kv_heads does not match (transformers cannot "
            "run it)",
        )
    return n_heads


@dataclass(frozen=True)
class Family:
    """How one family's modeling code builds its attention from its config (one entry of
    :data:`FAMILY_TABLE`; the reader, :func:`attention_config`, is the same for all).

    Attributes:
      weights: the weight layout: ``"separate"``, ``"qkv_rows"``, ``"neox"``, ``"grouped"``, ``"conv1d"``,
        ``"bert"``.
      renames: ``((ours, theirs), ...)`` module names that differ from ours (``q_proj``… in the separate
        layout, ``o_proj``, ``q_norm``/``k_norm``; ``qkv_proj`` names the fused matrix of the qkv_rows
        layout).
      qkv_bias, o_bias: a constant, or the config key the module reads (default in ``defaults``).
      rope: None (no rotary), ``"half"`` (rotate_half) or ``"interleaved"`` (pairs 2i, 2i + 1).
      partial: the rotary embedding reads ``partial_rotary_factor`` (else a config's value is ignored).
      rotary_dim: the config key of an absolute rotary width (GPT-J's ``rotary_dim``), instead.
      rope_per_layer_type: ``rope_parameters`` holds one dict per layer type (Gemma 3, OLMo 3).
      window: None (the module has no window), ``"config"`` (``sliding_window`` in every layer) or
        ``"layer"`` (on ``sliding_attention`` layers of ``layer_types``).
      window_gate: a bool config key the window needs on (Qwen's ``use_sliding_window``).
      qk_norm, qk_norm_offset, qk_norm_eps: the qk-norm kind (``"none"``, ``"head"``, ``"full"``,
        ``"unit"``), its weight offset (Gemma: 1) and the config key of its epsilon; ``qk_norm_switch``: a
        bool config key the norm needs on (GLM-4-MoE's ``use_qk_norm``, StableLM's ``qk_layernorm``).
      qk_norm_kind, qk_norm_per_head, qk_norm_bias: the norm is an RMSNorm (``"rms"``) or a LayerNorm
        (``"layer"``), with a weight per head and channel, with a bias (``AttentionConfig``'s fields).
      qk_norm_after_rope: the per-head norm applies to the rotated q and k (Hunyuan).
      qk_norm_list: the per-head weights live in a ``ModuleList`` of one norm per head,
        ``<q_norm>.norms.{i}.weight (H,)`` (StableLM's ``StableLmLayerNormPerHead``), stacked into ours.
      scale: None (``head_dim ** -0.5``), ``"one"`` (Gemma 4), ``"query_pre_attn_scalar"``, ``"gpt2"``, or
        the config key of the logit scale itself (Granite's ``attention_multiplier``, MPT's
        ``attn_config.softmax_scale``; None there: ``head_dim ** -0.5``).
      softcap: reads ``attn_logit_softcapping``.
      sinks: a learned sink logit per head.
      nope: the per-layer list key (1 = rotary, 0 = NoPE: SmolLM3's and Llama 4's ``no_rope_layers``).
      qk_norm_rope_only: the qk-norm exists on rotary layers only (Llama 4).
      clip: the config key of the q/k/v clamp (OLMo's ``clip_qkv``); a dotted key reads a sub-config
        (MPT's ``attn_config.clip_qkv``), as do ``dropout`` and ``scale``.
      alibi: ALiBi instead of rotary, its slopes computed as ``"bloom"`` (Bloom's ``build_alibi_tensor``),
        ``"mpt"`` (``build_mpt_alibi_tensor``) or ``"falcon"`` (Bloom's, rounded to bf16, over sqrt(H));
        ``alibi_switch``: a bool config key ALiBi needs on (Falcon's ``alibi``; off, the family rotates).
      kv_heads: reads the key/value head count (``(cfg, N, family) -> K``) where the config's flags decide it
        (Falcon's ``multi_query`` / ``new_decoder_architecture``).
      gate: the sigmoid output gate carried by ``q_proj`` (Qwen3-Next, Qwen3.5).
      chunk: the config key of the chunk size of ``chunked_attention`` layers (Llama 4).
      temperature: Llama 4's attention-temperature tuning on NoPE layers (``attn_temperature_tuning``,
        ``floor_scale``, ``attn_scale``).
      mrope: ``"contiguous"`` (Qwen2-VL) or ``"interleaved"`` (Qwen3-VL, Qwen3.5) multimodal RoPE, with
        ``mrope_default`` the sections the rotary embedding uses when ``rope_parameters`` has none.
      per_layer: ``head_dim`` and ``num_key_value_heads`` may differ per layer (Gemma 4's
        ``per_layer_config``, or ``global_head_dim`` / ``num_global_key_value_heads`` on full layers).
      v_norm: a weightless RMSNorm on each value head (Gemma 4).
      k_eq_v: the config key that makes full layers reuse the key projection as the values (Gemma 4's
        ``attention_k_eq_v``).
      last_layer_full: the config class forces the last layer to ``full_attention`` (Gemma 4).
      kv_shared: the config key counting the last layers that read another layer's keys and values (Gemma
        4's ``num_kv_shared_layers``): those layers read as ``kv_shared=True`` (no k/v projections, k norm
        nor v norm; :func:`kv_producer` names the layer whose keys and values they read).
      rope_sliding_only: only ``sliding_attention`` layers rotate (the others are NoPE): ``"always"``
        (Cohere 2: no window at all means no rotary anywhere) or ``"with_window"`` (EXAONE 4: without a window
        every layer rotates).
      causal: ``"decoder"``, ``"bert"`` (causal only as a decoder) or ``"vit"`` (bidirectional).
      dropout: the config key of the attention-weight dropout.
      layer_types: derives ``layer_types`` for a config.json lacking it, as the config class does.
      refuse: ``((knob, why), ...)``: config keys the module reads that ``AttentionConfig`` cannot express,
        refused when set (truthy).
      train_refuse: the same, only in training mode (output dropouts outside the attention).
      defaults: values the family's config class sets that a config.json may leave out.
      encoder: an encoder-only family (no KV cache, no decoding).
      window_from: ``(knob, fn)``: the window of ``sliding_attention`` layers is ``fn(config)`` (our
        convention), from ``knob`` rather than ``sliding_window`` as is (ModernBERT's ``local_attention``).
      mha: the module has no kv heads nor head width of its own (``K = N``, ``H = E // N``, whatever the
        config says).
    """

    weights: str = "separate"
    renames: tuple = ()
    qkv_bias: bool | str = "attention_bias"
    o_bias: bool | str = "attention_bias"
    rope: str | None = "half"
    partial: bool = False
    rotary_dim: str | None = None
    rope_per_layer_type: bool = False
    window: str | None = None
    window_gate: str | None = None
    qk_norm: str = "none"
    qk_norm_switch: str | None = None
    qk_norm_offset: float = 0.0
    qk_norm_eps: str = "rms_norm_eps"
    qk_norm_kind: str = "rms"
    qk_norm_per_head: bool = False
    qk_norm_bias: bool = False
    qk_norm_list: bool = False
    qk_norm_after_rope: bool = False
    scale: str | None = None
    softcap: bool = False
    sinks: bool = False
    nope: str | None = None
    qk_norm_rope_only: bool = False
    clip: str | None = None
    gate: bool = False
    chunk: str | None = None
    temperature: bool = False
    alibi: str | None = None
    alibi_switch: str | None = None
    kv_heads: object = None
    mrope: str | None = None
    mrope_default: tuple | None = None
    per_layer: bool = False
    v_norm: bool = False
    k_eq_v: str | None = None
    kv_shared: str | None = None
    last_layer_full: bool = False
    rope_sliding_only: str | None = None
    causal: str = "decoder"
    dropout: str = "attention_dropout"
    layer_types: object = None
    refuse: tuple = ()
    train_refuse: tuple = ()
    defaults: dict = field(default_factory=dict)
    encoder: bool = False
    window_from: tuple | None = None
    mha: bool = False


_LLAMA = Family()
_HUNYUAN = Family(  # Hunyuan: per-head RMSNorms named query/key_layernorm, applied after the rotation
    renames=(("q_norm", "query_layernorm"), ("k_norm", "key_layernorm")),
    qk_norm="head",
    qk_norm_after_rope=True,
)
_BIDIRECTIONAL = (("use_bidirectional_attention", "the bidirectional sliding-window mask is not ported"),)
_BERT = Family(
    weights="bert",
    renames=(
        ("q_proj", "self.query"),
        ("k_proj", "self.key"),
        ("v_proj", "self.value"),
        ("o_proj", "output.dense"),
    ),
    qkv_bias=True,
    o_bias=True,
    rope=None,
    causal="bert",
    dropout="attention_probs_dropout_prob",
    encoder=True,
)
_VIT = Family(
    qkv_bias="qkv_bias",
    o_bias=True,
    rope=None,
    causal="vit",
    dropout="attention_probs_dropout_prob",
    defaults={"qkv_bias": True},
    encoder=True,
)
_MODERNBERT_DROPOUT = (
    "the output dropout (out_drop, p=attention_dropout) in training mode is not ported; call .eval()"
)
_QWEN3 = Family(
    qk_norm="head", window="layer", window_gate="use_sliding_window", layer_types=_qwen_layer_types
)
FAMILY_TABLE: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": Family(
        qkv_bias=False,
        o_bias=False,
        window="config",
        refuse=(("layer_types", "MistralModel ignores it (use Ministral)"),),
    ),
    "mixtral": Family(qkv_bias=False, o_bias=False, window="config"),
    "ministral": Family(qkv_bias=False, o_bias=False, window="layer", layer_types=_all_sliding_if_window),
    "cwm": Family(qkv_bias=False, o_bias=False, window="layer", layer_types=_cwm_layer_types),
    "vaultgemma": Family(
        window="layer",
        layer_types=_every_other,
        scale="query_pre_attn_scalar",
        softcap=True,
        defaults={"query_pre_attn_scalar": 256},
    ),
    "hunyuan_v1_dense": _HUNYUAN,
    "hunyuan_v1_moe": _HUNYUAN,
    # GPT-Neo: unscaled logits, "local" layers see window_size keys (tril XOR tril(-window_size)), fp32
    # logits; the module is GPTNeoAttention around GPTNeoSelfAttention (attention.q_proj ...).
    "gpt_neo": Family(
        renames=(
            ("q_proj", "attention.q_proj"),
            ("k_proj", "attention.k_proj"),
            ("v_proj", "attention.v_proj"),
            ("o_proj", "attention.out_proj"),
        ),
        qkv_bias=False,
        o_bias=True,
        rope=None,
        scale="one",
        window="layer",
        window_from=("window_size", lambda cfg: cfg.get("window_size")),
        layer_types=lambda cfg, n: [
            "sliding_attention" if t == "local" else "full_attention" for t in _gpt_neo_layers(cfg, n)
        ],
        dropout="attention_dropout",
        mha=True,
        train_refuse=(
            (
                "resid_dropout",
                "GPTNeoSelfAttention's output dropout in training mode is not ported; call .eval()",
            ),
        ),
    ),
    # XGLM: BART-style attention (q/k/v/out_proj with biases, sinusoidal positions outside the layer); the
    # module keeps no config (its attributes are read).
    "xglm": Family(
        renames=(("o_proj", "out_proj"),),
        qkv_bias="attention_bias",
        o_bias="attention_bias",
        rope=None,
        mha=True,
        defaults={"attention_bias": True},
    ),
    # DBRX: Wqkv rows [all q; k; v] clamped to +-clip_qkv, out_proj, kv heads in attn_config.
    "dbrx": Family(
        weights="qkv_rows",
        renames=(("qkv_proj", "Wqkv"), ("o_proj", "out_proj")),
        qkv_bias=False,
        o_bias=False,
        clip="attn_config.clip_qkv",
        mha=True,
        kv_heads=lambda cfg, n, family: cfg.get("attn_config.kv_n_heads") or n,
        dropout="attn_config.attn_pdrop",
    ),
    "dots1": Family(qk_norm="head", window="layer", layer_types=_dots1_layer_types),
    # MiniMax: softmax layers (Mixtral's attention, a config-wide window) between lightning (linear) layers.
    "minimax": Family(
        qkv_bias=False,
        o_bias=False,
        window="config",
        layer_types=lambda cfg, n: [
            "full_attention" if (i + 1) % 2 else "linear_attention" for i in range(n)
        ],
    ),
    "mellum": Family(
        qk_norm="head",
        window="layer",
        layer_types=lambda cfg, n: ["full_attention"] * n,
        rope_per_layer_type=True,
        partial=True,
    ),
    "gpt_bigcode": Family(
        weights="bigcode",
        renames=(("qkv_proj", "c_attn"), ("query_key_value", "c_attn"), ("o_proj", "c_proj")),
        qkv_bias=True,
        o_bias=True,
        rope=None,
        scale="gpt2",
        kv_heads=lambda cfg, n, family: 1 if cfg.get("multi_query", True) else n,
        dropout="attn_pdrop",
        train_refuse=(
            (
                "resid_pdrop",
                "GPTBigCodeAttention's output dropout in training mode is not ported; call .eval()",
            ),
        ),
    ),
    "opt": Family(
        renames=(("o_proj", "out_proj"),),
        qkv_bias="enable_bias",
        o_bias="enable_bias",
        rope=None,
        defaults={"enable_bias": True},
    ),
    "biogpt": Family(
        renames=(("o_proj", "out_proj"),),
        qkv_bias=True,
        o_bias=True,
        rope=None,
        dropout="attention_probs_dropout_prob",
    ),
    "starcoder2": Family(
        qkv_bias="use_bias",
        o_bias="use_bias",
        window="config",
        defaults={"use_bias": True},
        train_refuse=(
            ("residual_dropout", "Starcoder2Attention's output dropout is not ported; call .eval()"),
        ),
    ),
    "qwen2": Family(
        qkv_bias=True,
        o_bias=False,
        window="layer",
        window_gate="use_sliding_window",
        layer_types=_qwen_layer_types,
    ),
    "qwen2_moe": Family(
        qkv_bias="qkv_bias",
        o_bias=False,
        window="layer",
        window_gate="use_sliding_window",
        layer_types=_qwen2_moe_layer_types,
        defaults={"qkv_bias": True},
    ),
    "qwen3": _QWEN3,
    "qwen3_moe": Family(qk_norm="head", window="config", window_gate="use_sliding_window"),
    "gemma": Family(refuse=_BIDIRECTIONAL),
    "gemma2": Family(
        window="layer",
        layer_types=_every_other,
        scale="query_pre_attn_scalar",
        softcap=True,
        refuse=_BIDIRECTIONAL,
        defaults={"query_pre_attn_scalar": 256},
    ),
    # transformers' Gemma3Attention never passes attn_logit_softcapping to its attention (the config field is
    # unused there), so the faithful port has no soft-cap for Gemma 3.
    "gemma3_text": Family(
        window="layer",
        layer_types=_gemma3_layer_types,
        rope_per_layer_type=True,
        qk_norm="head",
        qk_norm_offset=1.0,
        scale="query_pre_attn_scalar",
        refuse=_BIDIRECTIONAL,
        defaults={"query_pre_attn_scalar": 256},
    ),
    "granite": Family(scale="attention_multiplier", defaults={"attention_multiplier": 1.0}),
    "granitemoe": Family(scale="attention_multiplier", defaults={"attention_multiplier": 1.0}),
    "granitemoeshared": Family(scale="attention_multiplier", defaults={"attention_multiplier": 1.0}),
    "olmo": Family(clip="clip_qkv"),
    "olmo2": Family(qk_norm="full", defaults={"rms_norm_eps": 1e-5}),
    "olmo3": Family(
        qk_norm="full",
        window="layer",
        layer_types=_olmo3_layer_types,
        rope_per_layer_type=True,
        defaults={"rms_norm_eps": 1e-6},
    ),
    "smollm3": Family(
        window="layer",
        window_gate="use_sliding_window",
        nope="no_rope_layers",
        layer_types=_smollm3_layer_types,
    ),
    "glm": Family(rope="interleaved", partial=True, o_bias=False, defaults={"attention_bias": True}),
    "glm4": Family(rope="interleaved", partial=True, o_bias=False, defaults={"attention_bias": True}),
    "glm4_moe": Family(partial=True, o_bias=False, qk_norm="head", qk_norm_switch="use_qk_norm"),
    "cohere2": Family(
        rope="interleaved", window="layer", layer_types=_cohere2_layer_types, rope_sliding_only="always"
    ),
    "exaone4": Family(
        qkv_bias=False,
        o_bias=False,
        qk_norm="head",
        window="layer",
        layer_types=_exaone4_layer_types,
        rope_sliding_only="with_window",
        defaults={"rms_norm_eps": 1e-5},
    ),
    # CohereLayerNorm: a weight (N, H) / (K, H), no bias, in float32; over each head, before the rotary.
    "cohere": Family(
        rope="interleaved",
        qk_norm="head",
        qk_norm_switch="use_qk_norm",
        qk_norm_eps="layer_norm_eps",
        qk_norm_kind="layer",
        qk_norm_per_head=True,
        defaults={"layer_norm_eps": 1e-5},
    ),
    # nn.LayerNorm(H) with a bias, one for all query heads (one for the key heads).
    "phi": Family(
        renames=(("o_proj", "dense"), ("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")),
        qkv_bias=True,
        o_bias=True,
        partial=True,
        qk_norm="head",
        qk_norm_switch="qk_layernorm",
        qk_norm_eps="layer_norm_eps",
        qk_norm_kind="layer",
        qk_norm_bias=True,
        defaults={"layer_norm_eps": 1e-5},
    ),
    # StableLmLayerNormPerHead: a ModuleList of nn.LayerNorm(H, bias=False), one per head.
    "stablelm": Family(
        renames=(("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")),
        qkv_bias="use_qkv_bias",
        o_bias=False,
        partial=True,
        qk_norm="head",
        qk_norm_switch="qk_layernorm",
        qk_norm_eps="layer_norm_eps",
        qk_norm_kind="layer",
        qk_norm_per_head=True,
        qk_norm_list=True,
        defaults={"layer_norm_eps": 1e-5},
    ),
    "nemotron": Family(partial=True),
    # As Phi's norm; PersimmonConfig switches it on by default.
    "persimmon": Family(
        weights="neox",
        renames=(("o_proj", "dense"), ("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")),
        qkv_bias=True,
        o_bias=True,
        partial=True,
        qk_norm="head",
        qk_norm_switch="qk_layernorm",
        qk_norm_eps="layer_norm_eps",
        qk_norm_kind="layer",
        qk_norm_bias=True,
        defaults={"qk_layernorm": True, "layer_norm_eps": 1e-5},
    ),
    "phi3": Family(weights="qkv_rows", qkv_bias=False, o_bias=False, partial=True, window="config"),
    "gpt_oss": Family(window="layer", layer_types=_every_other, sinks=True),
    "gpt_neox": Family(
        weights="neox", renames=(("o_proj", "dense"),), partial=True, defaults={"attention_bias": True}
    ),
    "gptj": Family(
        renames=(("o_proj", "out_proj"),),
        qkv_bias=False,
        o_bias=False,
        rope="interleaved",
        rotary_dim="rotary_dim",
        dropout="attn_pdrop",
        train_refuse=(
            ("resid_pdrop", "GPTJAttention's output dropout in training mode is not ported; call .eval()"),
        ),
    ),
    # CodeGen: GPT-J's attention with a qkv_proj laid out for 4 model-parallel shards (per shard q, v, k).
    "codegen": Family(
        weights="codegen",
        renames=(("o_proj", "out_proj"),),
        qkv_bias=False,
        o_bias=False,
        rope="interleaved",
        rotary_dim="rotary_dim",
        dropout="attn_pdrop",
        mha=True,
        train_refuse=(
            ("resid_pdrop", "CodeGenAttention's output dropout in training mode is not ported; call .eval()"),
        ),
    ),
    "gpt2": Family(
        weights="conv1d",
        renames=(("o_proj", "c_proj"),),
        qkv_bias=True,
        o_bias=True,
        rope=None,
        scale="gpt2",
        dropout="attn_pdrop",
        train_refuse=(
            ("resid_pdrop", "GPT2Attention's output dropout in training mode is not ported; call .eval()"),
        ),
    ),
    # BloomAttention adds its ``residual`` argument to its output (after a dropout of ``hidden_dropout``): the
    # port stops at ``dense``, the caller adds the residual (the port check calls it with a zero residual).
    "bloom": Family(
        weights="neox",
        renames=(("o_proj", "dense"),),
        qkv_bias=True,
        o_bias=True,
        rope=None,
        alibi="bloom",
        train_refuse=(
            (
                "hidden_dropout",
                "BloomAttention's dropout of its output (before it adds the residual) in training mode is "
                "not ported; call .eval()",
            ),
        ),
    ),
    # MptAttention reads only softmax_scale, clip_qkv and attn_pdrop of attn_config: MptModel builds ALiBi
    # whatever attn_config.alibi says, with build_mpt_alibi_tensor's default alibi_bias_max (8) whatever
    # attn_config.alibi_bias_max says, and the module has no bias, qk-LayerNorm, prefix-LM or multi-query
    # variant (no_bias, qk_ln, prefix_lm, attn_type are unread), so the port follows transformers there.
    "mpt": Family(
        weights="qkv_rows",
        renames=(("qkv_proj", "Wqkv"), ("o_proj", "out_proj")),
        qkv_bias=False,
        o_bias=False,
        rope=None,
        alibi="mpt",
        clip="attn_config.clip_qkv",
        scale="attn_config.softmax_scale",
        dropout="attn_config.attn_pdrop",
    ),
    # Falcon: ALiBi (alibi=True; transformers rounds key positions and slope · position to bf16, the port not:
    # see falcon_alibi_slopes) or rotary; one fused query_key_value
    # in the grouped layout (classic: one group per head; multi_query: one group; new_decoder_architecture:
    # num_kv_heads groups).
    "falcon": Family(
        weights="grouped",
        renames=(("o_proj", "dense"),),
        qkv_bias="bias",
        o_bias="bias",
        alibi="falcon",
        alibi_switch="alibi",
        kv_heads=_falcon_kv_heads,
        defaults={"multi_query": True, "new_decoder_architecture": False, "alibi": False, "bias": False},
    ),
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    # ModernBERT: a fused Wqkv (rows [all q; all k; all v], like Phi-3's qkv_proj, with a bias when
    # attention_bias), rope per layer type (global_rope_theta / local_rope_theta in legacy configs),
    # bidirectional sliding windows on the local layers (see _modernbert_window), Wo.
    "modernbert": Family(
        weights="qkv_rows",
        renames=(("qkv_proj", "Wqkv"), ("o_proj", "Wo")),
        window="layer",
        window_from=("local_attention", _modernbert_window),
        rope_per_layer_type=True,
        layer_types=_modernbert_layer_types,
        causal="vit",
        train_refuse=(("attention_dropout", "ModernBertAttention's " + _MODERNBERT_DROPOUT),),
        defaults={"local_attention": 128},
        encoder=True,
        mha=True,
    ),
    # ModernBERT-decoder: separate q/k/v projections, causal windows of sliding_window = local_attention // 2.
    "modernbert-decoder": Family(
        renames=(("o_proj", "Wo"),),
        window="layer",
        window_from=("local_attention", _modernbert_decoder_window),
        rope_per_layer_type=True,
        layer_types=_modernbert_layer_types,
        train_refuse=(("attention_dropout", "ModernBertDecoderAttention's " + _MODERNBERT_DROPOUT),),
        defaults={"local_attention": 128},
        mha=True,
    ),
    # ViT's attention, line for line (q/k/v/o_proj, qkv_bias, scale head_dim ** -0.5; DINOv2's eager softmax
    # runs in the input dtype rather than float32).
    "deit": _VIT,
    "dinov2": _VIT,
    "dinov2_with_registers": _VIT,
    "vit_mae": _VIT,
    "vit_msn": _VIT,
    "ijepa": _VIT,
    "vivit": _VIT,
    "pixio": _VIT,
    # YOLOS keeps the older ViT layout (attention.query/key/value, output.dense + output dropout; no mask).
    "yolos": Family(
        weights="bert",
        renames=(
            ("q_proj", "attention.query"),
            ("k_proj", "attention.key"),
            ("v_proj", "attention.value"),
            ("o_proj", "output.dense"),
        ),
        qkv_bias="qkv_bias",
        o_bias=True,
        rope=None,
        causal="vit",
        dropout="attention_probs_dropout_prob",
        train_refuse=(
            ("hidden_dropout_prob", "YolosSelfOutput's dropout in training mode is not ported; call .eval()"),
        ),
        defaults={"qkv_bias": True},
        encoder=True,
    ),
    # BertAttention line for line (BertSelfAttention + BertSelfOutput with its post-LN).
    "camembert": _BERT,
    "data2vec-text": _BERT,
    "ernie": _BERT,
    "electra": _BERT,
    "bert-generation": _BERT,
    "roc_bert": _BERT,
    "gemma4_text": Family(
        window="layer",
        layer_types=_gemma4_layer_types,
        last_layer_full=True,
        rope_per_layer_type=True,
        partial=True,
        qk_norm="head",
        scale="one",
        per_layer=True,
        v_norm=True,
        k_eq_v="attention_k_eq_v",
        kv_shared="num_kv_shared_layers",
        refuse=(
            (
                "use_bidirectional_attention",
                "Gemma 4's bidirectional (all / vision) masks are not ported",
            ),
        ),
    ),
    "llama4_text": Family(
        rope="interleaved",
        nope="no_rope_layers",
        qk_norm="unit",
        qk_norm_switch="use_qk_norm",
        qk_norm_rope_only=True,
        chunk="attention_chunk_size",
        temperature=True,
        layer_types=_llama4_layer_types,
        defaults={
            "use_qk_norm": True,
            "attn_temperature_tuning": True,
            "floor_scale": 8192,
            "attn_scale": 0.1,
            "attention_chunk_size": 8192,
        },
    ),
    "qwen3_next": Family(
        partial=True,
        gate=True,
        qk_norm="head",
        qk_norm_offset=1.0,
        layer_types=_hybrid_layer_types,
        defaults={"partial_rotary_factor": 0.25},
    ),
    "qwen3_5_text": Family(
        partial=True,
        gate=True,
        qk_norm="head",
        qk_norm_offset=1.0,
        mrope="interleaved",
        mrope_default=(11, 11, 10),
        layer_types=_hybrid_layer_types,
    ),
    "qwen3_5_moe_text": Family(
        partial=True,
        gate=True,
        qk_norm="head",
        qk_norm_offset=1.0,
        mrope="interleaved",
        mrope_default=(11, 11, 10),
        layer_types=_hybrid_layer_types,
    ),
    "qwen2_vl_text": Family(
        qkv_bias=True,
        o_bias=False,
        window="layer",
        window_gate="use_sliding_window",
        layer_types=_qwen_layer_types,
        mrope="contiguous",
        mrope_default=(16, 24, 24),
    ),
    "qwen2_5_vl_text": Family(
        qkv_bias=True,
        o_bias=False,
        window="layer",
        window_gate="use_sliding_window",
        layer_types=_qwen_layer_types,
        mrope="contiguous",
        mrope_default=(16, 24, 24),
    ),
    "qwen3_vl_text": Family(qk_norm="head", mrope="interleaved", mrope_default=(24, 20, 20)),
    "qwen3_vl_moe_text": Family(qk_norm="head", mrope="interleaved", mrope_default=(24, 20, 20)),
    "vit": _VIT,
}
FAMILIES = tuple(FAMILY_TABLE)
ENCODERS = tuple(f for f, e in FAMILY_TABLE.items() if e.encoder)
DECODERS = tuple(f for f in FAMILIES if f not in ENCODERS)
# Knobs a config of a model_type with no entry may not set: only the family's own code could tell whether
# (and how) its attention reads them.
UNKNOWN_FAMILY_KNOBS = (
    "partial_rotary_factor",
    "rotary_pct",
    "rotary_dim",
    "rope_interleave",
    "attn_logit_softcapping",
    "query_pre_attn_scalar",
    "attention_multiplier",
    "clip_qkv",
    "qk_layernorm",
    "use_qk_norm",
    "no_rope_layers",
    "no_rope_layer_interval",
    "use_bidirectional_attention",
    "attention_chunk_size",
    "mrope_section",
    "use_sliding_window",
    "sliding_window",
    "layer_types",
)
# Model types inferred from their modules (describe_module): weights in the separate layout.
_INFERRED: dict[str, Family] = {}


class _Cfg:
    """Read a transformers config object or a config.json dict the same way."""

    def __init__(self, config, defaults: dict | None = None):
        self.obj = config
        self.defaults = defaults or {}

    def get(self, key, default=None):
        if "." in key:  # a sub-config's key (MPT's attn_config.clip_qkv), an object or a dict
            head, rest = key.split(".", 1)
            sub = self.get(head)
            val = None if sub is None else _Cfg(sub).get(rest)
            return self.defaults.get(key, default) if val is None else val
        for k in (key, *_ALIASES.get(key, ())):
            if isinstance(self.obj, dict):
                if k in self.obj:
                    return self.obj[k]
            else:
                try:
                    if hasattr(self.obj, k):
                        return getattr(self.obj, k)
                except Exception as err:  # noqa: BLE001
                    # A heterogeneous config (Gemma 4) refuses global reads of per-layer attributes: the
                    # reader takes them from the layer's view (_layer_overrides).
                    if type(err).__name__ != "AmbiguousGlobalPerLayerAttributeError":
                        raise
        return self.defaults.get(key, default)


def entry(family: str) -> Family:
    """The family's table entry (or the one inferred from its module); ValueError for an unknown name."""
    if family in FAMILY_TABLE:
        return FAMILY_TABLE[family]
    if family in _INFERRED:
        return _INFERRED[family]
    raise ValueError(f"{NAME}: unsupported model_type={family!r}; supported: {FAMILIES}")


def check_family(family: str, name: str) -> None:
    """``name``'s check of a family argument (the table's, or a model_type inferred from its module)."""
    if family not in FAMILY_TABLE and family not in _INFERRED:
        raise ValueError(f"{name}: unknown family={family!r}; known: {FAMILIES}")


def family_of(config) -> str:
    """The family name (``model_type``); a multimodal Gemma 3 config reads its ``text_config``."""
    family = _Cfg(config).get("model_type")
    entry(family)
    return family


def text_config(config):
    """``config`` itself, or the ``text_config`` of a multimodal wrapper (e.g. Gemma 3's)."""
    tc = _Cfg(config).get("text_config")
    return config if tc is None else tc


def layer_types(config, family: str) -> list[str] | None:
    """transformers' ``layer_types`` (``"sliding_attention"``/``"full_attention"`` per layer), derived as its
    config classes derive it when a ``config.json`` lacks it; None for families whose modules do not read
    it."""
    e = FAMILY_TABLE.get(family) or _INFERRED.get(family)
    cfg = _Cfg(config)
    if e is not None and e.window != "layer" and not e.rope_per_layer_type and e.layer_types is None:
        return None
    lt = cfg.get("layer_types")
    if lt is not None:
        lt = list(lt)
    elif e is not None and e.layer_types is not None:
        lt = e.layer_types(cfg, cfg.get("num_hidden_layers"))
    if lt and e is not None and e.last_layer_full:
        lt[-1] = "full_attention"
    return lt


def _rope_parameters(cfg: _Cfg, family: str, layer_type: str | None) -> dict:
    """The layer's ``rope_parameters`` (v5 name), from the v5 dict or the legacy keys of older configs, with
    only the knobs the family's rotary embedding reads (``partial_rotary_factor`` dropped where it does not
    read it)."""
    e = FAMILY_TABLE.get(family) or _INFERRED.get(family)
    rp = cfg.get("rope_parameters")
    if e is not None and e.rope_per_layer_type:
        if isinstance(rp, dict) and layer_type in rp:
            rp = rp[layer_type]
        elif family in ("modernbert", "modernbert-decoder"):  # legacy: global_/local_rope_theta
            key, theta = (
                ("local_rope_theta", 1e4)
                if layer_type == "sliding_attention"
                else ("global_rope_theta", 16e4)
            )
            rp = {"rope_type": "default", **(cfg.get("rope_scaling") or {})}
            rp.setdefault("rope_theta", cfg.get(key, theta))
        elif family == "gemma3_text" and layer_type == "sliding_attention":  # legacy: rope_local_base_freq
            rp = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
        elif layer_type == "sliding_attention":  # legacy OLMo 3: rope_scaling applies to full layers only
            rp = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 1e4)}
        else:
            rp = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
            rp.setdefault("rope_theta", cfg.get("rope_theta", 1e6 if family == "gemma3_text" else 1e4))
    if rp is None:
        rp = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
        rp.setdefault("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)))
        prf = cfg.get("partial_rotary_factor", cfg.get("rotary_pct"))
        if prf is not None:
            rp.setdefault("partial_rotary_factor", prf)
    rp = {k: v for k, v in dict(rp).items() if v is not None}
    if "type" in rp:
        rp.setdefault("rope_type", rp.pop("type"))
    if family == "phi3" and rp.get("rope_type") in (
        "su",
        "yarn",
    ):  # transformers' Phi-3 reads both as longrope
        rp["rope_type"] = "longrope"
    if rp.get("rope_type") in ("longrope", "yarn", "llama3") and "original_max_position_embeddings" not in rp:
        omp = cfg.get("original_max_position_embeddings")
        if omp is not None:
            rp["original_max_position_embeddings"] = omp
    if family == "gpt_neox":
        rp.setdefault("partial_rotary_factor", cfg.get("rotary_pct", 1.0))
    if e is not None and not e.partial:
        rp.pop("partial_rotary_factor", None)  # a knob this family's rotary embedding never reads
    if e is not None and e.partial and "partial_rotary_factor" in e.defaults:
        rp.setdefault("partial_rotary_factor", e.defaults["partial_rotary_factor"])
    rp.pop("mrope_interleaved", None)  # the family's code decides the layout, not this key
    if e is None or e.mrope is None:
        rp.pop("mrope_section", None)  # read only by the multimodal rotary embeddings
    else:
        rp["mrope_section"] = tuple(rp.get("mrope_section") or e.mrope_default)
        rp["mrope_interleaved"] = e.mrope == "interleaved"
    return rp


def _unsupported(family: str, knob: str, value, why: str) -> ValueError:
    return ValueError(f"{NAME}: {family} config knob {knob}={value!r} is not supported: {why}")


def _bias(cfg: _Cfg, spec_) -> bool:
    return spec_ if isinstance(spec_, bool) else bool(cfg.get(spec_, False))


def attention_config(
    config, layer: int = 0, *, module_kind: str | None = None
) -> tuple[str, AttentionConfig]:
    """``(family, AttentionConfig)`` of layer ``layer``'s attention.

    Args:
      config: a transformers config object or a ``config.json`` dict.
      layer: the layer index (window and rope differ per layer in Gemma 2/3, gpt-oss, Qwen2/3, OLMo 3,
        SmolLM3).
      module_kind: for BERT-like encoders, ``"block"`` (``BertAttention``, the default) — the post-LN is
        checked by the caller; ``"causal"`` when the layer is a decoder (``is_decoder``).

    Raises:
      ValueError: naming the first knob the layer sets that ``AttentionConfig`` cannot express.
    """
    config = text_config(config)
    family = family_of(config)
    return family, _read(config, layer, family, entry(family), module_kind)


def _read(config, layer, family: str, e: Family, module_kind=None) -> AttentionConfig:
    """The reader: ``AttentionConfig`` from the knobs ``e`` says the family's modeling code reads."""
    cfg = _Cfg(config, e.defaults)
    E, N = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    n_layers = cfg.get("num_hidden_layers")
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0 or (n_layers and layer >= n_layers):
        raise ValueError(f"{NAME}: layer must be an int in [0, {n_layers}); got layer={layer!r}")
    for knob, why in e.refuse:
        if cfg.get(knob):
            raise _unsupported(family, knob, cfg.get(knob), why)
    K = cfg.get("num_key_value_heads") or N
    H = cfg.get("head_dim") or E // N
    if e.mha or e.weights in (
        "neox",
        "conv1d",
        "bert",
        "grouped",
        "bigcode",
    ):  # no kv heads nor head_dim of their own
        K, H = N, E // N
    if e.kv_heads is not None:
        K = e.kv_heads(cfg, N, family)
    lt = layer_types(config, family)
    layer_type = lt[layer] if lt is not None else None
    if e.per_layer:
        over = _layer_overrides(cfg, layer, layer_type)
        K, H = over.get("num_key_value_heads") or K, over.get("head_dim") or H
    shared = _is_kv_shared(cfg, e, layer, n_layers)
    kw: dict = {"hidden_size": E, "num_heads": N, "num_kv_heads": K, "head_dim": H}
    if lt is not None and layer_type == "linear_attention":
        raise _unsupported(
            family,
            f"layer_types[{layer}]",
            layer_type,
            "a linear-attention (recurrent, e.g. Gated DeltaNet) layer, not softmax attention; the "
            "full_attention layers port",
        )
    known_types = ("sliding_attention", "full_attention") + (("chunked_attention",) if e.chunk else ())
    if lt is not None and layer_type not in known_types:
        raise _unsupported(family, f"layer_types[{layer}]", layer_type, f"known: {known_types}")
    kw["dropout"] = float(cfg.get(e.dropout, 0.0) or 0.0)

    # ALiBi (then no rotary) where the family has it and its switch is on.
    alibi_on = e.alibi is not None and (e.alibi_switch is None or bool(cfg.get(e.alibi_switch, False)))
    if alibi_on:
        kw["alibi_slopes"] = {
            "bloom": lambda: bloom_alibi_slopes(N),
            # MptModel calls build_mpt_alibi_tensor without attn_config.alibi_bias_max: its default, 8.
            "mpt": lambda: mpt_alibi_slopes(N, 8),
            "falcon": lambda: falcon_alibi_slopes(N, H),
        }[e.alibi]()

    # Rotary: the layer's parameters, in the family's layout; NoPE layers have none.
    rope_on = e.rope is not None and (e.nope is None or bool(_nope_list(cfg, n_layers)[layer]))
    rope_on = rope_on and not alibi_on
    if e.rope_sliding_only is not None:
        has_window = bool(cfg.get("sliding_window"))
        sliding = layer_type == "sliding_attention" and has_window
        rope_on = rope_on and (sliding or (e.rope_sliding_only == "with_window" and not has_window))
    if rope_on:
        rp = _rope_parameters(cfg, family, layer_type)
        if e.rotary_dim is not None:
            rd = cfg.get(e.rotary_dim)
            if not rd and e.weights == "codegen":  # CodeGen then rotates the whole head
                rd = H
            if not rd:  # GPT-J then builds a table as wide as the model, not a head
                raise _unsupported(family, e.rotary_dim, rd, "the rotary width must be given (<= head_dim)")
            rp["partial_rotary_factor"] = rd / H
        try:
            kw["rope"] = RopeConfig.from_hf(
                rp, max_position_embeddings=cfg.get("max_position_embeddings"), layout=e.rope
            )
        except ValueError as err:
            raise ValueError(f"{NAME}: {family} rope_parameters={rp}: {err}") from err
    else:
        kw["rope"] = None

    qkv, o = _bias(cfg, e.qkv_bias), _bias(cfg, e.o_bias)
    kw.update(q_bias=qkv, k_bias=qkv and not shared, v_bias=qkv and not shared, o_bias=o)

    # Sliding windows: config-wide or per layer type, where the family's module reads one at all.
    window = cfg.get("sliding_window")
    if e.window_gate is not None and not cfg.get(e.window_gate, False):
        window = None
    knob = "sliding_window"
    if e.window_from is not None:
        knob, window = e.window_from[0], e.window_from[1](cfg)
    if e.window == "config":
        kw["sliding_window"] = window or None
    elif e.window == "layer":
        kw["sliding_window"] = window if layer_type == "sliding_attention" else None
        if layer_type == "sliding_attention" and not window:
            raise _unsupported(
                family, knob, cfg.get(knob), f"layer {layer} is a sliding_attention layer and needs a window"
            )

    if e.chunk is not None and layer_type == "chunked_attention":
        kw["chunk_size"] = int(cfg.get(e.chunk))
    clip = None if e.clip is None else cfg.get(e.clip)
    if clip is not None and (clip or family != "mpt"):  # MptAttention clamps only when clip_qkv is truthy
        kw["clip_qkv"] = float(clip)
    kw["output_gate"] = e.gate
    if e.temperature and not rope_on and cfg.get("attn_temperature_tuning", False):
        kw["attn_temperature"] = (float(cfg.get("floor_scale")), float(cfg.get("attn_scale")))
    norm_on = e.qk_norm_switch is None or cfg.get(e.qk_norm_switch, False)
    if e.qk_norm_rope_only and not rope_on:
        norm_on = False
    if e.qk_norm != "none" and norm_on:
        kw.update(qk_norm=e.qk_norm, qk_norm_eps=float(cfg.get(e.qk_norm_eps, 1e-6)))
        kw["qk_norm_offset"] = e.qk_norm_offset
        kw.update(
            qk_norm_kind=e.qk_norm_kind, qk_norm_per_head=e.qk_norm_per_head, qk_norm_bias=e.qk_norm_bias
        )
        kw["qk_norm_after_rope"] = e.qk_norm_after_rope
    kw["v_norm"] = e.v_norm and not shared
    if e.v_norm:
        kw["qk_norm_eps"] = float(cfg.get(e.qk_norm_eps, 1e-6))
    if e.k_eq_v is not None and cfg.get(e.k_eq_v, False) and layer_type != "sliding_attention":
        kw["k_eq_v"] = not shared
    if shared:  # Gemma 4's "reuse" layers: q_proj, q_norm and o_proj only; keys and values of a producer
        kw["kv_shared"] = True
    if e.scale == "one":
        kw["scale"] = 1.0
    elif e.scale == "query_pre_attn_scalar":
        kw["query_pre_attn_scalar"] = cfg.get("query_pre_attn_scalar")
    elif e.scale == "gpt2":
        scale = (E // N) ** -0.5 if cfg.get("scale_attn_weights", True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer + 1)
        kw["scale"] = scale
        # reorder_and_upcast_attn only changes the precision of the logits (fp32 either way here).
    elif e.scale is not None:  # the config key of the logit scale itself (None: head_dim ** -0.5)
        scale = cfg.get(e.scale)
        if scale is not None:
            kw["scale"] = float(scale)
    if e.softcap:
        kw["softcap"] = cfg.get("attn_logit_softcapping")
    kw["sinks"] = e.sinks
    if e.causal == "bert":
        kw["causal"] = module_kind == "causal"
        pet = cfg.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise _unsupported(
                family, "position_embedding_type", pet, "relative position scores are not ported"
            )
    elif e.causal == "vit":
        kw["causal"] = False
    return AttentionConfig(**kw)


def _is_kv_shared(cfg: _Cfg, e: Family, layer: int, n_layers: int) -> bool:
    """Whether layer ``layer`` reads another layer's keys and values (the last ``num_kv_shared_layers``)."""
    if e.kv_shared is None or not cfg.get(e.kv_shared):
        return False
    return layer >= n_layers - int(cfg.get(e.kv_shared))


def kv_producer(config, layer: int) -> int | None:
    """The index of the layer whose keys and values layer ``layer`` reads (transformers' ``"store"`` layer of
    ``Gemma4TextConfig.kv_sharing_modes``: the last layer before the shared ones with the same layer type), or
    None when layer ``layer`` computes its own. ValueError when no layer of the model produces them (every
    layer shared: the keys come from another model, e.g. Gemma4Assistant's target)."""
    config = text_config(config)
    family = family_of(config)
    e = FAMILY_TABLE.get(family) or _INFERRED.get(family)
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise ValueError(f"{NAME}: layer must be an int >= 0; got layer={layer!r}")
    if e is None or e.kv_shared is None:  # families without key/value sharing (or not known to share)
        return None
    cfg = _Cfg(config, e.defaults)
    n_layers = cfg.get("num_hidden_layers")
    if layer >= n_layers:
        raise ValueError(f"{NAME}: layer must be an int in [0, {n_layers}); got layer={layer!r}")
    if not _is_kv_shared(cfg, e, layer, n_layers):
        return None
    first = n_layers - int(cfg.get(e.kv_shared))
    lt = layer_types(config, family)
    for i in range(first - 1, -1, -1):
        if lt is None or lt[i] == lt[layer]:
            return i
    raise ValueError(
        f"{NAME}: layer {layer} ({lt[layer] if lt else 'no layer type'}) reads shared keys and values, but "
        f"no layer before the shared ones (layers >= {first}, {e.kv_shared}={cfg.get(e.kv_shared)}) has "
        "its layer type: they come from outside this model"
    )


def _layer_overrides(cfg: _Cfg, layer: int, layer_type: str | None) -> dict:
    """Gemma 4's per-layer ``head_dim`` / ``num_key_value_heads``: from a config object's ``per_layer_config``
    view, a config.json's ``per_layer_config`` dict (string keys), or ``global_head_dim`` /
    ``num_global_key_value_heads`` on full layers (what the config class derives them from)."""
    plc = cfg.get("per_layer_config")
    if isinstance(plc, dict):
        return dict(plc.get(str(layer)) or plc.get(layer) or {})
    if plc is not None:
        view = plc[layer]
        return {k: getattr(view, k, None) for k in ("head_dim", "num_key_value_heads")}
    if layer_type == "full_attention":
        out = {"head_dim": cfg.get("global_head_dim", 512)}
        if cfg.get("attention_k_eq_v", False):
            out["num_key_value_heads"] = cfg.get("num_global_key_value_heads")
        return out
    return {}


def _rotary_layout(module, config, family: str, H: int) -> str:
    """The rotary layout of a module with no family entry, told by running its own modeling file's rotary
    embedding class and ``apply_rotary_pos_emb`` on one query at position 3 (duck-typed: tensors made from
    the module's own weight) and matching the result against both layouts in float64."""
    import sys

    from attn_spec.rope import inv_freq

    mod = sys.modules.get(type(module).__module__)
    rot = getattr(mod, type(module).__name__.removesuffix("Attention") + "RotaryEmbedding", None)
    apply = getattr(mod, "apply_rotary_pos_emb", None)
    why = f"{NAME}: model_type={family!r} has no family entry, and its rotary layout cannot be told"
    if rot is None or apply is None:
        raise ValueError(f"{why}: its modeling file has no RotaryEmbedding class / apply_rotary_pos_emb")
    x = np.arange(1, H + 1, dtype=np.float64) / H
    try:
        w = module.q_proj.weight
        q = w.new_tensor(x.tolist()).float().reshape(1, 1, 1, H)
        cos, sin = rot(config)(q, w.new_tensor([[3]]).long())
        got = np.array(apply(q, q, cos, sin)[0].detach().double().cpu().reshape(-1).tolist())
    except Exception as err:  # noqa: BLE001 (whatever the module's code raises: it does not fit)
        raise ValueError(f"{why}: running it raised {type(err).__name__}: {err}") from None
    rp = RopeConfig.from_hf(_rope_parameters(_Cfg(config), family, None), _cfg_max(config))
    inv, factor = inv_freq(rp, H, None, np.float64)
    c, s = np.cos(3 * inv) * factor, np.sin(3 * inv) * factor
    F = H // 2
    half = np.concatenate([x[:F] * c - x[F:] * s, x[F:] * c + x[:F] * s])
    inter = np.empty(H)
    inter[0::2], inter[1::2] = x[0::2] * c - x[1::2] * s, x[1::2] * c + x[0::2] * s
    for layout, want in (("half", half), ("interleaved", inter)):
        if np.allclose(got, want, rtol=1e-3, atol=1e-4):
            return layout
    raise ValueError(f"{why}: its rotation at position 3 matches neither the half nor the interleaved layout")


def _cfg_max(config):
    return _Cfg(config).get("max_position_embeddings")


def _infer_family(module, config, family: str) -> Family:
    """The entry of a model_type with no table entry, decided from its module's parameters and refused
    (naming the parameter or knob) where they or the config go beyond the known mechanisms."""
    cfg = _Cfg(config)
    for knob in UNKNOWN_FAMILY_KNOBS:
        val = cfg.get(knob)
        rp = cfg.get("rope_parameters")
        if val is None and isinstance(rp, dict):
            val = rp.get(knob)
        if knob in ("partial_rotary_factor", "rotary_pct") and val == 1.0:
            val = None
        if knob == "use_bidirectional_attention" and not val:
            val = None
        if knob in ("sliding_window", "use_sliding_window") and (
            not val or hasattr(module, "sliding_window")
        ):
            val = None
        if knob == "layer_types" and all(t == "full_attention" for t in val or ()):
            val = None  # per-layer-type rules (windows, NoPE on some types) are the family's own code
        if val is not None and val is not False:
            raise ValueError(
                f"{NAME}: model_type={family!r} has no family entry, and its config sets {knob}={val!r}, "
                "which only the family's own modeling code could say how it reads; add a Family entry"
            )
    shapes = {k: tuple(p.shape) for k, p in module.named_parameters()}
    E, N = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    K = cfg.get("num_key_value_heads") or N
    H = cfg.get("head_dim") or E // N
    want = {"q_proj.weight": (N * H, E), "k_proj.weight": (K * H, E), "v_proj.weight": (K * H, E)}
    want["o_proj.weight"] = (E, N * H)
    for key, shape in shapes.items():
        proj = key.split(".")[0]
        ok = key in want and shape == want[key]
        ok = ok or (
            key.endswith(".bias") and f"{proj}.weight" in want and shape == (want[f"{proj}.weight"][0],)
        )
        ok = ok or (key == "q_norm.weight" and shape in ((H,), (N * H,)))
        ok = ok or (key == "k_norm.weight" and shape in ((H,), (K * H,)))
        if not ok:
            raise ValueError(
                f"{NAME}: model_type={family!r} has no family entry, and its attention's parameter {key} "
                f"{shape} fits no known mechanism (expected q/k/v/o_proj of {want} with optional biases, "
                "q_norm/k_norm of width H or N·H)"
            )
    missing = [k for k in want if k not in shapes]
    if missing:
        raise ValueError(
            f"{NAME}: model_type={family!r} has no family entry and its attention lacks {missing}"
        )
    qkv = {f"{p}.bias" in shapes for p in ("q_proj", "k_proj", "v_proj")}
    if len(qkv) != 1:
        raise ValueError(
            f"{NAME}: model_type={family!r}: q/k/v biases differ (q, k, v must all have one or none)"
        )
    qk_norm = "none"
    if "q_norm.weight" in shapes or "k_norm.weight" in shapes:
        norm_types = {type(getattr(module, n, None)).__name__ for n in ("q_norm", "k_norm")}
        if any("RMSNorm" not in t for t in norm_types) or any(t.startswith("Gemma") for t in norm_types):
            raise ValueError(
                f"{NAME}: model_type={family!r}: q/k norms {sorted(norm_types)} are not plain RMSNorms"
            )
        qk_norm = "head" if shapes.get("q_norm.weight") == (H,) else "full"
    return Family(
        rope=_rotary_layout(module, config, family, H),
        qkv_bias=qkv.pop(),
        o_bias="o_proj.bias" in shapes,
        qk_norm=qk_norm,
        window="config" if getattr(module, "sliding_window", None) else None,
    )


# -------------------------------------------------------------------------------------------------------
# Weights: the family's state dict (NumPy arrays) ↔ ours (``attn_spec.attention.state_dict_shapes`` keys).
# -------------------------------------------------------------------------------------------------------

BERT_IGNORED = ("output.LayerNorm.weight", "output.LayerNorm.bias")


def ignored_keys(family: str) -> tuple[str, ...]:
    """Keys of the family's module that the port leaves to the caller (BERT-like post-LN)."""
    return BERT_IGNORED if entry(family).weights == "bert" and entry(family).causal == "bert" else ()


def _check_keys(family: str, sd: dict, want: list[str]) -> None:
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want and k not in ignored_keys(family)]
    if missing or unexpected:
        raise ValueError(
            f"{NAME}: the {family} attention's state dict does not match its config: missing {missing}, "
            f"unexpected {unexpected}"
        )


def hf_state_dict_keys(family: str, c: AttentionConfig) -> list[str]:
    """The family's attention keys (what :func:`to_hf` returns)."""
    return list(to_hf({k: np.zeros(s, np.float32) for k, s in state_dict_shapes(c).items()}, family, c))


CODEGEN_SHARDS = 4  # CodeGenAttention.mp_num


def _layout(e: Family, c: AttentionConfig) -> str:
    """The weight layout of this layer: GPT-BigCode's ``c_attn`` is rows [all q; k; v] with multi-query (one
    key/value head, ``qkv_rows``) and per head [q, k, v] otherwise (``neox``)."""
    if e.weights == "bigcode":
        return "qkv_rows" if c.K < c.N else "neox"
    return e.weights


def from_hf(sd: dict[str, np.ndarray], family: str, c: AttentionConfig) -> dict[str, np.ndarray]:
    """The family's attention state dict → ours (``q_proj.weight (N·H, E)``…); data movement only."""
    _check_keys(family, sd, hf_state_dict_keys(family, c))
    E, N, K, H = c.E, c.N, c.K, c.H
    e = entry(family)
    layout = _layout(e, c)
    out: dict[str, np.ndarray] = {}
    ren = dict(e.renames)
    if layout == "qkv_rows":
        fused = ren.get("qkv_proj", "qkv_proj")
        for suffix in ("weight", "bias") if c.q_bias else ("weight",):
            w = sd[f"{fused}.{suffix}"]
            out[f"q_proj.{suffix}"], out[f"k_proj.{suffix}"], out[f"v_proj.{suffix}"] = (
                w[: N * H],
                w[N * H : N * H + K * H],
                w[N * H + K * H :],
            )
    elif layout == "grouped":  # (K, N/K + 2, H) rows: each group's queries, then its key and value
        G = N // K
        for suffix in ("weight", "bias") if c.q_bias else ("weight",):
            a = sd[f"query_key_value.{suffix}"]
            a = a.reshape(K, G + 2, H, *a.shape[1:])
            out[f"q_proj.{suffix}"] = np.ascontiguousarray(a[:, :G].reshape(N * H, *a.shape[3:]))
            out[f"k_proj.{suffix}"] = np.ascontiguousarray(a[:, G].reshape(K * H, *a.shape[3:]))
            out[f"v_proj.{suffix}"] = np.ascontiguousarray(a[:, G + 1].reshape(K * H, *a.shape[3:]))
    elif layout == "codegen":  # rows (4 shards, [q, v, k], E / 4): heads are shard-major
        w = sd["qkv_proj.weight"].reshape(CODEGEN_SHARDS, 3, -1, sd["qkv_proj.weight"].shape[1])
        for j, p in enumerate(("q_proj", "v_proj", "k_proj")):
            out[f"{p}.weight"] = np.ascontiguousarray(w[:, j].reshape(-1, w.shape[-1]))
    elif layout == "neox":
        for suffix in ("weight", "bias") if c.q_bias else ("weight",):
            a = sd[f"{ren.get('query_key_value', 'query_key_value')}.{suffix}"]
            a = a.reshape(N, 3, H, *a.shape[1:])
            for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{p}.{suffix}"] = np.ascontiguousarray(a[:, j].reshape(N * H, *a.shape[3:]))
    elif layout == "conv1d":
        w, b = sd["c_attn.weight"], sd["c_attn.bias"]  # Conv1D: (in, out)
        for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{p}.weight"] = np.ascontiguousarray(w[:, j * E : (j + 1) * E].T)
            out[f"{p}.bias"] = b[j * E : (j + 1) * E].copy()
        out["o_proj.weight"] = np.ascontiguousarray(sd["c_proj.weight"].T)
        out["o_proj.bias"] = sd["c_proj.bias"].copy()
    for key in state_dict_shapes(c):
        if key not in out:
            proj, _, suffix = key.partition(".")
            theirs = ren.get(proj, proj)
            if e.qk_norm_list and proj in ("q_norm", "k_norm"):  # one norm per head: stacked (heads, H)
                heads = state_dict_shapes(c)[key][0]
                out[key] = np.stack([np.asarray(sd[f"{theirs}.norms.{i}.{suffix}"]) for i in range(heads)])
            else:
                out[key] = np.asarray(sd[f"{theirs}.{suffix}" if proj in ren else key])
    return out


def to_hf(ours: dict[str, np.ndarray], family: str, c: AttentionConfig) -> dict[str, np.ndarray]:
    """Ours → the family's attention state dict (inverse of :func:`from_hf`, bit-exact)."""
    N, K, H = c.N, c.K, c.H
    e = entry(family)
    layout = _layout(e, c)
    ren = dict(e.renames)
    ours = {k: np.asarray(v) for k, v in ours.items()}
    out: dict[str, np.ndarray] = {}
    qkv = ("q_proj", "k_proj", "v_proj")
    done: set[str] = set()
    if layout == "qkv_rows":
        for suffix in ("weight", "bias") if c.q_bias else ("weight",):
            fused = np.concatenate([ours[f"{p}.{suffix}"] for p in qkv], axis=0)
            out[f"{ren.get('qkv_proj', 'qkv_proj')}.{suffix}"] = fused
            done |= {f"{p}.{suffix}" for p in qkv}
    elif layout == "grouped":
        G = N // K
        for suffix in ("weight", "bias") if c.q_bias else ("weight",):
            rest = ours[f"q_proj.{suffix}"].shape[1:]
            q = ours[f"q_proj.{suffix}"].reshape(K, G, H, *rest)
            k = ours[f"k_proj.{suffix}"].reshape(K, 1, H, *rest)
            v = ours[f"v_proj.{suffix}"].reshape(K, 1, H, *rest)
            out[f"query_key_value.{suffix}"] = np.concatenate([q, k, v], axis=1).reshape(-1, *rest)
            done |= {f"{p}.{suffix}" for p in qkv}
    elif layout == "codegen":
        parts = [ours[f"{p}.weight"].reshape(CODEGEN_SHARDS, -1, ours[f"{p}.weight"].shape[1]) for p in qkv]
        q, k, v = parts
        out["qkv_proj.weight"] = np.stack([q, v, k], axis=1).reshape(-1, q.shape[-1])
        done |= {f"{p}.weight" for p in qkv}
    elif layout == "neox":
        for suffix in ("weight", "bias") if c.q_bias else ("weight",):
            parts = [ours[f"{p}.{suffix}"].reshape(N, H, *ours[f"{p}.{suffix}"].shape[1:]) for p in qkv]
            fused = np.stack(parts, axis=1).reshape(3 * N * H, *parts[0].shape[2:])
            out[f"{ren.get('query_key_value', 'query_key_value')}.{suffix}"] = fused
            done |= {f"{p}.{suffix}" for p in qkv}
    elif layout == "conv1d":
        out["c_attn.weight"] = np.concatenate([ours[f"{p}.weight"].T for p in qkv], axis=1)
        out["c_attn.bias"] = np.concatenate([ours[f"{p}.bias"] for p in qkv])
        out["c_proj.weight"] = np.ascontiguousarray(ours["o_proj.weight"].T)
        out["c_proj.bias"] = ours["o_proj.bias"]
        done = set(ours)
    for key in state_dict_shapes(c):
        if key in done:
            continue
        proj, _, suffix = key.partition(".")
        theirs = ren.get(proj, proj)
        if e.qk_norm_list and proj in ("q_norm", "k_norm"):  # one norm per head: rows of ours
            for i, row in enumerate(ours[key]):
                out[f"{theirs}.norms.{i}.{suffix}"] = np.ascontiguousarray(row)
        else:
            out[f"{theirs}.{suffix}" if proj in ren else key] = ours[key]
    return out


def layer_prefix(keys, layer: int) -> str:
    """The key prefix of layer ``layer``'s attention in a checkpoint (e.g. ``model.layers.3.self_attn.``)."""
    found = set()
    for infix in LAYER_INFIXES:
        infix = infix.format(i=layer)
        for key in keys:
            at = key.find(infix)
            if at == 0 or (at > 0 and key[at - 1] == "."):
                found.add(key[: at + len(infix)])
    if len(found) != 1:
        raise ValueError(
            f"load_layer: cannot find layer {layer}'s attention in the checkpoint "
            f"(looked for {[i.format(i=layer) for i in LAYER_INFIXES]}); found prefixes {sorted(found)}"
        )
    return found.pop()


def _bloom_module_config(m) -> dict:
    return {
        "model_type": "bloom",
        "hidden_size": int(m.hidden_size),
        "n_head": int(m.num_heads),
        "attention_dropout": float(m.attention_dropout.p),
        "hidden_dropout": float(m.hidden_dropout),
    }


def _mpt_module_config(m) -> dict:
    scale = float(m.softmax_scale)
    default = 1 / math.sqrt(m.hidden_size / m.n_heads)  # what MptAttention makes of softmax_scale=None
    return {
        "model_type": "mpt",
        "d_model": int(m.hidden_size),
        "n_heads": int(m.n_heads),
        "attn_config": {
            "softmax_scale": None if scale == default else scale,
            "clip_qkv": m.clip_qkv,
            "attn_pdrop": float(m.attn_dropout_p),
        },
    }


def _xglm_module_config(m) -> dict:
    return {
        "model_type": "xglm",
        "hidden_size": int(m.embed_dim),
        "num_attention_heads": int(m.num_heads),
        "attention_dropout": float(m.dropout or 0.0),
        "attention_bias": m.q_proj.bias is not None,
    }


# Attention modules that keep no ``config``: the config knobs their forward reads, from their own attributes.
_CONFIGLESS = {
    "BloomAttention": _bloom_module_config,
    "MptAttention": _mpt_module_config,
    "XGLMAttention": _xglm_module_config,
}


def describe_module(module, post_norm_outside: bool = False) -> tuple[str, AttentionConfig]:
    """``(family, AttentionConfig)`` of a transformers attention module, read duck-typed: its ``config``, its
    ``layer_idx`` and the attributes that differ from the config (GPT-2 cross-attention, BERT's causal flag).

    Accepted: the ``self_attn`` (``attention`` for GPT-NeoX, ``attn`` for GPT-2 and MPT, ``self_attention``
    for Bloom and Falcon; Bloom's and MPT's modules keep no config: their own attributes are read) of a
    decoder layer, ViT's ``ViTAttention`` and BERT's (RoBERTa's, XLM-R's) attention block (with
    ``post_norm_outside=True``, see :data:`BERT_POST_NORM`). A model_type with no family entry is decided from
    the module (see the module docstring).
    """
    import dataclasses

    config = (
        getattr(module, "config", None)
        or getattr(getattr(module, "self", None), "config", None)
        or getattr(getattr(module, "attention", None), "config", None)  # YOLOS
    )
    if config is None and type(module).__name__ in _CONFIGLESS:
        config = _CONFIGLESS[type(module).__name__](module)
    if config is None:
        raise ValueError(
            f"{NAME}: expected a transformers attention module with a .config; got {type(module).__name__}"
        )
    config = text_config(config)
    family = _Cfg(config).get("model_type")
    inferred = family not in FAMILY_TABLE
    if inferred:
        _INFERRED[family] = _infer_family(module, config, family)
    e = entry(family)
    training = bool(getattr(module, "training", False))
    kind = None
    if e.causal == "bert":
        inner = getattr(module, "self", None)
        if inner is None or not hasattr(module, "output"):
            raise ValueError(
                f"{NAME}: BERT ports the BertAttention block (layer.attention; {family} alike); got "
                f"{type(module).__name__}"
            )
        if getattr(module, "is_cross_attention", False) or getattr(inner, "is_cross_attention", False):
            raise _unsupported(family, "is_cross_attention", True, "cross-attention is not ported")
        if not post_norm_outside:
            raise ValueError(f"{NAME}: {BERT_POST_NORM}")
        if training and _Cfg(config).get("hidden_dropout_prob", 0.0):
            raise _unsupported(
                family,
                "hidden_dropout_prob",
                _Cfg(config).get("hidden_dropout_prob"),
                "BertSelfOutput's dropout in training mode is outside Attention; call .eval()",
            )
        kind = "causal" if getattr(inner, "is_causal", False) else "block"
        layer = getattr(inner, "layer_idx", None)
    else:
        layer = getattr(module, "layer_idx", None)
        if layer is None:  # GPT-Neo's attention keeps layer_id
            layer = getattr(module, "layer_id", None)
    if e.weights == "conv1d" and getattr(module, "is_cross_attention", False):
        raise _unsupported(family, "is_cross_attention", True, "cross-attention is not ported")
    for knob, why in e.train_refuse:
        if training and _Cfg(config).get(knob, 0.0):
            raise _unsupported(family, knob, _Cfg(config).get(knob), why)
    _, c = attention_config(config, 0 if layer is None else int(layer), module_kind=kind)
    if inferred:  # the module's own logit scale and window
        scaling = getattr(module, "scaling", None)
        if scaling is not None and abs(float(scaling) - c.H**-0.5) > 1e-12 * c.H**-0.5:
            c = dataclasses.replace(c, scale=float(scaling))
        c = dataclasses.replace(c, sliding_window=getattr(module, "sliding_window", None) or None)
    return family, c


# -------------------------------------------------------------------------------------------------------
# Checkpoints: config.json and safetensors (sharded through model.safetensors.index.json), NumPy only.
# -------------------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": ("float64", "<f8"),
    "F32": ("float32", "<f4"),
    "F16": ("float16", "<f2"),
    "BF16": ("bfloat16", "<u2"),  # NumPy has no bf16: its raw bits, for the twins to reinterpret
    "I64": ("int64", "<i8"),
    "I32": ("int32", "<i4"),
    "U8": ("uint8", "u1"),
    "BOOL": ("bool", "?"),
}


def _read_safetensors(path, wanted) -> dict[str, tuple[np.ndarray, str]]:
    """``{name: (array, dtype name)}`` of the ``wanted`` tensors of one ``.safetensors`` file (a little-endian
    u64 header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the raw bytes)."""
    import json

    out = {}
    with open(path, "rb") as f:
        (n,) = np.frombuffer(f.read(8), "<u8")
        header = json.loads(f.read(int(n)))
        base = 8 + int(n)
        for name in wanted:
            meta = header[name]
            if meta["dtype"] not in _ST_DTYPES:
                raise ValueError(f"load_layer: {name} has unsupported safetensors dtype {meta['dtype']}")
            dname, np_dt = _ST_DTYPES[meta["dtype"]]
            start, stop = meta["data_offsets"]
            f.seek(base + start)
            a = np.frombuffer(f.read(stop - start), np_dt).reshape(meta["shape"])
            out[name] = (np.array(a), dname)  # a writable copy in native order
    return out


def _safetensors_names(path) -> list[str]:
    import json

    with open(path, "rb") as f:
        (n,) = np.frombuffer(f.read(8), "<u8")
        return [k for k in json.loads(f.read(int(n))) if k != "__metadata__"]


def read_layer(checkpoint_dir, layer: int) -> tuple[str, AttentionConfig, dict[str, np.ndarray], str]:
    """``(family, config, state dict in ours, dtype name)`` of layer ``layer`` of a local checkpoint
    (``config.json`` + ``model.safetensors`` or the shards of ``model.safetensors.index.json``). bf16
    arrays come back as their uint16 bit patterns (dtype name ``"bfloat16"``)."""
    import json
    import os

    with open(os.path.join(checkpoint_dir, "config.json")) as f:
        config = json.load(f)
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        single = os.path.join(checkpoint_dir, "model.safetensors")
        if not os.path.exists(single):
            raise ValueError(f"load_layer: no model.safetensors(.index.json) in {checkpoint_dir}")
        weight_map = {k: "model.safetensors" for k in _safetensors_names(single)}
    try:
        family = family_of(text_config(config))
        kind = None
        if entry(family).causal == "bert":
            kind = "causal" if _Cfg(config).get("is_decoder", False) else "block"
        family, c = attention_config(config, layer, module_kind=kind)
    except ValueError as err:  # the errors name the function the user called
        raise ValueError(_renamed(str(err), "load_layer")) from None
    prefix = layer_prefix(weight_map, layer)
    names = [k for k in weight_map if k.startswith(prefix)]
    by_file: dict[str, list[str]] = {}
    for k in names:
        by_file.setdefault(weight_map[k], []).append(k)
    tensors = {}
    for fname, ks in by_file.items():
        tensors.update(_read_safetensors(os.path.join(checkpoint_dir, fname), ks))
    dtypes = {d for _, d in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"load_layer: layer {layer}'s attention weights have mixed dtypes {sorted(dtypes)}")
    sd = {k[len(prefix) :]: a for k, (a, _) in tensors.items()}
    try:
        ours = from_hf(sd, family, c)
    except ValueError as err:
        raise ValueError(_renamed(str(err), "load_layer")) from None
    return family, c, ours, dtypes.pop()


def _renamed(message: str, name: str) -> str:
    """``message`` with the ``from_hf:`` prefix of this module's errors replaced by ``name:``."""
    return f"{name}: {message.removeprefix(NAME + ': ')}"
