"""The catalogue of FlexAttention mods used by the flex tests, vectors and benchmarks (attention-gym
style: each mask or score mod a small named factory, composable with ``and_masks`` / ``or_masks``).

A mod is code, not data: a vector case records a mod's *name and parameters*, and every runner (the JAX
twin, the torch twin, torch's own ``flex_attention``, the float64 NumPy oracle) rebuilds it from here.
Mask mods use Python operators only, so one mod object works on NumPy, JAX and torch arrays alike. Score
mods that capture arrays (ALiBi slopes, a relative bias table) take that framework's array; the one that
needs a function beyond operators (``tanh``) takes the framework's namespace ``xp`` (``numpy``,
``jax.numpy`` or ``torch``).
"""

from __future__ import annotations


# ------------------------------------------------------------------------------- mask mods
def causal(b, h, q_idx, kv_idx):
    """Top-left causal: query t sees keys s <= t."""
    return q_idx >= kv_idx


def generate_sliding_window(window: int):
    """Causal sliding window: a query sees itself and the ``window - 1`` keys before it (HF's
    ``sliding_window`` convention)."""

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    sliding_window.__name__ = f"sliding_window_{window}"
    return sliding_window


def generate_prefix_lm(prefix: int):
    """Prefix LM: the first ``prefix`` keys are seen by every query (bidirectional), the rest causally."""

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (q_idx >= kv_idx)

    prefix_lm.__name__ = f"prefix_lm_{prefix}"
    return prefix_lm


def generate_document(doc_ids):
    """Packed sequences: causal within a document, nothing across. ``doc_ids`` ``(B, T)`` (this
    framework's int array; query and key positions share it, so T == S)."""

    def document(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    return document


def generate_dilated_sliding_window(window: int, dilation: int):
    """Causal window of ``window`` keys where only every ``dilation``-th key is seen."""

    def dilated_sliding_window(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff >= 0) & (diff < window) & (diff % dilation == 0)

    dilated_sliding_window.__name__ = f"dilated_sliding_window_{window}_{dilation}"
    return dilated_sliding_window


# ------------------------------------------------------------------------------- score mods
def generate_alibi(slopes):
    """ALiBi: ``score + slopes[h] * (kv_idx - q_idx)``; ``slopes`` ``(N,)`` float array."""

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi


def generate_tanh_softcap(cap: float, xp):
    """Gemma-2 soft-cap: ``cap * tanh(score / cap)``."""

    def tanh_softcap(score, b, h, q_idx, kv_idx):
        return cap * xp.tanh(score / cap)

    tanh_softcap.__name__ = f"tanh_softcap_{cap:g}"
    return tanh_softcap


def generate_rel_bias(table, S: int):
    """A learned relative-position bias: ``score + table[q_idx - kv_idx + S - 1]``; ``table`` ``(T + S -
    1,)`` float array (the gradient w.r.t. it trains it)."""

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx + (S - 1)]

    return rel_bias


def times_two(score, b, h, q_idx, kv_idx):
    """The operator-only score mod of the docs: ``score * 2``."""
    return score * 2
