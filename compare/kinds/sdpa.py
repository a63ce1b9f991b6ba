"""Kind ``"sdpa"``: the named scaled-dot-product-attention vectors and the implementations run on them.

A case is a small recipe (shapes, dtype, mask pattern and form, flags, seed); :func:`build_inputs` turns
it into NumPy arrays deterministically and :func:`expectations` runs the float64 oracle on them.
``compare.vectors`` stores both; both frameworks' tests read those files.

Every runner takes a :class:`compare.kinds.base.Vector` and returns ``{"out", "weights"?, "dq", "dk",
"dv"}`` where the gradients are those of ``sum(out * dout)``: a vector-Jacobian product with the stored
``dout``.

Sizes are distinct (B=2, N=3, T=5, S=7, H=8, V=6 …) so that a swapped axis cannot pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import ml_dtypes
import numpy as np

from compare import oracle
from compare.kinds.base import NP_DTYPES, Kind, Vector, oracle_passes, to_float64, to_torch
from compare.tolerance import gradient_magnitude

# How a mask is handed to the implementation; all forms carry the same logical keep-pattern.
MASK_FORMS = (
    "keep",  # bool, True = may attend (SDPA polarity)
    "masked",  # bool, True = ignore (torch-MHA polarity); converted with masked_to_keep() before the call
    "additive_inf",  # float32, 0 / -inf
    "additive_min",  # query dtype, 0 / finfo(dtype).min
    "additive_1e9",  # float32, 0 / -1e9 (the fp16-overflowing fill seen in the wild)
)
MASK_PATTERNS = ("random", "fully_masked_rows", "padding")
LOGITS = ("normal", "large", "offset")


@dataclass(frozen=True)
class SdpaCase:
    """One named SDPA vector. Shapes follow torch: ``q (..., T, H)``, ``k (..., S, H)``, ``v (..., S, V)``."""

    name: str
    q: tuple[int, ...]
    k: tuple[int, ...]
    v: tuple[int, ...]
    dtype: str = "float32"
    mask: str | None = None  # one of MASK_PATTERNS, or None
    mask_shape: tuple[int, ...] | None = None  # broadcastable to (..., T, S)
    mask_form: str = "keep"  # one of MASK_FORMS
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    dropout_p: float = 0.0  # > 0: an injected dropout keep-mask of the weights' shape is stored
    logits: str = "normal"  # one of LOGITS
    seed: int = 0
    note: str = field(default="", compare=False)

    def params(self) -> dict:
        """JSON-ready parameters (what the manifest records)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def groups(self) -> int:
        return self.q[-3] // self.k[-3] if self.enable_gqa else 1

    @property
    def logits_shape(self) -> tuple[int, ...]:
        batch = (
            np.broadcast_shapes(self.q[:-2], self.k[:-2])
            if not self.enable_gqa
            else (
                *np.broadcast_shapes(self.q[:-3], self.k[:-3]),
                self.q[-3],
            )
        )
        return (*batch, self.q[-2], self.k[-2])


def _keep_pattern(case: SdpaCase, rng: np.random.Generator) -> np.ndarray:
    shape = case.mask_shape
    if case.mask == "random":
        keep = rng.random(shape) < 0.7
        keep[..., 0] = True  # no fully-masked row by accident: that has its own cases
        return keep
    if case.mask == "fully_masked_rows":
        keep = rng.random(shape) < 0.7
        keep[..., 0] = True
        keep[..., 1, :] = False  # query 1 sees nothing, in every batch/head
        keep.reshape(-1, *shape[-2:])[-1, -1, :] = False  # and the last query of the last head only
        return keep
    if case.mask == "padding":
        # d2l's valid_lens: key s is kept when s < length; shape (B, 1, 1, S).
        B, S = shape[0], shape[-1]
        lengths = rng.integers(1, S + 1, size=B)
        return (np.arange(S) < lengths[:, None]).reshape(shape)
    raise ValueError(f"case {case.name}: unknown mask pattern {case.mask!r}")


