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

Regenerating is judged by value, not by hash (:func:`compare_regenerated`): float64 results of
BLAS-backed NumPy differ by a few ulp between CPUs and library builds (other kernels, other summation
orders), so a regenerated file's sha256 need not match. Inputs (seeded RNG, exact) must be bit-identical;
expectations must agree within a few ulp of the array's scale. The manifest's sha256 guards the committed
bytes against corruption and tampering; :func:`write` keeps a committed file whose regenerated values
agree, so rewriting the set on another machine changes only what really changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from compare import oracle
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


def _regenerate(kind: str, case) -> dict[str, np.ndarray]:
    """A case's arrays from its recipe: the inputs and the oracle's expectations."""
    inputs = _kind(kind).build_inputs(case)
    return {**inputs, **expectations(kind, case, inputs)}


def _serialize(arrays: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    dtypes = {k: np.dtype(v.dtype).name for k, v in sorted(arrays.items())}
    return st_save({k: _storable(v) for k, v in sorted(arrays.items())}), dtypes


# --- judging a regenerated vector by value ---------------------------------------------------------------

ULPS = 8
"""Expectations may differ from the stored ones by ``ULPS`` ulp (of float64, the stored dtype) of the
array's scale ``max(1, max|stored|)``, plus ``ULPS`` times the oracle's own sensitivity to one-ulp input
noise (:func:`oracle_noise`), which is what a different summation order amounts to."""

NOISE_CAP = 1e-11
"""The sensitivity allowance never exceeds ``NOISE_CAP · max(1, max|stored|)``: a change of 1e-9 is
always caught."""

EXPECTATION_PREFIXES = ("expected_", "naive_")


def is_expectation(name: str) -> bool:
    """Whether an array is an oracle expectation (judged by value) rather than an input (exact)."""
    return name.startswith(EXPECTATION_PREFIXES)


def _low_precision_ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """One ulp of ``dtype`` (bf16/fp16) at each element's magnitude, as float64 (subnormal spacing at 0)."""
    info = ml_dtypes.finfo(NP_DTYPES[dtype])
    smallest = 2.0 ** (int(info.minexp) - int(info.nmant))
    with np.errstate(divide="ignore", invalid="ignore"):
        _, exp = np.frexp(np.abs(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)))
    # |x| = m · 2^exp with m in [0.5, 1): its ulp is 2^(exp - 1 - nmant), never below the subnormal step.
    return np.maximum(np.ldexp(1.0, (exp - 1 - int(info.nmant)).astype(np.int64)), smallest)


def compare_regenerated(
    old: dict[str, np.ndarray],
    new: dict[str, np.ndarray],
    dtype: str | None = None,
    noise: dict[str, float] | None = None,
) -> list[str]:
    """Judge a regenerated vector against the stored one, by value; returns the problems (empty: agree).

    - The same array names, shapes and dtypes.
    - Inputs (every array that is not ``expected_*`` / ``naive_*``) bit-identical: they come from a
      seeded RNG and exact casts.
    - ``expected_*`` (float64): ``|new - old| <= ULPS·eps·s + min(ULPS·noise, NOISE_CAP·s)`` with the
      array's scale ``s = max(1, max|old|)`` and ``noise`` the oracle's sensitivity to one-ulp input noise
      for that array (:func:`oracle_noise`; 0 if not given).
    - ``naive_*`` (the low-precision baseline, stored as float64): the same, plus one ulp of the case's
      ``dtype`` at the element's magnitude, since a few-ulp float64 difference before a rounding to
      bf16/fp16 can flip that rounding.
    - NaN and infinities where the stored array has them, of the same sign.
    """
    problems = []
    noise = noise or {}
    eps = np.finfo(np.float64).eps
    if sorted(old) != sorted(new):
        missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        problems.append(f"arrays differ: stored only {missing}, regenerated only {extra}")
    for key in sorted(set(old) & set(new)):
        a, b = np.asarray(old[key]), np.asarray(new[key])
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(
                f"{key!r}: stored {a.dtype.name}{list(a.shape)}, regenerated {b.dtype.name}{list(b.shape)}"
            )
            continue
        if not is_expectation(key):
            if a.tobytes() != b.tobytes():
                n = int(np.sum(np.frombuffer(a.tobytes(), np.uint8) != np.frombuffer(b.tobytes(), np.uint8)))
                problems.append(f"input {key!r}: not bit-identical to its recipe ({n} bytes differ)")
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        finite = np.isfinite(a64)
        same_special = np.array_equal(np.isnan(a64), np.isnan(b64)) and np.array_equal(
            a64[~finite & ~np.isnan(a64)], b64[~finite & ~np.isnan(a64)]
        )
        if not same_special or not np.all(np.isfinite(b64[finite])):
            problems.append(f"{key!r}: NaN/inf positions differ from the stored array")
            continue
        scale = max(1.0, float(np.max(np.abs(a64[finite]), initial=0.0)))
        tol = ULPS * eps * scale + min(ULPS * float(noise.get(key, 0.0)), NOISE_CAP * scale)
        if key.startswith("naive_") and dtype in oracle.LOW_PRECISION:
            tol = tol + _low_precision_ulp(a64, dtype)
        diff = np.where(finite, np.abs(b64 - a64), 0.0)
        bad = diff > tol
        if np.any(bad):
            i = np.unravel_index(np.argmax(np.where(bad, diff, -1.0)), diff.shape)
            t = tol[i] if np.ndim(tol) else tol
            problems.append(
                f"{key!r}: differs from the regenerated value by {float(diff[i]):.3e} at {tuple(map(int, i))}"
                f" (allowed {float(t):.3e}: {ULPS} ulp of the scale {scale:.3g} plus the oracle's noise)"
            )
    return problems


