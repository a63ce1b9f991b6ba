"""Both ``MultiHeadLatentAttention`` twins run the shared ``mla`` vectors (each knob alone, DSA, the families,
cache chunks, bf16): output and gradients w.r.t. x and every parameter, judged against the float64 oracle
(``compare.oracle_mla``) and each other; the torch twin on every vector in its three computations (plain,
absorbed, blocked), the JAX twin (jit) on one; ``python -m compare`` runs all of them in both
(tests/test_mla_blocked.py checks the JAX twin's blocked computation against its plain one)."""

import pytest
from vector_checks import assert_all_ok

from compare import agree
from compare.kinds import mla
from compare.kinds.mla import MLA_CASES, param_names

CASES = list(MLA_CASES)
# The JAX twin (jit, one XLA compile per vector: seconds) on one vector here; tests/test_mla_hf.py runs its
# forward, backward, absorbed and decode on every family, tests/test_mla_decode.py its cache.
JAX_CASES = [("jax_mla", "mla_dsa_ties")]


@pytest.fixture(scope="module")
def results():
    return {}


def _result(results, all_vectors, impl, name):
    if (impl, name) not in results:
        results[impl, name] = mla.IMPLEMENTATIONS[impl](all_vectors[name])
    return results[impl, name]


@pytest.mark.parametrize(
    "impl, name",
    [("torch_mla", n) for n in CASES]
    + [("torch_mla_absorbed", n) for n in CASES]
    + [("torch_mla_blocked", n) for n in CASES]
    + JAX_CASES,
)
def test_matches_oracle(all_vectors, results, impl, name):
    vec = all_vectors[name]
    res = _result(results, all_vectors, impl, name)
    assert set(res) == {"out", "grad_x", *(f"grad_{p}" for p in param_names(vec.case))}
    assert_all_ok(agree.against_oracle(vec, res), f"{impl} vs oracle on {name}", nonempty=True)


@pytest.mark.parametrize("impl, name", JAX_CASES)
def test_jax_matches_torch(all_vectors, results, impl, name):
    vec = all_vectors[name]
    a = _result(results, all_vectors, impl, name)
    b = _result(results, all_vectors, impl.replace("jax", "torch"), name)
    assert_all_ok(agree.between(vec, a, b), f"{impl} vs torch on {name}")


def test_absorbed_equals_plain(all_vectors, results):
    """The two computations of the torch twin agree within the fp32 (bf16) tolerance on every vector."""
    for name in CASES:
        vec = all_vectors[name]
        a = _result(results, all_vectors, "torch_mla", name)
        b = _result(results, all_vectors, "torch_mla_absorbed", name)
        assert_all_ok(agree.between(vec, a, b), f"absorbed vs plain on {name}")


def test_blocked_equals_plain(all_vectors, results):
    """The torch twin's blocked computation (FlexAttention) agrees with its plain one on every vector."""
    for name in CASES:
        vec = all_vectors[name]
        a = _result(results, all_vectors, "torch_mla", name)
        b = _result(results, all_vectors, "torch_mla_blocked", name)
        assert_all_ok(agree.between(vec, a, b), f"blocked vs plain on {name}")


def test_every_knob_has_a_case():
    cfgs = {n: c.config() for n, c in MLA_CASES.items()}
    assert any(c.q_lora_rank is None for c in cfgs.values())
    assert any(c.rope.layout == "half" for c in cfgs.values())
    assert any(c.rope.mscale_all_dim and c.rope.mscale != c.rope.mscale_all_dim for c in cfgs.values())
    assert any(c.attention_bias for c in cfgs.values())
    assert any(c.index_shared for c in cfgs.values())
    assert any(c.index_rope_layout == "interleaved" and c.has_indexer for c in cfgs.values())
    assert {c.dtype for c in MLA_CASES.values()} == {"float32", "bfloat16"}
    odd = MLA_CASES["mla_odd_widths"]
    assert all(v % 2 for v in (odd.E, odd.Q, odd.L, odd.D, odd.V))
