"""MultiHeadLatentAttention: the configuration and its errors (one text for both twins), the Hugging Face
mapping of each family (rotary layout, yarn mscale softmax scale, the indexer's layout, GLM-5 shared
layers), transformers' parameter names, and state dicts bit-exact both ways in fp32 and bf16."""

import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn.mla as jmla
import torch_attn.mla as tmla
from attn_spec import mla as spec
from attn_spec.mla import MLAConfig, state_dict_shapes
from attn_spec.rope import RopeConfig
from compare import port_mla

BASE = dict(hidden_size=20, num_heads=3, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"kv_lora_rank": 0}, "kv_lora_rank must be a positive int; got kv_lora_rank=0"),
        ({"qk_rope_head_dim": 5}, "the rotary width must be even"),
        ({"q_lora_rank": 0}, "q_lora_rank must be a positive int or None"),
        (
            {"index_topk": 2, "index_n_heads": 1, "index_head_dim": 8},
            "the sparse indexer reads the query latent",
        ),
        (
            {"q_lora_rank": 4, "index_topk": 2, "index_n_heads": 1, "index_head_dim": 4},
            "index_head_dim must be",
        ),
        ({"index_n_heads": 2}, "set without index_topk"),
        ({"rope": RopeConfig(partial_rotary_factor=0.5)}, "rotates all qk_rope_head_dim channels"),
    ],
)
def test_config_errors(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MLAConfig(**{**BASE, **kw})


def test_call_errors_have_one_text_in_both_twins():
    c = MLAConfig(**BASE, q_lora_rank=6, index_topk=2, index_shared=True)
    tm = tmla.MultiHeadLatentAttention(c)
    jm = nnx.eval_shape(lambda: jmla.MultiHeadLatentAttention(c, rngs=nnx.Rngs(0)))
    x = np.zeros((1, 3, 20), np.float32)
    texts = []
    for call in (lambda: tm(torch.from_numpy(x)), lambda: jm(jnp.asarray(x))):
        with pytest.raises(ValueError, match="shares an earlier layer's selection") as e:
            call()
        texts.append(str(e.value))
    for call in (lambda: tm(torch.zeros(1, 3, 7)), lambda: jm(jnp.zeros((1, 3, 7)))):
        with pytest.raises(ValueError, match="x's last axis must be hidden_size=20") as e:
            call()
        texts.append(str(e.value))
    assert texts[0] == texts[1] and texts[2] == texts[3]
    assert texts[0].startswith("MultiHeadLatentAttention: ")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_dict_round_trips_bit_exact(dtype):
    c = MLAConfig(**BASE, q_lora_rank=6, attention_bias=True, index_topk=2, index_n_heads=2, index_head_dim=8)
    tm = tmla.MultiHeadLatentAttention(c, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_()
    # jax_attn.mla's builder (from_hf, load_layer): abstract construction, then the weights
    jm = jmla._build(c, {k: jmla._to_numpy(v) for k, v in tm.state_dict().items()}, None)
    assert jm.kv_b_proj.weight[...].dtype == getattr(jnp, dtype)
    back = tmla.MultiHeadLatentAttention(c, dtype=getattr(torch, dtype))
    back.load_torch_state_dict(jm.torch_state_dict())
    assert list(tm.state_dict()) == list(state_dict_shapes(c)) == list(jm.torch_state_dict())
    for k, v in tm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
        assert np.array_equal(np.asarray(jm.torch_state_dict()[k]).view(np.uint8), _bytes(v))


def _bytes(t):
    a = t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
    return a.view(np.uint8)


def test_hf_mapping_of_each_family():
    for family, layer, overrides, layout, index_layout in (
        ("deepseek_v2", 0, {}, "interleaved", None),
        ("deepseek_v3", 0, {"rope_interleave": False}, "half", None),
        ("glm4_moe_lite", 0, {}, "interleaved", None),
        ("deepseek_v32", 0, {}, "interleaved", "half"),
        ("glm_moe_dsa", 0, {}, "interleaved", "interleaved"),
    ):
        cfg = port_mla.tiny_config(family, **overrides, rope_parameters=port_mla.YARN)
        fam, c = spec.mla_config(cfg, layer)
        assert fam == family and c.rope.layout == layout
        assert (c.index_rope_layout if c.has_indexer else None) == index_layout
        assert c.rope.rope_type == "yarn" and c.rope.mscale_all_dim == 0.8
    module, _ = port_mla.tiny_module("deepseek_v3", rope_parameters=port_mla.YARN)
    _, c = spec.describe_module(module)
    assert c.logit_scale == pytest.approx(module.scaling, rel=1e-15)  # transformers' yarn_apply_mscale
    assert c.logit_scale != pytest.approx(c.H**-0.5)
    _, shared = spec.mla_config(port_mla.tiny_config("glm_moe_dsa", indexer_types=["full", "shared"]), 1)
    assert shared.index_shared and not shared.has_indexer
    assert not any(k.startswith("indexer.") for k in state_dict_shapes(shared))
