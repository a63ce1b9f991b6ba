"""Hugging Face attention layers as :class:`attn_spec.attention.AttentionConfig`: the framework-neutral part
of ``jax_attn.hf`` / ``torch_attn.hf`` (config → config per family, weight names and fused layouts both ways).

Nothing here imports torch or transformers: a config is read duck-typed (a ``transformers`` config object, or
the ``config.json`` dict of a checkpoint), weights are NumPy arrays. Weight conversion only moves data
(slices, transposes, concatenations), so it is bit-exact in any dtype (bf16 may travel as its raw 16-bit
pattern).

Families (``config.model_type``) and where their attention's weights live (prefix ``<p>`` = the module):

==============  ============================================================================================
llama, mistral, ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (+ ``q_norm``/``k_norm`` for qwen3, gemma3,
qwen2, qwen3,   olmo2; ``sinks`` for gpt-oss), transformers' ``nn.Linear`` layout (out, in) = ours
gemma2,
gemma3_text,
olmo2, gpt_oss,
vit
phi3            ``qkv_proj.weight (N·H + 2·K·H, E)``: q, k, v stacked by rows; ``o_proj``
gpt_neox        ``query_key_value.weight (N·3·H, E)``: per head, q, k, v (``(N, 3, H)`` rows); ``dense``
gpt2            ``c_attn.weight (E, 3E)`` (``Conv1D``: (in, out), columns [q | k | v]); ``c_proj (E, E)``
bert            ``BertAttention``: ``self.query/key/value``, ``output.dense`` (+ ``output.LayerNorm``, not
                ported: see :data:`BERT_POST_NORM`)
==============  ============================================================================================

Every config knob that changes the attention and that ``AttentionConfig`` cannot express raises
``ValueError`` naming it (:func:`attention_config`). Knobs that do not change the attention layer's math
(``attn_implementation``, ``pretraining_tp``, MLP and embedding settings) are ignored.
"""

from __future__ import annotations

import numpy as np

from attn_spec.attention import AttentionConfig, state_dict_shapes
from attn_spec.rope import RopeConfig

NAME = "from_hf"
DECODERS = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "gpt_oss",
    "gpt_neox",
    "gpt2",
)
ENCODERS = ("bert", "vit")
FAMILIES = DECODERS + ENCODERS
BERT_POST_NORM = (
    "BertAttention ends in BertSelfOutput: dropout, the residual add and LayerNorm(y + x) (post-LN), which "
    "Attention does not express; pass post_norm_outside=True to port it up to output.dense and apply "
    "output.LayerNorm(y + x) yourself"
)
# Legacy/alias names of config.json keys (the config objects resolve them through their attribute_map).
_ALIASES = {
    "hidden_size": ("n_embd",),
    "num_attention_heads": ("n_head",),
    "num_hidden_layers": ("n_layer",),
}
# Where a layer's attention lives in a checkpoint's keys (after an optional model prefix).
LAYER_INFIXES = ("layers.{i}.self_attn.", "layers.{i}.attention.", "h.{i}.attn.", "layer.{i}.attention.")


class _Cfg:
    """Read a transformers config object or a config.json dict the same way."""

    def __init__(self, config):
        self.obj = config

    def get(self, key, default=None):
        for k in (key, *_ALIASES.get(key, ())):
            if isinstance(self.obj, dict):
                if k in self.obj:
                    return self.obj[k]
            elif hasattr(self.obj, k):
                return getattr(self.obj, k)
        return default


def family_of(config) -> str:
    """The family name (``model_type``); a multimodal Gemma 3 config reads its ``text_config``."""
    cfg = _Cfg(config)
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{NAME}: unsupported model_type={family!r}; supported: {FAMILIES}")
    return family


def text_config(config):
    """``config`` itself, or the ``text_config`` of a multimodal wrapper (e.g. Gemma 3's)."""
    tc = _Cfg(config).get("text_config")
    return config if tc is None else tc


def layer_types(config, family: str) -> list[str] | None:
    """transformers' ``layer_types`` (``"sliding_attention"``/``"full_attention"`` per layer), derived as its
    config classes derive it when a ``config.json`` lacks it."""
    cfg = _Cfg(config)
    lt = cfg.get("layer_types")
    if lt is not None:
        return list(lt)
    n = cfg.get("num_hidden_layers")
    if family in ("qwen2", "qwen3"):
        w = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
        first = cfg.get("max_window_layers", 28)
        return ["sliding_attention" if w is not None and i >= first else "full_attention" for i in range(n)]
    if family in ("gemma2", "gpt_oss"):
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if family == "gemma3_text":
        p = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
        return ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]
    return None


