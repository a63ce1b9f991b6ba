"""The shared vector files: integrity checks, tamper detection, atomic writes."""

import json
import shutil

import numpy as np
import pytest

from compare import vectors
from compare.kinds.base import NP_DTYPES
from compare.kinds.sdpa import SDPA_CASES


@pytest.fixture
def vector_copy(tmp_path):
    dst = tmp_path / "vectors"
    shutil.copytree(vectors.DEFAULT_DIR, dst)
    return dst


def test_committed_vectors_check():
    assert vectors.check() == list(vectors.all_cases())


def test_vectors_are_small():
    total = sum(p.stat().st_size for p in vectors.DEFAULT_DIR.iterdir())
    assert total < 10 * 2**20


def test_enough_cases_cover_the_reference_edge_cases():
    names = set(SDPA_CASES)
    for needed in (
        "fully_masked_keep",
        "mask_masked",
        "mask_additive_inf",
        "mask_rank3_NTS",
        "causal_T_lt_S",
        "decode_L1",
        "gqa_G1",
        "gqa_G2",
        "gqa_G4_mqa",
        "scale_override",
        "large_logits",
        "large_mean_offset",
        "sizes_one",
        "primes",
        "dropout_injected",
        "basic_bf16",
        "basic_fp16",
    ):
        assert needed in names


def test_tampered_file_names_the_case(vector_copy):
    path = vector_copy / "gqa_G2.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(vectors.VectorError, match="gqa_G2.*altered"):
        vectors.check(vector_copy)


def test_missing_file_names_the_case(vector_copy):
    (vector_copy / "causal_L1.safetensors").unlink()
    with pytest.raises(vectors.VectorError, match="causal_L1.*missing"):
        vectors.check(vector_copy)