def _mask_in_form(keep: np.ndarray, case: SdpaCase) -> np.ndarray:
    form = case.mask_form
    if form == "keep":
        return keep
    if form == "masked":
        return ~keep
    if form == "additive_inf":
        return np.where(keep, 0.0, -np.inf).astype(np.float32)
    if form == "additive_min":
        np_dtype = NP_DTYPES[case.dtype]
        return np.where(keep, 0.0, float(ml_dtypes.finfo(np_dtype).min)).astype(np_dtype)
    if form == "additive_1e9":
        return np.where(keep, 0.0, -1e9).astype(np.float32)
    raise ValueError(f"case {case.name}: unknown mask form {form!r}")


def build_inputs(case: SdpaCase) -> dict[str, np.ndarray]:
    """Deterministic inputs for ``case``: q, k, v, dout in the case's dtype; attn_mask in its form (as
    handed to the implementation); dropout_mask (bool) when ``dropout_p > 0``."""
    rng = np.random.default_rng(case.seed)
    np_dtype = NP_DTYPES[case.dtype]
    q = rng.standard_normal(case.q)
    k = rng.standard_normal(case.k)
    v = rng.standard_normal(case.v)
    if case.logits == "large":
        # Logits of order ±1e4: exp overflows unless the row maximum is subtracted first.
        q, k = q * 100.0, k * 100.0
    elif case.logits == "offset":
        # A large common mean in q and k: every logit carries a big shared offset (~70).
        q, k = q + 5.0, k + 5.0
    arrays = {
        "q": q.astype(np_dtype),
        "k": k.astype(np_dtype),
        "v": v.astype(np_dtype),
    }
    out_shape = (*np.broadcast_shapes(case.logits_shape[:-1]), case.v[-1])
    arrays["dout"] = rng.standard_normal(out_shape).astype(np_dtype)
    if case.mask is not None:
        arrays["attn_mask"] = _mask_in_form(_keep_pattern(case, rng), case)
    if case.dropout_p > 0:
        arrays["dropout_mask"] = rng.random(case.logits_shape) >= case.dropout_p
    return arrays


def oracle_mask(case: SdpaCase, attn_mask: np.ndarray | None) -> np.ndarray | None:
    """The mask as the oracle takes it (keep polarity or additive float), from the stored form."""
    if attn_mask is None:
        return None
    if case.mask_form == "masked":
        return ~attn_mask
    return attn_mask if attn_mask.dtype == bool else attn_mask.astype(np.float64)


def oracle_kwargs(case: SdpaCase, arrays: dict[str, np.ndarray]) -> dict:
    """Keyword arguments for ``oracle.sdpa_forward``/``sdpa_backward`` from a case's arrays."""
    return {
        "attn_mask": oracle_mask(case, arrays.get("attn_mask")),
        "is_causal": case.is_causal,
        "scale": case.scale,
        "groups": case.groups,
        "dropout_mask": arrays.get("dropout_mask"),
        "dropout_p": case.dropout_p,
    }