def oracle_noise(kind: str, case, inputs: dict[str, np.ndarray], trials: int = 2) -> dict[str, float]:
    """How much each expectation moves when every finite, nonzero float input moves by one float64 ulp
    (in a seeded random direction): ``{expected_<q>: max |change|}``, the worst of ``trials``. Masks
    (arrays named ``*mask*``) stay as they are: they are added, not summed over, and a fill such as
    ``finfo.min`` must stay the fill it is.

    A BLAS with another summation order computes the exact result of slightly different inputs; the
    change here is what that amounts to for this case's conditioning (large: softmax over logits with a
    big common offset, gradients that are sums of cancelling terms).
    """
    base = expectations(kind, case, inputs)
    rng = np.random.default_rng(0)
    worst = {k: 0.0 for k in base if k.startswith("expected_")}
    for _ in range(trials):
        moved = {}
        for name in sorted(inputs):  # sorted: a loaded vector's arrays come in no fixed order
            x = inputs[name]
            floating = np.issubdtype(x.dtype, np.floating) or x.dtype == NP_DTYPES["bfloat16"]
            if not floating or "mask" in name:
                moved[name] = x
                continue
            x64 = x.astype(np.float64)
            step = np.where(rng.random(x.shape) < 0.5, -np.inf, np.inf)
            movable = np.isfinite(x64) & (x64 != 0)
            moved[name] = np.where(movable, np.nextafter(x64, step), x64)
        got = expectations(kind, case, moved)
        for k in worst:
            d = np.abs(np.nan_to_num(got[k]) - np.nan_to_num(base[k]))
            worst[k] = max(worst[k], float(np.max(d, initial=0.0)))
    return worst


def regeneration_problems(kind: str, case, stored: dict[str, np.ndarray]) -> list[str]:
    """:func:`compare_regenerated` of ``stored`` against a fresh run of the case's recipe and oracle."""
    inputs = _kind(kind).build_inputs(case)
    fresh = {**inputs, **expectations(kind, case, inputs)}
    return compare_regenerated(stored, fresh, case.dtype, oracle_noise(kind, case, inputs))


def _agreeing_file(directory: Path, name: str, kind: str, case, arrays: dict) -> bytes | None:
    """The bytes of ``directory``'s intact file for ``name`` when its values agree with ``arrays``
    (:func:`compare_regenerated`), else None."""
    try:
        stored = load(name, directory)
        data = (Path(directory) / read_manifest(directory)["cases"][name]["file"]).read_bytes()
    except (VectorError, OSError, KeyError):
        return None
    inputs = {k: v for k, v in arrays.items() if not is_expectation(k)}
    if compare_regenerated(stored.arrays, arrays, case.dtype, oracle_noise(kind, case, inputs)):
        return None
    return data


