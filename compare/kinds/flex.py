"""Kind ``"flex"``: FlexAttention vectors, the catalogue of mods, and the implementations run on them.

**The catalogue** (attention-gym style: each mask or score mod a small named factory, composable with
``and_masks`` / ``or_masks``) is shared by the flex tests, these vectors and the benchmarks. A mod is
code, not data: a case records a mod's *name and parameters* and every runner (the JAX twin, the torch
twin, torch's own ``flex_attention``, the float64 NumPy oracle) rebuilds it from here. Mask mods use
Python operators only, so one mod object works on NumPy, JAX and torch arrays alike. Mods that capture
arrays (document ids, ALiBi slopes, a relative bias table) take that framework's array; the one that needs
a function beyond operators (``tanh``) takes the framework's namespace ``xp`` (``numpy``, ``jax.numpy``
or ``torch``).

**A case** is a recipe (sizes, mask and score mod by name with their parameters, BLOCK_SIZE, seed);
:func:`build_inputs` makes ``q (B, N, T, H)``, ``k (B, K, S, H)``, ``v (B, K, S, V)``, the cotangents
``d_out (B, N, T, V)`` and ``d_lse (B, N, T)`` and the arrays the mods capture. Expected values come from
``compare.oracle_flex`` (float64). Quantities: ``out``, ``lse``, and the gradients of ``sum(out * d_out)
+ sum(lse * d_lse)``: ``dq``, ``dk``, ``dv`` and ``dbias`` (w.r.t. the relative bias table, where the
case has one). Small blocks (4-8) and lengths that are not multiples of them, so the multi-block, ragged
and sparse paths run cheaply. No case has a fully masked row (its lse is -inf, which the tolerance policy
counts as non-finite); tests/test_flex.py covers those.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from compare import oracle_flex, tolerance
from compare.kinds.base import Kind, Vector, to_float64


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


# ------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class FlexCase:
    """One named FlexAttention vector. ``mask``/``score``: catalogue names (None = none), with their
    integer / float parameters; ``block``: BLOCK_SIZE (None: no BlockMask, the engine's own blocks)."""

    name: str
    B: int
    N: int
    K: int
    T: int
    S: int
    H: int
    V: int
    mask: str | None = "causal"
    mask_args: tuple = ()
    score: str | None = None
    score_args: tuple = ()
    block: int | tuple[int, int] | None = 4
    per_batch_mask: bool = False  # the BlockMask has the batch dimension (document ids differ per row)
    dtype: str = "float32"
    seed: int = 0
    note: str = field(default="", compare=False)

    def params(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


MASK_FACTORIES = {
    "causal": lambda arrays: causal,
    "sliding_window": lambda arrays, w: generate_sliding_window(w),
    "prefix_lm": lambda arrays, p: generate_prefix_lm(p),
    "document": lambda arrays: generate_document(arrays["doc_ids"]),
    "dilated_sliding_window": lambda arrays, w, d: generate_dilated_sliding_window(w, d),
}

SCORE_FACTORIES = {
    "alibi": lambda arrays, xp: generate_alibi(arrays["slopes"]),
    "tanh_softcap": lambda arrays, xp, cap: generate_tanh_softcap(cap, xp),
    "rel_bias": lambda arrays, xp, S: generate_rel_bias(arrays["bias_table"], S),
    "times_two": lambda arrays, xp: times_two,
}


def build_mods(case: FlexCase, arrays: dict, xp):
    """``(score_mod, mask_mod)`` of ``case`` from the catalogue, capturing ``arrays`` (this framework's
    arrays: ``doc_ids``, ``slopes``, ``bias_table``) and using ``xp`` for ``tanh``."""
    mask = None if case.mask is None else MASK_FACTORIES[case.mask](arrays, *case.mask_args)
    score = None if case.score is None else SCORE_FACTORIES[case.score](arrays, xp, *case.score_args)
    return score, mask


def _flex_cases() -> list[FlexCase]:
    c = FlexCase
    return [
        c("flex_causal", 2, 4, 4, 13, 13, 8, 5, seed=400, note="T = 13 in blocks of 4"),
        c(
            "flex_sliding_window",
            1,
            3,
            3,
            37,
            37,
            6,
            7,
            mask="sliding_window",
            mask_args=(7,),
            block=(8, 4),
            seed=401,
        ),
        c("flex_prefix_lm", 2, 2, 2, 21, 21, 8, 8, mask="prefix_lm", mask_args=(6,), block=8, seed=402),
        c(
            "flex_document",
            2,
            2,
            2,
            29,
            29,
            8,
            6,
            mask="document",
            per_batch_mask=True,
            seed=403,
            note="packed sequences, document ids differ per batch row",
        ),
        c(
            "flex_dilated_sliding_window",
            1,
            2,
            2,
            31,
            31,
            8,
            8,
            mask="dilated_sliding_window",
            mask_args=(12, 3),
            block=8,
            seed=404,
        ),
        c(
            "flex_alibi",
            2,
            4,
            4,
            17,
            17,
            8,
            8,
            score="alibi",
            seed=405,
            note="causal + ALiBi slopes 2^-(h+1)",
        ),
        c(
            "flex_tanh_softcap",
            1,
            2,
            2,
            19,
            19,
            8,
            8,
            mask="sliding_window",
            mask_args=(9,),
            score="tanh_softcap",
            score_args=(1.5,),
            seed=406,
        ),
        c(
            "flex_rel_bias",
            2,
            2,
            2,
            13,
            16,
            8,
            4,
            score="rel_bias",
            score_args=(16,),
            seed=407,
            note="learned relative bias: dbias is a quantity; T != S",
        ),
        c(
            "flex_gqa",
            2,
            6,
            2,
            23,
            23,
            8,
            5,
            mask="sliding_window",
            mask_args=(6,),
            block=8,
            seed=408,
            note="3 query heads per key/value head",
        ),
        c(
            "flex_no_block_mask",
            2,
            2,
            1,
            13,
            37,
            8,
            6,
            mask=None,
            score="times_two",
            block=None,
            seed=409,
            note="no BlockMask: every block visited; S = 37",
        ),
    ]


FLEX_CASES: dict[str, FlexCase] = {case.name: case for case in _flex_cases()}


def build_inputs(case: FlexCase) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(case.seed)
    arrays = {
        "q": rng.standard_normal((case.B, case.N, case.T, case.H)),
        "k": rng.standard_normal((case.B, case.K, case.S, case.H)),
        "v": rng.standard_normal((case.B, case.K, case.S, case.V)),
        "d_out": rng.standard_normal((case.B, case.N, case.T, case.V)),
        "d_lse": rng.standard_normal((case.B, case.N, case.T)),
    }
    if case.mask == "document":
        arrays["doc_ids"] = np.sort(rng.integers(0, 4, (case.B, case.T)), axis=1).astype(np.int32)
    if case.score == "alibi":
        arrays["slopes"] = 2.0 ** -np.arange(1, case.N + 1, dtype=np.float64)
    if case.score == "rel_bias":
        arrays["bias_table"] = rng.standard_normal(case.T + case.S - 1)
    return {k: v if v.dtype.kind == "i" else v.astype(np.float32) for k, v in arrays.items()}


def _f64(arrays):
    return {k: v if v.dtype.kind == "i" else v.astype(np.float64) for k, v in arrays.items()}


def expectations(case: FlexCase, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    a = _f64(inputs)
    score, mask = build_mods(case, a, np)
    out, lse = oracle_flex.flex_forward(a["q"], a["k"], a["v"], score, mask)
    params, factory = (), None
    if case.score is not None:
        if case.score == "rel_bias":
            params = (a["bias_table"],)
            factory = lambda table: build_mods(case, {**a, "bias_table": table}, np)[0]  # noqa: E731
        else:
            factory = lambda: score  # noqa: E731
    dq, dk, dv, dparams = oracle_flex.flex_backward(
        a["q"], a["k"], a["v"], a["d_out"], a["d_lse"], factory, params, mask
    )
    result = {
        "expected_out": out,
        "expected_lse": lse,
        "expected_dq": dq,
        "expected_dk": dk,
        "expected_dv": dv,
    }
    if dparams:
        result["expected_dbias"] = dparams[0]
    return result


def magnitude(case: FlexCase, arrays: dict[str, np.ndarray], quantity: str) -> float:
    """The gradient term size of ``compare.tolerance`` for dq, dk, dv (plus the lse cotangent's share);
    0 for out, lse and dbias (judged relative to max(1, |expected|))."""
    base = tolerance.gradient_magnitude(
        quantity, arrays["q"], arrays["k"], arrays["v"], arrays["d_out"], None
    )
    if quantity in ("dq", "dk"):
        base += float(np.max(np.abs(arrays["d_lse"]))) * float(
            np.max(np.abs(arrays["k" if quantity == "dq" else "q"]))
        )
    return base


# ------------------------------------------------------------------------------- runners


def run_jax(vec: Vector) -> dict[str, np.ndarray]:
    """``jax_attn.flex_attention`` under ``jax.jit`` (create_block_mask inside the program): output, lse
    and the gradients, one compilation per vector."""
    import jax
    import jax.numpy as jnp

    import jax_attn.flex as jf

    c, a = vec.case, vec.arrays
    fixed = {k: jnp.asarray(a[k]) for k in ("doc_ids", "slopes") if k in a}
    q, k, v, d_out, d_lse = (jnp.asarray(a[n]) for n in ("q", "k", "v", "d_out", "d_lse"))
    table = jnp.asarray(a["bias_table"]) if "bias_table" in a else jnp.zeros(())

    def loss(q, k, v, table):
        score, mask = build_mods(c, {**fixed, "bias_table": table}, jnp)
        bm = None
        if mask is not None:
            bm = jf.create_block_mask(
                mask, c.B if c.per_batch_mask else None, None, c.T, c.S, BLOCK_SIZE=c.block
            )
        out, lse = jf.flex_attention(q, k, v, score, bm, enable_gqa=c.N != c.K, return_lse=True)
        return jnp.sum(out * d_out) + jnp.sum(lse * d_lse), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        q, k, v, table
    )
    result = {"out": out, "lse": lse, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if "bias_table" in a:
        result["dbias"] = grads[3]
    return {n: to_float64(x) for n, x in result.items()}


def _torch_arrays(a, requires_grad):
    import torch

    out = {}
    for n, x in a.items():
        t = torch.from_numpy(np.ascontiguousarray(x))
        if t.dtype.is_floating_point and n in ("q", "k", "v", "bias_table"):
            t.requires_grad_(requires_grad)
        out[n] = t
    return out


def run_torch(vec: Vector) -> dict[str, np.ndarray]:
    """``torch_attn.flex_attention`` (eager; autograd): output, lse and the gradients."""
    import torch

    import torch_attn.flex as tf

    c = vec.case
    t = _torch_arrays(vec.arrays, True)
    score, mask = build_mods(c, t, torch)
    bm = None
    if mask is not None:
        bm = tf.create_block_mask(mask, c.B if c.per_batch_mask else None, None, c.T, c.S, BLOCK_SIZE=c.block)
    out, lse = tf.flex_attention(t["q"], t["k"], t["v"], score, bm, enable_gqa=c.N != c.K, return_lse=True)
    ((out * t["d_out"]).sum() + (lse * t["d_lse"]).sum()).backward()
    result = {"out": out, "lse": lse, "dq": t["q"].grad, "dk": t["k"].grad, "dv": t["v"].grad}
    if "bias_table" in t:
        result["dbias"] = t["bias_table"].grad
    return {n: to_float64(x) for n, x in result.items()}


def run_torch_flex(vec: Vector) -> dict[str, np.ndarray]:
    """torch's own ``flex_attention``, eager, forward and lse only (it has no backward on CPU)."""
    import warnings

    import torch
    from torch.nn.attention import flex_attention as tflex

    c = vec.case
    t = _torch_arrays(vec.arrays, False)
    score, mask = build_mods(c, t, torch)
    bm = None
    if mask is not None:
        B = c.B if c.per_batch_mask else None
        bm = tflex.create_block_mask(mask, B, None, c.T, c.S, device="cpu", BLOCK_SIZE=c.block)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # "return_lse is deprecated", "called without torch.compile"
        out, lse = tflex.flex_attention(
            t["q"], t["k"], t["v"], score, bm, enable_gqa=c.N != c.K, return_lse=True
        )
    return {"out": to_float64(out), "lse": to_float64(lse)}


IMPLEMENTATIONS = {"jax_attn": run_jax, "torch_attn": run_torch, "torch_flex": run_torch_flex}


KIND = Kind(
    name="flex",
    cases=FLEX_CASES,
    build_inputs=build_inputs,
    expectations=expectations,
    magnitude=magnitude,
    implementations=IMPLEMENTATIONS,
)