def test_malformed_file_with_matching_hash_names_the_case(vector_copy):
    path = vector_copy / "basic.safetensors"
    path.write_bytes(b"not a safetensors file")
    manifest = json.loads((vector_copy / "manifest.json").read_text())
    manifest["cases"]["basic"]["sha256"] = vectors._sha256(b"not a safetensors file")
    (vector_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(vectors.VectorError, match="'basic'.*not a readable safetensors"):
        vectors.check(vector_copy)


def test_changed_values_with_updated_hash_are_caught_by_the_oracle(vector_copy):
    from safetensors.numpy import load, save

    path = vector_copy / "mask_keep.safetensors"
    arrays = load(path.read_bytes())
    arrays["expected_out"] = arrays["expected_out"] + 1e-6
    data = save(arrays)
    path.write_bytes(data)
    manifest = json.loads((vector_copy / "manifest.json").read_text())
    manifest["cases"]["mask_keep"]["sha256"] = vectors._sha256(data)
    (vector_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(vectors.VectorError, match="mask_keep.*expected_out.*oracle"):
        vectors.check(vector_copy)


def test_case_missing_from_manifest(vector_copy):
    manifest = json.loads((vector_copy / "manifest.json").read_text())
    del manifest["cases"]["primes"]
    (vector_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(vectors.VectorError, match="primes.*missing from"):
        vectors.check(vector_copy)


def test_missing_manifest(tmp_path):
    with pytest.raises(vectors.VectorError, match="no manifest"):
        vectors.check(tmp_path)


def test_write_reproduces_the_committed_values(tmp_path):
    # By value, not by hash: float64 BLAS results differ by a few ulp between CPUs (an AMD machine
    # regenerates dq and parameter gradients 1-3 ulp away from the Intel-written files).
    manifest = vectors.write(tmp_path / "v", keep_agreeing=False)
    committed = json.loads((vectors.DEFAULT_DIR / "manifest.json").read_text())
    assert sorted(manifest["cases"]) == sorted(committed["cases"])
    for name, entry in manifest["cases"].items():
        assert {k: v for k, v in entry.items() if k != "sha256"} == {
            k: v for k, v in committed["cases"][name].items() if k != "sha256"
        }, name
    assert vectors.compare_directories(vectors.DEFAULT_DIR, tmp_path / "v") == []


def test_failed_write_leaves_the_old_set_intact(vector_copy, monkeypatch):
    before = {p.name: p.read_bytes() for p in vector_copy.iterdir()}

    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(vectors, "_serialize", boom)
    with pytest.raises(RuntimeError):
        vectors.write(vector_copy)
    assert {p.name: p.read_bytes() for p in vector_copy.iterdir()} == before
    assert not list(vector_copy.parent.glob(".vectors-*"))


# --- judging regenerated vectors by value ---------------------------------------------------------------


def _nudged(vec, steps: int, seed: int = 0) -> dict:
    """``vec``'s arrays with every expected_* element moved by up to ``steps`` float64 ulps and a fifth of
    the naive_* elements by one ulp of the case's low-precision dtype (a flipped rounding)."""
    rng = np.random.default_rng(seed)
    out = dict(vec.arrays)
    for key in sorted(vec.arrays):  # sorted: safetensors hands the arrays over in no fixed order
        a = vec.arrays[key]
        if key.startswith("expected_"):
            b = a.copy()
            for _ in range(steps):
                b = np.nextafter(b, np.where(rng.random(a.shape) < 0.5, -np.inf, np.inf))
            out[key] = b
        elif key.startswith("naive_"):
            # one low-precision ulp at the element's magnitude, up or down (naive MHA weights are means
            # over heads, so not always representable in the low-precision dtype themselves)
            flip = np.where(rng.random(a.shape) < 0.5, -1.0, 1.0) * (rng.random(a.shape) < 0.2)
            out[key] = a + flip * vectors._low_precision_ulp(a, vec.dtype)
    return out


@pytest.mark.parametrize("name", list(vectors.all_cases()))
def test_ulp_noise_in_expectations_passes(name):
    vec = vectors.load(name)
    noisy = _nudged(vec, steps=3)
    assert any(not np.array_equal(noisy[k], vec.arrays[k]) for k in noisy if k.startswith("expected_"))
    assert vectors.compare_regenerated(vec.arrays, noisy, vec.dtype) == []


@pytest.mark.parametrize("name", list(vectors.all_cases()))
def test_a_real_change_of_1e9_fails(name):
    vec = vectors.load(name)
    kind, case = vectors.all_cases()[name]
    inputs = {k: v for k, v in vec.arrays.items() if not vectors.is_expectation(k)}
    noise = vectors.oracle_noise(kind, case, inputs)  # the widest allowance the checks ever use
    for key in (k for k in vec.arrays if k.startswith("expected_")):
        changed = dict(vec.arrays)
        changed[key] = vec.arrays[key].copy()
        changed[key].flat[changed[key].size // 2] += 1e-9
        problems = vectors.compare_regenerated(vec.arrays, changed, vec.dtype, noise)
        assert len(problems) == 1 and repr(key) in problems[0] and "1.000e-09" in problems[0], problems


def test_a_naive_value_two_low_precision_ulps_away_fails():
    vec = vectors.load("basic_bf16")
    low = NP_DTYPES["bfloat16"]
    changed = dict(vec.arrays)
    a = vec.arrays["naive_out"].astype(low)
    twice = np.nextafter(np.nextafter(a, np.asarray(np.inf, low)), np.asarray(np.inf, low))
    changed["naive_out"] = np.where(np.arange(a.size).reshape(a.shape) == 0, twice.astype(np.float64), a)
    problems = vectors.compare_regenerated(vec.arrays, changed, vec.dtype)
    assert len(problems) == 1 and "'naive_out'" in problems[0]


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("primes", "q"),
        ("basic_bf16", "k"),
        ("mha_basic", "param.in_proj_bias"),
        ("mask_keep", "attn_mask"),
        ("csa_mha", "dy"),
    ],
)
def test_any_input_bit_change_fails(name, key):
    vec = vectors.load(name)
    changed = dict(vec.arrays)
    a = vec.arrays[key].copy()
    if a.dtype == bool:
        a.flat[0] = not a.flat[0]
    else:
        bits = a.view(np.dtype(f"u{a.dtype.itemsize}"))
        bits.flat[-1] ^= 1  # the lowest mantissa bit of one element
    changed[key] = a
    problems = vectors.compare_regenerated(vec.arrays, changed, vec.dtype)
    assert problems == [f"input {key!r}: not bit-identical to its recipe (1 bytes differ)"]


def test_missing_reshaped_or_retyped_arrays_fail():
    vec = vectors.load("primes")
    a = dict(vec.arrays)
    del a["expected_dv"]
    assert "stored only ['expected_dv']" in vectors.compare_regenerated(vec.arrays, a)[0]
    b = dict(vec.arrays, expected_out=vec.arrays["expected_out"].astype(np.float32))
    assert "'expected_out': stored float64" in vectors.compare_regenerated(vec.arrays, b)[0]
    c = dict(vec.arrays, q=vec.arrays["q"].reshape(-1))
    assert "'q': stored float32" in vectors.compare_regenerated(vec.arrays, c)[0]
    d = dict(
        vec.arrays, expected_out=np.where(vec.arrays["expected_out"] > 0, np.nan, vec.arrays["expected_out"])
    )
    assert "NaN/inf" in vectors.compare_regenerated(vec.arrays, d)[0]


def test_the_oracle_noise_widens_ill_conditioned_cases_only():
    eps = np.finfo(np.float64).eps
    widening = {}
    for name in ("basic", "large_mean_offset"):
        kind, case = vectors.all_cases()[name]
        inputs = vectors._kind(kind).build_inputs(case)
        widening[name] = vectors.oracle_noise(kind, case, inputs)["expected_weights"] / eps
    # logits with a common offset of ~70: a one-ulp input change moves the weights by ~20 ulp
    assert widening["basic"] < 8 < widening["large_mean_offset"] < 1e3


def _rewrite(directory, name, edit):
    from safetensors.numpy import load, save

    manifest = json.loads((directory / "manifest.json").read_text())
    path = directory / manifest["cases"][name]["file"]
    arrays = load(path.read_bytes())
    edit(arrays)
    data = save(arrays)
    path.write_bytes(data)
    manifest["cases"][name]["sha256"] = vectors._sha256(data)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return data


def test_check_passes_on_ulp_noise_with_a_matching_hash(vector_copy):
    def nudge(arrays):
        for key in ("expected_out", "expected_dq", "expected_weights"):
            arrays[key] = np.nextafter(np.nextafter(arrays[key], np.inf), np.inf)

    _rewrite(vector_copy, "large_mean_offset", nudge)
    assert vectors.check(vector_copy) == list(vectors.all_cases())


def test_write_keeps_files_that_agree_by_value_and_rewrites_real_changes(vector_copy):
    noisy = _rewrite(
        vector_copy, "primes", lambda a: a.update(expected_dq=np.nextafter(a["expected_dq"], np.inf))
    )
    changed = _rewrite(vector_copy, "basic", lambda a: a.update(expected_out=a["expected_out"] + 1e-9))
    before = {p.name: p.read_bytes() for p in vector_copy.glob("*.safetensors")}
    vectors.write(vector_copy)
    after = {p.name: p.read_bytes() for p in vector_copy.glob("*.safetensors")}
    assert after["primes.safetensors"] == noisy  # ulp noise: kept byte for byte
    assert after["basic.safetensors"] != changed  # a real change: regenerated
    assert {n for n in after if after[n] != before[n]} == {"basic.safetensors"}
    assert vectors.check(vector_copy) == list(vectors.all_cases())


def test_compare_directories_names_the_case_that_really_differs(vector_copy):
    _rewrite(vector_copy, "primes", lambda a: a.update(expected_dq=np.nextafter(a["expected_dq"], np.inf)))
    _rewrite(vector_copy, "gqa_G2", lambda a: a.update(expected_dk=a["expected_dk"] * (1 + 1e-9)))
    problems = vectors.compare_directories(vectors.DEFAULT_DIR, vector_copy)
    assert len(problems) == 1 and problems[0].startswith("case 'gqa_G2': 'expected_dk'")
