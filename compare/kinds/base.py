"""What every kind of shared vector shares: :class:`Kind`, :class:`Vector`, the dtype table and the array
conversions into and out of the frameworks. Imports no kind (and no framework at import time)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from compare import oracle

NP_DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}

# Where the torch runners put their tensors; set by ``compare.env.select_device`` (JAX uses its default
# device, which the same function sets). Read it as ``base.TORCH_DEVICE`` at call time, not imported by
# name, so that the setting is seen.
TORCH_DEVICE = "cpu"


@dataclass
class Vector:
    """A loaded vector: its kind, its case recipe and its arrays (NumPy, in their native dtypes)."""

    kind: str
    case: Any
    arrays: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def dtype(self) -> str:
        return self.case.dtype


@dataclass(frozen=True)
class Kind:
    """How one kind of vector is made, judged and run.

    Attributes:
      name: manifest kind, e.g. ``"sdpa"``.
      cases: ``{name: case}``; a case has ``.name``, ``.dtype`` and ``.params()`` (JSON-ready).
      build_inputs: ``case -> {array name: ndarray}``, deterministic, in native dtypes.
      expectations: ``(case, inputs) -> {"expected_<q>": float64, "naive_<q>": ... (bf16/fp16 only)}``.
      magnitude: ``(case, arrays, quantity) -> float``: the term size the tolerance policy scales
        gradient tolerances by (0 for forward quantities); see ``compare.tolerance``.
      implementations: ``{impl name: Vector -> {quantity: float64 ndarray}}``.
      applies: ``(impl name, Vector) -> bool``: whether an implementation can run a vector.
    """

    name: str
    cases: Mapping[str, Any]
    build_inputs: Callable[[Any], dict[str, np.ndarray]]
    expectations: Callable[[Any, dict[str, np.ndarray]], dict[str, np.ndarray]]
    magnitude: Callable[[Any, dict[str, np.ndarray], str], float]
    implementations: Mapping[str, Callable]
    applies: Callable[[str, Any], bool] = lambda impl, vec: True


def chunks(case) -> list[tuple[int, int]]:
    """``(start, stop)`` of each chunk a cached run feeds (``case.chunks``: chunk lengths); one chunk (no
    cache) for a full pass of ``case.T`` tokens."""
    sizes = case.chunks or (case.T,)
    stops = np.cumsum(sizes).tolist()
    return list(zip([0, *stops[:-1]], stops))


def oracle_passes(dtype: str) -> tuple[tuple[str, str | None], ...]:
    """``(prefix, rounding dtype)`` of each oracle pass a case of ``dtype`` stores: ``expected_`` (float64)
    always, and for bf16/fp16 also ``naive_`` (every intermediate rounded to ``dtype``)."""
    if dtype in oracle.LOW_PRECISION:
        return (("expected", None), ("naive", dtype))
    return (("expected", None),)


def to_torch(x: np.ndarray, dtype: str | None = None):
    """A NumPy array (bf16 included) as a torch tensor on :data:`TORCH_DEVICE`, in ``dtype`` if given."""
    import torch

    if x.dtype == bool:
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif dtype is not None or x.dtype == NP_DTYPES["bfloat16"]:
        t = torch.from_numpy(np.asarray(x, np.float32)).to(getattr(torch, dtype or "bfloat16"))
    else:
        t = torch.from_numpy(np.ascontiguousarray(x))
    return t.to(TORCH_DEVICE)


def to_float64(x) -> np.ndarray:
    """Any framework's array (bf16 included) as a float64 NumPy array."""
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().double().numpy()
    return np.asarray(x).astype(np.float64)


def jax_module(build: Callable, state_dict: Mapping[str, np.ndarray]):
    """The nnx module ``build()`` with ``state_dict`` loaded (``load_torch_state_dict``), built abstractly
    (``nnx.eval_shape``): its random initialization would be overwritten and costs one XLA compile per
    parameter shape, a quarter of a small vector's JAX run. Built concretely when loading leaves some
    state abstract (a dropout layer's random stream)."""
    import jax
    from flax import nnx

    module = nnx.eval_shape(build)
    module.load_torch_state_dict(state_dict)
    leaves = jax.tree_util.tree_leaves(nnx.state(module))
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        module = build()
        module.load_torch_state_dict(state_dict)
    return module