def _rope_parameters(cfg: _Cfg, family: str, layer_type: str | None) -> dict:
    """The layer's ``rope_parameters`` (v5 name), from the v5 dict or the legacy keys of older configs."""
    rp = cfg.get("rope_parameters")
    if family == "gemma3_text":
        if isinstance(rp, dict) and layer_type in rp:
            rp = rp[layer_type]
        elif layer_type == "sliding_attention":  # legacy: rope_local_base_freq, unscaled
            rp = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
        else:
            rp = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
            rp.setdefault("rope_theta", cfg.get("rope_theta", 1e6))
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
    return rp


def _unsupported(family: str, knob: str, value, why: str) -> ValueError:
    return ValueError(f"{NAME}: {family} config knob {knob}={value!r} is not supported: {why}")


def attention_config(
    config, layer: int = 0, *, module_kind: str | None = None
) -> tuple[str, AttentionConfig]:
    """``(family, AttentionConfig)`` of layer ``layer``'s attention.

    Args:
      config: a transformers config object or a ``config.json`` dict.
      layer: the layer index (window and rope differ per layer in Gemma 2/3, gpt-oss, Qwen2/3).
      module_kind: for BERT, ``"block"`` (``BertAttention``, the default) — the post-LN is checked by the
        caller; ``"causal"`` when the BERT layer is a decoder (``is_decoder``).

    Raises:
      ValueError: naming the first knob the layer sets that ``AttentionConfig`` cannot express.
    """
    config = text_config(config)
    family = family_of(config)
    cfg = _Cfg(config)
    E, N = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    n_layers = cfg.get("num_hidden_layers")
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0 or (n_layers and layer >= n_layers):
        raise ValueError(f"{NAME}: layer must be an int in [0, {n_layers}); got layer={layer!r}")
    K = cfg.get("num_key_value_heads") or N
    H = cfg.get("head_dim") or E // N
    kw: dict = {"hidden_size": E, "num_heads": N, "num_kv_heads": K, "head_dim": H}
    lt = layer_types(config, family)
    layer_type = lt[layer] if lt is not None else None
    if lt is not None and layer_type not in ("sliding_attention", "full_attention"):
        raise _unsupported(family, f"layer_types[{layer}]", layer_type, "known: sliding/full_attention")

    # Attention dropout (training mode only), under each family's name.
    drop_key = {
        "gpt2": "attn_pdrop",
        "bert": "attention_probs_dropout_prob",
        "vit": "attention_probs_dropout_prob",
    }
    kw["dropout"] = float(cfg.get(drop_key.get(family, "attention_dropout"), 0.0) or 0.0)

    if family in ("gpt2", "bert", "vit"):
        kw.update(rope=None, num_kv_heads=N, head_dim=E // N)
    else:
        rp = _rope_parameters(cfg, family, layer_type)
        try:
            kw["rope"] = RopeConfig.from_hf(rp, max_position_embeddings=cfg.get("max_position_embeddings"))
        except ValueError as err:
            raise ValueError(f"{NAME}: {family} rope_parameters={rp}: {err}") from err

    bias = bool(cfg.get("attention_bias", False))
    window = cfg.get("sliding_window")
    if family in ("llama", "olmo2", "gemma2", "gemma3_text", "qwen3", "gpt_oss"):
        kw.update(q_bias=bias, k_bias=bias, v_bias=bias, o_bias=bias)
    if family == "qwen2":
        kw.update(q_bias=True, k_bias=True, v_bias=True)
    if family == "gpt_neox":
        kw.update(q_bias=bias, k_bias=bias, v_bias=bias, o_bias=bias, num_kv_heads=N, head_dim=E // N)
    if family in ("gpt2", "bert"):
        kw.update(q_bias=True, k_bias=True, v_bias=True, o_bias=True)
    if family == "vit":
        qkv = bool(cfg.get("qkv_bias", True))
        kw.update(q_bias=qkv, k_bias=qkv, v_bias=qkv, o_bias=True)

    # Sliding windows: config-wide for Mistral and Phi-3; per layer type elsewhere.
    if family == "mistral":
        if cfg.get("layer_types") is not None:
            raise _unsupported(
                family, "layer_types", cfg.get("layer_types"), "MistralModel ignores it (use Ministral)"
            )
        kw["sliding_window"] = window
    elif family == "phi3":
        kw["sliding_window"] = window
    elif family in ("qwen2", "qwen3", "gemma2", "gemma3_text", "gpt_oss"):
        if family in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        kw["sliding_window"] = window if layer_type == "sliding_attention" else None
        if layer_type == "sliding_attention" and window is None:
            raise _unsupported(family, "sliding_window", None, f"layer {layer} is a sliding_attention layer")

    if family in ("qwen3", "gemma3_text"):
        kw.update(qk_norm="head", qk_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)))
    if family == "olmo2":
        kw.update(qk_norm="full", qk_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)))
    if family in ("gemma2", "gemma3_text"):
        kw["qk_norm_offset"] = 1.0 if family == "gemma3_text" else 0.0
        kw["query_pre_attn_scalar"] = cfg.get("query_pre_attn_scalar", 256)
        # transformers' Gemma3Attention never passes attn_logit_softcapping to its attention (the config field
        # is unused there), so the faithful port has no soft-cap for Gemma 3.
        kw["softcap"] = cfg.get("attn_logit_softcapping") if family == "gemma2" else None
        if cfg.get("use_bidirectional_attention"):
            raise _unsupported(
                family,
                "use_bidirectional_attention",
                True,
                "the bidirectional sliding-window mask is not ported",
            )
    if family == "gpt_oss":
        kw["sinks"] = True
    if family == "gpt2":
        scale = (E // N) ** -0.5 if cfg.get("scale_attn_weights", True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer + 1)
        kw["scale"] = scale
        # reorder_and_upcast_attn only changes the precision of the logits (fp32 either way here).
    if family == "bert":
        kw["causal"] = module_kind == "causal"
        pet = cfg.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise _unsupported(
                family, "position_embedding_type", pet, "relative position scores are not ported"
            )
    if family == "vit":
        kw["causal"] = False
    return family, AttentionConfig(**kw)


# -------------------------------------------------------------------------------------------------------
# Weights: the family's state dict (NumPy arrays) ↔ ours (``attn_spec.attention.state_dict_shapes`` keys).
# -------------------------------------------------------------------------------------------------------

_RENAMES = {
    "bert": {"q_proj": "self.query", "k_proj": "self.key", "v_proj": "self.value", "o_proj": "output.dense"},
    "gpt_neox": {"o_proj": "dense"},
    "gpt2": {"o_proj": "c_proj"},
}
BERT_IGNORED = ("output.LayerNorm.weight", "output.LayerNorm.bias")


def _check_keys(family: str, sd: dict, want: list[str]) -> None:
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want and not (family == "bert" and k in BERT_IGNORED)]
    if missing or unexpected:
        raise ValueError(
            f"{NAME}: the {family} attention's state dict does not match its config: missing {missing}, "
            f"unexpected {unexpected}"
        )


