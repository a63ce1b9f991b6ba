"""Both twins (and torch's built-in where it applies) on the shared MHA vectors: outputs, weights and the
gradients w.r.t. the inputs and every parameter, against the float64 oracle and pairwise.

Compiling the JAX forward+VJP costs ~1.5 s per vector on a 2-core CPU, so within the CI budget the JAX
twin runs on a subset that covers every flag, mask form and dtype (:data:`JAX_CASES`); the torch twin and
the built-in run on every vector. ``python -m compare agree --case mha_`` runs all three on all of them.
"""

import pytest

from compare import agree
from compare.kinds.mha import IMPLEMENTATIONS, MHA_CASES, builtin_applies

JAX_CASES = (
    "mha_no_bias",
    "mha_bias_kv_zero_attn_masked",
    "mha_attn_mask_3d",
    "mha_masks_mixed",
    "mha_dropout_per_head",
    "mha_fully_padded_sequence",
    "mha_masked_bf16",
    "mha_bias_kv_fp16",
)


def test_jax_subset_covers_every_flag():
    cases = [MHA_CASES[n] for n in JAX_CASES]
    for flag in ("add_bias_kv", "add_zero_attn", "fully_masked", "dropout_p", "key_padding_mask", "kdim"):
        assert any(getattr(c, flag) for c in cases), flag
    assert not all(c.bias for c in cases) and not all(c.batched for c in cases)
    assert {c.dtype for c in cases} == {"float32", "bfloat16", "float16"}
    assert {c.attn_mask_rank for c in cases if c.attn_mask} == {2, 3}


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("name", list(MHA_CASES))
def test_mha_vector_agrees(all_vectors, name):
    vec = all_vectors[name]
    impls = dict(IMPLEMENTATIONS)
    if name not in JAX_CASES:
        del impls["jax_attn"]
    records = agree.run([vec], implementations={"mha": impls})
    bad = [r for r in records if not r["ok"]]
    assert not bad, bad
    pairs = {r["pair"] for r in records}
    twin = "jax_attn" if name in JAX_CASES else "torch_attn"
    want = {f"{twin} vs oracle", "torch_attn vs oracle"}
    if builtin_applies(vec):
        want |= {"torch_builtin vs oracle", f"{twin} vs torch_builtin"}
    assert want <= pairs
    # every parameter's gradient was compared, not just the inputs'
    quantities = {r["quantity"] for r in records if r["pair"] == f"{twin} vs oracle"}
    params = {k.removeprefix("param.") for k in vec.arrays if k.startswith("param.")}
    assert {f"d{p}" for p in params} | {"out", "dquery", "dkey", "dvalue"} <= quantities
