"""The registry of named ``MultiheadAttention`` cases behind the shared vectors (kind ``"mha"``).

Mirrors ``compare/cases.py``: a case is a small recipe (sizes, constructor flags, masks and their form,
layout, dtype, seed); :func:`build_inputs` turns it into NumPy arrays deterministically, in the form
handed to torch's ``nn.MultiheadAttention`` (its layout, its mask polarity, its parameter names stored
as ``param.<name>``); :func:`expectations` runs the float64 oracle (``compare.oracle.mha_forward`` /
``mha_backward``).

Quantities: ``out`` and ``weights`` exactly as torch returns them (layout, averaging, unbatched), and the
gradients of ``sum(out * dout)``: ``dquery``, ``dkey``, ``dvalue`` and ``d<param name>``.

Sizes are distinct (N=2, L=3, S=5, E=12, Nh=3 so D=4, kdim=7, vdim=10) so a swapped axis cannot pass;
the rank-3 mask case uses N == Nh so that a per-batch / per-head mix-up shows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from compare import oracle
from compare.cases import NP_DTYPES

MASKS = ("random", "causal", "fully_masked_rows")  # attn_mask patterns
PADDINGS = ("lengths", "fully_padded")  # key_padding_mask patterns
MASK_FORMS = ("masked", "additive_inf", "additive_random")  # bool True = ignore; 0/-inf; random + -inf
PARAM_PREFIX = "param."


@dataclass(frozen=True)
class MhaCase:
    """One named MHA vector; torch's constructor flags and forward arguments."""

    name: str
    E: int = 12
    num_heads: int = 3
    L: int = 3
    S: int = 5
    N: int | None = 2  # None: unbatched (L, E) input
    kdim: int | None = None
    vdim: int | None = None
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    batch_first: bool = False
    attn_mask: str | None = None  # one of MASKS
    attn_mask_rank: int = 2  # 2: (L, S); 3: (N * Nh, L, S)
    attn_mask_form: str = "masked"  # one of MASK_FORMS
    key_padding_mask: str | None = None  # one of PADDINGS
    key_padding_mask_form: str = "masked"
    is_causal: bool = False
    need_weights: bool = True
    average_attn_weights: bool = True
    dropout_p: float = 0.0  # > 0: training mode with an injected keep-mask of the per-head weights
    dtype: str = "float32"
    seed: int = 0
    note: str = field(default="", compare=False)

    def params(self) -> dict:
        """JSON-ready parameters (what the manifest records)."""
        return asdict(self)

    @property
    def batched(self) -> bool:
        return self.N is not None

    @property
    def S_total(self) -> int:
        return self.S + int(self.add_bias_kv) + int(self.add_zero_attn)

    @property
    def fully_masked(self) -> bool:
        """Whether some query row has no key left (torch's built-in gives NaN on some paths there)."""
        return self.attn_mask == "fully_masked_rows" or self.key_padding_mask == "fully_padded"

    def layout(self, length: int, width: int) -> tuple[int, ...]:
        """Shape of a sequence input in the case's layout."""
        if not self.batched:
            return (length, width)
        return (self.N, length, width) if self.batch_first else (length, self.N, width)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """torch's ``state_dict`` names and shapes for this configuration, in torch's order."""
        E, kdim, vdim = self.E, self.kdim or self.E, self.vdim or self.E
        shapes = {}
        if kdim == E and vdim == E:
            shapes["in_proj_weight"] = (3 * E, E)
        else:
            shapes.update(q_proj_weight=(E, E), k_proj_weight=(E, kdim), v_proj_weight=(E, vdim))
        if self.bias:
            shapes["in_proj_bias"] = (3 * E,)
        if self.add_bias_kv:
            shapes.update(bias_k=(1, 1, E), bias_v=(1, 1, E))
        shapes["out_proj.weight"] = (E, E)
        if self.bias:
            shapes["out_proj.bias"] = (E,)
        return shapes


def _attn_keep(case: MhaCase, rng: np.random.Generator) -> np.ndarray:
    N = case.N or 1
    shape = (case.L, case.S) if case.attn_mask_rank == 2 else (N * case.num_heads, case.L, case.S)
    if case.attn_mask == "causal":
        # seed 002: ~tril(ones(L, S)).bool() in torch polarity, i.e. keep = tril.
        return np.broadcast_to(oracle.causal_keep(case.L, case.S), shape).copy()
    keep = rng.random(shape) < 0.7
    keep[..., 0] = True  # no fully-masked row by accident
    if case.attn_mask == "fully_masked_rows":
        keep[..., 1, :] = False  # query 1 sees no key (of the S real ones)
    return keep