def hf_state_dict_keys(family: str, c: AttentionConfig) -> list[str]:
    """The family's attention keys (what :func:`to_hf` returns)."""
    return list(to_hf({k: np.zeros(s, np.float32) for k, s in state_dict_shapes(c).items()}, family, c))


def from_hf(sd: dict[str, np.ndarray], family: str, c: AttentionConfig) -> dict[str, np.ndarray]:
    """The family's attention state dict → ours (``q_proj.weight (N·H, E)``…); data movement only."""
    _check_keys(family, sd, hf_state_dict_keys(family, c))
    E, N, K, H = c.E, c.N, c.K, c.H
    out: dict[str, np.ndarray] = {}
    ren = _RENAMES.get(family, {})
    if family == "phi3":
        w = sd["qkv_proj.weight"]
        out["q_proj.weight"], out["k_proj.weight"], out["v_proj.weight"] = (
            w[: N * H],
            w[N * H : N * H + K * H],
            w[N * H + K * H :],
        )
    elif family == "gpt_neox":
        for suffix in ("weight", "bias") if c.q_bias else ("weight",):
            a = sd[f"query_key_value.{suffix}"]
            a = a.reshape(N, 3, H, *a.shape[1:])
            for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{p}.{suffix}"] = np.ascontiguousarray(a[:, j].reshape(N * H, *a.shape[3:]))
    elif family == "gpt2":
        w, b = sd["c_attn.weight"], sd["c_attn.bias"]  # Conv1D: (in, out)
        for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{p}.weight"] = np.ascontiguousarray(w[:, j * E : (j + 1) * E].T)
            out[f"{p}.bias"] = b[j * E : (j + 1) * E].copy()
        out["o_proj.weight"] = np.ascontiguousarray(sd["c_proj.weight"].T)
        out["o_proj.bias"] = sd["c_proj.bias"].copy()
    for key in state_dict_shapes(c):
        if key not in out:
            proj, _, suffix = key.partition(".")
            out[key] = np.asarray(sd[f"{ren[proj]}.{suffix}" if proj in ren else key])
    return out


