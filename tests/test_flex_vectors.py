"""Both FlexAttention twins run every shared flex vector (out, lse, dq, dk, dv, dbias), judged against
the float64 oracle and each other; torch's own flex_attention (eager, forward + lse) too."""

import pytest
from vector_checks import assert_all_ok

from compare import agree
from compare.kinds import flex
from compare.kinds.flex import FLEX_CASES

CASES = list(FLEX_CASES)


@pytest.fixture(scope="module")
def results():
    return {}


def _result(results, all_vectors, impl, name):
    if (impl, name) not in results:
        results[impl, name] = flex.IMPLEMENTATIONS[impl](all_vectors[name])
    return results[impl, name]


@pytest.mark.parametrize("impl", ["jax_attn", "torch_attn"])
@pytest.mark.parametrize("name", CASES)
def test_matches_oracle(all_vectors, results, impl, name):
    vec = all_vectors[name]
    res = _result(results, all_vectors, impl, name)
    want = {"out", "lse", "dq", "dk", "dv"} | ({"dbias"} if vec.case.score == "rel_bias" else set())
    assert set(res) == want
    assert_all_ok(agree.against_oracle(vec, res), f"{impl} vs oracle on {name}", nonempty=True)


@pytest.mark.parametrize("name", CASES)
def test_twins_agree_and_torch_flex_forward(all_vectors, results, name):
    vec = all_vectors[name]
    a = _result(results, all_vectors, "jax_attn", name)
    b = _result(results, all_vectors, "torch_attn", name)
    assert_all_ok(agree.between(vec, a, b), f"jax vs torch on {name}", nonempty=True)
    ref = flex.run_torch_flex(vec)
    assert_all_ok(
        agree.against_oracle(vec, ref), f"torch's flex_attention vs oracle on {name}", nonempty=True
    )
    assert_all_ok(agree.between(vec, a, ref), f"jax vs torch's flex_attention on {name}", nonempty=True)
