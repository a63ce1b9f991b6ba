"""``attn_spec.hf`` and the ``from_hf`` / ``to_hf_state_dict`` twins: configs per family and layer, weight
layouts (bit-exact round trips in fp32, bf16 and fp16), and every unsupported knob raising ``ValueError`` with
the same text in both twins."""

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import jax_attn.hf as jhf  # noqa: E402
import torch_attn.hf as thf  # noqa: E402
from attn_spec import hf as spec  # noqa: E402
from compare import port_hf  # noqa: E402

FAMILIES = spec.FAMILIES


def _module(family, layer=0, dtype="float32"):
    return port_hf.tiny_module(family, layer, dtype, seed=3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_bit_exact(family, dtype):
    module, _ = _module(family, 0, dtype)
    kw = {"post_norm_outside": True} if spec.entry(family).causal == "bert" else {}
    sd = {k: v for k, v in module.state_dict().items() if k not in spec.ignored_keys(family)}
    back_t = thf.to_hf_state_dict(thf.from_hf(module, **kw), family)
    back_j = jhf.to_hf_state_dict(jhf.from_hf(module, **kw), family)
    assert set(back_t) == set(sd) == set(back_j)
    for k, v in sd.items():
        assert back_t[k].dtype == v.dtype and torch.equal(back_t[k], v), k
        assert np.asarray(back_j[k]).dtype.name == dtype
        assert np.array_equal(np.asarray(back_j[k]).astype(np.float64), v.double().numpy()), k


def test_fused_layouts_split_as_transformers_slices():
    """Phi-3 rows [q | k | v], GPT-NeoX per-head (N, 3, H), GPT-2 Conv1D columns: ours equal the slices
    transformers' forward takes."""
    m, _ = _module("phi3")
    ours = thf.from_hf(m).torch_state_dict()
    w = m.qkv_proj.weight
    N, K, H = 4, 2, 8
    assert torch.equal(ours["k_proj.weight"], w[N * H : N * H + K * H])
    m, _ = _module("gpt_neox")
    ours = thf.from_hf(m).torch_state_dict()
    w = m.query_key_value.weight.view(4, 3, 8, 32)
    assert torch.equal(ours["v_proj.weight"], w[:, 2].reshape(32, 32))
    m, _ = _module("gpt2")
    ours = thf.from_hf(m).torch_state_dict()
    assert torch.equal(ours["k_proj.weight"], m.c_attn.weight[:, 32:64].T)
    assert torch.equal(ours["o_proj.weight"], m.c_proj.weight.T)


def test_layer_index_selects_window_and_rope():
    cfg = port_hf.tiny_config("gemma3_text")
    _, local = spec.attention_config(cfg, 0)
    _, glob = spec.attention_config(cfg, 1)
    assert (local.sliding_window, local.rope.rope_theta) == (3, 10000.0)
    assert (glob.sliding_window, glob.rope.rope_theta) == (None, 1e6)
    assert local.qk_norm == "head" and local.qk_norm_offset == 1.0 and local.query_pre_attn_scalar == 8
    for family in ("gemma2", "gpt_oss"):
        cfg = port_hf.tiny_config(family)
        assert [spec.attention_config(cfg, i)[1].sliding_window for i in (0, 1)] == [3, None]
    cfg = port_hf.tiny_config("qwen2")  # max_window_layers=1
    assert [spec.attention_config(cfg, i)[1].sliding_window for i in (0, 1)] == [None, 3]
    cfg = port_hf.tiny_config("qwen2", use_sliding_window=False, sliding_window=None, layer_types=None)
    assert [spec.attention_config(cfg, i)[1].sliding_window for i in (0, 1)] == [None, None]
    cfg = port_hf.tiny_config("gpt2")
    assert spec.attention_config(cfg, 1)[1].logit_scale == pytest.approx(8**-0.5 / 2)
    _, c = spec.attention_config(port_hf.tiny_config("gemma2"), 0)
    assert (c.softcap, c.logit_scale, c.head_dim) == (2.0, 12**-0.5, 16)
    # Gemma 3's attention ignores attn_logit_softcapping in transformers; so does the port.
    assert (
        spec.attention_config(port_hf.tiny_config("gemma3_text", attn_logit_softcapping=2.0), 0)[1].softcap
        is None
    )


def _llama_dict(**kw):
    d = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "max_position_embeddings": 64,
    }
    d.update(kw)
    return d


