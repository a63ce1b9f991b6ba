"""Encoder families by mechanism (issue #22): ModernBERT (fused ``Wqkv``, rope per layer type, bidirectional
local windows) and ModernBERT-decoder, the ViT relatives that share ViT's attention (DeiT, DINOv2, ViT-MAE,
ViT-MSN, I-JEPA, ViViT, Pixio; YOLOS in the older query/key/value layout) and the BERT relatives that share
BertAttention (CamemBERT, Data2VecText, ERNIE, ELECTRA, BertGeneration, RoCBert): each against transformers
and the float64 reference, the window conventions against transformers' own mask builders, config.json
reading, checkpoints and refusals."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from port_support import assert_agrees, bad, check, post_ln  # noqa: E402

import jax_attn.hf as jhf  # noqa: E402
import torch_attn.hf as thf  # noqa: E402
from attn_spec import hf as spec  # noqa: E402
from compare import oracle_attention, port, port_hf  # noqa: E402

VIT_RELATIVES = ("deit", "dinov2", "dinov2_with_registers", "vit_mae", "vit_msn", "ijepa", "vivit", "pixio")
BERT_RELATIVES = ("camembert", "data2vec-text", "ernie", "electra", "bert-generation", "roc_bert")
CASES = [
    ("modernbert", 0),  # local layer: |q - k| <= local_attention // 2 = 2 (our window 3), theta 1e4, biases
    ("modernbert", 1),  # global layer: theta 1.6e5, no window
    ("modernbert-decoder", 0),  # causal window sliding_window = 3, with cached decode
    ("modernbert-decoder", 1),
    *[(f, 0) for f in VIT_RELATIVES],
    ("yolos", 0),  # attention.query/key/value, output.dense; no mask (an unpadded batch)
    *[(f, 0) for f in BERT_RELATIVES],  # BertAttention, ported up to output.dense (post-LN outside)
]


_bad, _post_ln = bad, post_ln


def _check(family, layer, dtype="float32"):
    return check(family, layer, dtype)


@pytest.mark.parametrize("family,layer", CASES, ids=[f"{f}-L{i}" for f, i in CASES])
def test_family_agrees_fp32(family, layer):
    module, record = _check(family, layer)
    assert_agrees(module, record, family)


@pytest.mark.parametrize("family,layer", [("modernbert", 0), ("dinov2", 0)])
def test_family_agrees_bf16(family, layer):
    _, record = _check(family, layer, "bfloat16")
    assert record.ok and record.round_trip_bit_exact and record.dtype == "bfloat16", _bad(record)


def test_modernbert_configs_per_layer():
    cfg = port_hf.tiny_config("modernbert")
    local, glob = (spec.attention_config(cfg, i)[1] for i in (0, 1))
    assert (local.sliding_window, local.rope.rope_theta, local.causal) == (3, 1e4, False)
    assert (glob.sliding_window, glob.rope.rope_theta, glob.causal) == (None, 1.6e5, False)
    assert (local.N, local.K, local.H) == (4, 4, 8) and local.q_bias and local.o_bias
    assert (
        spec.attention_config(port_hf.tiny_config("modernbert", local_attention=9), 0)[1].sliding_window == 5
    )
    dec = port_hf.tiny_config("modernbert-decoder")  # local_attention 6: sliding_window 3
    assert [spec.attention_config(dec, i)[1].sliding_window for i in (0, 1)] == [3, None]
    assert spec.attention_config(dec, 0)[1].causal


@pytest.mark.parametrize("local_attention", [2, 4, 5, 8])
def test_bidirectional_window_matches_the_models_mask(local_attention):
    """ModernBertModel builds its local layers' mask with create_bidirectional_sliding_window_mask; ours (the
    oracle's keep mask, which both twins follow) keeps exactly the same keys on a left-padded batch."""
    from transformers.masking_utils import create_bidirectional_sliding_window_mask

    cfg = port_hf.tiny_config("modernbert", local_attention=local_attention)
    _, c = spec.attention_config(cfg, 0)
    valid = np.ones((2, 12), np.int64)
    valid[1, :3] = 0
    hf = create_bidirectional_sliding_window_mask(
        config=cfg, inputs_embeds=torch.zeros(2, 12, 32), attention_mask=torch.from_numpy(valid)
    )
    hf_keep = (hf[:, 0] == 0).numpy()
    ours = oracle_attention.keep_mask(c, valid)
    real = valid.astype(bool)  # pad query rows: transformers keeps its masked keys, we keep none
    assert np.array_equal(hf_keep[real], ours[real])


@pytest.mark.parametrize("local_attention", [4, 6, 7])
def test_decoder_window_matches_the_models_mask(local_attention):
    from transformers.masking_utils import create_sliding_window_causal_mask

    cfg = port_hf.tiny_config("modernbert-decoder", local_attention=local_attention)
    cfg.sliding_window = (
        local_attention // 2
    )  # what __post_init__ derives (tiny_config sets attributes after)
    _, c = spec.attention_config(cfg, 0)
    valid = np.ones((2, 12), np.int64)
    valid[1, :3] = 0
    hf = create_sliding_window_causal_mask(
        config=cfg,
        inputs_embeds=torch.zeros(2, 12, 32),
        attention_mask=torch.from_numpy(valid),
        cache=None,
        position_ids=torch.from_numpy(np.clip(np.cumsum(valid, 1) - 1, 0, None)),
    )
    real = valid.astype(bool)
    assert np.array_equal((hf[:, 0] == 0).numpy()[real], oracle_attention.keep_mask(c, valid)[real])


