"""The JAX twin's CPU attention kernel (``attention_cpu.cc``), built on first use, called through XLA's FFI.

XLA:CPU runs the blocked engine's loops one small op at a time, each op split across the cores; on the
2-core CPU of ``docs/performance.md`` that scaled 1.3–1.6× from one core to two where torch's fused kernel
scales 2.0×. This kernel does what torch's does: a parallel loop over whole work items (query rows × query
blocks forward, key rows backward), each an online softmax over key blocks on register-tiled GEMMs.

It serves the engine's dense plan (:func:`jax_attn.engine.block_attention`) for fp32 inputs with no mask
(or top-left causal) on the CPU backend, inside the engine's custom VJP; :func:`jax_attn.engine.native_reason`
says when it does not apply, and everything else keeps the XLA loops.

The source is compiled once per machine with the system C++ compiler (``$CXX``, else ``g++``, ``c++`` or
``clang++``) with ``-O3 -march=native`` against jaxlib's FFI headers, into
``$JAX_ATTN_CACHE`` (default ``$XDG_CACHE_HOME/jax_attn`` or ``~/.cache/jax_attn``), keyed by the source,
jaxlib's version, the compiler and the CPU's feature flags; about 3 s. Without a compiler (or with
``JAX_ATTN_NATIVE=0``) :func:`unavailable` says why and the engine's XLA loops serve instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NAME", "unavailable", "forward", "backward"]

log = logging.getLogger(__name__)

#: The kernel's name in dispatch reasons.
NAME = "jax_attn's CPU kernel"

_SRC = Path(__file__).with_name("attention_cpu.cc")
_TARGETS = {"jax_attn_cpu_forward": "JaxAttnCpuForward", "jax_attn_cpu_backward": "JaxAttnCpuBackward"}
_lock = threading.Lock()


def _cache_dir() -> Path:
    if os.environ.get("JAX_ATTN_CACHE"):
        return Path(os.environ["JAX_ATTN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jax_attn"


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` code runs only where they match)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """``(library, "")`` with the FFI targets registered, or ``(None, why not)``."""
    if os.environ.get("JAX_ATTN_NATIVE", "1") == "0":
        return None, "disabled by JAX_ATTN_NATIVE=0"
    ffi = getattr(jax, "ffi", None)
    if ffi is None or not hasattr(ffi, "include_dir"):
        return None, f"jax {jax.__version__} has no jax.ffi (needs jax >= 0.4.38)"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found ($CXX, g++, c++ or clang++)"
    include = ffi.include_dir()
    flags = ["-O3", "-march=native", "-std=gnu++17", "-shared", "-fPIC", "-pthread", "-isystem", include]
    import jaxlib

    key = hashlib.sha256(
        b"\0".join(
            x.encode() if isinstance(x, str) else x
            for x in (_SRC.read_bytes(), jaxlib.__version__, cxx, " ".join(flags), _cpu_flags())
        )
    ).hexdigest()[:16]
    out = _cache_dir() / f"attention_cpu-{key}.so"
    try:
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            try:
                log.info("jax_attn: compiling %s (once per machine, ~3 s)", _SRC.name)
                proc = subprocess.run(
                    [cxx, *flags, str(_SRC), "-o", tmp], capture_output=True, text=True, timeout=600
                )
                if proc.returncode != 0:
                    return None, f"compiling {_SRC.name} failed: {proc.stderr.strip()[-400:]}"
                os.replace(tmp, out)  # atomic: a concurrent build or a crash leaves no half-written library
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(out))
        for target, symbol in _TARGETS.items():
            ffi.register_ffi_target(target, ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        return None, f"building or loading {_SRC.name} failed: {e}"
    return lib, ""


def unavailable() -> str:
    """Why the kernel cannot run here ("" when it can). Builds it on first call."""
    with _lock:
        return _load()[1]


def _check(q, k, v, groups, extra=()):
    """ValueError unless ``q (R, T, H)``, ``k (R/groups, S, H)``, ``v (R/groups, S, V)`` (and ``extra``,
    ``(name, array, shape)`` triples) are float32 with consistent shapes: the kernel reads raw buffers."""
    shapes = {"q": q.shape, "k": k.shape, "v": v.shape}
    if any(len(x) != 3 for x in shapes.values()) or groups < 1 or q.shape[0] != k.shape[0] * groups:
        raise ValueError(
            f"{NAME}: q must be (R, T, H), k (R/groups, S, H), v (R/groups, S, V); got q.shape={q.shape}, "
            f"k.shape={k.shape}, v.shape={v.shape}, groups={groups}"
        )
    if k.shape[2] != q.shape[2] or v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"{NAME}: q and k must share the head width and k and v their rows and length; got "
            f"q.shape={q.shape}, k.shape={k.shape}, v.shape={v.shape}"
        )
    for name, x, want in extra:
        if tuple(x.shape) != tuple(want):
            raise ValueError(f"{NAME}: {name} must be {tuple(want)}; got {name}.shape={tuple(x.shape)}")
    for name, x in [("q", q), ("k", k), ("v", v), *((n, x) for n, x, _ in extra)]:
        if jnp.dtype(x.dtype) != jnp.float32:
            raise ValueError(f"{NAME}: {name} must be float32; got {name}.dtype={jnp.dtype(x.dtype).name}")


def _call(target, results, *args, groups, scale, causal):
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"{NAME} is unavailable: {why}")
    return jax.ffi.ffi_call(target, results, vmap_method="sequential")(
        *args, groups=np.int64(groups), scale=np.float32(scale), causal=np.int64(bool(causal))
    )


def forward(q, k, v, *, groups: int, scale: float, causal: bool):
    """``q (R, T, H)``, ``k (R/groups, S, H)``, ``v (R/groups, S, V)`` fp32 → ``(out (R, T, V), stats (R, T,
    3))``; query row r reads key row ``r // groups``. ``stats``: the row's max of the scaled logits, the sum
    of their exponentials shifted by it and the lse (the engine's layout; 0, 1, -inf for an empty row)."""
    _check(q, k, v, groups)
    R, T, _ = q.shape
    out = jax.ShapeDtypeStruct((R, T, v.shape[-1]), jnp.float32)
    stats = jax.ShapeDtypeStruct((R, T, 3), jnp.float32)
    return _call("jax_attn_cpu_forward", (out, stats), q, k, v, groups=groups, scale=scale, causal=causal)


def backward(q, k, v, stats, d_out, delta, *, groups: int, scale: float, causal: bool):
    """Gradients ``(dq, dk, dv)`` of :func:`forward` given its ``stats``, the output cotangent ``d_out`` and
    ``delta = rowsum(d_out ∘ out) − d_lse``. The probabilities are recomputed as ``exp((s − max) − log sum)``
    from logits equal to the forward's to the bit."""
    R, T = q.shape[:2]
    _check(
        q,
        k,
        v,
        groups,
        [("stats", stats, (R, T, 3)), ("d_out", d_out, (R, T, v.shape[-1])), ("delta", delta, (R, T))],
    )
    results = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    args = (q, k, v, stats, d_out, delta)
    return _call("jax_attn_cpu_backward", results, *args, groups=groups, scale=scale, causal=causal)
