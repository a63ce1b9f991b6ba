"""``compare.port_model`` / ``python -m compare port DIR``: the ports checked inside the real model on tiny
checkpoints with a real (word-level) tokenizer; deliberately broken ports in one layer are named as the first
to diverge."""

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from compare import cli, port_hf, port_model  # noqa: E402

WORDS = (
    "the a of to and in is it that was for on are with as his they be at one have this from or had by hot "
    "word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see"
).split()
PROMPTS = (
    " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(40)),
    " ".join(WORDS[(3 * i + 1) % len(WORDS)] for i in range(23)),
    "the time of the long way",
)


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS[: vocab_size - len(specials)]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


def _save(tmp_path, family, **overrides):
    _, model = port_hf.tiny_module(family, 0, **overrides)
    for i in range(2):  # order-one weights: a peaked softmax, position-dependent behaviour that shows
        port_hf.randomize_(port_hf.attention_of(model, i), 20 + i)
    d = tmp_path / family
    model.save_pretrained(d)
    _tokenizer(model.config.vocab_size).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: _save(root, f) for f in ("llama", "mistral", "gemma3_text", "bert")}


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "bert"])
def test_correct_ports_agree_in_the_model(checkpoints, family):
    record = port_model.check_model(checkpoints[family], PROMPTS, max_new_tokens=4)
    _assert_agrees(record, family)


# Further families through the whole model (their attention modules are called in other ways: GPT-2's
# positional hidden states, GPT-NeoX's layer_past, Phi-3's fused qkv and longrope past its original length,
# gpt-oss's sinks and windows).
@pytest.mark.parametrize(
    "family", ["gpt2", "gpt_neox", "phi3", "gpt_oss", "qwen3", "llama4_text", "gemma4_text", "roberta"]
)
def test_more_families_agree_in_the_model(tmp_path, family):
    record = port_model.check_model(_save(tmp_path, family), PROMPTS, max_new_tokens=3)
    _assert_agrees(record, family)


def test_a_hybrid_model_is_refused_naming_its_linear_layers(tmp_path):
    """Qwen3.5 interleaves Gated DeltaNet layers: the model cannot run end to end on attention ports, and the
    check says which layers and why before running anything."""
    import transformers as tf

    cfg = port_hf.tiny_config("qwen3_5_text")
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / "q")
    _tokenizer(cfg.vocab_size).save_pretrained(tmp_path / "q")
    with pytest.raises(
        ValueError, match=r"1 of 2 layers cannot be ported \(layers \[1\]\).*linear_attention"
    ):
        port_model.check_model(tmp_path / "q", PROMPTS, max_new_tokens=2)


def test_gemma4_key_value_shared_layers_agree_in_the_model(tmp_path):
    """Layers 2 and 3 of the four-layer tiny Gemma 4 read layers 0's and 1's keys and values: judged on their
    real inputs against the oracle consumer of the oracle producer, and end to end (the bridges hand each
    producer port's ``SharedKV`` to its consumers, through the producers' caches when decoding)."""
    _, model = port_hf.tiny_module("gemma4_text", 0, shared_kv=True)
    for i in range(4):
        port_hf.randomize_(port_hf.attention_of(model, i), 20 + i)
    d = tmp_path / "gemma4_shared"
    model.save_pretrained(d)
    _tokenizer(model.config.vocab_size).save_pretrained(d)
    record = port_model.check_model(d, PROMPTS, max_new_tokens=3)
    assert record.ok, record.verdict()
    assert [("kv-shared" in r.config) for r in record.layers] == [False, False, True, True]
    assert all(e.tokens_identical for e in record.end_to_end)


def _assert_agrees(record, family):
    assert record.ok, record.verdict()
    assert record.verdict().startswith("ALL AGREE: 2 attention layers")
    assert [r.layer for r in record.layers] == [0, 1]
    assert record.prompt_tokens[0] > record.prompt_tokens[1] > record.prompt_tokens[2]
    for r in record.layers:
        assert set(r.ok) == {"transformers", "jax_attn", "torch_attn"}
        assert all(0 <= r.ratio(i) <= 1 for i in r.ok)
    assert [e.impl for e in record.end_to_end] == ["jax_attn", "torch_attn"]
    if family not in ("bert", "roberta"):  # encoders: no logits, no tokens
        # top-1 is an argmax of computed floats: a near tie may flip on another CPU; a wrong port moves many
        assert all(e.top1_agreement >= 0.9 for e in record.end_to_end)
        assert np.shape(record.generated["jax_attn"]) == (3, record.max_new_tokens)


def _broken(layer: int, change):
    """``ports=`` for check_model: the default ports, with the JAX one of ``layer`` rebuilt by ``change``."""
    import jax_attn.hf as jhf

    def ports(i, module, family):
        jax_port, torch_port = (port_model._ports(module, family, w) for w in ("jax_attn", "torch_attn"))
        if i == layer:
            c, sd = change(jax_port.config, jax_port.torch_state_dict())
            jax_port = jhf._build(c, sd, None, training=False)
        return jax_port, torch_port

    return ports


