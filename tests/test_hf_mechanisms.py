"""The config reader by mechanism (``attn_spec.hf``) on the families of 2025-2026 with patterns that wrap:
nine layers, so NoPE / chunked / linear-attention / sliding patterns repeat and the last layer is special.

For every layer the reader gives the same ``AttentionConfig`` from the config object and from its
``config.json`` dict with the derived per-layer lists removed (the reader derives them as the config class
does), and what it says matches the family's own modules (which layer rotates, is chunked, slides, is
linear attention). A few wrapped layers are then ported and judged against transformers."""

import pytest

pytest.importorskip("transformers")

import transformers as tf  # noqa: E402

from attn_spec import hf as spec  # noqa: E402
from compare import port, port_hf  # noqa: E402

N_LAYERS = 9
SMALL = dict(
    hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=64
)


def _llama4():
    return tf.Llama4TextConfig(
        **SMALL,
        num_hidden_layers=N_LAYERS,
        head_dim=8,
        attention_chunk_size=3,
        floor_scale=2,
        attn_scale=0.5,
        num_local_experts=2,
        num_experts_per_tok=1,
        intermediate_size_mlp=64,
        pad_token_id=0,
    )


def _qwen3_5():
    return tf.Qwen3_5TextConfig(
        **SMALL,
        num_hidden_layers=N_LAYERS,
        head_dim=16,
        full_attention_interval=3,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        **port_hf.LINEAR_TINY,
        pad_token_id=0,
    )


def _qwen3_next():
    return tf.Qwen3NextConfig(
        **SMALL,
        num_hidden_layers=N_LAYERS,
        head_dim=8,
        full_attention_interval=4,
        **port_hf.MOE_TINY,
        shared_expert_intermediate_size=16,
        **port_hf.LINEAR_TINY,
        pad_token_id=0,
    )


def _gemma4():
    return tf.Gemma4TextConfig(
        **SMALL,
        num_hidden_layers=N_LAYERS,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=3,
        vocab_size_per_layer_input=64,
        hidden_size_per_layer_input=8,
        pad_token_id=0,
    )


def _smollm3():
    return tf.SmolLM3Config(
        **SMALL, num_hidden_layers=N_LAYERS, use_sliding_window=True, sliding_window=3, pad_token_id=0
    )


CONFIGS = {
    "llama4_text": _llama4,
    "qwen3_5_text": _qwen3_5,
    "qwen3_next": _qwen3_next,
    "gemma4_text": _gemma4,
    "smollm3": _smollm3,
}
# What the reader derives itself when a config.json lacks it.
DERIVED = ("layer_types", "no_rope_layers", "per_layer_config")


def _read(config, layer):
    try:
        return spec.attention_config(config, layer)[1]
    except ValueError as err:
        return str(err)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_config_json_reads_like_the_config_object(family):
    cfg = CONFIGS[family]()
    d = {k: v for k, v in cfg.to_dict().items() if k not in DERIVED}
    # What the config classes built the derived lists from (constructor arguments they do not keep).
    if family == "gemma4_text":
        d.update(global_head_dim=16, num_global_key_value_heads=1)
    if family == "qwen3_5_text":
        d.update(full_attention_interval=3)
    if family == "qwen3_next":
        d.update(full_attention_interval=4)
    for layer in range(N_LAYERS):
        assert _read(cfg, layer) == _read(d, layer), layer


@pytest.mark.parametrize("family", list(CONFIGS))
def test_each_layer_matches_the_family_module(family):
    cfg = CONFIGS[family]()
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg)
    types = cfg.layer_types
    for layer in range(N_LAYERS):
        c = _read(cfg, layer)
        if types[layer] == "linear_attention":  # Gated DeltaNet: refused, naming the layer
            assert isinstance(c, str) and f"layer_types[{layer}]='linear_attention'" in c
            continue
        module = port_hf.attention_of(model, layer)
        assert spec.describe_module(module)[1] == c
        if family == "llama4_text":
            assert (c.rope is not None) == bool(module.use_rope)
            assert (c.chunk_size == 3) == (types[layer] == "chunked_attention")
            assert (c.attn_temperature is not None) == (not module.use_rope)
            assert (c.qk_norm == "unit") == hasattr(module, "qk_norm")
        if family == "gemma4_text":
            assert (c.sliding_window is not None) == module.is_sliding
            assert c.head_dim == module.head_dim and c.k_eq_v == (module.v_proj is None)
        if family == "smollm3":
            assert (c.rope is not None) == bool(module.use_rope)
            assert c.sliding_window == module.sliding_window
    assert types[-1] == "full_attention" or family != "gemma4_text"


@pytest.mark.parametrize(
    "family,layer",
    [("llama4_text", 7), ("llama4_text", 8), ("gemma4_text", 8), ("qwen3_5_text", 5)],
    ids=["llama4-L7-nope", "llama4-L8-chunked", "gemma4-L8-forced-full", "qwen3_5-L5-full"],
)
def test_wrapped_layers_port(family, layer):
    cfg = CONFIGS[family]()
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    module = port_hf.randomize_(port_hf.attention_of(model, layer), layer)
    record = port.check_port(module, print_table=False)
    bad = [
        (p, a.quantity, a.max_abs, a.tol) for p, rows in record.agreements.items() for a in rows if not a.ok
    ]
    assert record.ok and record.round_trip_bit_exact, bad


def test_gemma4_shared_kv_layers_read_as_consumers_of_their_producer():
    cfg = tf.Gemma4TextConfig(
        **SMALL,
        num_hidden_layers=4,
        head_dim=8,
        num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=3,
    )
    assert spec.attention_config(cfg, 1)[1].head_dim == 512  # the default global_head_dim
    modes = cfg.kv_sharing_modes
    for layer in range(4):
        c = spec.attention_config(cfg, layer)[1]
        producer = spec.kv_producer(cfg, layer)
        assert c.kv_shared == (modes[layer] == "reuse")
        if c.kv_shared:  # transformers' "store" layer of the same type; its kv heads and head width
            assert modes[producer] == "store"
            assert cfg.layer_types[producer] == cfg.layer_types[layer]
            p = spec.attention_config(cfg, producer)[1]
            assert (c.K, c.H, c.sliding_window) == (p.K, p.H, p.sliding_window)
            assert not (c.v_norm or c.k_eq_v or c.k_bias)
        else:
            assert producer is None
    every = tf.Gemma4TextConfig(**SMALL, num_hidden_layers=2, head_dim=8, num_kv_shared_layers=2)
    assert spec.attention_config(every, 0)[1].kv_shared
    with pytest.raises(ValueError, match="come from outside this model"):
        spec.kv_producer(every, 0)
