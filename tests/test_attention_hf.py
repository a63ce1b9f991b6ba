"""Both ``Attention`` twins against transformers' own attention modules (eager), one tiny random layer per
family of issue 14's table, same weights, a left-padded batch: the output of every real query row agrees
(≤ 1e-5 fp32). The masks come from transformers' mask functions (its causal / sliding-window / padding
conventions), the rotary tables from each family's own rotary module. Pad query rows are not compared
(transformers gives them an arbitrary average; ours gives zeros)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)
from transformers.masking_utils import (
    and_masks,
    causal_mask_function,
    padding_mask_function,
    sliding_window_causal_mask_function,
)
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.gpt_oss import modeling_gpt_oss
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.olmo2 import modeling_olmo2
from transformers.models.phi3 import modeling_phi3
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

import jax_attn.attention as jatt
import torch_attn.attention as tatt
from attn_spec.attention import AttentionConfig
from attn_spec.rope import RopeConfig

B, T, E, N, K, H = 2, 9, 24, 4, 2, 6
L0 = 64
COMMON = dict(hidden_size=E, num_attention_heads=N, num_key_value_heads=K, max_position_embeddings=L0)


def _family(name):
    """(hf config, attention class, rotary class, layer_type or None, our config kwargs)."""
    if name == "llama3":
        rp = {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 4,
        }
        cfg = LlamaConfig(**COMMON, head_dim=H, rope_parameters=rp)
        return cfg, modeling_llama.LlamaAttention, modeling_llama.LlamaRotaryEmbedding, None, {}
    if name == "mistral":
        cfg = MistralConfig(**COMMON, head_dim=H, sliding_window=3)
        return (
            cfg,
            modeling_mistral.MistralAttention,
            modeling_mistral.MistralRotaryEmbedding,
            None,
            {"sliding_window": 3},
        )
    if name == "qwen2":
        cfg = Qwen2Config(**COMMON)
        return (
            cfg,
            modeling_qwen2.Qwen2Attention,
            modeling_qwen2.Qwen2RotaryEmbedding,
            None,
            {
                "q_bias": True,
                "k_bias": True,
                "v_bias": True,
            },
        )
    if name == "qwen3":
        cfg = Qwen3Config(**COMMON, head_dim=H, rms_norm_eps=1e-5)
        return (
            cfg,
            modeling_qwen3.Qwen3Attention,
            modeling_qwen3.Qwen3RotaryEmbedding,
            None,
            {
                "qk_norm": "head",
                "qk_norm_eps": 1e-5,
            },
        )
    if name == "gemma2":
        cfg = Gemma2Config(
            **COMMON, head_dim=8, query_pre_attn_scalar=10, attn_logit_softcapping=1.5, sliding_window=4
        )
        return (
            cfg,
            modeling_gemma2.Gemma2Attention,
            modeling_gemma2.Gemma2RotaryEmbedding,
            None,
            {
                "head_dim": 8,
                "query_pre_attn_scalar": 10,
                "softcap": 1.5,
                "sliding_window": 4,
            },
        )
    if name == "gemma3_local":
        cfg = Gemma3TextConfig(
            **COMMON, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, rms_norm_eps=1e-6
        )
        return (
            cfg,
            modeling_gemma3.Gemma3Attention,
            modeling_gemma3.Gemma3RotaryEmbedding,
            "sliding_attention",
            {
                "head_dim": 8,
                "query_pre_attn_scalar": 8,
                "sliding_window": 4,
                "qk_norm": "head",
                "qk_norm_offset": 1.0,
            },
        )
    if name == "phi3_longrope":
        rp = {
            "rope_type": "longrope",
            "rope_theta": 1e4,
            "short_factor": [1.0, 1.1],
            "long_factor": [1.5, 3.0],
            "original_max_position_embeddings": 4,
            "partial_rotary_factor": 0.5,
        }
        cfg = Phi3Config(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=L0,
            original_max_position_embeddings=4,
            rope_parameters=rp,
        )
        return cfg, modeling_phi3.Phi3Attention, modeling_phi3.Phi3RotaryEmbedding, None, {"hidden_size": 32}
    if name == "olmo2":
        cfg = Olmo2Config(**{**COMMON, "num_key_value_heads": N}, rms_norm_eps=1e-6)
        return (
            cfg,
            modeling_olmo2.Olmo2Attention,
            modeling_olmo2.Olmo2RotaryEmbedding,
            None,
            {
                "num_kv_heads": N,
                "qk_norm": "full",
            },
        )
    if name == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=32,
            num_attention_heads=4,
            max_position_embeddings=L0,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25},
            attention_bias=True,
        )
        return (
            cfg,
            modeling_gpt_neox.GPTNeoXAttention,
            modeling_gpt_neox.GPTNeoXRotaryEmbedding,
            None,
            {
                "hidden_size": 32,
                "num_kv_heads": 4,
                **{f"{p}_bias": True for p in "qkvo"},
            },
        )
    if name == "gpt_oss":
        rp = {
            "rope_type": "yarn",
            "rope_theta": 15e4,
            "factor": 16.0,
            "original_max_position_embeddings": 4,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        }
        cfg = GptOssConfig(**COMMON, head_dim=H, sliding_window=3, rope_parameters=rp, attention_bias=True)
        return (
            cfg,
            modeling_gpt_oss.GptOssAttention,
            modeling_gpt_oss.GptOssRotaryEmbedding,
            None,
            {
                "sliding_window": 3,
                "sinks": True,
                **{f"{p}_bias": True for p in "qkvo"},
            },
        )
    raise KeyError(name)


FAMILIES = [
    "llama3",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_local",
    "phi3_longrope",
    "olmo2",
    "gpt_neox",
    "gpt_oss",
]


def _ours_config(cfg, kwargs, layer_type) -> AttentionConfig:
    rp = cfg.rope_parameters[layer_type] if layer_type else cfg.rope_parameters
    rp = {k: v for k, v in rp.items() if v is not None}
    E_, N_ = kwargs.pop("hidden_size", E), N
    H_ = kwargs.pop("head_dim", E_ // N_)
    return AttentionConfig(
        hidden_size=E_,
        num_heads=N_,
        num_kv_heads=kwargs.pop("num_kv_heads", K),
        head_dim=H_,
        rope=RopeConfig.from_hf(rp, max_position_embeddings=L0),
        qk_norm_eps=kwargs.pop("qk_norm_eps", 1e-6),
        **kwargs,
    )


def _hf_state_dict(name, sd, c: AttentionConfig) -> dict:
    """Our keys to the family's (fused qkv for Phi-3 and GPT-NeoX)."""
    if name == "phi3_longrope":
        return {
            "qkv_proj.weight": torch.cat([sd["q_proj.weight"], sd["k_proj.weight"], sd["v_proj.weight"]]),
            "o_proj.weight": sd["o_proj.weight"],
        }
    if name == "gpt_neox":
        per_head = lambda key: torch.stack(
            [sd[f"{p}_proj.{key}"].reshape(c.N, c.H, *sd[f"{p}_proj.{key}"].shape[1:]) for p in "qkv"], 1
        )
        return {
            "query_key_value.weight": per_head("weight").reshape(3 * c.N * c.H, c.E),
            "query_key_value.bias": per_head("bias").reshape(3 * c.N * c.H),
            "dense.weight": sd["o_proj.weight"],
            "dense.bias": sd["o_proj.bias"],
        }
    return dict(sd)