def write(directory: Path = DEFAULT_DIR, progress=None, keep_agreeing: bool = True) -> dict:
    """Write every registered case and the manifest into ``directory`` atomically; returns the manifest.

    With ``keep_agreeing``, a case whose intact file in ``directory`` agrees by value with the
    regenerated arrays (:func:`compare_regenerated`) keeps its bytes and sha256: regenerating on another
    CPU does not rewrite files over ulp-level noise."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    cases = all_cases()
    staging = Path(tempfile.mkdtemp(prefix=".vectors-", dir=directory.parent))
    try:
        manifest = {"format": FORMAT, "cases": {}}
        for i, (name, (kind, case)) in enumerate(cases.items()):
            arrays = _regenerate(kind, case)
            data, dtypes = _serialize(arrays)
            kept = _agreeing_file(directory, name, kind, case, arrays) if keep_agreeing else None
            data = data if kept is None else kept
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
    """Verify the whole set: every registry case present and intact (sha256), and regenerated from its
    recipe equal by value (:func:`compare_regenerated`: inputs bit-identical, expectations within a few
    ulp). Returns the checked case names; raises :class:`VectorError` on the first problem."""
    manifest = read_manifest(directory)
    registered = all_cases()
    extra = sorted(set(manifest["cases"]) - set(registered))
    if extra:
        raise VectorError(f"cases {extra} are in the manifest but not in the registry")
    for i, name in enumerate(registered):
        vec = load(name, directory, manifest)
        problems = regeneration_problems(vec.kind, vec.case, vec.arrays)
        if problems:
            raise VectorError(
                f"case {name!r}: stored {problems[0]} (regenerated from the recipe and the oracle)"
            )
        if progress:
            progress(i + 1, len(registered), name)
    return list(registered)


def compare_directories(reference: Path, other: Path, progress=None) -> list[str]:
    """Every difference of vector set ``other`` from ``reference`` that is not ulp-level noise: manifest
    entries (all fields but ``sha256``) and each case's arrays by value (:func:`compare_regenerated`).
    Both sets are loaded with their own hashes verified. Returns the problems, each naming its case."""
    ref_manifest, other_manifest = read_manifest(reference), read_manifest(other)
    problems = []
    names = sorted(set(ref_manifest["cases"]) | set(other_manifest["cases"]))
    registered = all_cases()
    for i, name in enumerate(names):
        a, b = ref_manifest["cases"].get(name), other_manifest["cases"].get(name)
        if a is None or b is None:
            problems.append(f"case {name!r}: only in {reference if b is None else other}")
            continue
        fields = sorted(k for k in set(a) | set(b) if k != "sha256" and a.get(k) != b.get(k))
        if fields:
            problems.append(f"case {name!r}: manifest fields {fields} differ")
            continue
        try:
            va, vb = load(name, reference, ref_manifest), load(name, other, other_manifest)
        except VectorError as e:
            problems.append(str(e))
            continue
        kind, case = registered[name]  # load() checked that the registry has it
        inputs = {k: v for k, v in va.arrays.items() if not is_expectation(k)}
        noise = oracle_noise(kind, case, inputs)
        problems += [
            f"case {name!r}: {p}" for p in compare_regenerated(va.arrays, vb.arrays, case.dtype, noise)
        ]
        if progress:
            progress(i + 1, len(names), name)
    return problems


def verify_regenerate(directory: Path = DEFAULT_DIR, progress=None) -> list[str]:
    """Regenerate the whole set into a temporary folder, exactly as ``--write`` would write it from
    scratch, and compare it with ``directory`` by value (:func:`compare_directories`); returns the
    problems (empty: the committed set is what this machine's recipes and oracle give)."""
    directory = Path(directory)
    with tempfile.TemporaryDirectory(prefix="vectors-verify-") as tmp:
        fresh = Path(tmp) / "vectors"
        write(fresh, keep_agreeing=False)
        return compare_directories(directory, fresh, progress=progress)