def to_hf(ours: dict[str, np.ndarray], family: str, c: AttentionConfig) -> dict[str, np.ndarray]:
    """Ours → the family's attention state dict (inverse of :func:`from_hf`, bit-exact)."""
    N, H = c.N, c.H
    ours = {k: np.asarray(v) for k, v in ours.items()}
    out: dict[str, np.ndarray] = {}
    qkv = ("q_proj", "k_proj", "v_proj")
    done: set[str] = set()
    if family == "phi3":
        out["qkv_proj.weight"] = np.concatenate([ours[f"{p}.weight"] for p in qkv], axis=0)
        done |= {f"{p}.weight" for p in qkv}
    elif family == "gpt_neox":
        for suffix in ("weight", "bias") if c.q_bias else ("weight",):
            parts = [ours[f"{p}.{suffix}"].reshape(N, H, *ours[f"{p}.{suffix}"].shape[1:]) for p in qkv]
            out[f"query_key_value.{suffix}"] = np.stack(parts, axis=1).reshape(3 * N * H, *parts[0].shape[2:])
            done |= {f"{p}.{suffix}" for p in qkv}
    elif family == "gpt2":
        out["c_attn.weight"] = np.concatenate([ours[f"{p}.weight"].T for p in qkv], axis=1)
        out["c_attn.bias"] = np.concatenate([ours[f"{p}.bias"] for p in qkv])
        out["c_proj.weight"] = np.ascontiguousarray(ours["o_proj.weight"].T)
        out["c_proj.bias"] = ours["o_proj.bias"]
        done = set(ours)
    ren = _RENAMES.get(family, {})
    for key in state_dict_shapes(c):
        if key in done:
            continue
        proj, _, suffix = key.partition(".")
        out[f"{ren[proj]}.{suffix}" if proj in ren else key] = ours[key]
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


def describe_module(module, post_norm_outside: bool = False) -> tuple[str, AttentionConfig]:
    """``(family, AttentionConfig)`` of a transformers attention module, read duck-typed: its ``config``, its
    ``layer_idx`` and the attributes that differ from the config (GPT-2 cross-attention, BERT's causal flag).

    Accepted: the ``self_attn`` (``attention`` for GPT-NeoX, ``attn`` for GPT-2) of a decoder layer, ViT's
    ``ViTAttention`` and BERT's ``BertAttention`` block (with ``post_norm_outside=True``, see
    :data:`BERT_POST_NORM`).
    """
    config = getattr(module, "config", None) or getattr(getattr(module, "self", None), "config", None)
    if config is None:
        raise ValueError(
            f"{NAME}: expected a transformers attention module with a .config; got {type(module).__name__}"
        )
    family = family_of(text_config(config))
    training = bool(getattr(module, "training", False))
    kind = None
    if family == "bert":
        inner = getattr(module, "self", None)
        if inner is None or not hasattr(module, "output"):
            raise ValueError(
                f"{NAME}: BERT ports the BertAttention block (layer.attention); got {type(module).__name__}"
            )
        if getattr(module, "is_cross_attention", False):
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
    if family == "gpt2":
        if getattr(module, "is_cross_attention", False):
            raise _unsupported(family, "is_cross_attention", True, "cross-attention is not ported")
        if training and _Cfg(config).get("resid_pdrop", 0.0):
            raise _unsupported(
                family,
                "resid_pdrop",
                _Cfg(config).get("resid_pdrop"),
                "GPT2Attention's output dropout in training mode is not ported; call .eval()",
            )
    _, c = attention_config(config, 0 if layer is None else int(layer), module_kind=kind)
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
        if family == "bert":
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
