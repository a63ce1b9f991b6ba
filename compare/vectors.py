"""Shared test vectors: safetensors files plus a manifest, written from the case registry and the oracle.

Layout of ``tests/vectors/``::

    manifest.json          {"format": 1, "cases": {name: {"kind", "params", "file", "sha256", "arrays"}}}
    <name>.safetensors     inputs (q, k, v, dout, attn_mask?, dropout_mask?) and expectations
                           (expected_out, expected_weights, expected_dq/dk/dv from the float64 oracle;
                           for bf16/fp16 also naive_* from the same-dtype baseline)

Loading never unpickles: safetensors holds raw arrays and the manifest is JSON. Every problem (missing,
altered or malformed file, a case missing from the manifest) raises :class:`VectorError` naming the case.
Writing goes through a temporary folder and ``os.replace``, so a failed write leaves the old set intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from compare import oracle
from compare.cases import NP_DTYPES, SDPA_CASES, SdpaCase, build_inputs, oracle_mask

FORMAT = 1
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "tests" / "vectors"
EXPECTED = ("out", "weights", "dq", "dk", "dv")


class VectorError(ValueError):
    """A vector file or the manifest is missing, altered or malformed; the message names the case."""


@dataclass
class Vector:
    """A loaded vector: its case recipe and its arrays (NumPy, in the stored dtypes)."""

    case: SdpaCase
    arrays: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return self.case.name

    def oracle_kwargs(self) -> dict:
        """Keyword arguments for ``oracle.sdpa_forward``/``sdpa_backward`` built from the stored inputs."""
        c, a = self.case, self.arrays
        return {
            "attn_mask": oracle_mask(c, a.get("attn_mask")),
            "is_causal": c.is_causal,
            "scale": c.scale,
            "groups": c.groups,
            "dropout_mask": a.get("dropout_mask"),
            "dropout_p": c.dropout_p,
        }


def expectations(case: SdpaCase, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Oracle outputs (float64) and, for low precision, the naive same-dtype baseline, from ``inputs``."""
    q, k, v, dout = (inputs[n].astype(np.float64) for n in ("q", "k", "v", "dout"))
    vec = Vector(case, inputs)
    result = {}
    low = case.dtype in oracle.LOW_PRECISION
    for prefix, dtype in (("expected", None), ("naive", case.dtype)) if low else (("expected", None),):
        fwd = oracle.sdpa_forward(q, k, v, **vec.oracle_kwargs(), dtype=dtype)
        bwd = oracle.sdpa_backward(q, k, v, dout, **vec.oracle_kwargs(), dtype=dtype)
        result[f"{prefix}_out"] = fwd["out"]
        result[f"{prefix}_weights"] = fwd["weights"]
        for g in ("dq", "dk", "dv"):
            result[f"{prefix}_{g}"] = bwd[g]
    return result


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _storable(x: np.ndarray) -> np.ndarray:
    # safetensors' NumPy reader knows no bfloat16: bf16 arrays are stored as float32 (exactly) and cast
    # back on load, guided by the case's dtype.
    return np.ascontiguousarray(x.astype(np.float32) if x.dtype == NP_DTYPES["bfloat16"] else x)