def _padding_keep(case: MhaCase, rng: np.random.Generator) -> np.ndarray:
    N = case.N or 1
    lengths = rng.integers(1, case.S + 1, size=N)
    if case.key_padding_mask == "fully_padded":
        lengths[-1] = 0  # the last sequence is all padding
    keep = np.arange(case.S) < lengths[:, None]
    return keep if case.batched else keep[0]


def _in_form(keep: np.ndarray, form: str, rng: np.random.Generator, dtype: str) -> np.ndarray:
    """A keep-pattern in torch-MHA form: bool True = ignore, or an additive float in the case's dtype."""
    if form == "masked":
        return ~keep
    np_dtype = NP_DTYPES[dtype]
    if form == "additive_inf":
        return np.where(keep, 0.0, -np.inf).astype(np_dtype)
    if form == "additive_random":
        return np.where(keep, 0.5 * rng.standard_normal(keep.shape), -np.inf).astype(np_dtype)
    raise ValueError(f"unknown mask form {form!r}")


def build_inputs(case: MhaCase) -> dict[str, np.ndarray]:
    """Deterministic inputs: query/key/value/dout in the case's layout and dtype, torch-form masks,
    parameters as ``param.<torch name>``, and ``dropout_mask`` when ``dropout_p > 0``."""
    rng = np.random.default_rng(case.seed)
    np_dtype = NP_DTYPES[case.dtype]
    kdim, vdim = case.kdim or case.E, case.vdim or case.E
    arrays = {
        "query": rng.standard_normal(case.layout(case.L, case.E)),
        "key": rng.standard_normal(case.layout(case.S, kdim)),
        "value": rng.standard_normal(case.layout(case.S, vdim)),
        "dout": rng.standard_normal(case.layout(case.L, case.E)),
    }
    for name, shape in case.parameter_shapes().items():
        # Weights of torch's init scale (1/sqrt(fan_in)); biases small but not zero, so they count.
        scale = 0.1 if len(shape) == 1 or name.startswith("bias_") else 1.0 / np.sqrt(shape[-1])
        arrays[PARAM_PREFIX + name] = scale * rng.standard_normal(shape)
    arrays = {k: v.astype(np_dtype) for k, v in arrays.items()}
    if case.attn_mask is not None:
        arrays["attn_mask"] = _in_form(_attn_keep(case, rng), case.attn_mask_form, rng, case.dtype)
    if case.key_padding_mask is not None:
        arrays["key_padding_mask"] = _in_form(
            _padding_keep(case, rng), case.key_padding_mask_form, rng, case.dtype
        )
    if case.dropout_p > 0:
        heads = (case.N, case.num_heads) if case.batched else (case.num_heads,)
        arrays["dropout_mask"] = rng.random((*heads, case.L, case.S_total)) >= case.dropout_p
    return arrays


