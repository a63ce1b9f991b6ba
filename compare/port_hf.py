"""Port check for Hugging Face attention modules (``compare.port.check_port`` dispatches here).

For a transformers attention module the record holds:

- **forward and gradients**: transformers' own module (eager attention; its family's rotary-embedding class
  for ``position_embeddings``; an explicit additive 4-D mask from transformers' mask functions: causal or
  sliding-window from the *module's own* window, and the padding mask), the JAX port under ``jax.jit``
  (``jax_attn.hf.from_hf``) and the torch twin (``torch_attn.hf.from_hf``), each judged against a float64
  reference with the tolerance policy (``compare.tolerance``): the output and the gradients of
  ``sum(y · dy)`` w.r.t. the hidden states and every parameter (transformers' fused gradients are split into
  ours with the same data movement as the weights).
- **the reference**: the float64 NumPy oracle (``compare.oracle_attention``, rotary in float64) on the ported
  config (weights and inputs widened exactly).
  transformers' module is judged against it too, so a port that maps a knob wrongly (a window off by one, a
  flipped rotary layout) fails in the ``transformers vs reference`` row even though both twins agree with it.
- **the tolerance, in every dtype** (fp32, bf16, fp16): the policy's naive same-dtype baseline (the oracle
  with every intermediate rounded to the dtype): each implementation, transformers included, may be at most
  2× as far from the float64 reference as the naive one, plus the dtype's slack (1e-5 relative in fp32, one
  unit of roundoff in bf16/fp16), plus for gradients 1e-5 of the sum of ``|terms|`` their last contraction
  adds up (float32 accumulators). What a dtype can do depends on the problem: trained weights fed N(0, 1)
  inputs give logits and gradient sums far larger than real activations do, and the naive term measures it.
- **a left-padded batch**: row 1 starts with pads, positions skip them (``cumsum(mask) - 1``). A pad query
  sees no real key: transformers then averages over the masked keys (an arbitrary row), ours gives zeros.
  Pad query rows are therefore *excluded* from every comparison with transformers (their ``dy`` is zero, so
  the gradients are comparable everywhere) and compared as our convention gives them against the reference.
- **decode** (decoders): one token at a time from the first, through transformers'
  ``DynamicCache`` and through our ``KVCache`` (jitted step in JAX), with the same left padding; the decoded
  outputs are compared with each other and with the reference decoding the same way (which equals its full
  pass, except for length-dependent rope tables, dynamic and longrope: cached keys keep the rotation of the
  call that wrote them, in transformers as in ours).
- **key/value-shared layers** (Gemma 4's last ``num_kv_shared_layers``, ``kv_shared=True``): checked with
  their producer module (``producer=``), run first on its own random input of the same batch and mask:
  transformers' producer fills the ``shared_kv_states`` dict the consumer reads (decode: one ``DynamicCache``
  for both, producer then consumer per token, as the model runs them), our producer ports return their
  ``SharedKV`` (``return_kv=True``) for the consumer ports (``shared_kv=``), and the reference is the oracle
  consumer on the oracle producer's keys and values (each naive baseline on its own naive producer's). The
  quantities are the consumer's: its output, the gradients w.r.t. its x and its own parameters (the producer's
  keys and values are constants), decode.
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict

import numpy as np

from attn_spec import hf as spec
from attn_spec.rope import SEQ_DEPENDENT
from compare.port_record import PortRecord
from compare.tolerance import SLACK, Agreement, compare_arrays, tolerance

B, T = 2, 7
PAD = 2  # left pads of batch row 1
# Families whose transformers module takes no attention mask (YOLOS passes None): checked on unpadded batches.
NO_MASK = ("yolos",)


# ---------------------------------------------------------------------------------------------------------
# Tiny random modules of each family (tests, the docs table).
# ---------------------------------------------------------------------------------------------------------


# Tiny settings of the parts around the attention: hybrid models' linear-attention layers, MoE experts.
LINEAR_TINY = dict(
    linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8
)
MOE_TINY = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16)


def tiny_config(family: str, **overrides):
    """A transformers config of ``family`` with two layers of width 32 (vocab 64) and the attention knobs of
    its family switched on (windows shorter than the test sequence, soft-cap, scaled rope)."""
    import transformers as tf

    common = dict(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, vocab_size=64
    )
    dec = dict(common, num_key_value_heads=2, max_position_embeddings=64)
    vision = {k: v for k, v in common.items() if k != "vocab_size"}
    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 4,
    }
    make = {
        "llama": lambda: tf.LlamaConfig(**dec, rope_parameters=llama3),
        "mistral": lambda: tf.MistralConfig(**dec, sliding_window=3),
        "qwen2": lambda: tf.Qwen2Config(
            **dec, use_sliding_window=True, sliding_window=3, max_window_layers=1
        ),
        "qwen3": lambda: tf.Qwen3Config(**dec, head_dim=8, rms_norm_eps=1e-5),
        "gemma2": lambda: tf.Gemma2Config(
            **dec, head_dim=16, query_pre_attn_scalar=12, attn_logit_softcapping=2.0, sliding_window=3
        ),
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            **dec,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "phi3": lambda: tf.Phi3Config(
            **{**dec, "max_position_embeddings": 16},
            pad_token_id=0,
            eos_token_id=1,
            original_max_position_embeddings=4,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 1e4,
                "short_factor": [1.0, 1.1, 1.3, 1.7],
                "long_factor": [1.5, 2.0, 3.0, 4.0],
                "original_max_position_embeddings": 4,
            },
        ),
        "olmo2": lambda: tf.Olmo2Config(**{**dec, "num_key_value_heads": 4}),
        "gpt_oss": lambda: tf.GptOssConfig(
            **dec,
            head_dim=8,
            sliding_window=3,
            num_local_experts=2,
            num_experts_per_tok=1,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 15e4,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            **common,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25},
        ),
        "gptj": lambda: tf.GPTJConfig(
            n_embd=32, n_head=4, n_layer=2, vocab_size=64, n_positions=64, rotary_dim=4, pad_token_id=0
        ),
        # ALiBi families. Bloom: 10 heads (a non-power of two: slopes 2^-1..2^-8, then 2^-0.5, 2^-1.5).
        "bloom": lambda: tf.BloomConfig(hidden_size=40, n_head=10, n_layer=2, vocab_size=64, pad_token_id=0),
        # MPT: 6 heads (its slopes reordered from 8), clip_qkv and softmax_scale on.
        "mpt": lambda: tf.MptConfig(
            d_model=48,
            n_heads=6,
            n_layers=2,
            expansion_ratio=2,
            max_seq_len=64,
            vocab_size=64,
            pad_token_id=0,
            attn_config={"clip_qkv": 0.8, "softmax_scale": 0.3},
        ),
        # Falcon: ALiBi and the new decoder architecture (2 key/value groups of 2 heads), biases on; the
        # other layouts and rotary by overrides (alibi=False, new_decoder_architecture=False, multi_query).
        "falcon": lambda: tf.FalconConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_kv_heads=2,
            num_hidden_layers=2,
            vocab_size=64,
            max_position_embeddings=64,
            alibi=True,
            new_decoder_architecture=True,
            bias=True,
            pad_token_id=0,
        ),
        "codegen": lambda: tf.CodeGenConfig(
            n_embd=32,
            n_head=4,
            n_layer=2,
            vocab_size=64,
            n_positions=64,
            n_ctx=64,
            rotary_dim=4,
            pad_token_id=0,
        ),
        "gpt2": lambda: tf.GPT2Config(
            n_embd=32, n_head=4, n_layer=2, vocab_size=64, scale_attn_by_inverse_layer_idx=True
        ),
        "bert": lambda: tf.BertConfig(**common),
        "roberta": lambda: tf.RobertaConfig(**common),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(**common),
        "mixtral": lambda: tf.MixtralConfig(
            **dec, sliding_window=3, num_local_experts=2, num_experts_per_tok=1
        ),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            **dec,
            use_sliding_window=True,
            sliding_window=3,
            max_window_layers=2,
            **MOE_TINY,
            shared_expert_intermediate_size=16,
        ),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            **dec,
            head_dim=8,
            **MOE_TINY,
            rms_norm_eps=1e-5,
        ),
        "gemma": lambda: tf.GemmaConfig(**dec, head_dim=16),
        "nemotron": lambda: tf.NemotronConfig(
            **dec,
            pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        ),
        "persimmon": lambda: tf.PersimmonConfig(**common, qk_layernorm=True, pad_token_id=0),
        "cohere2": lambda: tf.Cohere2Config(
            **dec, sliding_window=3, layer_types=["sliding_attention", "full_attention"], pad_token_id=0
        ),
        "exaone4": lambda: tf.Exaone4Config(
            **dec,
            head_dim=8,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            pad_token_id=0,
        ),
        "ministral": lambda: tf.MinistralConfig(
            **dec, head_dim=8, sliding_window=3, layer_types=["sliding_attention", "full_attention"]
        ),
        "granitemoeshared": lambda: tf.GraniteMoeSharedConfig(
            **dec,
            attention_multiplier=0.3,
            num_local_experts=2,
            num_experts_per_tok=1,
            shared_intermediate_size=16,
        ),
        "glm4_moe": lambda: tf.Glm4MoeConfig(
            **dec,
            head_dim=8,
            use_qk_norm=True,
            n_routed_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            pad_token_id=0,
        ),
        "olmo": lambda: tf.OlmoConfig(**dec, clip_qkv=0.8),
        "olmo3": lambda: tf.Olmo3Config(
            **dec, sliding_window=3, layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-5
        ),
        "starcoder2": lambda: tf.Starcoder2Config(**dec, sliding_window=3, residual_dropout=0.0),
        "granite": lambda: tf.GraniteConfig(**dec, attention_multiplier=0.2, attention_bias=True),
        "granitemoe": lambda: tf.GraniteMoeConfig(
            **dec, attention_multiplier=0.3, num_local_experts=2, num_experts_per_tok=1
        ),
        "glm": lambda: tf.GlmConfig(**dec, head_dim=8, pad_token_id=0),
        "glm4": lambda: tf.Glm4Config(
            **dec,
            head_dim=8,
            pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        ),
        "phi": lambda: tf.PhiConfig(**dec, qk_layernorm=True),
        "stablelm": lambda: tf.StableLmConfig(**dec, use_qkv_bias=True, qk_layernorm=True),
        "cohere": lambda: tf.CohereConfig(**dec, attention_bias=True, use_qk_norm=True),
        "smollm3": lambda: tf.SmolLM3Config(**dec, no_rope_layers=[1, 0], pad_token_id=0),
        "gemma4_text": lambda: tf.Gemma4TextConfig(
            **dec,
            head_dim=8,
            global_head_dim=16,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.5,
                    "rope_theta": 1e6,
                },
            },
            vocab_size_per_layer_input=64,
            hidden_size_per_layer_input=8,
            pad_token_id=0,
        ),
        "cwm": lambda: tf.CwmConfig(
            **dec, head_dim=8, sliding_window=3, layer_types=["sliding_attention", "full_attention"]
        ),
        "vaultgemma": lambda: tf.VaultGemmaConfig(
            **dec, head_dim=16, query_pre_attn_scalar=12, attn_logit_softcapping=2.0, sliding_window=3
        ),
        "hunyuan_v1_dense": lambda: tf.HunYuanDenseV1Config(**dec, head_dim=8, pad_token_id=0),
        "hunyuan_v1_moe": lambda: tf.HunYuanMoEV1Config(
            **dec, head_dim=8, num_experts=2, moe_topk=1, moe_intermediate_size=16, pad_token_id=0
        ),
        "gpt_neo": lambda: tf.GPTNeoConfig(
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["local", "global"], 1]],
            window_size=3,
            vocab_size=64,
            max_position_embeddings=64,
            intermediate_size=64,
        ),
        "xglm": lambda: tf.XGLMConfig(
            d_model=32, attention_heads=4, num_layers=2, ffn_dim=64, vocab_size=64, max_position_embeddings=64
        ),
        "dbrx": lambda: tf.DbrxConfig(
            d_model=32,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            vocab_size=64,
            attn_config={"kv_n_heads": 2, "clip_qkv": 0.8, "rope_theta": 1e4},
            ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 2, "moe_top_k": 1},
        ),
        "dots1": lambda: tf.Dots1Config(
            **dec,
            head_dim=8,
            sliding_window=3,
            max_window_layers=0,
            n_routed_experts=2,
            n_shared_experts=1,
            num_experts_per_tok=1,
            moe_intermediate_size=16,
            pad_token_id=0,
        ),
        "minimax": lambda: tf.MiniMaxConfig(
            **dec,
            head_dim=8,
            sliding_window=3,
            layer_types=["full_attention", "linear_attention"],
            num_local_experts=2,
            num_experts_per_tok=1,
            pad_token_id=0,
        ),
        "mellum": lambda: tf.MellumConfig(
            **dec,
            head_dim=8,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            **MOE_TINY,
            pad_token_id=0,
        ),
        "gpt_bigcode": lambda: tf.GPTBigCodeConfig(
            n_embd=32, n_head=4, n_layer=2, vocab_size=64, n_positions=64, multi_query=True
        ),
        "opt": lambda: tf.OPTConfig(**common, ffn_dim=64, word_embed_proj_dim=32, pad_token_id=0),
        "biogpt": lambda: tf.BioGptConfig(**common, pad_token_id=0),
        "llama4_text": lambda: tf.Llama4TextConfig(
            **dec,
            head_dim=8,
            no_rope_layers=[1, 0],
            attention_chunk_size=3,
            floor_scale=2,
            attn_scale=0.5,
            num_local_experts=2,
            num_experts_per_tok=1,
            intermediate_size_mlp=64,
            rms_norm_eps=1e-5,
            pad_token_id=0,
        ),
        "qwen3_next": lambda: tf.Qwen3NextConfig(
            **dec,
            head_dim=8,
            layer_types=["full_attention", "linear_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
            **MOE_TINY,
            shared_expert_intermediate_size=16,
            **LINEAR_TINY,
            pad_token_id=0,
        ),
        "qwen3_5_text": lambda: tf.Qwen3_5TextConfig(
            **dec,
            head_dim=16,
            layer_types=["full_attention", "linear_attention"],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1],
            },
            **LINEAR_TINY,
            pad_token_id=0,
        ),
        "qwen2_vl_text": lambda: tf.Qwen2VLTextConfig(
            **dec,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
        ),
        "qwen2_5_vl_text": lambda: tf.Qwen2_5_VLTextConfig(
            **dec,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]},
        ),
        "qwen3_vl_moe_text": lambda: tf.Qwen3VLMoeTextConfig(
            **dec,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 3, 1]},
            **MOE_TINY,
        ),
        "qwen3_5_moe_text": lambda: tf.Qwen3_5MoeTextConfig(
            **dec,
            head_dim=16,
            layer_types=["full_attention", "linear_attention"],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.5,
                "mrope_section": [1, 2, 1],
            },
            **LINEAR_TINY,
            **MOE_TINY,
            shared_expert_intermediate_size=16,
            pad_token_id=0,
        ),
        "qwen3_vl_text": lambda: tf.Qwen3VLTextConfig(
            **dec,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": [3, 2, 2]},
        ),
        "vit": lambda: tf.ViTConfig(**vision, image_size=8, patch_size=4),
        # Local layer first (window: |q - k| <= local_attention // 2 = 2, shorter than T), then a global one;
        # the default thetas differ (local 1e4, global 1.6e5).
        "modernbert": lambda: tf.ModernBertConfig(
            **common,
            local_attention=4,
            layer_types=["sliding_attention", "full_attention"],
            attention_bias=True,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
        "modernbert-decoder": lambda: tf.ModernBertDecoderConfig(
            **common,
            local_attention=6,
            layer_types=["sliding_attention", "full_attention"],
            attention_bias=True,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
        "deit": lambda: tf.DeiTConfig(**vision, image_size=8, patch_size=4),
        "dinov2": lambda: tf.Dinov2Config(**vision, image_size=8, patch_size=4),
        "dinov2_with_registers": lambda: tf.Dinov2WithRegistersConfig(**vision, image_size=8, patch_size=4),
        "vit_mae": lambda: tf.ViTMAEConfig(**vision, image_size=8, patch_size=4, qkv_bias=False),
        "vit_msn": lambda: tf.ViTMSNConfig(**vision, image_size=8, patch_size=4),
        "ijepa": lambda: tf.IJepaConfig(**vision, image_size=8, patch_size=4),
        "vivit": lambda: tf.VivitConfig(**vision, image_size=8, num_frames=2, tubelet_size=[1, 4, 4]),
        "pixio": lambda: tf.PixioConfig(**vision, image_size=8, patch_size=4),
        "yolos": lambda: tf.YolosConfig(**vision, image_size=[8, 8], patch_size=4, num_detection_tokens=2),
        "camembert": lambda: tf.CamembertConfig(**common),
        "data2vec-text": lambda: tf.Data2VecTextConfig(**common),
        "ernie": lambda: tf.ErnieConfig(**common),
        "electra": lambda: tf.ElectraConfig(**common, embedding_size=16),
        "bert-generation": lambda: tf.BertGenerationConfig(**common),
        "roc_bert": lambda: tf.RoCBertConfig(**common),
    }
    if family not in make:
        raise ValueError(f"tiny_config: unknown family {family!r}; known: {sorted(make)}")
    cfg = make[family]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_shared_kv_config():
    """A four-layer tiny Gemma 4 (sliding, full, sliding, full) whose last two layers read the keys and values
    of the first two (``num_kv_shared_layers=2``: transformers' ``kv_sharing_modes`` store, store, reuse,
    reuse); :func:`tiny_config`'s knobs otherwise (``tiny_config``'s overrides are set after construction,
    which does not rebuild the per-layer fields derived from ``layer_types``)."""
    import transformers as tf

    base = tiny_config("gemma4_text").to_dict()
    kw = {
        k: base[k]
        for k in (
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
            "head_dim",
            "attention_k_eq_v",
            "sliding_window",
            "rope_parameters",
            "vocab_size_per_layer_input",
            "hidden_size_per_layer_input",
            "pad_token_id",
        )
    }
    cfg = tf.Gemma4TextConfig(
        **kw,
        num_hidden_layers=4,
        global_head_dim=16,
        num_global_key_value_heads=1,
        num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    cfg._attn_implementation = "eager"
    return cfg


def producer_of(model, layer: int):
    """The attention module whose keys and values layer ``layer`` of ``model`` reads
    (:func:`attn_spec.hf.kv_producer`), or None when it computes its own."""
    index = spec.kv_producer(model.config, layer)
    return None if index is None else attention_of(model, index)


def attention_of(model, layer: int):
    """The attention module of layer ``layer`` of a transformers model (base or with a head)."""
    base = getattr(model, "base_model", model)
    if not any(hasattr(base, name) for name in ("layers", "h", "blocks", "encoder")):
        base = getattr(base, "model", base)  # Llama 4: its base_model_prefix names no attribute
    for path in ("layers", "h", "blocks", "encoder.layer", "decoder.layers"):
        obj = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        block = obj[layer]
        block = getattr(block, "norm_attn_norm", block)  # DBRX nests its attention one level down
        for name in ("self_attn", "attention", "attn", "self_attention"):
            if hasattr(block, name):
                return getattr(block, name)
    raise ValueError(f"attention_of: no attention layer {layer} in {type(model).__name__}")


def randomize_(module, seed: int = 0):
    """Weights of order one (transformers' 0.02 init makes attention almost uniform, a weak test): projections
    ``N(0, 1/sqrt(in))``·1.5, biases and sinks ``N(0, 0.5)``, norm weights ``1 + N(0, 0.3)`` (Gemma: ``N(0,
    0.3)``, its norm scales by 1 + w; StableLM's per-head ``norms.{i}.weight`` too)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if (
                name.endswith("norm.weight")
                or "LayerNorm" in name
                or (".norms." in name and name.endswith(".weight"))
            ):
                gemma = type(module).__name__.startswith("Gemma")
                val = r * 0.3 + (0.0 if gemma else 1.0)
            elif p.ndim == 2:
                fan_in = p.shape[0] if type(module).__name__.startswith("GPT2") else p.shape[1]
                val = r * 1.5 / fan_in**0.5
            else:
                val = r * 0.5
            p.copy_(val.to(p.dtype))
    return module


def tiny_module(
    family: str, layer: int = 0, dtype: str = "float32", seed: int = 0, shared_kv: bool = False, **overrides
):
    """Layer ``layer``'s attention of a tiny random ``family`` model (eval mode, ``dtype``). ``shared_kv``:
    the four-layer Gemma 4 of :func:`tiny_shared_kv_config` (layers 2 and 3 read layers 0's and 1's keys
    and values; :func:`producer_of` gives a layer's producer, randomized with its own seed)."""
    import torch
    import transformers as tf

    if shared_kv and family != "gemma4_text":
        raise ValueError(f"tiny_module: shared_kv=True is a Gemma 4 model (gemma4_text); got {family!r}")
    cfg = tiny_shared_kv_config() if shared_kv else tiny_config(family, **overrides)
    if shared_kv:
        for k, v in overrides.items():
            setattr(cfg, k, v)
    torch.manual_seed(seed)
    if family in spec.ENCODERS:
        model = tf.AutoModel.from_config(cfg)
    elif family == "gemma3_text":
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        try:
            model = tf.AutoModelForCausalLM.from_config(cfg)
        except ValueError:  # text towers of multimodal families (Qwen2-VL, Qwen3-VL): the base model
            model = tf.AutoModel.from_config(cfg)
    model = model.to(getattr(torch, dtype)).eval()
    if shared_kv:
        producer = spec.kv_producer(cfg, layer)
        if producer is not None:
            randomize_(attention_of(model, producer), seed + 1000)
    return randomize_(attention_of(model, layer), seed), model


# ---------------------------------------------------------------------------------------------------------
# Running transformers' module.
# ---------------------------------------------------------------------------------------------------------


def _rotary(module, family: str):
    """The family's rotary-embedding module for this layer, and the layer type it takes (Gemma 3)."""
    if spec.entry(family).rope is None:
        return None, None
    mod = sys.modules[type(module).__module__]
    base = type(module).__name__.removesuffix("Attention")
    cls = getattr(mod, base + "RotaryEmbedding", None) or getattr(mod, base + "TextRotaryEmbedding")
    rotary = cls(module.config)
    layer_type = None
    if spec.entry(family).rope_per_layer_type:  # Gemma 3, OLMo 3: one table per layer type
        layer_type = module.config.layer_types[module.layer_idx]
    return rotary, layer_type


def _window(module, family: str):
    """The module's own window (what transformers' model builds the mask from), not our mapping."""
    e = spec.entry(family)
    if e.window == "config":  # these modules pass config.sliding_window to their attention
        return getattr(module.config, "sliding_window", None) or None
    if e.window is None and family in spec.FAMILY_TABLE:
        return None
    if getattr(module, "is_sliding", None) is False:  # EXAONE 4 keeps the window on its full layers unused
        return None
    return getattr(module, "sliding_window", None) or None


def _keep(module, family: str, mask: np.ndarray, q_idx: np.ndarray, S: int):
    """bool ``(B, len(q_idx), S)`` from transformers' mask functions."""
    import torch
    from transformers import masking_utils as mu

    pad = mu.padding_mask_function(torch.from_numpy(mask[:, :S].astype(bool)))
    causal = _causal(module, family)
    config = getattr(module, "config", None)  # Bloom's and MPT's modules have none
    layer_types = getattr(config, "layer_types", None) if hasattr(module, "layer_idx") else None
    if causal:
        w = _window(module, family)
        base = mu.causal_mask_function if w is None else mu.sliding_window_causal_mask_function(w)
        if layer_types is not None and layer_types[module.layer_idx] == "chunked_attention":
            lead = torch.from_numpy(
                (np.cumsum(mask, axis=1) == 0).sum(axis=1)
            )  # create_chunked_causal_mask's
            base = mu.chunked_causal_mask_function(module.config.attention_chunk_size, lead)
        fn = mu.and_masks(base, pad)
    elif layer_types is not None and layer_types[module.layer_idx] == "sliding_attention":
        # ModernBERT: create_bidirectional_sliding_window_mask's function, with the config's sliding_window
        # (local_attention // 2: |q - k| <= it), not the module's (+1, for flash attention) nor ours.
        base = mu.sliding_window_bidirectional_mask_function(module.config.sliding_window)
        fn = mu.and_masks(base, pad)
    else:
        fn = pad
    b, q, kv = np.meshgrid(np.arange(mask.shape[0]), q_idx, np.arange(S), indexing="ij")
    return fn(torch.from_numpy(b), 0, torch.from_numpy(q), torch.from_numpy(kv))


def _causal(module, family: str) -> bool:
    causal = spec.entry(family).causal
    if causal == "bert":
        return bool(getattr(module.self, "is_causal", False))
    return causal != "vit"


def _hf_call(module, family, x, mask, pos, q_idx, S, cache=None, shared_kv_states=None):
    """transformers' module on ``x (B, t, E)`` (queries at sequence indices ``q_idx``, ``S`` keys);
    ``shared_kv_states``: Gemma 4's dict of the layers' shared keys/values (a store layer writes it, a reuse
    layer reads it; None: a fresh one)."""
    import torch

    keep = _keep(module, family, mask, q_idx, S)
    if family in NO_MASK:  # the module takes no mask: only an unpadded batch is comparable
        if not bool(keep.all()):
            raise ValueError(f"{family}'s attention takes no attention mask: pass an unpadded batch")
        return module(x)
    additive = torch.where(keep, 0.0, torch.finfo(x.dtype).min)[:, None].to(x.dtype)
    kwargs = {"attention_mask": additive}
    rotary, layer_type = _rotary(module, family)
    if rotary is not None:
        pos_t = torch.from_numpy(pos)
        kwargs["position_embeddings"] = rotary(x, pos_t, layer_type) if layer_type else rotary(x, pos_t)
    if spec.entry(family).alibi is not None:
        kwargs.update(_alibi_kwargs(module, family, x, mask[:, :S], keep))
    if cache is not None:
        kwargs[
            "layer_past" if family in ("gpt_neox", "bloom", "falcon", "gpt_bigcode", "gpt_neo") else "cache"
        ] = cache
    if spec.entry(family).kv_shared is not None:  # Gemma 4's forward takes the layers' shared keys/values
        kwargs["shared_kv_states"] = {} if shared_kv_states is None else shared_kv_states
    if spec.entry(family).causal == "bert":
        y = module.self(x, **kwargs)[0]
        return module.output.dense(y)
    return module(x, **kwargs)[0]


def _alibi_kwargs(module, family, x, mask, keep) -> dict:
    """What the family's model hands its attention for ALiBi, built by the family's own functions from the
    ``(B, S)`` padding mask, as its model's forward builds it:

    - Bloom: ``alibi = build_alibi_tensor(mask)`` (``slope · (cumsum(mask) - 1)`` per key, in the dtype) and
      ``residual``, which its attention adds to its output: zeros (the port stops at ``dense``; in eval mode
      the dropout before that add is off, so the output is ``dense``'s exactly);
    - MPT: ``position_bias = build_mpt_alibi_tensor(N, max_seq_len)`` (with its default ``alibi_bias_max``,
      as ``MptModel`` calls it) and a boolean mask, True where masked (``MptModel``'s ``.to(torch.bool)`` of
      the additive one);
    - Falcon with ``alibi``: the additive mask is ``build_alibi_tensor(mask) / sqrt(H)`` where kept, the
      dtype's minimum elsewhere (``FalconModel.forward``'s ``masked_fill``); without ``alibi``, nothing.
    """
    import math

    import torch

    mod = sys.modules[type(module).__module__]
    mask_t = torch.from_numpy(np.ascontiguousarray(mask))
    if family == "bloom":
        if module.training and module.hidden_dropout:
            raise ValueError("port check: BloomAttention's output dropout must be off (eval mode)")
        alibi = mod.build_alibi_tensor(mask_t, module.num_heads, x.dtype)
        return {"alibi": alibi, "residual": torch.zeros_like(x)}
    if family == "mpt":
        bias = mod.build_mpt_alibi_tensor(module.n_heads, module.max_seq_length, device=x.device)
        return {"position_bias": bias, "attention_mask": ~keep[:, None]}
    if family == "falcon" and module.config.alibi:
        B, S = mask.shape
        alibi = mod.build_alibi_tensor(mask_t, module.num_heads, x.dtype).reshape(B, -1, 1, S)
        scaled = alibi / math.sqrt(module.config.hidden_size // module.num_heads)
        return {"attention_mask": torch.masked_fill(scaled, ~keep[:, None], torch.finfo(x.dtype).min)}
    return {}


def _eager(module):
    """Run with the eager attention (the readable reference); returns a restore callable."""
    inner = getattr(module, "self", None) or getattr(module, "attention", None)
    cfg = getattr(module, "config", None) or getattr(inner, "config", None)  # BERT: .self, YOLOS: .attention
    if cfg is None:  # Bloom's and MPT's attentions have only their own eager code
        return lambda: None
    old = getattr(cfg, "_attn_implementation", None)
    cfg._attn_implementation = "eager"
    return lambda: setattr(cfg, "_attn_implementation", old)


def run_transformers(
    module, family, c, x, mask, pos, dy, decode: bool, producer=None
) -> dict[str, np.ndarray]:
    """transformers' module: output, gradients, decode. ``producer``: ``(module, x)`` of a kv-shared layer's
    producer, run first (without gradients) on its own input to fill the ``shared_kv_states`` dict."""
    import torch

    restore = _eager(module)
    restore_p = _eager(producer[0]) if producer is not None else (lambda: None)
    was_training = module.training
    module.eval()
    if producer is not None:
        producer[0].eval()
    try:
        dt = next(module.parameters()).dtype
        xt = torch.tensor(x, dtype=dt, requires_grad=True)
        params = dict(module.named_parameters())
        for p in params.values():
            p.grad = None
        shared = None
        if producer is not None:
            shared = {}
            with torch.no_grad():
                xp = torch.tensor(producer[1], dtype=dt)
                _hf_call(producer[0], family, xp, mask, pos, np.arange(x.shape[1]), x.shape[1], None, shared)
        y = _hf_call(module, family, xt, mask, pos, np.arange(x.shape[1]), x.shape[1], None, shared)
        y.backward(torch.tensor(dy, dtype=dt))
        res = {"out": _f64(y), "grad_x": _f64(xt.grad)}
        hf_grads = {k: _bits(p.grad) for k, p in params.items() if p.grad is not None}
        hf_grads = {k: v for k, v in hf_grads.items() if k not in spec.ignored_keys(family)}
        for k, g in spec.from_hf(hf_grads, family, c).items():
            res[f"grad_{k}"] = _unbits(g, dt)
        for p in params.values():
            p.grad = None
        if decode:
            from transformers import DynamicCache

            cache, ys = DynamicCache(), []
            with torch.no_grad():
                xt = torch.tensor(x, dtype=dt)
                for start, stop in _chunks(x.shape[1]):
                    shared = None
                    if producer is not None:  # producer then consumer, one cache, as the model runs them
                        shared = {}
                        xp = torch.tensor(producer[1][:, start:stop], dtype=dt)
                        _hf_call(
                            producer[0],
                            family,
                            xp,
                            mask,
                            pos[..., start:stop],
                            np.arange(start, stop),
                            stop,
                            cache,
                            shared,
                        )
                    ys.append(
                        _hf_call(
                            module,
                            family,
                            xt[:, start:stop].contiguous(),
                            mask,
                            pos[..., start:stop],
                            np.arange(start, stop),
                            stop,
                            cache,
                            shared,
                        )
                    )
            res["decode_out"] = _f64(torch.cat(ys, dim=1))
    finally:
        restore()
        restore_p()
        module.train(was_training)
    return res


def _chunks(T_: int) -> list[tuple[int, int]]:
    return [(t, t + 1) for t in range(T_)]  # token by token from the first (one JAX compile)


def _f64(t) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _bits(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _unbits(a: np.ndarray, dt) -> np.ndarray:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t.view(torch.bfloat16) if dt == torch.bfloat16 else t).double().numpy()


# ---------------------------------------------------------------------------------------------------------
# Running the twins.
# ---------------------------------------------------------------------------------------------------------


def run_torch_twin(attn, x, mask, pos, dy, decode: bool, dtype=None, producer=None) -> dict[str, np.ndarray]:
    """The torch twin: output, gradients, decode. ``producer``: ``(producer port, its x)`` of a kv_shared
    layer: run first with ``return_kv=True`` (no gradients), its ``SharedKV`` passed as ``shared_kv=``."""
    import torch

    dt = dtype or next(attn.parameters()).dtype
    attn = attn.to(dt).eval()
    xt = torch.tensor(x, dtype=dt, requires_grad=True)
    m, p = torch.from_numpy(mask), torch.from_numpy(pos)
    kw = {}
    if producer is not None:
        prod = producer[0].to(dt).eval()
        with torch.no_grad():
            kw["shared_kv"] = prod(torch.tensor(producer[1], dtype=dt), m, p, return_kv=True)[1]
    y = attn(xt, m, p, **kw)
    y.backward(torch.tensor(dy, dtype=dt))
    res = {"out": _f64(y), "grad_x": _f64(xt.grad)}
    for k, prm in attn.named_parameters():
        res[f"grad_{k}"] = _f64(prm.grad)
        prm.grad = None
    if decode:
        owner = attn if producer is None else prod  # a consumer decodes through its producer's cache
        cache, ys = owner.init_cache(x.shape[0], x.shape[1]), []
        with torch.no_grad():
            xt = torch.tensor(x, dtype=dt)
            for start, stop in _chunks(x.shape[1]):
                sl = (slice(None), slice(start, stop))
                if producer is None:
                    y, cache = attn(xt[sl], m[sl], p[..., start:stop], cache=cache)
                else:
                    xp = torch.tensor(producer[1][sl], dtype=dt)
                    _, cache, kv = prod(xp, m[sl], p[..., start:stop], cache=cache, return_kv=True)
                    y = attn(xt[sl], m[sl], p[..., start:stop], shared_kv=kv)
                ys.append(y)
        res["decode_out"] = _f64(torch.cat(ys, dim=1))
    return res


def run_jax_port(attn, x, mask, pos, dy, decode: bool, producer=None) -> dict[str, np.ndarray]:
    """The JAX port under ``jax.jit``: output, gradients, decode. ``producer``: as in :func:`run_torch_twin`
    (its ``SharedKV`` an argument of the consumer's jitted forward, a constant of its gradients)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    attn.deterministic = True
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)
    dt = params["q_proj"]["weight"][...].dtype
    if producer is not None:
        producer[0].deterministic = True
        p_graphdef, p_params, p_rest = nnx.split(producer[0], nnx.Param, ...)

        @jax.jit
        def produce(p_params, xp, m, p, cache=None):
            prod = nnx.merge(p_graphdef, p_params, p_rest)
            if cache is None:
                return prod(xp, m, p, return_kv=True)[1]
            return prod(xp, m, p, cache=cache, return_kv=True)[1:]

        kv = produce(p_params, jnp.asarray(producer[1], dt), jnp.asarray(mask), jnp.asarray(pos))
    else:
        kv = None

    def forward(params, x, kv):
        kw = {} if kv is None else {"shared_kv": kv}
        return nnx.merge(graphdef, params, rest)(x, mask, pos, **kw)

    @jax.jit
    def forward_backward(params, x, dy, kv):
        out, vjp = jax.vjp(lambda params, x: forward(params, x, kv), params, x)
        return out, *vjp(dy)

    out, dparams, dx = forward_backward(params, jnp.asarray(x, dt), jnp.asarray(dy, dt), kv)
    res = {"out": np.asarray(out, np.float64), "grad_x": np.asarray(dx, np.float64)}
    for path, value in nnx.to_flat_state(dparams):
        res["grad_" + ".".join(str(q) for q in path)] = np.asarray(value[...], np.float64)
    if decode:

        @jax.jit
        def step(params, x, m, p, cache):
            return nnx.merge(graphdef, params, rest)(x, m, p, cache=cache)

        @jax.jit
        def shared_step(params, x, m, p, kv):
            return nnx.merge(graphdef, params, rest)(x, m, p, shared_kv=kv)

        owner = attn if producer is None else producer[0]  # a consumer decodes through its producer's cache
        cache, ys = owner.init_cache(x.shape[0], x.shape[1]), []
        for start, stop in _chunks(x.shape[1]):
            sl = slice(start, stop)
            m_t, p_t = jnp.asarray(mask[:, sl]), jnp.asarray(pos[..., sl])
            if producer is None:
                y, cache = step(params, jnp.asarray(x[:, sl], dt), m_t, p_t, cache)
            else:
                cache, kv = produce(p_params, jnp.asarray(producer[1][:, sl], dt), m_t, p_t, cache)
                y = shared_step(params, jnp.asarray(x[:, sl], dt), m_t, p_t, kv)
            ys.append(np.asarray(y, np.float64))
        res["decode_out"] = np.concatenate(ys, axis=1)
    return res


# ---------------------------------------------------------------------------------------------------------
# The record.
# ---------------------------------------------------------------------------------------------------------


def _tolerance(dtype, ref, naive, magnitude: float) -> float:
    """The policy's tolerance for one quantity of the port check (``compare.tolerance``): twice the naive
    same-dtype evaluation's error plus the dtype's slack; for gradients, the sum of ``|terms|`` of their last
    contraction (``magnitude``) at float32's slack, whatever the dtype, since every implementation judged
    here sums in float32 (bf16/fp16 included: its storage rounding is the naive term's part)."""
    if dtype in ("bfloat16", "float16"):
        return tolerance(dtype, ref, naive) + SLACK["float32"] * magnitude
    return tolerance(dtype, ref, naive, magnitude)


def _judge(name, got, ref, dtype, baseline, rows, magnitude=0.0) -> Agreement:
    """``got`` vs ``ref`` (float64) on the selected query rows (``rows`` bool (B, T) for row quantities)."""
    if rows is not None:
        got, ref = got[rows], ref[rows]
        baseline = None if baseline is None else baseline[rows]
    return compare_arrays(name, got, ref, dtype, tol=_tolerance(dtype, ref, baseline, magnitude))


def _reference(ours_t, c, x, mask, pos, dy, decode: bool, dtype: str, producer=None):
    """The float64 oracle (``compare.oracle_attention``) on the ported config and weights (widened exactly):
    ``(reference, naive same-dtype baseline, gradient magnitudes)``. The baseline is, per quantity, the
    worse of two naive evaluations: in bf16/fp16 every intermediate rounded, and only the stored tensors
    rounded (float32 internals, as the twins' kernels); in float32 the plain float32 evaluation with the
    projections summing over the model width in one order and in the reverse one. On an ill-conditioned row
    (a peaked softmax fed by large logits) where and in which order the dtype rounds decides the result, and
    either evaluation may land nearer the float64 one: one sample of that spread is not its size.

    Decoding is expected to give the full pass, except for rope tables that depend on the call's length
    (dynamic, longrope), where cached keys keep the rotation of the call that wrote them: there the reference
    is the torch twin decoding in float64 the same way (and the naive baseline has no decode).

    ``producer``: ``(producer's torch port, its config, its x)`` of a kv_shared layer: each evaluation runs
    the oracle producer the same way (rounding, order) and hands its keys and values to the consumer."""
    import torch

    from attn_spec.rope import SEQ_DEPENDENT
    from compare import oracle_attention

    params = {k: v.double().numpy() for k, v in ours_t.torch_state_dict().items()}
    if producer is not None:
        p_params = {k: v.double().numpy() for k, v in producer[0].torch_state_dict().items()}
        p_c, p_x = producer[1], producer[2]
    out, magnitudes = {}, {}
    passes = [("ref", None, False, False), ("naive", dtype, False, False)]
    if dtype in ("bfloat16", "float16"):
        passes.append(("naive_other", dtype, True, False))
    elif dtype == "float32":
        passes.append(("naive_other", dtype, False, True))
    E = x.shape[-1]
    reverse = np.arange(E)[::-1]
    for name, rounding, storage_only, reorder in passes:
        xs, ps = x, params
        if reorder:  # the same float32 evaluation, the projections summing over E in the reverse order
            xs = np.ascontiguousarray(x[..., reverse])
            ps = {
                k: np.ascontiguousarray(v[:, reverse]) if _contracts_e(k, v, E) else v
                for k, v in params.items()
            }
        shared_kv = None
        if producer is not None:
            pxs, pps = p_x, p_params
            if reorder:
                pxs = np.ascontiguousarray(p_x[..., reverse])
                pps = {
                    k: np.ascontiguousarray(v[:, reverse]) if _contracts_e(k, v, E) else v
                    for k, v in p_params.items()
                }
            fp = oracle_attention.attention_forward(
                pxs, pps, p_c, mask, pos, dtype=rounding, storage_only=storage_only
            )
            shared_kv = (fp["k"], fp["v"])
        bwd = oracle_attention.attention_backward(
            xs,
            ps,
            dy,
            c,
            attention_mask=mask,
            position_ids=pos,
            dtype=rounding,
            storage_only=storage_only,
            shared_kv=shared_kv,
        )
        if reorder:
            bwd = dict(bwd, x=np.asarray(bwd["x"])[..., np.argsort(reverse)])
            for k, v in params.items():
                if _contracts_e(k, v, E):
                    bwd[k] = np.asarray(bwd[k])[:, np.argsort(reverse)]
        res = {"out": np.asarray(bwd["out"], np.float64), "grad_x": np.asarray(bwd["x"], np.float64)}
        res.update({f"grad_{k}": np.asarray(bwd[k], np.float64) for k in params})
        if decode:
            res["decode_out"] = res["out"]
        out[name] = res
        if rounding is None:
            terms = oracle_attention.gradient_magnitudes(x, params, dy, bwd)
            magnitudes = {f"grad_{k}": v for k, v in terms.items()}
    if "naive_other" in out:  # the naive evaluation that lands further from the reference, per quantity
        other = out.pop("naive_other")
        for q, a in out["naive"].items():
            ref_q = out["ref"][q]
            if np.max(np.abs(other[q] - ref_q), initial=0.0) > np.max(np.abs(a - ref_q), initial=0.0):
                out["naive"][q] = other[q]
    if decode and c.rope is not None and c.rope.rope_type in SEQ_DEPENDENT:
        ref_twin = type(ours_t)(c, implementation="math", dtype=torch.float64)
        ref_twin.load_torch_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
        ref_producer = None
        if producer is not None:
            ref_p = type(ours_t)(p_c, implementation="math", dtype=torch.float64)
            ref_p.load_torch_state_dict({k: torch.from_numpy(v) for k, v in p_params.items()})
            ref_producer = (ref_p, p_x)
        dec = run_torch_twin(ref_twin, x, mask, pos, dy, True, dtype=torch.float64, producer=ref_producer)[
            "decode_out"
        ]
        out["ref"]["decode_out"] = dec
        del out["naive"]["decode_out"]
    return out["ref"], out["naive"], magnitudes


def _contracts_e(name: str, value: np.ndarray, E: int) -> bool:
    """Whether parameter ``name`` is a q/k/v projection weight, whose columns meet the model width E."""
    return name in ("q_proj.weight", "k_proj.weight", "v_proj.weight") and value.shape[1] == E


def _dtype_name(module) -> str:
    return str(next(module.parameters()).dtype).removeprefix("torch.")


def check_hf_port(
    module,
    x=None,
    attention_mask=None,
    *,
    seed: int = 0,
    post_norm_outside: bool = False,
    decode: bool | None = None,
    print_table: bool = True,
    jax_port=None,
    producer=None,
) -> PortRecord:
    """Port a transformers attention module to both twins and judge everything against the float64 reference
    (see the module docstring). ``x (B, T, E)`` and ``attention_mask (B, T)`` default to a random left-padded
    batch; ``decode`` defaults to True for causal layers. ``jax_port`` replaces
    ``jax_attn.hf.from_hf(module)`` (to check a port made some other way, e.g. by ``load_layer``).
    ``producer``: required for a key/value-shared layer (Gemma 4's ``reuse`` layers, ``kv_shared``): the
    transformers attention module whose keys and values it reads (its model's ``kv_producer`` layer), fed its
    own random input (seeded by ``seed``) with the same mask."""
    import torch

    import jax_attn.hf as jhf
    import torch_attn.hf as thf
    from compare import env

    env.pin_precision()
    family, c = spec.describe_module(module, post_norm_outside)
    dtype = _dtype_name(module)
    p_c = _check_producer(module, family, c, producer)
    rng = np.random.default_rng(seed)
    if x is None:
        x = rng.standard_normal((B, T, c.E))
    x = np.asarray(x.detach().cpu().double() if hasattr(x, "detach") else x, np.float64)
    x_p = None if producer is None else rng.standard_normal(x.shape)
    if attention_mask is None:
        attention_mask = np.ones(x.shape[:2], np.int64)
        if x.shape[0] > 1 and family not in NO_MASK:
            attention_mask[1, : min(PAD, x.shape[1] - 1)] = 0
    mask = np.asarray(attention_mask.cpu() if hasattr(attention_mask, "cpu") else attention_mask).astype(
        np.int64
    )
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    if c.rope is not None and c.rope.mrope_section is not None:  # three distinct rows (t, h, w)
        pos = np.stack([pos, pos // 2 + 1, (3 * pos) % 5]).astype(np.int64)
    real = mask.astype(bool)
    dy = rng.standard_normal(x.shape) * real[..., None]  # pad rows carry no gradient
    decode = c.causal if decode is None else decode
    # Inputs rounded to the module's dtype once, so that every side sees the same numbers.
    tdt = getattr(torch, dtype)
    x = torch.tensor(x).to(tdt).double().numpy()
    dy = torch.tensor(dy).to(tdt).double().numpy()

    ours_t = thf.from_hf(module, post_norm_outside=post_norm_outside, implementation="math")
    ours_j = (
        jax_port
        if jax_port is not None
        else jhf.from_hf(module, post_norm_outside=post_norm_outside, implementation="math")
    )
    hf_p = t_p = j_p = ref_p = None
    if producer is not None:
        x_p = torch.tensor(x_p).to(tdt).double().numpy()
        prod_t = thf.from_hf(producer, implementation="math")
        hf_p, t_p = (producer, x_p), (prod_t, x_p)
        j_p, ref_p = (jhf.from_hf(producer, implementation="math"), x_p), (prod_t, p_c, x_p)
    low = dtype in ("bfloat16", "float16")
    results = {
        "transformers": run_transformers(module, family, c, x, mask, pos, dy, decode, hf_p),
        "jax_attn": run_jax_port(ours_j, x, mask, pos, dy, decode, j_p),
        "torch_attn": run_torch_twin(ours_t, x, mask, pos, dy, decode, producer=t_p),
    }
    ref, naive, magnitudes = _reference(ours_t, c, x, mask, pos, dy, decode, dtype, ref_p)
    if low and decode and c.rope is not None and c.rope.rope_type in SEQ_DEPENDENT:
        # The oracle has no cache: for a length-dependent rope decoded in low precision, transformers' own
        # cached decode is the same-dtype baseline.
        naive["decode_out"] = results["transformers"]["decode_out"]

    sd = module.state_dict()
    back = thf.to_hf_state_dict(ours_t, family)
    back_j = jhf.to_hf_state_dict(ours_j, family)
    round_trip = all(
        torch.equal(back[k], sd[k])
        and np.array_equal(np.asarray(back_j[k], np.float64), sd[k].double().numpy())
        for k in back
    ) and set(back) == {k for k in sd if k not in spec.ignored_keys(family)}

    hf = results["transformers"]
    record = PortRecord(
        module=type(module).__module__ + "." + type(module).__name__,
        kind=f"hf:{family}",
        dtype=dtype,
        config=_config_dict(c),
        round_trip_bit_exact=bool(round_trip),
    )
    quantities = [q for q in ref if ref[q] is not None]
    for impl in ("transformers", "jax_attn", "torch_attn"):
        # Pad query rows: excluded against transformers (and wherever it is the bf16 baseline).
        only_real = impl == "transformers" or low
        record.agreements[f"{impl} vs reference"] = [
            _judge(
                q,
                results[impl][q],
                ref[q],
                dtype,
                naive.get(q),
                real if (only_real and q in ("out", "decode_out")) else None,
                magnitudes.get(q, 0.0),
            )
            for q in quantities
            if q in results[impl]
        ]
    for impl in ("jax_attn", "torch_attn"):
        record.agreements[f"{impl} vs transformers"] = [
            _between(
                q,
                results[impl][q],
                hf[q],
                ref[q],
                naive.get(q),
                dtype,
                real if q in ("out", "decode_out") else None,
                magnitudes.get(q, 0.0),
            )
            for q in quantities
            if q in results[impl] and q in hf
        ]
    if print_table:
        from rich.console import Console

        Console().print(record.table())
    return record


def _check_producer(module, family, c, producer):
    """The producer's config for a kv_shared layer (ValueError when it is missing, shared itself, of another
    dtype, or its keys do not fit: kv heads, head width, window); None for other layers (producer refused)."""
    if not c.kv_shared:
        if producer is not None:
            raise ValueError(
                f"check_hf_port: producer= is for key/value-shared layers; this {family} layer computes its "
                "own keys and values"
            )
        return None
    if producer is None:
        layer = getattr(module, "layer_idx", None)
        which = ""
        if layer is not None:
            which = f" (layer {spec.kv_producer(module.config, int(layer))} of its model)"
        raise ValueError(
            f"check_hf_port: this {family} layer reads another layer's keys and values (kv_shared); pass "
            f"producer=, the attention module that stores them{which}"
        )
    p_family, p_c = spec.describe_module(producer)
    if p_family != family or p_c.kv_shared or _dtype_name(producer) != _dtype_name(module):
        raise ValueError(
            f"check_hf_port: the producer must be a {family} layer computing its keys and values, in the "
            f"consumer's dtype {_dtype_name(module)}; got a {p_family} layer (kv_shared={p_c.kv_shared}, "
            f"dtype {_dtype_name(producer)})"
        )
    if (p_c.K, p_c.H, p_c.sliding_window) != (c.K, c.H, c.sliding_window):
        raise ValueError(
            "check_hf_port: the producer's keys do not fit the consumer: (kv heads, head width, window) "
            f"{(p_c.K, p_c.H, p_c.sliding_window)} vs {(c.K, c.H, c.sliding_window)}"
        )
    if not getattr(producer, "store_full_length_kv", True):
        raise ValueError(
            "check_hf_port: the producer module does not store its keys and values (store_full_length_kv is "
            "False: not the last non-shared layer of its type); pass attn_spec.hf.kv_producer's layer"
        )
    return p_c


def _between(q, got, hf, ref, naive, dtype, rows, magnitude) -> Agreement:
    """A port vs transformers: the policy's tolerance against the reference plus transformers' own distance
    from it, at most that same tolerance (the triangle inequality: both may sit on either side of the
    reference; a transformers module outside the tolerance grants nothing beyond it, so a knob mapped
    wrongly in both twins and the reference still fails here)."""
    if rows is not None:
        got, hf, ref = got[rows], hf[rows], ref[rows]
        naive = None if naive is None else naive[rows]
    tol = _tolerance(dtype, ref, naive, magnitude)
    tol += min(tol, float(np.max(np.abs(hf - ref), initial=0.0)))
    return compare_arrays(q, got, hf, dtype, tol=tol)


def _config_dict(c) -> dict:
    d = asdict(c)
    if d.get("rope"):
        d["rope"] = {k: v for k, v in d["rope"].items() if v is not None}
    return d


# ---------------------------------------------------------------------------------------------------------
# The docs table (docs/porting.md): every family's tiny module through check_hf_port, fp32 and bf16.
# ---------------------------------------------------------------------------------------------------------

TABLE_CASES = (
    ("llama", 0, "llama3 rope, GQA"),
    ("mistral", 0, "window 3, GQA"),
    ("qwen2", 1, "q/k/v biases, window 3 from max_window_layers"),
    ("qwen3", 0, "per-head QK-norm (eps 1e-5), head_dim 8"),
    ("gemma2", 0, "window 3, soft-cap 2, query_pre_attn_scalar 12, head_dim 16"),
    ("gemma2", 1, "global layer, soft-cap 2"),
    ("gemma3_text", 0, "local layer: theta 1e4, window 3, QK-norm 1 + w"),
    ("gemma3_text", 1, "global layer: theta 1e6"),
    ("phi3", 0, "fused qkv_proj, longrope (long factors past 4 positions)"),
    ("olmo2", 0, "full-width QK-norm, MHA"),
    ("gpt_oss", 0, "sinks, yarn, window 3, biases"),
    ("gpt_oss", 1, "sinks, yarn, global layer"),
    ("gpt_neox", 0, "fused per-head qkv, rotary_pct 0.25, biases"),
    ("gpt2", 1, "Conv1D c_attn, scale / (layer + 1)"),
    ("bert", 0, "bidirectional, q/k/v/o biases (post-LN outside)"),
    ("vit", 0, "bidirectional, qkv_bias"),
)


def _worst(record, pairs, kind) -> float:
    def pick(q):
        return {"fwd": q == "out", "grad": q.startswith("grad_"), "decode": q == "decode_out"}[kind]

    vals = [a.max_abs for p in pairs for a in record.agreements[p] if pick(a.quantity)]
    return max(vals) if vals else float("nan")


def family_table(dtypes=("float32", "bfloat16")) -> list[dict]:
    """One row per (case, dtype): the worst error of both ports vs the float64 reference and vs transformers
    (forward, gradients, decode), and whether the whole record agrees."""
    rows = []
    ports = ("jax_attn vs reference", "torch_attn vs reference")
    vs_hf = ("jax_attn vs transformers", "torch_attn vs transformers")
    for family, layer, knobs in TABLE_CASES:
        for dtype in dtypes:
            module, _ = tiny_module(family, layer, dtype, seed=layer)
            rec = check_hf_port(
                module, post_norm_outside=spec.entry(family).causal == "bert", print_table=False
            )
            row = {"family": family, "layer": layer, "knobs": knobs, "dtype": dtype, "ok": rec.ok}
            row["policy_ratio"] = max(
                a.max_abs / a.tol for p in ports + vs_hf for a in rec.agreements[p] if a.tol > 0
            )
            for kind in ("fwd", "grad", "decode"):
                row[f"ref_{kind}"] = _worst(rec, ports, kind)
                row[f"hf_{kind}"] = _worst(rec, vs_hf, kind)
                row[f"transformers_{kind}"] = _worst(rec, ("transformers vs reference",), kind)
            rows.append(row)
    return rows


def table_markdown(rows) -> str:
    def f(v):
        return "–" if v != v else f"{v:.1e}"

    out = [
        "| family | layer | knobs covered | dtype | port vs f64 fwd / grad / decode | port vs transformers "
        "fwd / grad / decode | transformers vs f64 fwd / grad | worst error / tolerance | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['family']} | {r['layer']} | {r['knobs']} | {r['dtype']} | {f(r['ref_fwd'])} / "
            f"{f(r['ref_grad'])} / {f(r['ref_decode'])} | {f(r['hf_fwd'])} / {f(r['hf_grad'])} / "
            f"{f(r['hf_decode'])} | {f(r['transformers_fwd'])} / {f(r['transformers_grad'])} | "
            f"{r['policy_ratio']:.2f} | {'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Coverage over the installed transformers: each family ported (worst error vs transformers) or refused (the
# parameter or knob named by the reader).
# ---------------------------------------------------------------------------------------------------------

# Model_types of transformers 5.x probed beyond the table (tiny models from their default configs): the
# reader decides each from its attention module (attn_spec.hf, "A model_type with no entry"). The encoders
# last: ViT/BERT relatives whose attention is not ViT's or BERT's (BEiT and VideoMAE: no key bias, BEiT's
# relative position bias; the pre-LN RoBERTa variants: a LayerNorm inside the attention block).
COVERAGE_CANDIDATES = (
    "helium",
    "arcee",
    "apertus",
    "seed_oss",
    "ernie4_5",
    "ernie4_5_moe",
    "internlm3",
    "nanochat",
    "olmoe",
    "flex_olmo",
    "phimoe",
    "jetmoe",
    "bitnet",
    "diffllama",
    "doge",
    "gemma3n_text",
    "beit",
    "data2vec-vision",
    "videomae",
    "roberta-prelayernorm",
    "xlm-roberta-xl",
)
_SHRINK = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=64,
    vocab_size=64,
    max_position_embeddings=64,
    head_dim=8,
    num_experts=2,
    num_local_experts=2,
    n_routed_experts=2,
    num_experts_per_tok=1,
    moe_intermediate_size=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


# Coverage rows of a key/value-shared layer: name -> (family, layer of tiny_module(..., shared_kv=True)).
SHARED_KV_PROBES = {"gemma4_text/kv_shared": ("gemma4_text", 2)}


def _probe_pair(name: str):
    """``(module, producer)``: :func:`_probe`'s module and None, or for a :data:`SHARED_KV_PROBES` row the
    shared layer of the four-layer tiny Gemma 4 and the layer whose keys and values it reads."""
    if name in SHARED_KV_PROBES:
        family, layer = SHARED_KV_PROBES[name]
        module, model = tiny_module(family, layer, shared_kv=True)
        return module, producer_of(model, layer)
    return _probe(name), None


def _probe(model_type: str):
    """Layer 0's attention of a tiny ``model_type`` model: :func:`tiny_module` for the table's families,
    else the default config shrunk (only the keys it has)."""
    import torch
    import transformers as tf

    if model_type in spec.FAMILY_TABLE:
        return tiny_module(model_type, 0)[0]
    default = tf.AutoConfig.for_model(model_type)
    keys = set(default.to_dict()) | {k for k in _SHRINK if hasattr(default, k)}
    cfg = tf.AutoConfig.for_model(model_type, **{k: v for k, v in _SHRINK.items() if k in keys})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    try:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError):
        model = tf.AutoModel.from_config(cfg)
    return randomize_(attention_of(model.float().eval(), 0), 0)


def coverage_table(model_types=None, dtypes=("float32",)) -> tuple[list[dict], str]:
    """``(rows, markdown)``: for each model_type (default: :data:`attn_spec.hf.FAMILIES`,
    :data:`SHARED_KV_PROBES` (a key/value-shared layer, checked with its producer) and
    :data:`COVERAGE_CANDIDATES`), its tiny layer-0 attention ported and judged by :func:`check_hf_port`
    against transformers (worst error of both ports vs transformers over outputs, gradients and decode, per
    dtype, and whether the whole record agrees), or the reader's refusal (the parameter or knob it names), or
    why no tiny model could be built."""
    import torch

    rows = []
    default = (*spec.FAMILIES, *SHARED_KV_PROBES, *COVERAGE_CANDIDATES)
    for mt in dict.fromkeys(model_types or default):
        row = {"model_type": mt, "status": "", "detail": "", "errors": {}, "ok": None}
        try:
            module, producer = _probe_pair(mt)
        except Exception as err:  # noqa: BLE001 (any failure to build is reported, not raised)
            row.update(status="not built", detail=f"{type(err).__name__}: {str(err)[:160]}")
            rows.append(row)
            continue
        post_ln = mt in spec.FAMILY_TABLE and spec.entry(mt).causal == "bert"
        try:
            spec.describe_module(module, post_ln)
        except ValueError as err:
            row.update(status="refused", detail=str(err).removeprefix(spec.NAME + ": ")[:240])
            rows.append(row)
            continue
        known = mt in spec.FAMILY_TABLE or mt in SHARED_KV_PROBES
        row["status"] = "ported" if known else "ported (inferred from its module)"
        oks = []
        for dtype in dtypes:
            try:
                if producer is not None:
                    producer = producer.to(getattr(torch, dtype))
                rec = check_hf_port(
                    module.to(getattr(torch, dtype)),
                    post_norm_outside=post_ln,
                    print_table=False,
                    producer=producer,
                )
            except Exception as err:  # noqa: BLE001
                row["detail"] = f"check failed: {type(err).__name__}: {str(err)[:160]}"
                oks.append(False)
                continue
            pairs = ("jax_attn vs transformers", "torch_attn vs transformers")
            row["errors"][dtype] = max(a.max_abs for p in pairs for a in rec.agreements[p])
            oks.append(rec.ok and rec.round_trip_bit_exact)
        row["ok"] = all(oks)
        rows.append(row)
    return rows, coverage_markdown(rows, dtypes)


COVERAGE_BEGIN = "<!-- coverage table: written by `python -m compare port --families --write-docs` -->"
COVERAGE_END = "<!-- end of the coverage table -->"


def write_coverage_docs(markdown: str, path) -> None:
    """Replace the table between :data:`COVERAGE_BEGIN` and :data:`COVERAGE_END` in ``path`` (docs/porting.md)
    by ``markdown``; ValueError when the markers are missing."""
    from pathlib import Path

    from compare import report

    path = Path(path)
    text = path.read_text()
    if COVERAGE_BEGIN not in text or COVERAGE_END not in text:
        raise ValueError(
            f"write_coverage_docs: {path} lacks the markers {COVERAGE_BEGIN!r} / {COVERAGE_END!r}"
        )
    head, rest = text.split(COVERAGE_BEGIN, 1)
    _, tail = rest.split(COVERAGE_END, 1)
    report.write_atomic(path, f"{head}{COVERAGE_BEGIN}\n{markdown}{COVERAGE_END}{tail}")


def read_coverage_docs(path) -> list[tuple[str, str, str]]:
    """``(model_type, status, agrees)`` of each row of the table in ``path`` (what the docs claim)."""
    from pathlib import Path

    text = Path(path).read_text()
    block = text.split(COVERAGE_BEGIN, 1)[1].split(COVERAGE_END, 1)[0]
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # not at "\\|"
        if len(cells) >= 4 and cells[0].startswith("`"):
            rows.append((cells[0].strip("`"), cells[1], cells[-2]))
    return rows


def coverage_markdown(rows, dtypes=("float32",)) -> str:
    head = " | ".join(f"worst vs transformers ({d})" for d in dtypes)
    out = [
        f"| model_type | status | {head} | agrees | detail |",
        "|---|---|" + "---|" * len(dtypes) + "---|---|",
    ]
    for r in rows:
        errs = " | ".join(f"{r['errors'][d]:.1e}" if d in r["errors"] else "–" for d in dtypes)
        ok = "–" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        detail = r["detail"].replace("|", "\\|").replace("\n", " ")
        out.append(f"| `{r['model_type']}` | {r['status']} | {errs} | {ok} | {detail} |")
    return "\n".join(out) + "\n"
