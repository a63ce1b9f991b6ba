"""The fast SDPA paths (``implementation="blocked"`` / ``"fused"``) on every shared vector they apply to:
against the float64 oracle and against the readable math path of the same framework."""

import numpy as np
import pytest

from compare import agree, runners
from compare.cases import SDPA_CASES

FAST = ["jax_attn_blocked", "jax_attn_fused", "torch_attn_blocked", "torch_attn_fused"]
CASES = list(SDPA_CASES)


def _assert_all_ok(agreements, label):
    bad = [a for a in agreements if not a.ok]
    assert not bad, f"{label}: " + "; ".join(
        f"{a.quantity} max_abs={a.max_abs:.3e} tol={a.tol:.3e} nonfinite={a.nonfinite}" for a in bad
    )


@pytest.fixture(scope="module")
def results():
    return {}


def _result(results, vec, impl):
    if (impl, vec.name) not in results:
        results[impl, vec.name] = runners.IMPLEMENTATIONS[impl](vec)
    return results[impl, vec.name]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("name", CASES)
def test_fast_path_matches_oracle_and_math(all_vectors, results, impl, name):
    vec = all_vectors[name]
    if not runners.applies(impl, vec):
        pytest.skip(f"{impl} does not apply to {name} (injected dropout)")
    res = _result(results, vec, impl)
    assert set(res) == {"out", "dq", "dk", "dv"}
    _assert_all_ok(agree.against_oracle(vec, res), f"{impl} vs oracle on {name}")
    math = _result(results, vec, impl.rsplit("_", 1)[0])
    _assert_all_ok(agree.between(vec, res, math), f"{impl} vs math on {name}")
    if "fully_masked" in name:
        assert all(np.all(np.isfinite(x)) for x in res.values())
