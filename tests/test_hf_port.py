"""``compare.port.check_port`` on transformers' attention modules: every family against transformers itself
and the float64 reference (forward, gradients, left padding, cached decode), fp32 and bf16, and deliberately
wrong ports caught."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("transformers")

from port_support import assert_agrees, check, post_ln  # noqa: E402

from attn_spec import hf as spec  # noqa: E402
from compare import port, port_hf  # noqa: E402

# (family, layer): the layer that switches the family's special knob on (a window shorter than T, the
# inverse-layer scale of GPT-2, ...).
CASES = [
    ("llama", 0),
    ("mistral", 0),
    ("qwen2", 1),  # max_window_layers=1: layer 1 slides
    ("qwen3", 0),
    ("gemma2", 0),  # sliding, soft-capped
    ("gemma3_text", 1),  # global layer: theta 1e6, no window
    ("phi3", 0),  # longrope past original_max_position_embeddings
    ("olmo2", 0),
    ("gpt_oss", 0),  # sliding, sinks, yarn
    ("gpt_neox", 0),
    ("gpt2", 1),  # scale / (layer + 1)
    ("bert", 0),
    ("vit", 0),
    # Families that need no new mechanism (issue #22).
    ("mixtral", 0),  # = Mistral: window 3
    ("qwen2_moe", 0),  # = Qwen2: biases, window on layer 0 of layer_types
    ("qwen3_moe", 0),  # = Qwen3: per-head QK-norm
    ("gemma", 0),  # Gemma 1: head_dim 16 != E / N
    ("olmo", 0),  # clip_qkv 0.8 clamps some q/k/v
    ("olmo3", 0),  # full-width QK-norm, window 3 on sliding layers, rope per layer type
    ("starcoder2", 0),  # four biases (use_bias), window 3
    ("granite", 0),  # attention_multiplier 0.2 = the logit scale, biases
    ("granitemoe", 0),
    ("glm", 0),  # interleaved partial rotary (0.5), q/k/v biases
    ("glm4", 0),
    ("phi", 0),  # partial rotary 0.5, dense, all biases
    ("stablelm", 0),  # partial rotary 0.25, q/k/v biases
    ("cohere", 0),  # interleaved full rotary, biases
    ("smollm3", 1),  # a NoPE layer (no_rope_layers[1] = 0)
    ("ministral", 0),  # = Mistral with layer_types windows
    ("granitemoeshared", 0),
    ("glm4_moe", 0),  # half-layout partial rotary (0.5), per-head QK-norm (use_qk_norm)
    ("cohere2", 1),  # a full layer: NoPE (only Cohere 2's sliding layers rotate), no window
    ("exaone4", 0),  # sliding layer: rotary, window 3, per-head QK-norm
    ("exaone4", 1),  # full layer: NoPE
    ("nemotron", 0),  # partial rotary 0.5 (rotate-half)
    ("persimmon", 0),  # GPT-NeoX's fused per-head query_key_value, dense, partial rotary 0.5, biases
    ("gptj", 0),  # interleaved rotary on rotary_dim 4 of 8, out_proj
    ("roberta", 0),
    ("xlm-roberta", 0),
    # The mechanisms of 2025-2026 families (issue #22).
    ("llama4_text", 0),  # chunked rope layer (chunk 3 < T), weightless qk-norm, interleaved rotary
    ("llama4_text", 1),  # NoPE layer, full attention, temperature tuning (floor_scale 2)
    ("qwen3_next", 0),  # gated output, 1 + w qk-norm, partial rotary 0.5
    ("qwen3_5_text", 0),  # + interleaved mrope (sections 2, 1, 1) over 3-row positions
    ("qwen2_vl_text", 0),  # contiguous mrope (1, 1, 2), q/k/v biases
    ("qwen3_vl_text", 0),  # interleaved mrope (3, 2, 2), qk-norm
    ("gemma4_text", 0),  # sliding layer: window 3, scale 1, v-norm
    ("gemma4_text", 1),  # full layer: head 16, one kv head, values = keys' projection, proportional rope
    ("cwm", 0),  # windows on sliding_attention layers (every 4th full by default)
    ("vaultgemma", 0),  # Gemma 2's soft-cap and query_pre_attn_scalar, window 3
    ("hunyuan_v1_dense", 0),  # per-head RMSNorms after the rotation (query/key_layernorm)
    ("opt", 0),  # out_proj, biases, no rotary, model.decoder.layers
    ("biogpt", 0),
    ("gpt_bigcode", 0),  # multi-query c_attn: rows [all q; k; v] (one key/value head), c_proj
    ("gpt_neo", 0),  # local layer: window 3, unscaled logits, attention.out_proj
    ("gpt_neo", 1),  # global layer
    ("mellum", 0),  # sliding layer: rope per layer type, per-head qk-norm, window 3
    ("mellum", 1),
    ("dots1", 0),  # per-head qk-norm, window 3 past max_window_layers
    ("minimax", 0),  # a softmax layer (config-wide window 3) of a model with lightning-attention layers
    ("xglm", 0),  # a module with no config: its attributes read; out_proj, biases
    ("dbrx", 0),  # Wqkv rows [q; k; v] clamped to 0.8, GQA from attn_config.kv_n_heads
    ("codegen", 0),  # qkv_proj in 4 shards of [q, v, k], GPT-J's interleaved rotary on rotary_dim 4 of 8
]


def _post_ln(family):
    return post_ln(family)


def _check(family, layer, dtype="float32", **kw):
    if kw:
        module, _ = port_hf.tiny_module(family, layer, dtype, seed=layer)
        return module, port.check_port(module, print_table=False, post_norm_outside=_post_ln(family), **kw)
    return check(family, layer, dtype)


@pytest.mark.parametrize("family,layer", CASES, ids=[f"{f}-L{i}" for f, i in CASES])
def test_family_agrees_fp32(family, layer):
    module, record = _check(family, layer)
    assert_agrees(module, record, family)


@pytest.mark.parametrize(
    "family,layer",
    [
        ("llama", 0),
        ("gemma2", 0),
        ("gpt_oss", 0),
        ("gpt2", 0),
        ("glm", 0),
        ("granite", 0),
        ("smollm3", 1),
        ("olmo", 0),
        ("llama4_text", 0),
        ("llama4_text", 1),
        ("qwen3_5_text", 0),
        ("gemma4_text", 1),
    ],
)
def test_family_agrees_bf16(family, layer):
    _, record = _check(family, layer, "bfloat16")
    bad = [
        (p, a.quantity, a.max_abs, a.tol) for p, rows in record.agreements.items() for a in rows if not a.ok
    ]
    assert record.ok and record.round_trip_bit_exact and record.dtype == "bfloat16", bad


def test_rotary_layout_flipped_is_caught():
    import jax_attn.hf as jhf

    module, _ = port_hf.tiny_module("llama", 0)
    good = jhf.from_hf(module, implementation="math")
    c = good.config
    flipped = dataclasses.replace(c, rope=dataclasses.replace(c.rope, layout="interleaved"))
    wrong = jhf._build(flipped, good.torch_state_dict(), "math", training=False)
    record = port.check_port(module, print_table=False, jax_port=wrong)
    assert not record.ok
    failed = {a.quantity for a in record.agreements["jax_attn vs transformers"] if not a.ok}
    assert {"out", "decode_out"} <= failed
    assert all(a.ok for a in record.agreements["torch_attn vs transformers"])


def _swap_heads(sd, c):
    """Query heads 0 and 1 exchanged in q_proj (and its bias): o_proj still expects the original order."""
    sd = dict(sd)
    H = c.H
    for key in ("q_proj.weight", "q_proj.bias"):
        if key in sd:
            w = np.array(sd[key])
            w[:H], w[H : 2 * H] = w[H : 2 * H].copy(), w[:H].copy()
            sd[key] = w
    return sd


def _scaled(sd, key, factor):
    sd = dict(sd)
    sd[key] = np.asarray(sd[key]) * np.asarray(factor, np.asarray(sd[key]).dtype)
    return sd


# name: (family, layer, dtype, config change, state-dict change) of a deliberately wrong JAX port.
MUTATIONS = {
    "rotary_layout_flipped": ("llama", 0, "float32", lambda c: _rope(c, layout="interleaved"), None),
    "rope_theta_1e4_not_5e5": ("llama", 0, "float32", lambda c: _rope(c, rope_theta=1e4), None),
    "window_off_by_one": (
        "mistral",
        0,
        "float32",
        lambda c: dataclasses.replace(c, sliding_window=c.sliding_window + 1),
        None,
    ),
    "scale_2pct_high": (
        "gemma2",
        0,
        "float32",
        lambda c: dataclasses.replace(c, scale=c.logit_scale * 1.02, query_pre_attn_scalar=None),
        None,
    ),
    "two_heads_swapped": ("qwen2", 1, "float32", None, _swap_heads),
    "norm_eps_1e3x": (
        "qwen3",
        0,
        "float32",
        lambda c: dataclasses.replace(c, qk_norm_eps=c.qk_norm_eps * 1e3),
        None,
    ),
    "o_proj_scaled_1pct": ("gpt_oss", 0, "float32", None, lambda sd, c: _scaled(sd, "o_proj.weight", 1.01)),
    "bf16_two_heads_swapped": ("llama", 0, "bfloat16", None, _swap_heads),
    "bf16_rotary_layout_flipped": ("qwen3", 0, "bfloat16", lambda c: _rope(c, layout="interleaved"), None),
    "bf16_softcap_dropped": ("gemma2", 0, "bfloat16", lambda c: dataclasses.replace(c, softcap=None), None),
}


def _rope(c, **kw):
    return dataclasses.replace(c, rope=dataclasses.replace(c.rope, **kw))


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_mutated_jax_port_is_caught(name):
    """Each mutation of the JAX port alone: the record fails, in the JAX rows (against the reference and
    against transformers); the torch twin and transformers itself still pass."""
    import jax_attn.hf as jhf

    family, layer, dtype, change_config, change_weights = MUTATIONS[name]
    module, _ = port_hf.tiny_module(family, layer, dtype, seed=layer)
    good = jhf.from_hf(module, implementation="math")
    c = change_config(good.config) if change_config else good.config
    sd = good.torch_state_dict()
    sd = change_weights(sd, c) if change_weights else sd
    wrong = jhf._build(c, sd, "math", training=False)
    record = port.check_port(module, print_table=False, jax_port=wrong)
    assert not record.ok
    assert not all(a.ok for a in record.agreements["jax_attn vs reference"])
    assert not all(a.ok for a in record.agreements["jax_attn vs transformers"])
    for pair in ("torch_attn vs reference", "torch_attn vs transformers", "transformers vs reference"):
        assert all(a.ok for a in record.agreements[pair]), (pair, name)


def test_window_off_by_one_in_the_mapping_is_caught(monkeypatch):
    """A mapping bug moves both twins and the reference together: transformers' own row catches it."""
    real = spec.attention_config

    def off_by_one(config, layer=0, **kw):
        family, c = real(config, layer, **kw)
        return family, dataclasses.replace(c, sliding_window=c.sliding_window + 1)

    monkeypatch.setattr(spec, "attention_config", off_by_one)
    module, _ = port_hf.tiny_module("mistral", 0)
    record = port.check_port(module, print_table=False)
    assert not record.ok
    assert not all(a.ok for a in record.agreements["transformers vs reference"])
    assert not all(a.ok for a in record.agreements["jax_attn vs transformers"])


def test_check_port_argument_errors():
    module, _ = port_hf.tiny_module("vit", 0)
    with pytest.raises(ValueError, match="takes x"):
        port.check_port(module, attn_mask=object(), print_table=False)


def test_gpt_bigcode_without_multi_query_is_per_head_fused():
    """GPT-BigCode's c_attn is per head [q, k, v] when multi_query=False (the neox layout), rows [q; k; v]
    with one key/value head otherwise: both port and agree with transformers."""
    import transformers as tf

    cfg = tf.GPTBigCodeConfig(
        n_embd=32, n_head=4, n_layer=1, vocab_size=64, n_positions=64, multi_query=False
    )
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    module = port_hf.randomize_(port_hf.attention_of(model, 0), 0)
    assert spec.describe_module(module)[1].num_kv_heads == 4
    record = port.check_port(module, print_table=False)
    assert record.ok and record.round_trip_bit_exact
