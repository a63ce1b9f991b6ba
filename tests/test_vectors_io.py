"""The shared vector files: integrity checks, tamper detection, atomic writes."""

import json
import shutil

import pytest

from compare import vectors
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


def test_write_reproduces_the_committed_files(tmp_path):
    manifest = vectors.write(tmp_path / "v")
    committed = json.loads((vectors.DEFAULT_DIR / "manifest.json").read_text())
    assert manifest == committed


def test_failed_write_leaves_the_old_set_intact(vector_copy, monkeypatch):
    before = {p.name: p.read_bytes() for p in vector_copy.iterdir()}

    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(vectors, "_serialize", boom)
    with pytest.raises(RuntimeError):
        vectors.write(vector_copy)
    assert {p.name: p.read_bytes() for p in vector_copy.iterdir()} == before
    assert not list(vector_copy.parent.glob(".vectors-*"))
