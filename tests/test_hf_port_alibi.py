"""The ALiBi families (issue #22): Bloom, MPT and Falcon (ALiBi or rotary; its classic, multi-query and
new-decoder-architecture layouts of ``query_key_value``) ported and judged by ``compare.port.check_port``
against transformers and the float64 reference; the slopes ``attn_spec.hf`` computes equal the ones
transformers' own functions build; the knobs that cannot be ported raise naming them."""

import dataclasses
import math

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from port_support import assert_agrees, bad, check  # noqa: E402
from transformers.models.bloom import modeling_bloom  # noqa: E402
from transformers.models.falcon import modeling_falcon  # noqa: E402
from transformers.models.mpt import modeling_mpt  # noqa: E402

from attn_spec import hf as spec  # noqa: E402
from compare import port, port_hf  # noqa: E402

# (family, overrides of its tiny config, what the case switches on)
CASES = [
    ("bloom", {}, "10 heads: non-power-of-two slopes, per-head fused qkv, biases"),
    ("mpt", {}, "6 heads: slopes reordered from 8; Wqkv rows, clip_qkv 0.8, softmax_scale 0.3"),
    ("falcon", {}, "ALiBi, new_decoder_architecture: 2 kv groups of 2 heads, biases"),
    ("falcon", {"alibi": False}, "rotary, new_decoder_architecture"),
    ("falcon", {"new_decoder_architecture": False, "multi_query": True}, "ALiBi, multi_query (K = 1)"),
    (
        "falcon",
        {"alibi": False, "new_decoder_architecture": False, "multi_query": True, "bias": False},
        "rotary, multi_query, no biases",
    ),
    (
        "falcon",
        {"new_decoder_architecture": False, "multi_query": False, "num_kv_heads": 4},
        "ALiBi, classic per-head [q, k, v] rows",
    ),
]
IDS = ["bloom", "mpt", "falcon-alibi-newarch", "falcon-rope-newarch", "falcon-alibi-mq", "falcon-rope-mq"]
IDS += ["falcon-alibi-classic"]


_bad = bad


@pytest.mark.parametrize("family,overrides,what", CASES, ids=IDS)
def test_family_agrees_fp32(family, overrides, what):
    module, record = check(family, 0, "float32", seed=0, **overrides)
    c = assert_agrees(module, record, family)
    alibi = overrides.get("alibi", True)
    assert (c.alibi_slopes is not None) == alibi and (c.rope is None) == alibi
    if family == "falcon":
        new_arch, mq = overrides.get("new_decoder_architecture", True), overrides.get("multi_query")
        assert c.K == (2 if new_arch else 1 if mq else 4) and c.q_bias == overrides.get("bias", True)


def test_bloom_agrees_bf16():
    module, _ = port_hf.tiny_module("bloom", 0, "bfloat16", seed=1)
    record = port.check_port(module, print_table=False)
    assert record.ok and record.round_trip_bit_exact and record.dtype == "bfloat16", _bad(record)


def test_wrong_slopes_are_caught():
    """Falcon's slopes without its division by sqrt(H): both twins' port disagrees with transformers."""
    import jax_attn.hf as jhf

    module, _ = port_hf.tiny_module("falcon", 0)
    good = jhf.from_hf(module, implementation="math")
    c = good.config
    wrong_slopes = tuple(s * math.sqrt(c.H) for s in c.alibi_slopes)
    wrong = jhf._build(
        dataclasses.replace(c, alibi_slopes=wrong_slopes), good.torch_state_dict(), "math", training=False
    )
    record = port.check_port(module, print_table=False, jax_port=wrong)
    failed = {a.quantity for a in record.agreements["jax_attn vs transformers"] if not a.ok}
    assert not record.ok and {"out", "decode_out"} <= failed
    assert all(a.ok for a in record.agreements["torch_attn vs transformers"])


HEADS = [*range(1, 41), 48, 56, 64, 71, 80, 96, 112, 128]


def test_slopes_equal_transformers():
    """Ours (float64 arithmetic on float32 values) vs the families' own torch functions, power-of-two head
    counts and the others: Bloom within one float32 rounding (torch.pow), MPT and Falcon (bf16) exactly."""
    ones = torch.ones(1, 2, dtype=torch.long)
    for n in HEADS:
        want = modeling_bloom._get_alibi_slopes(n, torch.device("cpu")).double().numpy()
        np.testing.assert_allclose(spec.bloom_alibi_slopes(n), want, rtol=2.0**-23, atol=0, err_msg=str(n))
        # build_alibi_tensor: slope · position (position 1 of an unpadded row)
        got = modeling_bloom.build_alibi_tensor(ones, n, torch.float32)[:, 0, 1].double().numpy()
        np.testing.assert_allclose(spec.bloom_alibi_slopes(n), got, rtol=2.0**-23, atol=0, err_msg=str(n))
        for amax in (8, 16):
            bias = modeling_mpt.build_mpt_alibi_tensor(
                n, 2, alibi_bias_max=amax
            )  # (N, 1, 2): slope · (s - 1)
            assert spec.mpt_alibi_slopes(n, amax) == tuple((-bias[:, 0, 0]).double().tolist()), (n, amax)
        # Falcon: the bf16-rounded slopes at position 1; ours carry the 1 / sqrt(head_dim) of FalconModel.
        falcon = modeling_falcon.build_alibi_tensor(ones, n, torch.float32)[:, 0, 1].double().tolist()
        assert spec.falcon_alibi_slopes(n, 1) == tuple(falcon), n
        assert spec.falcon_alibi_slopes(n, 64) == tuple(s / 8 for s in falcon), n
    assert spec.mpt_alibi_slopes(6) == (2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3)


