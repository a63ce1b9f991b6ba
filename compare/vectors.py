"""Shared test vectors: safetensors files plus a manifest, written from the case registry and the oracle.

Layout of ``tests/vectors/``::

    manifest.json          {"format": 1, "cases": {name: {"kind", "params", "file", "sha256", "arrays",
                                                          "dtypes"}}}
    <name>.safetensors     inputs (e.g. q, k, v, dout, attn_mask, dropout_mask, parameters) and
                           expectations: ``expected_<quantity>`` from the float64 oracle, and for
                           bf16/fp16 ``naive_<quantity>`` from the same-dtype baseline

Each *kind* of case (``sdpa``, and the module kinds) is described once, in its module under
``compare/kinds/`` and listed in ``compare.registry``: its case recipes, how to build inputs, how the
oracle computes expectations. Loading never unpickles: safetensors
holds raw arrays and the manifest is JSON. Every problem (missing, altered or malformed file, a case
missing from the manifest) raises :class:`VectorError` naming the case. Writing goes through a temporary
folder and ``os.replace``, so a failed write leaves the old set intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from compare.kinds.base import NP_DTYPES, Vector
from compare.registry import KINDS

FORMAT = 1
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "tests" / "vectors"


class VectorError(ValueError):
    """A vector file or the manifest is missing, altered or malformed; the message names the case."""


def all_cases() -> dict[str, tuple[str, Any]]:
    """Every registered case by name: ``{name: (kind, case)}``."""
    out = {}
    for kind in KINDS.values():
        for name, case in kind.cases.items():
            if name in out:
                raise ValueError(f"case name {name!r} is registered by two kinds")
            out[name] = (kind.name, case)
    return out


def _kind(name: str):
    return KINDS[name]


def expectations(kind: str, case, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _kind(kind).expectations(case, inputs)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _storable(x: np.ndarray) -> np.ndarray:
    # safetensors' NumPy reader knows no bfloat16: bf16 arrays are stored as float32 (exactly) and cast
    # back on load, guided by the manifest's "dtypes".
    return np.ascontiguousarray(x.astype(np.float32) if x.dtype == NP_DTYPES["bfloat16"] else x)


def _serialize(kind: str, case) -> tuple[bytes, dict[str, str]]:
    inputs = _kind(kind).build_inputs(case)
    arrays = {**inputs, **expectations(kind, case, inputs)}
    dtypes = {k: np.dtype(v.dtype).name for k, v in sorted(arrays.items())}
    return st_save({k: _storable(v) for k, v in sorted(arrays.items())}), dtypes


def write(directory: Path = DEFAULT_DIR, progress=None) -> dict:
    """Write every registered case and the manifest into ``directory`` atomically; returns the manifest."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    cases = all_cases()
    staging = Path(tempfile.mkdtemp(prefix=".vectors-", dir=directory.parent))
    try:
        manifest = {"format": FORMAT, "cases": {}}
        for i, (name, (kind, case)) in enumerate(cases.items()):
            data, dtypes = _serialize(kind, case)
            file = f"{name}.safetensors"
            (staging / file).write_bytes(data)
            manifest["cases"][name] = {
                "kind": kind,
                "params": case.params(),
                "file": file,
                "sha256": _sha256(data),
                "arrays": sorted(dtypes),
                "dtypes": dtypes,
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
    registered = all_cases()
    if name not in registered:
        raise VectorError(f"case {name!r}: not in the case registry")
    kind, case = registered[name]
    entry = manifest["cases"].get(name)
    if entry is None:
        raise VectorError(f"case {name!r}: missing from {directory / 'manifest.json'}")
    if entry.get("kind") != kind or entry.get("params") != case.params():
        raise VectorError(
            f"case {name!r}: manifest kind/parameters differ from the registry; rewrite with "
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
    dtypes = entry.get("dtypes", {})
    arrays = {
        k: a.astype(NP_DTYPES[dtypes[k]]) if dtypes.get(k) == "bfloat16" else a for k, a in arrays.items()
    }
    return Vector(kind, case, arrays)


def load_all(directory: Path = DEFAULT_DIR, names=None) -> list[Vector]:
    manifest = read_manifest(directory)
    return [load(n, directory, manifest) for n in (names or all_cases())]


def check(directory: Path = DEFAULT_DIR, progress=None) -> list[str]:
    """Verify the whole set: every registry case present and intact, inputs regenerate identically from
    the recipe, and the stored expectations equal a fresh oracle run. Returns the checked case names;
    raises :class:`VectorError` on the first problem."""
    manifest = read_manifest(directory)
    registered = all_cases()
    extra = sorted(set(manifest["cases"]) - set(registered))
    if extra:
        raise VectorError(f"cases {extra} are in the manifest but not in the registry")
    for i, name in enumerate(registered):
        vec = load(name, directory, manifest)
        fresh = _kind(vec.kind).build_inputs(vec.case)
        for key, arr in fresh.items():
            if not np.array_equal(arr, vec.arrays[key], equal_nan=True):
                raise VectorError(f"case {name!r}: stored input {key!r} differs from its recipe")
        for key, arr in expectations(vec.kind, vec.case, fresh).items():
            if not np.allclose(arr, vec.arrays[key], rtol=1e-12, atol=1e-12, equal_nan=True):
                raise VectorError(f"case {name!r}: stored {key!r} differs from the oracle")
        if progress:
            progress(i + 1, len(registered), name)
    return list(registered)
