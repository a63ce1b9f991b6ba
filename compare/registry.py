"""The kinds of shared vectors, in one place: each kind's cases, input builder, oracle expectations,
tolerance magnitudes and implementations.

To add a kind (e.g. a module), write its cases/oracle/runners in their own modules and add one entry
to :data:`KINDS` below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from compare import cases as sdpa_cases
from compare import cases_causal as causal_cases
from compare import cases_mha as mha_cases
from compare import runners as sdpa_runners
from compare import runners_causal as causal_runners
from compare import runners_flax as flax_runners
from compare import runners_mha as mha_runners


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


KINDS: dict[str, Kind] = {
    "sdpa": Kind(
        name="sdpa",
        cases=sdpa_cases.SDPA_CASES,
        build_inputs=sdpa_cases.build_inputs,
        expectations=sdpa_cases.expectations,
        magnitude=sdpa_cases.magnitude,
        implementations=sdpa_runners.IMPLEMENTATIONS,
        applies=sdpa_runners.applies,
    ),
    "mha": Kind(
        name="mha",
        cases=mha_cases.MHA_CASES,
        build_inputs=mha_cases.build_inputs,
        expectations=mha_cases.expectations,
        magnitude=mha_cases.magnitude,
        implementations={**mha_runners.IMPLEMENTATIONS, "flax_nnx": flax_runners.run_flax_nnx},
        applies=lambda impl, vec: (
            flax_runners.applies(vec) if impl == "flax_nnx" else mha_runners.applies(impl, vec)
        ),
    ),
    "causal": Kind(
        name="causal",
        cases=causal_cases.CAUSAL_CASES,
        build_inputs=causal_cases.build_inputs,
        expectations=causal_cases.expectations,
        magnitude=causal_cases.magnitude,
        implementations=causal_runners.IMPLEMENTATIONS,
        applies=causal_runners.applies,
    ),
}