def expectations(case: SdpaCase, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Oracle outputs (float64) and, for low precision, the naive same-dtype baseline, from ``inputs``."""
    q, k, v, dout = (inputs[n].astype(np.float64) for n in ("q", "k", "v", "dout"))
    kwargs = oracle_kwargs(case, inputs)
    result = {}
    for prefix, dtype in oracle_passes(case.dtype):
        fwd = oracle.sdpa_forward(q, k, v, **kwargs, dtype=dtype)
        bwd = oracle.sdpa_backward(q, k, v, dout, **kwargs, dtype=dtype)
        result[f"{prefix}_out"] = fwd["out"]
        result[f"{prefix}_weights"] = fwd["weights"]
        for g in ("dq", "dk", "dv"):
            result[f"{prefix}_{g}"] = bwd[g]
    return result


def magnitude(case: SdpaCase, arrays: dict[str, np.ndarray], quantity: str) -> float:
    """Gradient term size for the tolerance policy (see ``compare.tolerance.gradient_magnitude``)."""
    return gradient_magnitude(quantity, arrays["q"], arrays["k"], arrays["v"], arrays["dout"], case.scale)


def _sdpa_cases() -> list[SdpaCase]:
    B, N, T, S, H, V = 2, 3, 5, 7, 8, 6
    q, k, v = (B, N, T, H), (B, N, S, H), (B, N, S, V)
    c = SdpaCase
    cases = [
        c("basic", q, k, v, note="cross attention T != S, V != H"),
        c("self_square", (B, N, 6, H), (B, N, 6, H), (B, N, 6, H), seed=1),
        c("primes", (2, 3, 5, 11), (2, 3, 7, 11), (2, 3, 7, 13), seed=2, note="distinct prime sizes"),
        c("sizes_one", (1, 1, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1), seed=3),
        c("rank3_no_heads", (B, T, H), (B, S, H), (B, S, V), seed=4),
        c("rank2_unbatched", (T, H), (S, H), (S, V), seed=5),
        c("broadcast_batch", (B, N, T, H), (1, N, S, H), (1, N, S, V), seed=6, note="k/v broadcast over B"),
        c("decode_L1", (B, N, 1, H), k, v, seed=7, note="one query token against S keys"),
        c("scale_override", q, k, v, scale=0.3, seed=8),
        c("large_logits", q, k, v, logits="large", seed=9, note="logits of order ±1e4"),
        c("large_mean_offset", q, k, v, logits="offset", seed=10),
        # Mask polarity forms: one logical keep-pattern (seed 20), five ways of saying it.
        *[
            c(f"mask_{form}", q, k, v, mask="random", mask_shape=(B, N, T, S), mask_form=form, seed=20)
            for form in MASK_FORMS
        ],
        # Mask ranks with B == N, so that a per-batch / per-head mix-up shows.
        c(
            "mask_rank2_TS",
            (3, 3, T, H),
            (3, 3, S, H),
            (3, 3, S, V),
            mask="random",
            mask_shape=(T, S),
            seed=21,
        ),
        c(
            "mask_rank3_NTS",
            (3, 3, T, H),
            (3, 3, S, H),
            (3, 3, S, V),
            mask="random",
            mask_shape=(3, T, S),
            seed=22,
            note="rank-3 mask broadcasts over batch: it is per head",
        ),
        c(
            "mask_rank4_B1TS",
            (3, 3, T, H),
            (3, 3, S, H),
            (3, 3, S, V),
            mask="random",
            mask_shape=(3, 1, T, S),
            seed=23,
            note="per batch, shared by heads",
        ),
        c("mask_padding_B11S", q, k, v, mask="padding", mask_shape=(B, 1, 1, S), seed=24),
        # Fully-masked rows: zeros out, zero gradients, never NaN.
        c("fully_masked_keep", q, k, v, mask="fully_masked_rows", mask_shape=(B, N, T, S), seed=25),
        c(
            "fully_masked_additive_inf",
            q,
            k,
            v,
            mask="fully_masked_rows",
            mask_shape=(B, N, T, S),
            mask_form="additive_inf",
            seed=25,
        ),
        c(
            "fully_masked_additive_min",
            q,
            k,
            v,
            mask="fully_masked_rows",
            mask_shape=(B, N, T, S),
            mask_form="additive_min",
            seed=25,
            note="a finite fill: a fully-masked row is uniform, as in torch",
        ),
        # Causal, top-left aligned like torch.
        c("causal_square", (B, N, 6, H), (B, N, 6, H), (B, N, 6, V), is_causal=True, seed=30),
        c("causal_T_lt_S", (B, N, 3, H), (B, N, 7, H), (B, N, 7, V), is_causal=True, seed=31),
        c("causal_T_gt_S", (B, N, 7, H), (B, N, 3, H), (B, N, 3, V), is_causal=True, seed=32),
        c(
            "causal_L1",
            (B, N, 1, H),
            k,
            v,
            is_causal=True,
            seed=33,
            note="top-left: the one query sees key 0",
        ),
        # Grouped-query attention: 1, 2 and all query heads per KV head.
        c("gqa_G1", (B, 4, T, H), (B, 4, S, H), (B, 4, S, V), enable_gqa=True, seed=40),
        c("gqa_G2", (B, 4, T, H), (B, 2, S, H), (B, 2, S, V), enable_gqa=True, seed=41),
        c("gqa_G4_mqa", (B, 4, T, H), (B, 1, S, H), (B, 1, S, V), enable_gqa=True, seed=42),
        c(
            "gqa_G2_causal_masked",
            (B, 4, T, H),
            (B, 2, S, H),
            (B, 2, S, V),
            enable_gqa=True,
            mask="random",
            mask_shape=(B, 4, T, S),
            seed=43,
        ),
        c("dropout_injected", q, k, v, dropout_p=0.25, seed=50, note="the same keep-mask on both sides"),
        c("dropout_masked", q, k, v, mask="random", mask_shape=(B, N, T, S), dropout_p=0.5, seed=51),
    ]
    low = [
        ("basic", {}),
        ("mask_keep", {"mask": "random", "mask_shape": (B, N, T, S)}),
        ("mask_additive_min", {"mask": "random", "mask_shape": (B, N, T, S), "mask_form": "additive_min"}),
        ("mask_additive_1e9", {"mask": "random", "mask_shape": (B, N, T, S), "mask_form": "additive_1e9"}),
        ("fully_masked_keep", {"mask": "fully_masked_rows", "mask_shape": (B, N, T, S)}),
        ("causal_square", {"is_causal": True}),
        ("large_mean_offset", {"logits": "offset"}),
        ("gqa_G2", {"enable_gqa": True}),
    ]
    for dtype in ("bfloat16", "float16"):
        for i, (name, kw) in enumerate(low):
            kk, vv = ((B, 2, S, H), (B, 2, S, V)) if kw.get("enable_gqa") else (k, v)
            qq = (B, 4, T, H) if kw.get("enable_gqa") else q
            if kw.get("is_causal"):
                qq, kk, vv = (B, N, 6, H), (B, N, 6, H), (B, N, 6, V)
            cases.append(
                c(
                    f"{name}_{'bf16' if dtype == 'bfloat16' else 'fp16'}",
                    qq,
                    kk,
                    vv,
                    dtype=dtype,
                    seed=100 + i,
                    **kw,
                )
            )
    return cases


SDPA_CASES: dict[str, SdpaCase] = {case.name: case for case in _sdpa_cases()}


# --- runners -------------------------------------------------------------------------------------------


def _jax_inputs(vec: Vector):
    import jax.numpy as jnp

    import jax_attn

    a, dt = vec.arrays, vec.case.dtype
    q, k, v, dout = (jnp.asarray(a[n], dtype=jnp.dtype(NP_DTYPES[dt])) for n in ("q", "k", "v", "dout"))
    mask = a.get("attn_mask")
    if mask is not None:
        mask = jnp.asarray(mask)
        if vec.case.mask_form == "masked":
            mask = jax_attn.masked_to_keep(mask)
    drop = a.get("dropout_mask")
    return q, k, v, dout, mask, None if drop is None else jnp.asarray(drop)


def run_jax(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``jax_attn.scaled_dot_product_attention`` under ``jax.jit``: output, weights and input gradients
    (no weights from a fast ``implementation``)."""
    import jax

    import jax_attn

    c = vec.case
    q, k, v, dout, mask, drop = _jax_inputs(vec)
    if implementation != "math":

        @jax.jit
        def fast(q, k, v):
            return jax_attn.scaled_dot_product_attention(
                q, k, v, mask, 0.0, c.is_causal, c.scale, c.enable_gqa, implementation=implementation
            )

        out, vjp = jax.vjp(fast, q, k, v)
        dq, dk, dv = vjp(dout)
        return {n: to_float64(x) for n, x in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv))}

    @jax.jit
    def fwd(q, k, v):
        return jax_attn.scaled_dot_product_attention_with_weights(
            q, k, v, mask, c.dropout_p, c.is_causal, c.scale, c.enable_gqa, dropout_mask=drop
        )

    (out, weights), vjp = jax.vjp(fwd, q, k, v)
    dq, dk, dv = vjp((dout, jax.numpy.zeros_like(weights)))
    return {
        n: to_float64(x) for n, x in zip(("out", "weights", "dq", "dk", "dv"), (out, weights, dq, dk, dv))
    }


