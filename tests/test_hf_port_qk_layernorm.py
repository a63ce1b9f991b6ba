"""The LayerNorm q/k-norm mechanism (``AttentionConfig.qk_norm_kind="layer"``, ``qk_norm_per_head``,
``qk_norm_bias``) ported from transformers: Cohere's ``use_qk_norm`` (CohereLayerNorm, a weight per head and
channel), StableLM's ``qk_layernorm`` (one LayerNorm per head), Phi's and Persimmon's ``qk_layernorm`` (one
LayerNorm with a bias over each head's channels), judged by ``compare.port.check_port`` against transformers
and the float64 reference (outputs on a left-padded batch, gradients w.r.t. x and every parameter, decode)."""

import pytest

pytest.importorskip("transformers")

from port_support import assert_agrees, bad, check  # noqa: E402

from attn_spec import hf as spec  # noqa: E402
from attn_spec.attention import AttentionConfig, state_dict_shapes  # noqa: E402
from compare import port_hf  # noqa: E402

# family: (qk_norm_per_head, qk_norm_bias, its weight keys in transformers' state dict)
FAMILIES = {
    "cohere": (True, False, {"q_norm.weight": (4, 8), "k_norm.weight": (2, 8)}),
    "stablelm": (True, False, {"q_layernorm.norms.3.weight": (8,), "k_layernorm.norms.1.weight": (8,)}),
    "phi": (False, True, {"q_layernorm.weight": (8,), "k_layernorm.bias": (8,)}),
    "persimmon": (False, True, {"q_layernorm.weight": (8,), "k_layernorm.bias": (8,)}),
}


def _check(family, dtype="float32"):
    return check(family, 0, dtype, seed=0)


_bad = bad


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_agrees_fp32(family):
    module, record = _check(family)
    c = assert_agrees(module, record, family)
    per_head, bias, hf_keys = FAMILIES[family]
    assert (c.qk_norm, c.qk_norm_kind, c.qk_norm_per_head, c.qk_norm_bias) == (
        "head",
        "layer",
        per_head,
        bias,
    )
    assert c.qk_norm_eps == module.config.layer_norm_eps
    sd = module.state_dict()
    assert all(tuple(sd[k].shape) == shape for k, shape in hf_keys.items())
    quantities = {a.quantity for a in record.agreements["jax_attn vs transformers"]}
    params = {f"grad_{k}" for k in state_dict_shapes(c)}
    assert {"grad_q_norm.weight", "grad_k_norm.weight"} <= params
    assert ("grad_q_norm.bias" in params) == bias
    assert {"out", "grad_x", "decode_out"} | params <= quantities


@pytest.mark.parametrize("family", ["cohere", "persimmon"])
def test_family_agrees_bf16(family):
    """Both ports agree with the reference and with transformers in bf16. Cohere's norm computes in float32
    (its whole record agrees); Persimmon's ``nn.LayerNorm`` in bf16 on the CPU sums its weight and bias
    gradients with bf16 partial sums (~1 unit of bf16 of the sum, where one rounding of a float32 sum gives
    half), which may put transformers' own norm-parameter gradients past the policy's tolerance: only those
    rows may disagree."""
    _, record = _check(family, "bfloat16")
    assert record.round_trip_bit_exact and record.dtype == "bfloat16"
    bad = _bad(record)
    if family == "cohere":
        assert record.ok, bad
    norm_grads = {f"grad_{w}_norm.{p}" for w in "qk" for p in ("weight", "bias")}
    assert all(p == "transformers vs reference" and q in norm_grads for p, q, *_ in bad), bad


def test_knobs_read_from_the_config():
    cfg = port_hf.tiny_config("phi", layer_norm_eps=0.05)
    assert spec.attention_config(cfg, 0)[1].qk_norm_eps == 0.05
    assert spec.attention_config(port_hf.tiny_config("stablelm", qk_layernorm=False), 0)[1].qk_norm == "none"
    assert spec.attention_config(port_hf.tiny_config("cohere", use_qk_norm=False), 0)[1].qk_norm == "none"
    # PersimmonConfig switches its norm on by default: a config.json without the key has it.
    d = {"model_type": "persimmon", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2}
    c = spec.attention_config(d, 0)[1]
    assert (c.qk_norm, c.qk_norm_kind, c.qk_norm_bias, c.qk_norm_eps) == ("head", "layer", True, 1e-5)
    assert spec.attention_config({**d, "qk_layernorm": False}, 0)[1].qk_norm == "none"
    # StableLM's per-head ModuleList maps to rows of ours, both ways.
    c = spec.attention_config(port_hf.tiny_config("stablelm"), 0)[1]
    keys = spec.hf_state_dict_keys("stablelm", c)
    assert [k for k in keys if "layernorm" in k] == [f"q_layernorm.norms.{i}.weight" for i in range(4)] + [
        f"k_layernorm.norms.{i}.weight" for i in range(2)
    ]


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"qk_norm_kind": "batch"}, "qk_norm_kind must be one of ('rms', 'layer'); got qk_norm_kind='batch'"),
        ({"qk_norm_kind": "layer"}, "qk_norm_kind='layer' (a LayerNorm with a weight) needs qk_norm="),
        ({"qk_norm": "unit", "qk_norm_kind": "layer"}, "qk_norm_kind='layer'.*got qk_norm='unit'"),
        ({"qk_norm": "full", "qk_norm_per_head": True}, "qk_norm_per_head=True .* needs qk_norm='head'"),
        ({"qk_norm": "head", "qk_norm_bias": True}, "qk_norm_bias=True needs qk_norm_kind='layer'"),
        ({"qk_norm": "head", "qk_norm_per_head": 1}, "qk_norm_per_head must be a bool"),
        ({"qk_norm": "head", "qk_norm_kind": "layer", "qk_norm_bias": "yes"}, "qk_norm_bias must be a bool"),
    ],
)
def test_bad_config_names_the_knob(knobs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AttentionConfig(hidden_size=32, num_heads=4, num_kv_heads=2, **knobs)
