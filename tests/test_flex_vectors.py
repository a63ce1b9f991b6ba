"""Both FlexAttention twins run every shared flex vector (out, lse, dq, dk, dv, dbias), judged against
the float64 oracle and each other; torch's own flex_attention (eager, forward + lse) too."""

import pytest

from compare import agree
from compare.kinds import flex
from compare.kinds.flex import FLEX_CASES

CASES = list(FLEX_CASES)


def _assert_all_ok(agreements, label):
    assert agreements, f"{label}: nothing compared"
    bad = [a for a in agreements if not a.ok]
    assert not bad, f"{label}: " + "; ".join(
        f"{a.quantity} max_abs={a.max_abs:.3e} tol={a.tol:.3e} nonfinite={a.nonfinite} at {a.worst_index}"
        for a in bad
    )


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
    _assert_all_ok(agree.against_oracle(vec, res), f"{impl} vs oracle on {name}")


@pytest.mark.parametrize("name", CASES)
def test_twins_agree_and_torch_flex_forward(all_vectors, results, name):
    vec = all_vectors[name]
    a = _result(results, all_vectors, "jax_attn", name)
    b = _result(results, all_vectors, "torch_attn", name)
    _assert_all_ok(agree.between(vec, a, b), f"jax vs torch on {name}")
    ref = flex.run_torch_flex(vec)
    _assert_all_ok(agree.against_oracle(vec, ref), f"torch's flex_attention vs oracle on {name}")
    _assert_all_ok(agree.between(vec, a, ref), f"jax vs torch's flex_attention on {name}")