def _torch_inputs(vec: Vector):
    import torch_attn

    a, dt = vec.arrays, vec.case.dtype
    q, k, v, dout = (to_torch(a[n], dt) for n in ("q", "k", "v", "dout"))
    mask = a.get("attn_mask")
    if mask is not None:
        # A mask stored in the query's dtype (finfo.min fills) stays in it; others keep their own dtype.
        mask = to_torch(mask, dt if mask.dtype == NP_DTYPES[dt] else None)
        if vec.case.mask_form == "masked":
            mask = torch_attn.masked_to_keep(mask)
    drop = a.get("dropout_mask")
    return q, k, v, dout, mask, None if drop is None else to_torch(drop)


def run_torch(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``torch_attn.scaled_dot_product_attention`` (eager): output, weights and input gradients (no
    weights from a fast ``implementation``)."""
    import torch_attn

    c = vec.case
    q, k, v, dout, mask, drop = _torch_inputs(vec)
    for x in (q, k, v):
        x.requires_grad_(True)
    if implementation != "math":
        out = torch_attn.scaled_dot_product_attention(
            q, k, v, mask, 0.0, c.is_causal, c.scale, c.enable_gqa, implementation=implementation
        )
        out.backward(dout)
        result = {"out": out, "dq": q.grad, "dk": k.grad, "dv": v.grad}
        return {n: to_float64(x) for n, x in result.items()}
    out, weights = torch_attn.scaled_dot_product_attention_with_weights(
        q, k, v, mask, c.dropout_p, c.is_causal, c.scale, c.enable_gqa, dropout_mask=drop
    )
    out.backward(dout)
    result = {"out": out, "weights": weights, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return {n: to_float64(x) for n, x in result.items()}


def builtin_applies(vec: Vector) -> bool:
    """Whether torch's own ``F.scaled_dot_product_attention`` can run this vector: no injected dropout
    (its dropout draws its own mask)."""
    return vec.case.dropout_p == 0.0


def applies(impl: str, vec: Vector) -> bool:
    """The built-in and the fast paths (``*_blocked``, ``*_fused``) have no injectable dropout."""
    if impl == "torch_builtin" or impl.endswith(("_blocked", "_fused")):
        return builtin_applies(vec)
    return True


def run_torch_builtin(vec: Vector) -> dict[str, np.ndarray]:
    """torch's ``F.scaled_dot_product_attention`` on the vector: output and input gradients (no weights)."""
    import torch
    import torch.nn.functional as F

    c = vec.case
    if not builtin_applies(vec):
        raise ValueError(f"case {vec.name!r}: torch's built-in SDPA cannot take an injected dropout mask")
    q, k, v, dout, mask, _ = _torch_inputs(vec)
    for x in (q, k, v):
        x.requires_grad_(True)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)  # the built-in wants a float mask in the query's dtype
    out = F.scaled_dot_product_attention(
        q, k, v, mask, 0.0, c.is_causal, scale=c.scale, enable_gqa=c.enable_gqa
    )
    out.backward(dout)
    result = {"out": out, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return {n: to_float64(x) for n, x in result.items()}


IMPLEMENTATIONS = {
    "jax_attn": run_jax,
    "torch_attn": run_torch,
    "torch_builtin": run_torch_builtin,
    # the fast paths, judged on every vector they apply to (see applies)
    "jax_attn_blocked": lambda vec: run_jax(vec, "blocked"),
    "jax_attn_fused": lambda vec: run_jax(vec, "fused"),
    "torch_attn_blocked": lambda vec: run_torch(vec, "blocked"),
    "torch_attn_fused": lambda vec: run_torch(vec, "fused"),
}


KIND = Kind(
    name="sdpa",
    cases=SDPA_CASES,
    build_inputs=build_inputs,
    expectations=expectations,
    magnitude=magnitude,
    implementations=IMPLEMENTATIONS,
    applies=applies,
)