def _restore_dtypes(case: SdpaCase, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    native = NP_DTYPES[case.dtype]
    cast = ("q", "k", "v", "dout") + (("attn_mask",) if case.mask_form == "additive_min" else ())
    return {k: a.astype(native) if k in cast else a for k, a in arrays.items()}


def _serialize(case: SdpaCase) -> bytes:
    inputs = build_inputs(case)
    arrays = {**inputs, **expectations(case, inputs)}
    return st_save({k: _storable(v) for k, v in sorted(arrays.items())})


def write(directory: Path = DEFAULT_DIR, cases: dict[str, SdpaCase] = SDPA_CASES, progress=None) -> dict:
    """Write every case and the manifest into ``directory`` atomically; returns the manifest."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".vectors-", dir=directory.parent))
    try:
        manifest = {"format": FORMAT, "cases": {}}
        for i, (name, case) in enumerate(cases.items()):
            data = _serialize(case)
            file = f"{name}.safetensors"
            (staging / file).write_bytes(data)
            manifest["cases"][name] = {
                "kind": "sdpa",
                "params": case.params(),
                "file": file,
                "sha256": _sha256(data),
                "arrays": sorted(st_load(data)),
            }
            if progress:
                progress(i + 1, len(cases), name)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.safetensors"):
            if old.name not in {m["file"] for m in manifest["cases"].values()}:
                old.unlink()
        # Data files first, the manifest last: a reader never sees a manifest pointing at missing data.
        for path in sorted(staging.iterdir()):
            if path.name != "manifest.json":
                os.replace(path, directory / path.name)
        os.replace(staging / "manifest.json", directory / "manifest.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def read_manifest(directory: Path = DEFAULT_DIR) -> dict:
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise VectorError(f"no manifest at {path}; run `python -m compare vectors --write`") from None
    except json.JSONDecodeError as e:
        raise VectorError(f"manifest {path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "cases" not in manifest:
        raise VectorError(f"manifest {path} is not a format-{FORMAT} vector manifest")
    return manifest


def load(name: str, directory: Path = DEFAULT_DIR, manifest: dict | None = None) -> Vector:
    """Load one case, verifying its hash, its arrays and that the registry still describes it."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    if name not in SDPA_CASES:
        raise VectorError(f"case {name!r}: not in the case registry")
    entry = manifest["cases"].get(name)
    if entry is None:
        raise VectorError(f"case {name!r}: missing from {directory / 'manifest.json'}")
    case = SDPA_CASES[name]
    if entry.get("params") != case.params():
        raise VectorError(
            f"case {name!r}: manifest parameters differ from the registry; rewrite with "
            "`python -m compare vectors --write`"
        )
    path = directory / entry["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise VectorError(f"case {name!r}: file {path} is missing") from None
    if _sha256(data) != entry["sha256"]:
        raise VectorError(f"case {name!r}: file {path} was altered (sha256 does not match the manifest)")
    try:
        arrays = st_load(data)
    except (SafetensorError, ValueError, OSError) as e:
        raise VectorError(f"case {name!r}: file {path} is not a readable safetensors file: {e}") from None
    if sorted(arrays) != sorted(entry["arrays"]):
        raise VectorError(
            f"case {name!r}: arrays {sorted(arrays)} differ from the manifest's {entry['arrays']}"
        )
    return Vector(case, _restore_dtypes(case, arrays))


def load_all(directory: Path = DEFAULT_DIR, names=None) -> list[Vector]:
    manifest = read_manifest(directory)
    return [load(n, directory, manifest) for n in (names or SDPA_CASES)]


def check(directory: Path = DEFAULT_DIR, progress=None) -> list[str]:
    """Verify the whole set: every registry case present and intact, inputs regenerate identically from
    the recipe, and the stored expectations equal a fresh oracle run. Returns the checked case names;
    raises :class:`VectorError` on the first problem."""
    manifest = read_manifest(directory)
    extra = sorted(set(manifest["cases"]) - set(SDPA_CASES))
    if extra:
        raise VectorError(f"cases {extra} are in the manifest but not in the registry")
    for i, name in enumerate(SDPA_CASES):
        vec = load(name, directory, manifest)
        fresh = build_inputs(vec.case)
        for key, arr in fresh.items():
            if not np.array_equal(arr, vec.arrays[key], equal_nan=True):
                raise VectorError(f"case {name!r}: stored input {key!r} differs from its recipe")
        for key, arr in expectations(vec.case, fresh).items():
            if not np.allclose(arr, vec.arrays[key], rtol=1e-12, atol=1e-12, equal_nan=True):
                raise VectorError(f"case {name!r}: stored {key!r} differs from the oracle")
        if progress:
            progress(i + 1, len(SDPA_CASES), name)
    return list(SDPA_CASES)
