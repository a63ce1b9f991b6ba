"""Both MLA twins against transformers' own modules (``compare.port_mla.check_mla_port``): DeepSeek V2, V3,
GLM-4.7-Flash (``glm4_moe_lite``), DeepSeek V3.2 and GLM-5 (``glm_moe_dsa``) with their indexers, fp32:
outputs, gradients w.r.t. x and every parameter, the absorbed full pass, token-by-token decode against
``DynamicCache``, a left-padded batch, each within the tolerance policy of the float64 reference and of
transformers (fp32: 1e-5 of max(1, |expected|, term sums)); weights round trip bit-exact. Indexer rows tied
at the top-k boundary are counted and kept out of the comparison with transformers. A port that maps the
rotary layout wrongly fails (mutation). GLM-5's shared layers: ``docs/mla.md`` (the docs table) and the
``mla_dsa_shared`` vector."""

import dataclasses

import numpy as np
import pytest

import jax_attn.mla as jmla
from compare import port_mla
from compare.port import check_port

CASES = [
    ("deepseek_v2", {"q_lora_rank": None, "rope_parameters": port_mla.YARN}),
    ("deepseek_v3", {"rope_parameters": port_mla.YARN}),
    ("glm4_moe_lite", {"rope_interleave": False, "attention_bias": True}),
    ("deepseek_v32", {}),
    ("glm_moe_dsa", {}),
]


@pytest.mark.parametrize("family, overrides", CASES, ids=[c[0] for c in CASES])
def test_port_agrees_with_transformers(family, overrides):
    module, _ = port_mla.tiny_module(family, 0, "float32", **overrides)
    rec = check_port(module, print_table=False)  # dispatched to check_mla_port
    assert rec.kind == f"hf:{family}"
    assert rec.ok, rec.verdict()
    for pair in ("jax_attn vs transformers", "torch_attn vs transformers"):
        quantities = {a.quantity for a in rec.agreements[pair]}
        assert {"out", "out_absorbed", "decode_out", "grad_x", "grad_kv_b_proj.weight"} <= quantities
    if family in ("deepseek_v32", "glm_moe_dsa"):
        # These seeds have rows whose 3rd and 4th index scores are both 0 (the ReLU): tied, reported, and
        # compared with the reference only; everyone's selection agrees with the reference's elsewhere.
        assert rec.config["tied_rows"] >= 1
        sel = [a for rows in rec.agreements.values() for a in rows if a.quantity == "topk_selection"]
        assert len(sel) == 3 and all(a.ok for a in sel)
    else:
        assert rec.config["tied_rows"] == 0


def test_a_wrong_rotary_layout_fails():
    module, _ = port_mla.tiny_module("deepseek_v3", 0, "float32")
    good = jmla.from_hf(module)
    c = good.config
    wrong = dataclasses.replace(c, rope=dataclasses.replace(c.rope, layout="half"))
    bad = jmla._build(wrong, good.torch_state_dict(), None)
    rec = port_mla.check_mla_port(module, print_table=False, decode=False, jax_port=bad)
    assert not rec.ok
    assert "out" in {a.quantity for a in rec.agreements["jax_attn vs transformers"] if not a.ok}
    assert all(a.ok for a in rec.agreements["torch_attn vs transformers"])


def test_cache_axis_indices():
    topk = np.array([[[0, 2, 3]]])
    assert port_mla.cache_axis_indices(topk, 3, 5).tolist() == [[[0, 2, 5]]]