@pytest.mark.parametrize("name", FAMILIES)
def test_twins_match_transformers_module(name):
    cfg, attn_cls, rotary_cls, layer_type, kwargs = _family(name)
    cfg._attn_implementation = "eager"
    c = _ours_config(cfg, dict(kwargs), layer_type)
    torch.manual_seed(0)
    ours_t = tatt.Attention(c, implementation="math").eval()
    with torch.no_grad():
        for p in ours_t.parameters():
            p.normal_(0.0, 0.4)
    sd = {k: v.detach().clone() for k, v in ours_t.state_dict().items()}
    hf = attn_cls(cfg, layer_idx=0).eval()
    hf.load_state_dict(_hf_state_dict(name, sd, c), strict=True)
    ours_j = jatt.Attention(c, implementation="math", rngs=nnx.Rngs(0))
    ours_j.load_torch_state_dict(sd)
    ours_j.deterministic = True

    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, c.E)).astype(np.float32)
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = 0  # left padding
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # positions skip the pads
    xt = torch.from_numpy(x)

    rotary = rotary_cls(cfg)
    cos, sin = (
        rotary(xt, torch.from_numpy(pos), layer_type) if layer_type else rotary(xt, torch.from_numpy(pos))
    )
    # The family's own window: the layer's attribute, or Mistral's config-wide one.
    window = getattr(hf, "sliding_window", None) or getattr(cfg, "sliding_window", None)
    if name in ("qwen2", "qwen3"):
        window = hf.sliding_window  # their configs carry a window that only sliding layers use
    base = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    fn = and_masks(base, padding_mask_function(torch.from_numpy(mask).bool()))
    b, q, kv = np.meshgrid(np.arange(B), np.arange(T), np.arange(T), indexing="ij")
    keep = fn(torch.from_numpy(b), 0, torch.from_numpy(q), torch.from_numpy(kv))
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        want = hf(xt, position_embeddings=(cos, sin), attention_mask=additive)[0].numpy()
        got_t = ours_t(xt, torch.from_numpy(mask), torch.from_numpy(pos)).numpy()
    got_j = np.asarray(ours_j(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(pos)))
    real = mask.astype(bool)
    scale = max(1.0, np.abs(want[real]).max())
    assert np.abs(got_t - want)[real].max() <= 1e-5 * scale
    assert np.abs(got_j - want)[real].max() <= 1e-5 * scale
    assert np.all(got_t[~real] == 0) or c.o_bias  # pad rows: zeros before o_proj's bias