def test_legacy_config_json_keys():
    """config.json dicts of older transformers: rope_theta/rope_scaling, rotary_pct, rope_local_base_freq."""
    _, c = spec.attention_config(_llama_dict(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}))
    assert (c.rope.rope_type, c.rope.rope_theta, c.rope.factor) == ("linear", 5e5, 2.0)
    neox = {"model_type": "gpt_neox", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2}
    _, c = spec.attention_config(
        {**neox, "rotary_pct": 0.5, "rotary_emb_base": 500.0, "attention_bias": True}
    )
    assert (c.R, c.rope.rope_theta, c.o_bias) == (4, 500.0, True)
    g3 = {**_llama_dict(), "model_type": "gemma3_text", "head_dim": 8, "sliding_window": 4}
    g3.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=2)
    assert spec.attention_config(g3, 0)[1].rope.rope_theta == 1e4
    assert spec.attention_config(g3, 1)[1].rope.rope_theta == 1e6
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 2}
    assert spec.attention_config(gpt2, 0)[1].hidden_size == 32


@pytest.mark.parametrize(
    "config,match",
    [
        (_llama_dict(model_type="t5"), "unsupported model_type='t5'"),
        (_llama_dict(rope_parameters={"rope_type": "su2", "rope_theta": 1e4}), "unknown rope_type='su2'"),
        (
            _llama_dict(
                model_type="qwen2_vl_text",
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1]},
            ),
            "mrope_section",
        ),
        (_llama_dict(model_type="mistral", layer_types=["full_attention"] * 2), "layer_types"),
        (
            _llama_dict(model_type="gemma2", sliding_window=4, use_bidirectional_attention=True),
            "bidirectional",
        ),
        (_llama_dict(model_type="qwen2", layer_types=["sliding_attention"] * 2), "sliding_window=None"),
        (_llama_dict(layer_types=["chunked_attention"] * 2, model_type="qwen3"), "layer_types\\[0\\]"),
        (
            {
                "model_type": "bert",
                "hidden_size": 8,
                "num_attention_heads": 2,
                "position_embedding_type": "relative_key",
            },
            "position_embedding_type",
        ),
    ],
    ids=[
        "model_type",
        "rope_type",
        "rope_key",
        "mistral_layer_types",
        "bidirectional",
        "window_none",
        "layer_type",
        "bert_relative",
    ],
)
def test_unsupported_knobs_raise(config, match):
    with pytest.raises(ValueError, match=match):
        spec.attention_config(config, 0)


def test_layer_out_of_range():
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\); got layer=2"):
        spec.attention_config(_llama_dict(), 2)


def _both_raise(module, match, **kw):
    errors = []
    for twin in (jhf, thf):
        with pytest.raises(ValueError, match=match) as info:
            twin.from_hf(module, **kw)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_module_knobs_raise_the_same_in_both_twins():
    module, model = _module("bert")
    _both_raise(module, "post-LN")
    _both_raise(module.self, "BERT ports the BertAttention block")
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    cfg = port_hf.tiny_config("gpt2")
    _both_raise(GPT2Attention(cfg, is_cross_attention=True, layer_idx=0), "is_cross_attention")
    _both_raise(GPT2Attention(cfg, layer_idx=0).train(), "resid_pdrop")
    with pytest.raises(ValueError, match="expected a transformers attention module"):
        jhf.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown family='t5'"):
        jhf.to_hf_state_dict(jhf.from_hf(_module("llama")[0]), "t5")


def test_training_mode_and_dropout_follow_the_module():
    module, _ = _module("gpt2")  # attn_pdrop 0.1, resid_pdrop 0.1
    module.config.resid_pdrop = 0.0
    module.train()
    t, j = thf.from_hf(module), jhf.from_hf(module)
    assert t.training and not j.deterministic and t.config.dropout == 0.1
    module.eval()
    assert not thf.from_hf(module).training and jhf.from_hf(module).deterministic