def test_window_off_by_one_is_caught(monkeypatch):
    module, _ = port_hf.tiny_module("modernbert", 0)
    e = spec.FAMILY_TABLE["modernbert"]
    for wrong in (
        lambda cfg: cfg.get("local_attention") // 2,
        lambda cfg: cfg.get("local_attention") // 2 + 2,
    ):
        monkeypatch.setitem(spec.FAMILY_TABLE, "modernbert", dataclasses.replace(e, window_from=("x", wrong)))
        record = port.check_port(module, print_table=False)
        assert not record.ok
        assert not all(a.ok for a in record.agreements["transformers vs reference"])
        assert not any(a.ok for a in record.agreements["jax_attn vs transformers"] if a.quantity == "out")


def test_legacy_config_json_reads_as_the_config_class():
    """A Hub config.json of ModernBERT-base's kind (global_attn_every_n_layers, global_/local_rope_theta, no
    layer_types nor rope_parameters) reads as ModernBertConfig builds it from the same keys."""
    import transformers as tf

    raw = {
        "model_type": "modernbert",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 7,
        "global_attn_every_n_layers": 3,
        "local_attention": 128,
        "global_rope_theta": 160000.0,
        "local_rope_theta": 10000.0,
        "attention_bias": False,
        "max_position_embeddings": 8192,
    }
    obj = tf.ModernBertConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    for layer in range(7):
        assert spec.attention_config(raw, layer) == spec.attention_config(obj, layer)
    _, c1 = spec.attention_config(raw, 1)
    _, c3 = spec.attention_config(raw, 3)
    assert (c1.sliding_window, c1.rope.rope_theta, c1.q_bias) == (65, 1e4, False)
    assert (c3.sliding_window, c3.rope.rope_theta) == (None, 1.6e5)
    dec = dict(raw, model_type="modernbert-decoder", global_rope_theta=5e4)
    obj = tf.ModernBertDecoderConfig(**{k: v for k, v in dec.items() if k != "model_type"})
    for layer in range(7):
        assert spec.attention_config(dec, layer) == spec.attention_config(obj, layer)
    assert spec.attention_config(dec, 1)[1].sliding_window == 64


def test_fused_wqkv_splits_as_transformers_does():
    """ModernBertAttention views Wqkv's output as (3, N, H): ours are those rows, biases included."""
    m, _ = port_hf.tiny_module("modernbert", 0)
    ours = thf.from_hf(m).torch_state_dict()
    w, b = m.Wqkv.weight.view(3, 32, 32), m.Wqkv.bias.view(3, 32)
    for j, p in enumerate("qkv"):
        assert torch.equal(ours[f"{p}_proj.weight"], w[j]) and torch.equal(ours[f"{p}_proj.bias"], b[j])
    assert torch.equal(ours["o_proj.weight"], m.Wo.weight)
    m, _ = port_hf.tiny_module("modernbert", 1, "bfloat16", attention_bias=False)
    back = jhf.to_hf_state_dict(jhf.from_hf(m), "modernbert")
    assert set(back) == {"Wqkv.weight", "Wo.weight"} == set(m.state_dict())
    assert np.array_equal(
        np.asarray(back["Wqkv.weight"], np.float64), m.Wqkv.weight.detach().double().numpy()
    )


def test_load_layer_reads_a_modernbert_checkpoint(tmp_path):
    _, model = port_hf.tiny_module("modernbert", 0)
    for layer in range(2):
        port_hf.randomize_(port_hf.attention_of(model, layer), 10 + layer)
    model.save_pretrained(tmp_path)
    for layer in range(2):
        module = port_hf.attention_of(model, layer)
        loaded, direct = thf.load_layer(tmp_path, layer), thf.from_hf(module)
        assert loaded.config == direct.config
        for k, v in direct.torch_state_dict().items():
            assert torch.equal(loaded.torch_state_dict()[k], v), k


def test_refusals_name_the_knob():
    module, _ = port_hf.tiny_module("modernbert", 0, attention_dropout=0.1)
    spec.describe_module(module)  # eval: dropout off, ports
    with pytest.raises(ValueError, match="attention_dropout"):
        thf.from_hf(module.train())
    module, _ = port_hf.tiny_module("yolos", 0, hidden_dropout_prob=0.1)
    with pytest.raises(ValueError, match="hidden_dropout_prob"):
        jhf.from_hf(module.train())
    cfg = port_hf.tiny_config("modernbert-decoder")
    cfg.sliding_window = -1  # what ModernBertDecoderConfig derives from local_attention=None
    with pytest.raises(ValueError, match="local_attention"):
        spec.attention_config(cfg, 0)
    assert spec.attention_config(cfg, 1)[1].sliding_window is None  # the global layer still ports


def test_yolos_takes_no_mask():
    module, _ = port_hf.tiny_module("yolos", 0)
    mask = np.ones((2, 7), np.int64)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="no attention mask"):
        port.check_port(module, key_padding_mask=mask, print_table=False)