def test_falcon_position_rounding_bound():
    """What the port does not express: Falcon's build_alibi_tensor rounds the position and slope · position
    to bf16. Exact for power-of-two slopes up to position 256; else off by <= 2^-7 of the bias from 3 on."""
    P = 2048
    for n, H, exact_until in ((4, 8, 256), (32, 64, 2)):
        theirs = modeling_falcon.build_alibi_tensor(torch.ones(1, P, dtype=torch.long), n, torch.float32)
        theirs = theirs[:, 0].double().numpy() / math.sqrt(H)
        ours = np.asarray(spec.falcon_alibi_slopes(n, H))[:, None] * np.arange(P)
        err = np.abs(theirs - ours)
        assert err[:, : exact_until + 1].max() < 1e-12 and err[:, exact_until + 1 :].max() > 0
        assert np.all(err <= 2.0**-7 * np.abs(ours) + 1e-12)


@pytest.mark.xfail(
    strict=True, reason="Falcon's bf16 rounding of key positions and slope · position is not ported"
)
def test_falcon_alibi_with_inexact_slopes_disagrees():
    """32 heads (slopes 2^(-k/4)): from position 3 on transformers' bias is rounded, the port's is exact."""
    module, _ = port_hf.tiny_module("falcon", 0, num_attention_heads=32, num_kv_heads=32, hidden_size=64)
    record = port.check_port(module, print_table=False)
    assert record.ok, _bad(record)


def test_reader_sets_slopes_and_knobs_from_configs():
    """Config objects and config.json dicts: slopes per family, MPT's attn_config sub-keys, Falcon's layout
    flags (a config.json without multi_query takes FalconConfig's default: True, one kv head)."""
    _, c = spec.attention_config(port_hf.tiny_config("bloom"))
    assert c.alibi_slopes == spec.bloom_alibi_slopes(10) and c.rope is None and c.K == 10 and c.H == 4
    assert c.q_bias and c.o_bias
    _, c = spec.attention_config(port_hf.tiny_config("mpt"))
    assert c.alibi_slopes == spec.mpt_alibi_slopes(6) and c.clip_qkv == 0.8 and c.scale == 0.3
    mpt = {
        "model_type": "mpt",
        "d_model": 64,
        "n_heads": 8,
        "n_layers": 2,
        "attn_config": {"alibi_bias_max": 16, "attn_pdrop": 0.1, "clip_qkv": None, "softmax_scale": None},
    }
    _, c = spec.attention_config(mpt)
    # MptModel calls build_mpt_alibi_tensor without alibi_bias_max: transformers runs 8 whatever the config.
    assert c.alibi_slopes == spec.mpt_alibi_slopes(8, 8) and c.scale is None and c.clip_qkv is None
    assert c.dropout == 0.1 and not c.q_bias and not c.o_bias
    _, c = spec.attention_config({**mpt, "attn_config": {"clip_qkv": 0}})  # MptAttention: `if self.clip_qkv`
    assert c.clip_qkv is None
    bloom = {"model_type": "bloom", "n_embed": 64, "n_head": 16, "n_layer": 2}
    _, c = spec.attention_config(bloom)
    assert c.E == 64 and c.N == 16 and c.alibi_slopes == spec.bloom_alibi_slopes(16)
    falcon = {"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 2}
    _, c = spec.attention_config(falcon)  # FalconConfig's defaults: multi_query, rotary, no biases
    assert c.K == 1 and c.alibi_slopes is None and c.rope is not None and not c.q_bias
    _, c = spec.attention_config(
        {**falcon, "alibi": True, "new_decoder_architecture": True, "num_kv_heads": 2}
    )
    assert c.K == 2 and c.rope is None and c.alibi_slopes == spec.falcon_alibi_slopes(8, 8)


def test_falcon_grouped_layout_is_transformers_split():
    """Falcon's query_key_value rows in the new decoder architecture: per kv group, its queries, then its key
    and value; ours equal the slices FalconAttention.forward takes."""
    import torch_attn.hf as thf

    module, _ = port_hf.tiny_module("falcon", 0)
    ours = thf.from_hf(module).torch_state_dict()
    w = module.query_key_value.weight.view(2, 4, 8, 32)  # (K, N/K + 2, H, E)
    assert torch.equal(ours["q_proj.weight"], w[:, :2].reshape(32, 32))
    assert torch.equal(ours["k_proj.weight"], w[:, 2].reshape(16, 32))
    assert torch.equal(ours["v_proj.bias"], module.query_key_value.bias.view(2, 4, 8)[:, 3].reshape(16))


def test_refused_knobs_are_named():
    cfg = port_hf.tiny_config("falcon", new_decoder_architecture=False, multi_query=False)  # num_kv_heads 2
    with pytest.raises(ValueError, match="falcon config knob num_kv_heads=2"):
        spec.attention_config(cfg)
    module, _ = port_hf.tiny_module("bloom", 0, hidden_dropout=0.1)
    spec.describe_module(module)  # eval mode: the output dropout is off
    with pytest.raises(ValueError, match="bloom config knob hidden_dropout=0.1"):
        spec.describe_module(module.train())
