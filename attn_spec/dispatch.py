"""The automatic choice of an SDPA path (``implementation=None`` / ``"auto"``), written once for both twins.

Each twin turns its call into facts (how many logits, whether weights or dropout are asked for, whether a
float mask is given, and whether the framework's fused kernel is the fast path for these inputs on this
device) and asks :func:`select` which path to take. The rule, in order:

1. **math** when attention weights are asked for (only math materialises them) or dropout is active
   (only math takes dropout or an injected ``dropout_mask``). Above :data:`LARGE_LOGITS` this holds a
   dense ``(..., T, S)`` matrix as torch does for weights; the choice then carries a ``warning`` (the twin
   logs it) instead of raising, since the memory is what the call asked for.
2. **fused** when the framework says its kernel is the fast path here (the ``fused`` fact): the torch
   twin on CPU and CUDA (``F.scaled_dot_product_attention``: flash / memory-efficient / cuDNN kernels,
   bounded memory), the JAX twin on a GPU for fp16/bf16 with head widths cuDNN takes (a multiple of 8,
   at most 128). JAX's XLA fallback of ``jax.nn.dot_product_attention`` materialises the logits and was
   never faster than math or blocked on CPU, so it is not a fast path.
3. **math** when the problem is small: fewer than :data:`MATH_MAX_LOGITS` logits (per-block overhead makes
   blocked slower there; see ``docs/performance.md``), with or without a float ``attn_mask``. (A float mask
   once kept math up to :data:`LARGE_LOGITS`, when the JAX blocked path gave it no gradient. Both engines
   give it its gradient now, and blocked is the faster: forward+backward with a ``(1, 1, T, T)`` float
   mask, B1 8 heads of 64, 2-core CPU, math / blocked time 1.35 / 2.29 / 2.43 / 2.60 (JAX, jit) and
   1.13 / 1.34 / 2.89 / 3.06 (torch) at T 256 / 512 / 1024 / 2048.)
4. **blocked** otherwise: online softmax over blocks, memory bounded by one block, causal blocks above the
   diagonal skipped; a float mask gets its gradient. (Both twins run it on their engine; on the CPU
   backend the JAX engine runs fp32 calls without a mask array on its compiled kernel, ``jax_attn/native``,
   and its reason says so. The thresholds below were measured before that kernel. Re-measured with it (jit,
   8 heads of 64): between 2^16 and 2^17 logits blocked is 1.35–1.9× faster than math, at 2^15 about
   equal, and at 2^17 forward+backward math is still the faster at B4 T64. The threshold stays as it is,
   shared by both twins; see ``docs/performance.md``.)

The thresholds count logits elements (``batch · heads · T · S``), measured on the 2-core CPU of
``docs/performance.md`` (jax.jit forward and forward+backward, B1–8, 8 heads of 64, fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

#: ``implementation=`` values that ask for the automatic choice.
AUTO = (None, "auto")

#: Below this many logits math is chosen (when fused is not the fast path). Measured (jit, fp32, 8 heads
#: of 64): B1 T64 (2^15 logits) math forward 0.14 ms vs blocked 0.20 ms, forward+backward equal; B1 T128
#: (2^17) equal forward, blocked 1.5x faster forward+backward; from B1 T256 (2^19) blocked is faster in
#: forward+backward (1.9x) and from B1 T512 (2^21) in both (1.3x forward, 2.4x forward+backward).
MATH_MAX_LOGITS = 2**17

#: Above this many logits a dense ``(..., T, S)`` matrix is large: 2^27 fp32 logits are 512 MiB, and the
#: math path holds about three such arrays (logits, exponentials, weights), ~1.5 GiB. Weights or dropout
#: above it come with a warning.
LARGE_LOGITS = 2**27


@dataclass(frozen=True)
class Choice:
    """The path taken and why.

    Attributes:
      implementation: ``"math"``, ``"blocked"`` or ``"fused"``.
      reason: one sentence naming the facts that decided it.
      warning: non-empty when the choice holds a dense ``(..., T, S)`` matrix above :data:`LARGE_LOGITS`.
    """

    implementation: str
    reason: str
    warning: str = ""

    def __str__(self) -> str:
        return f"{self.implementation} ({self.reason})"


def _size(logits: int) -> str:
    return f"{logits} logits"


def select(*, logits: int, need_weights: bool, dropout: bool, float_mask: bool, fused: str | None) -> Choice:
    """The automatic choice for a call with these facts (the rule of this module's docstring).

    Args:
      logits: elements of the logits, ``batch · heads · T · S`` (``prod(shapes.logits)``).
      need_weights: the call returns attention weights.
      dropout: dropout is active (``dropout_p > 0``).
      float_mask: a float (additive) ``attn_mask`` is given.
      fused: a short name of the framework's fused kernel when it is the fast path for these inputs on
        this device (e.g. ``"F.scaled_dot_product_attention"``, ``"cuDNN"``), else None.
    """
    if need_weights or dropout:
        what = "attention weights requested" if need_weights else "dropout active"
        reason = f"{what}: only math provides them ({_size(logits)})"
        warning = ""
        if logits > LARGE_LOGITS:
            warning = (
                f"{what} with {logits} logits (> {LARGE_LOGITS}): the math path holds dense (..., T, S) "
                "arrays of that size; pass need_weights=False / dropout_p=0 for a bounded-memory path"
            )
        return Choice("math", reason, warning)
    if fused is not None:
        return Choice("fused", f"{fused} is the fast path here ({_size(logits)})")
    if logits < MATH_MAX_LOGITS:
        return Choice("math", f"small: {logits} logits < {MATH_MAX_LOGITS}")
    reason = f"large: {logits} logits >= {MATH_MAX_LOGITS}, bounded memory"
    if float_mask:
        reason += "; the float attn_mask gets its gradient blockwise"
    return Choice("blocked", reason)


class ChoiceLog:
    """Where a module notes its last automatic choice, for its ``repr`` and ``last_choice``.

    Every instance compares equal to every other and hashes alike, so noting a choice never changes a
    Flax module's static structure (no retrace under ``nnx.jit``); it is set at trace time under ``jit``
    (shapes are static there, so the choice is the one every call of that compilation makes).
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: Choice | None = None

    def __eq__(self, other) -> bool:
        return isinstance(other, ChoiceLog)

    def __hash__(self) -> int:
        return hash(ChoiceLog)

    def __repr__(self) -> str:
        return "not called yet" if self.last is None else f"last call: {self.last}"


def describe(implementation: str | None, log: ChoiceLog | None = None) -> str:
    """How a module shows its ``implementation=``: ``'blocked'``, or ``None (auto; last call: ...)``."""
    if implementation not in AUTO:
        return repr(implementation)
    return f"{implementation!r} (auto; {log!r})" if log is not None else f"{implementation!r} (auto)"
