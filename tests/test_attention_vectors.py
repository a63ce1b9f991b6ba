"""Both ``Attention`` twins run every shared ``attention`` vector (each knob alone, the decoder families
of issue 14, KV-cache chunks, bf16/fp16): output and gradients w.r.t. x and every parameter, judged against
the float64 oracle (``compare.oracle_attention``) and each other; the fused paths on a spread of cases."""

import pytest
from vector_checks import assert_all_ok

from compare import agree
from compare.kinds import attention
from compare.kinds.attention import ATTENTION_CASES, param_names

CASES = list(ATTENTION_CASES)
# JAX compiles each vector once (seconds on a loaded CPU): here the families, the cache and low-precision
# vectors; ``python -m compare`` runs jax_attn on every vector, torch_attn runs all of them here.
JAX_CASES = [n for n in CASES if n.startswith("fam_")]
BLOCKED_CASES = [
    "fam_gpt_oss",
    "fam_gemma2",
    "fam_gpt_oss_cache_chunks",
    "attn_bidirectional_window",
    "fam_llama3_bf16",
    "fam_llama4_chunked_cache",
    "fam_bloom_alibi_cache",
    "attn_chunked",
    "fam_gemma4_full",
]
FUSED_CASES = ["fam_llama3", "fam_qwen3_cache_chunks", "fam_llama3_bf16"]


@pytest.fixture(scope="module")
def results():
    return {}


def _result(results, all_vectors, impl, name):
    if (impl, name) not in results:
        results[impl, name] = attention.IMPLEMENTATIONS[impl](all_vectors[name])
    return results[impl, name]


@pytest.mark.parametrize(
    "impl, name", [("torch_attn", n) for n in CASES] + [("jax_attn", n) for n in JAX_CASES]
)
def test_matches_oracle(all_vectors, results, impl, name):
    vec = all_vectors[name]
    res = _result(results, all_vectors, impl, name)
    assert set(res) == {"out", "grad_x", *(f"grad_{p}" for p in param_names(vec.case))}
    assert_all_ok(agree.against_oracle(vec, res), f"{impl} vs oracle on {name}")


@pytest.mark.parametrize("name", JAX_CASES)
def test_jax_matches_torch(all_vectors, results, name):
    vec = all_vectors[name]
    a = _result(results, all_vectors, "jax_attn", name)
    b = _result(results, all_vectors, "torch_attn", name)
    assert_all_ok(agree.between(vec, a, b), f"jax vs torch on {name}")


@pytest.mark.parametrize("impl", ["jax_attn_fused", "torch_attn_fused"])
@pytest.mark.parametrize("name", FUSED_CASES)
def test_fused_matches_oracle(all_vectors, impl, name):
    vec = all_vectors[name]
    assert attention.applies(impl, vec)
    assert_all_ok(agree.against_oracle(vec, attention.IMPLEMENTATIONS[impl](vec)), f"{impl} on {name}")


@pytest.mark.parametrize("impl", ["jax_attn_blocked", "torch_attn_blocked"])
@pytest.mark.parametrize("name", BLOCKED_CASES)
def test_blocked_matches_oracle(all_vectors, impl, name):
    vec = all_vectors[name]
    assert attention.applies(impl, vec)
    assert_all_ok(agree.against_oracle(vec, attention.IMPLEMENTATIONS[impl](vec)), f"{impl} on {name}")