# ------------------------------------------------------------------------------------------------------------
# The reader by mechanism (issue #22): knobs count only where the family's own modeling code reads them.
# ------------------------------------------------------------------------------------------------------------


def test_llama_ignores_partial_rotary_factor():
    """transformers' Llama rotary embedding never reads partial_rotary_factor: the port rotates the full head
    (it used to port R = H/2 and disagree with transformers by ~2)."""
    from compare import port

    rp = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    cfg = port_hf.tiny_config("llama", rope_parameters=rp)
    _, c = spec.attention_config(cfg, 0)
    assert c.R == c.H == 8
    assert spec.attention_config(_llama_dict(partial_rotary_factor=0.5), 0)[1].R == 8
    module, _ = port_hf.tiny_module("llama", 0, rope_parameters=rp)
    record = port.check_port(module, print_table=False)
    assert record.ok, [
        (p, a.quantity, a.max_abs) for p, r in record.agreements.items() for a in r if not a.ok
    ]
    # Families whose rotary reads it keep it.
    assert spec.attention_config(port_hf.tiny_config("phi"), 0)[1].R == 4
    assert spec.attention_config(port_hf.tiny_config("stablelm"), 0)[1].R == 2


def test_new_families_map_their_knobs():
    c = spec.attention_config(port_hf.tiny_config("glm"), 0)[1]
    assert (c.rope.layout, c.R, c.q_bias, c.o_bias) == ("interleaved", 4, True, False)
    c = spec.attention_config(port_hf.tiny_config("cohere"), 0)[1]
    assert (c.rope.layout, c.R, c.o_bias) == ("interleaved", 8, True)
    cfg = port_hf.tiny_config("cohere2")  # sliding layer rotates (interleaved), full layer is NoPE
    c0, c1 = (spec.attention_config(cfg, i)[1] for i in (0, 1))
    assert (c0.rope.layout, c0.sliding_window, c1.rope, c1.sliding_window) == ("interleaved", 3, None, None)
    cfg = port_hf.tiny_config("exaone4")
    c0, c1 = (spec.attention_config(cfg, i)[1] for i in (0, 1))
    assert (c0.R, c0.sliding_window, c0.qk_norm, c1.rope, c1.sliding_window) == (8, 3, "head", None, None)
    d = {"model_type": "exaone4", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2}
    assert spec.attention_config(d, 1)[1].rope is not None  # no window: every EXAONE 4 layer rotates
    c = spec.attention_config(port_hf.tiny_config("glm4_moe"), 0)[1]
    assert (c.rope.layout, c.R, c.qk_norm, c.o_bias) == ("half", 4, "head", False)
    c = spec.attention_config(port_hf.tiny_config("glm4_moe", use_qk_norm=False), 0)[1]
    assert c.qk_norm == "none"
    cfg = port_hf.tiny_config("ministral")
    assert [spec.attention_config(cfg, i)[1].sliding_window for i in (0, 1)] == [3, None]
    c = spec.attention_config(port_hf.tiny_config("gptj"), 0)[1]  # rotary_dim 4 of head_dim 8
    assert (c.rope.layout, c.R, c.q_bias, c.num_kv_heads) == ("interleaved", 4, False, 4)
    c = spec.attention_config(port_hf.tiny_config("granite"), 0)[1]
    assert c.logit_scale == 0.2 and c.o_bias
    cfg = port_hf.tiny_config("smollm3")  # no_rope_layers=[1, 0]
    assert spec.attention_config(cfg, 0)[1].rope is not None and spec.attention_config(cfg, 1)[1].rope is None
    cfg = port_hf.tiny_config("olmo3")
    assert [spec.attention_config(cfg, i)[1].sliding_window for i in (0, 1)] == [3, None]
    assert spec.attention_config(cfg, 0)[1].qk_norm == "full"
    assert spec.attention_config(port_hf.tiny_config("mixtral"), 1)[1].sliding_window == 3
    assert spec.attention_config(port_hf.tiny_config("starcoder2"), 0)[1].o_bias
    cfg = port_hf.tiny_config("qwen2_moe")  # layer_types: every other layer below max_window_layers
    assert [spec.attention_config(cfg, i)[1].sliding_window for i in (0, 1)] == [3, None]
    c = spec.attention_config(port_hf.tiny_config("qwen3_moe"), 0)[1]
    assert (c.qk_norm, c.sliding_window) == ("head", None)
    c = spec.attention_config(port_hf.tiny_config("gemma"), 0)[1]
    assert (c.head_dim, c.logit_scale, c.qk_norm) == (16, 0.25, "none")
    # config.json dicts: the defaults their config classes leave implicit
    d = {"model_type": "starcoder2", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2}
    assert spec.attention_config(d, 0)[1].o_bias
    d = {**d, "model_type": "smollm3", "num_hidden_layers": 4}
    assert [spec.attention_config(d, i)[1].rope is None for i in range(4)] == [False, False, False, True]