def parameters(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``param.<name>`` arrays as a torch-named ``state_dict``."""
    return {k.removeprefix(PARAM_PREFIX): v for k, v in arrays.items() if k.startswith(PARAM_PREFIX)}


def _to_batch_first(case: MhaCase, x: np.ndarray) -> np.ndarray:
    if not case.batched:
        return x[None]
    return x if case.batch_first else np.swapaxes(x, 0, 1)


def _from_batch_first(case: MhaCase, x: np.ndarray) -> np.ndarray:
    if not case.batched:
        return x[0]
    return x if case.batch_first else np.swapaxes(x, 0, 1)


def _oracle_mask(mask: np.ndarray | None) -> np.ndarray | None:
    """torch-MHA form to the oracle's: bool True = ignore becomes a keep-mask; floats stay additive."""
    if mask is None:
        return None
    return ~mask if mask.dtype == bool else mask.astype(np.float64)


def expectations(case: MhaCase, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Oracle outputs (float64) and, for bf16/fp16, the naive same-dtype baseline."""
    f64 = {k: v.astype(np.float64) if v.dtype != bool else v for k, v in inputs.items()}
    query, key, value, dout = (_to_batch_first(case, f64[n]) for n in ("query", "key", "value", "dout"))
    kpm = _oracle_mask(inputs.get("key_padding_mask"))
    drop = inputs.get("dropout_mask")
    kwargs = {
        "attn_mask": _oracle_mask(inputs.get("attn_mask")),
        "key_padding_mask": None if kpm is None else kpm.reshape(case.N or 1, case.S),
        "add_zero_attn": case.add_zero_attn,
        "dropout_mask": None if drop is None else drop.reshape(case.N or 1, *drop.shape[-3:]),
        "dropout_p": case.dropout_p,
    }
    params = parameters(f64)
    result = {}
    low = case.dtype in oracle.LOW_PRECISION
    for prefix, dtype in (("expected", None), ("naive", case.dtype)) if low else (("expected", None),):
        fwd = oracle.mha_forward(query, key, value, params, case.num_heads, **kwargs, dtype=dtype)
        bwd = oracle.mha_backward(query, key, value, params, case.num_heads, dout, **kwargs, dtype=dtype)
        result[f"{prefix}_out"] = _from_batch_first(case, fwd["out"])
        if case.need_weights:
            w = fwd["weights"].mean(axis=1) if case.average_attn_weights else fwd["weights"]
            result[f"{prefix}_weights"] = w if case.batched else w[0]
        for g, arr in bwd.items():
            if g in ("dquery", "dkey", "dvalue"):
                arr = _from_batch_first(case, arr)
            result[f"{prefix}_{g}"] = arr
    return result


def magnitude(case: MhaCase, arrays: dict[str, np.ndarray], quantity: str) -> float:
    """Gradient term size for the tolerance policy: 0 for forward quantities; for gradients the product
    of the largest factors a gradient element multiplies together (|dout|·|W_out|·|W_in|·|x|)."""
    if quantity in ("out", "weights"):
        return 0.0

    def amax(*names):
        return max(float(np.max(np.abs(np.asarray(arrays[n], np.float64)), initial=0.0)) for n in names)

    seq = amax("query", "key", "value")
    weights = [n for n in arrays if n.startswith(PARAM_PREFIX) and "weight" in n and "out_proj" not in n]
    return amax("dout") * amax(PARAM_PREFIX + "out_proj.weight") * max(1.0, seq) * max(1.0, amax(*weights))


def _mha_cases() -> list[MhaCase]:
    c = MhaCase
    cases = [
        c("mha_basic", note="seed 000's pattern: (L, N, E) query against a longer (S, N, E) key/value"),
        c("mha_batch_first", batch_first=True, L=4, seed=1),
        c("mha_unbatched", N=None, seed=2),
        c("mha_kdim_vdim", kdim=7, vdim=10, seed=3, note="separate q/k/v projection weights"),
        c("mha_no_bias", bias=False, seed=4),
        c("mha_bias_kv", add_bias_kv=True, seed=5),
        c("mha_zero_attn", add_zero_attn=True, seed=6),
        c(
            "mha_bias_kv_zero_attn_masked",
            add_bias_kv=True,
            add_zero_attn=True,
            attn_mask="random",
            key_padding_mask="lengths",
            kdim=7,
            seed=7,
        ),
        c("mha_attn_mask_2d", attn_mask="random", seed=8),
        c(
            "mha_attn_mask_3d",
            N=3,
            attn_mask="random",
            attn_mask_rank=3,
            seed=9,
            note="(N * Nh, L, S) with N == Nh: row n * Nh + h",
        ),
        c("mha_attn_mask_additive", attn_mask="random", attn_mask_form="additive_random", seed=10),
        c("mha_key_padding_mask", key_padding_mask="lengths", batch_first=True, seed=11),
        c(
            "mha_masks_mixed",
            attn_mask="random",
            key_padding_mask="lengths",
            key_padding_mask_form="additive_inf",
            seed=12,
            note="bool attn_mask with a float key_padding_mask: merged additively, like torch",
        ),
        c(
            "mha_causal",
            L=5,
            attn_mask="causal",
            is_causal=True,
            seed=13,
            note="seed 002: ~tril(ones(L, L)).bool() with the is_causal hint",
        ),
        c("mha_per_head_weights", average_attn_weights=False, key_padding_mask="lengths", seed=14),
        c("mha_no_weights", need_weights=False, attn_mask="random", seed=15),
        c("mha_dropout_injected", dropout_p=0.25, seed=16, note="training mode, the same keep-mask"),
        c(
            "mha_dropout_per_head",
            dropout_p=0.5,
            average_attn_weights=False,
            key_padding_mask="lengths",
            N=None,
            seed=17,
        ),
        c("mha_fully_masked_row", attn_mask="fully_masked_rows", seed=18, note="zeros, not NaN"),
        c(
            "mha_fully_padded_sequence",
            key_padding_mask="fully_padded",
            average_attn_weights=False,
            seed=19,
            note="one sequence all padding: zeros, not NaN",
        ),
        c(
            "mha_fully_padded_zero_attn",
            key_padding_mask="fully_padded",
            add_zero_attn=True,
            seed=20,
            note="add_zero_attn rescues the row",
        ),
    ]
    for dtype, tag in (("bfloat16", "bf16"), ("float16", "fp16")):
        cases += [
            c(f"mha_basic_{tag}", dtype=dtype, seed=100),
            c(f"mha_masked_{tag}", dtype=dtype, attn_mask="random", key_padding_mask="lengths", seed=101),
            c(f"mha_bias_kv_{tag}", dtype=dtype, add_bias_kv=True, kdim=7, vdim=10, seed=102),
        ]
    return cases


MHA_CASES: dict[str, MhaCase] = {case.name: case for case in _mha_cases()}
