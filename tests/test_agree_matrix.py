"""The agreement matrix beyond our twins: flax's own nnx.MultiHeadAttention, and not-applicable pairs."""

import numpy as np

from compare import agree, report, vectors
from compare.kinds import mha


def test_flax_nnx_mha_agrees_with_oracle_where_it_applies():
    vec = vectors.load("mha_basic")
    assert mha.flax_applies(vec)
    res = mha.run_flax_nnx(vec)
    bad = [a for a in agree.against_oracle(vec, res) if not a.ok]
    assert not bad, [(a.quantity, a.max_abs, a.tol) for a in bad]
    assert "weights" not in res  # flax returns none


def test_flax_is_not_run_where_its_semantics_differ():
    for name in ("mha_attn_mask_additive", "mha_bias_kv", "mha_fully_masked_row", "mha_kdim_vdim"):
        assert not mha.flax_applies(vectors.load(name)), name


def test_not_applicable_pairs_are_listed_not_counted():
    vecs = [vectors.load("mha_fully_masked_row")]
    records = agree.run(vecs)
    skipped = {r["pair"] for r in records if r.get("skipped")}
    assert skipped == {"torch_builtin vs oracle", "flax_nnx vs oracle"}
    assert all(r["ok"] for r in records)
    assert all(row["pair"] not in skipped or row["checks"] == 0 for row in report.summarize(records))
    md = report.agreement_markdown(records, {}, {}, "cpu")
    assert "## Not applicable" in md and "mha_fully_masked_row" in md
    # our twins still return finite zeros there, judged against the oracle
    assert any(r["pair"] == "jax_attn vs oracle" and r["ok"] for r in records)
    assert all(np.isfinite(r["max_abs"]) for r in records if "max_abs" in r)