def _rope(c, **kw):
    return dataclasses.replace(c, rope=dataclasses.replace(c.rope, **kw))


def _swap_heads(sd, H):
    w = np.array(sd["q_proj.weight"])
    w[:H], w[H : 2 * H] = w[H : 2 * H].copy(), w[:H].copy()
    return {**sd, "q_proj.weight": w}


MUTATIONS = {
    "rotary_layout_flipped": ("llama", 1, lambda c, sd: (_rope(c, layout="interleaved"), sd)),
    "window_off_by_one": (
        "mistral",
        1,
        lambda c, sd: (dataclasses.replace(c, sliding_window=c.sliding_window + 1), sd),
    ),
    "two_heads_swapped": ("llama", 0, lambda c, sd: (c, _swap_heads(sd, c.H))),
    "o_proj_scaled": (
        "gemma3_text",
        1,
        lambda c, sd: (c, {**sd, "o_proj.weight": sd["o_proj.weight"] * 1.01}),
    ),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_broken_layer_is_named_first_to_diverge(checkpoints, name):
    family, layer, change = MUTATIONS[name]
    record = port_model.check_model(
        checkpoints[family], PROMPTS, max_new_tokens=2, ports=_broken(layer, change)
    )
    assert not record.ok
    assert record.first_failing_layer == layer
    row = record.layers[layer]
    assert not row.ok["jax_attn"] and row.ok["torch_attn"] and row.ok["transformers"]
    assert f"first diverging layer {layer} (jax_attn" in record.verdict()
    if name != "o_proj_scaled":
        assert record.end_to_end[0].output_max_abs > 10 * record.end_to_end[1].output_max_abs
    else:  # Gemma 3 RMS-normalises the attention output (post_attention_layernorm) before the residual
        # add: a uniformly scaled o_proj is invisible end to end; only the per-layer check sees it
        assert record.end_to_end[0].output_max_abs < 1e-5 * record.end_to_end[0].output_scale


def test_cli_verdict_first_and_last_files_and_exit_codes(checkpoints, tmp_path, capsys, monkeypatch):
    d = checkpoints["llama"]
    args = ["port", str(d), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "--max-new-tokens", "3"]
    assert cli.main([*args, "--out", str(tmp_path / "ok")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert lines[0].startswith(f"{d}: ALL AGREE: 2 attention layers of LlamaForCausalLM (float32)")
    assert lines[-1] == lines[0]
    assert len(lines) < 40
    data = json.loads((tmp_path / "ok" / "port_model.json").read_text())
    assert data["ok"] and data["first_failing_layer"] is None and len(data["layers"]) == 2
    assert (tmp_path / "ok" / "port_model.png").stat().st_size > 10_000
    assert "| 1 |" in (tmp_path / "ok" / "port_model.md").read_text()

    real = port_model._ports

    def flipped(module, family, which):
        port = real(module, family, which)
        if which == "jax_attn" and getattr(module, "layer_idx", 0) == 1:
            import jax_attn.hf as jhf

            port = jhf._build(_rope(port.config, layout="interleaved"), port.torch_state_dict(), None, False)
        return port

    monkeypatch.setattr(port_model, "_ports", flipped)
    assert cli.main([*args, "--out", str(tmp_path / "bad")]) == 1
    out = capsys.readouterr().out
    assert "DISAGREE: first diverging layer 1 (jax_attn" in out.splitlines()[0]


def test_cli_errors(checkpoints, tmp_path, capsys):
    _, model = port_hf.tiny_module("llama", 0)
    model.save_pretrained(tmp_path / "no_tokenizer")
    assert cli.main(["port", str(tmp_path / "no_tokenizer"), "--out", str(tmp_path / "x")]) == 2
    assert "no tokenizer in" in capsys.readouterr().out
    assert cli.main(["port", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().out
    d = checkpoints["llama"]
    assert cli.main(["port", str(d), "--max-new-tokens", "-1", "--out", str(tmp_path / "x")]) == 2


def test_cli_families_prints_the_coverage_table(tmp_path, capsys, monkeypatch):
    """``compare port --families``: verdict first and last, the coverage table (here cut to three
    model_types: a family, an MoE sibling, one refused by its parameter), files; no folder and no
    --families: 2."""
    real = port_hf.coverage_table
    monkeypatch.setattr(
        port_hf,
        "coverage_table",
        lambda dtypes: real(model_types=["llama", "mixtral", "bitnet"], dtypes=dtypes),
    )
    assert cli.main(["port", "--families", "--out", str(tmp_path)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert lines[0] == lines[-1] == "ALL AGREE: 2 of 3 model_types port (float32)"
    assert any(ln.startswith("| `mixtral` | ported |") for ln in lines)
    assert any(ln.startswith("| `bitnet` | refused |") and "attn_sub_norm.weight" in ln for ln in lines)
    rows = json.loads((tmp_path / "port_families.json").read_text())
    assert [r["model_type"] for r in rows] == ["llama", "mixtral", "bitnet"]
    assert cli.main(["port", "--out", str(tmp_path)]) == 2