@pytest.mark.parametrize(
    "family,knob",
    [
        ("gemma2", "use_bidirectional_attention"),
        ("gemma3_text", "use_bidirectional_attention"),
        ("gemma4_text", "use_bidirectional_attention"),
    ],
)
def test_knobs_of_new_families_raise(family, knob):
    cfg = port_hf.tiny_config(family, **{knob: "vision" if family == "gemma4_text" else True})
    with pytest.raises(ValueError, match=f"{family} config knob {knob}="):
        spec.attention_config(cfg, 0)


def test_unknown_model_type_ports_by_mechanism():
    """A model_type with no entry ports when its module has Llama's parameters and its config no knob whose
    use only its family could tell; otherwise the parameter or knob is named."""
    from compare import port

    module, _ = port_hf.tiny_module("qwen3", 0)
    module.config.model_type = "never_seen_qwen"
    family, c = spec.describe_module(module)
    assert family == "never_seen_qwen" and c.qk_norm == "head" and not c.q_bias
    record = port.check_port(module, print_table=False)
    assert record.ok and record.round_trip_bit_exact and record.kind == "hf:never_seen_qwen"
    with pytest.raises(ValueError, match="unsupported model_type='never_seen_dict'"):
        spec.attention_config(_llama_dict(model_type="never_seen_dict"), 0)
    module, _ = port_hf.tiny_module("llama", 0)
    module.config.model_type = "never_seen_softcap"
    module.config.attn_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="attn_logit_softcapping=30.0"):
        spec.describe_module(module)
    module, _ = port_hf.tiny_module("phi", 0, qk_layernorm=False)
    module.config.model_type = "never_seen_phi"
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        spec.describe_module(module)
    module.config.rope_parameters = {**module.config.rope_parameters, "partial_rotary_factor": 1.0}
    with pytest.raises(ValueError, match="parameter dense.weight"):
        spec.describe_module(module)


def test_coverage_table_decides_unknown_families_from_their_modules():
    """Helium (no entry) rotates interleaved: its layout is told by running its own rotary code, and the port
    agrees with transformers; BitNet's attention carries a sub-norm before o_proj that no mechanism
    expresses: refused, naming the parameter."""
    rows, md = port_hf.coverage_table(["helium", "bitnet"])
    helium, bitnet = rows
    assert helium["status"].startswith("ported") and helium["ok"] and helium["errors"]["float32"] < 1e-4
    assert spec.entry("helium").rope == "interleaved"
    assert bitnet["status"] == "refused" and "attn_sub_norm.weight" in bitnet["detail"]
    assert "| `helium` | ported (inferred from its module) |" in md


def test_a_knob_the_family_does_not_read_is_ignored():
    """LlamaRotaryEmbedding never reads mrope_section, LlamaAttention never reads attention_chunk_size: a
    Llama config carrying them ports as plain Llama (a knob counts only where the family's code reads it)."""
    cfg = _llama_dict(
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]},
        attention_chunk_size=3,
    )
    _, c = spec.attention_config(cfg, 0)
    assert c.rope.mrope_section is None and c.chunk_size is None
