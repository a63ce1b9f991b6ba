"""Kind ``"mha"``: the named ``MultiheadAttention`` vectors and the implementations run on them.

A case is a small recipe (sizes, constructor flags, masks and their form, layout, dtype, seed);
:func:`build_inputs` turns it into NumPy arrays deterministically, in the form handed to torch's
``nn.MultiheadAttention`` (its layout, its mask polarity, its parameter names stored as
``param.<name>``); :func:`expectations` runs the float64 oracle (``compare.oracle.mha_forward`` /
``mha_backward``).

Quantities: ``out`` and ``weights`` exactly as torch returns them (layout, averaging, unbatched), and the
gradients of ``sum(out * dout)``: ``dquery``, ``dkey``, ``dvalue`` and ``d<param name>``.

Implementations (each takes a :class:`compare.kinds.base.Vector` and returns those quantities as float64):

- ``jax_attn``: ``jax_attn.MultiheadAttention`` loaded with the vector's ``state_dict``, forward and VJP
  under ``jax.jit`` (the module split with ``nnx.split`` and merged inside the jitted function).
- ``torch_attn``: ``torch_attn.MultiheadAttention`` loaded with the ``state_dict``, eager.
- ``torch_builtin``: ``torch.nn.MultiheadAttention`` itself, where it applies (no injected dropout: it
  draws its own; no fully-masked rows: it gives NaN there on some paths, see ``docs/porting.md``).
- ``*_blocked``, ``*_fused``: the twins with a fast SDPA path inside (no weights, no dropout).
- ``flax_nnx``: flax's own ``nnx.MultiHeadAttention`` with torch's weights ported in (see
  :func:`run_flax_nnx`).

Sizes are distinct (N=2, L=3, S=5, E=12, Nh=3 so D=4, kdim=7, vdim=10) so a swapped axis cannot pass;
the rank-3 mask case uses N == Nh so that a per-batch / per-head mix-up shows.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from compare import oracle
from compare.kinds import base
from compare.kinds.base import NP_DTYPES, Kind, Vector, oracle_passes, to_float64, to_torch

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
    # torch's rule (F.multi_head_attention_forward): the is_causal hint replaces the mask by top-left causal
    # over every key (appended ones included) only without a key_padding_mask and without weights.
    causal = case.is_causal and kpm is None and not case.need_weights
    kwargs = {
        "attn_mask": None if causal else _oracle_mask(inputs.get("attn_mask")),
        "is_causal": causal,
        "key_padding_mask": None if kpm is None else kpm.reshape(case.N or 1, case.S),
        "add_zero_attn": case.add_zero_attn,
        "dropout_mask": None if drop is None else drop.reshape(case.N or 1, *drop.shape[-3:]),
        "dropout_p": case.dropout_p,
    }
    params = parameters(f64)
    result = {}
    for prefix, dtype in oracle_passes(case.dtype):
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


# --- our twins and torch's built-in --------------------------------------------------------------------


def _ctor_kwargs(case: MhaCase) -> dict:
    return {
        "dropout": case.dropout_p,
        "bias": case.bias,
        "add_bias_kv": case.add_bias_kv,
        "add_zero_attn": case.add_zero_attn,
        "kdim": case.kdim,
        "vdim": case.vdim,
        "batch_first": case.batch_first,
    }


def _forward_kwargs(case: MhaCase, implementation: str = "math") -> dict:
    # the fast paths return no weights: they run the vector with need_weights=False
    return {
        "need_weights": case.need_weights and implementation == "math",
        "average_attn_weights": case.average_attn_weights,
        "is_causal": case.is_causal,
    }


def run_jax(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``jax_attn.MultiheadAttention`` under ``jax.jit``: outputs and gradients (inputs and parameters)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_attn

    c, a = vec.case, vec.arrays
    dt = jnp.dtype(NP_DTYPES[c.dtype])
    module = jax_attn.MultiheadAttention.from_state_dict(
        parameters(a), c.E, c.num_heads, **_ctor_kwargs(c), param_dtype=dt, implementation=implementation
    )
    if c.dropout_p == 0:
        module.eval()
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    masks = {n: None if a.get(n) is None else jnp.asarray(a[n]) for n in ("attn_mask", "key_padding_mask")}
    drop = None if a.get("dropout_mask") is None else jnp.asarray(a["dropout_mask"])

    @jax.jit
    def forward_and_grads(params, query, key, value, dout):
        # Forward and VJP in one compiled program (compiling once is what dominates on CPU).
        def forward(params, query, key, value):
            m = nnx.merge(graphdef, params, rest)
            return m(query, key, value, **masks, **_forward_kwargs(c, implementation), dropout_mask=drop)

        (out, weights), vjp = jax.vjp(forward, params, query, key, value)
        grads = vjp((dout, None if weights is None else jnp.zeros_like(weights)))
        return out, weights, grads

    inputs = (jnp.asarray(a[n], dt) for n in ("query", "key", "value", "dout"))
    out, weights, (dparams, dquery, dkey, dvalue) = forward_and_grads(params, *inputs)
    result = {"out": out, "dquery": dquery, "dkey": dkey, "dvalue": dvalue}
    if weights is not None:
        result["weights"] = weights
    grads = nnx.merge(graphdef, dparams, rest).torch_state_dict()
    result.update({f"d{k}": v for k, v in grads.items()})
    return {k: to_float64(v) for k, v in result.items()}


def _torch_run(vec: Vector, module, implementation: str = "math") -> dict[str, np.ndarray]:

    c, a = vec.case, vec.arrays

    def tensor(x):  # on base.TORCH_DEVICE (set by --device)
        return to_torch(x) if x.dtype == bool else to_torch(x, c.dtype)

    module.to(base.TORCH_DEVICE)
    module.load_state_dict({k: tensor(v) for k, v in parameters(a).items()}, strict=True)
    module.train(c.dropout_p > 0)
    query, key, value = (tensor(a[n]).requires_grad_(True) for n in ("query", "key", "value"))
    masks = {n: None if a.get(n) is None else tensor(a[n]) for n in ("attn_mask", "key_padding_mask")}
    extra = {} if a.get("dropout_mask") is None else {"dropout_mask": tensor(a["dropout_mask"])}
    out, weights = module(query, key, value, **masks, **_forward_kwargs(c, implementation), **extra)
    out.backward(tensor(a["dout"]))
    result = {"out": out, "dquery": query.grad, "dkey": key.grad, "dvalue": value.grad}
    if weights is not None:
        result["weights"] = weights
    result.update({f"d{k}": p.grad for k, p in module.named_parameters()})
    return {k: to_float64(v) for k, v in result.items()}


def run_torch(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``torch_attn.MultiheadAttention`` (eager): outputs and gradients (inputs and parameters)."""
    import torch

    import torch_attn

    c = vec.case
    module = torch_attn.MultiheadAttention(
        c.E, c.num_heads, **_ctor_kwargs(c), dtype=getattr(torch, c.dtype), implementation=implementation
    )
    return _torch_run(vec, module, implementation)


def builtin_applies(vec: Vector) -> bool:
    """Whether ``torch.nn.MultiheadAttention`` can run this vector: no injected dropout (its dropout draws
    its own mask) and no fully-masked row (NaN there on the weights path)."""
    return vec.case.dropout_p == 0.0 and not vec.case.fully_masked


def fast_applies(vec: Vector) -> bool:
    """The fast paths (``*_blocked``, ``*_fused``) take no dropout; they run with need_weights=False."""
    return vec.case.dropout_p == 0.0


def run_torch_builtin(vec: Vector) -> dict[str, np.ndarray]:
    """``torch.nn.MultiheadAttention`` itself: outputs and gradients (inputs and parameters)."""
    import torch

    c = vec.case
    if not builtin_applies(vec):
        raise ValueError(
            f"case {vec.name!r}: torch's built-in MHA cannot take an injected dropout mask, and gives NaN "
            "on fully-masked rows"
        )
    module = torch.nn.MultiheadAttention(c.E, c.num_heads, **_ctor_kwargs(c), dtype=getattr(torch, c.dtype))
    # Some vectors mix a bool key_padding_mask with a float attn_mask on purpose (torch still accepts it);
    # its deprecation warning would land in the middle of the main job's log on every run. The filter is
    # process-wide (catch_warnings is not thread-safe and the agreement runs vectors in threads).
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")
    return _torch_run(vec, module)


IMPLEMENTATIONS = {
    "jax_attn": run_jax,
    "torch_attn": run_torch,
    "torch_builtin": run_torch_builtin,
    # the fast SDPA paths inside the module, judged on every dropout-free vector (without weights)
    "jax_attn_blocked": lambda vec: run_jax(vec, "blocked"),
    "jax_attn_fused": lambda vec: run_jax(vec, "fused"),
    "torch_attn_blocked": lambda vec: run_torch(vec, "blocked"),
    "torch_attn_fused": lambda vec: run_torch(vec, "fused"),
}


# --- flax's nnx.MultiHeadAttention ---------------------------------------------------------------------
# flax's own ``nnx.MultiHeadAttention`` on the MHA vectors, with torch's weights ported in.
#
# It joins the agreement matrix where its semantics overlap torch's ``nn.MultiheadAttention``: batched input,
# the same width for query/key/value (one ``in_kv_features``), no ``add_bias_kv``/``add_zero_attn``, no
# dropout, a *bool* mask (flax reads a 0/-inf float mask as truthy: polarity silently inverted) and no
# fully-masked row (flax gives such a row uniform weights, torch NaN, we zeros). It returns no weights, so
# output and gradients are compared.
#
# Weight mapping (REFERENCE.md): ``W (out, in)`` → ``kernel = W.T.reshape(E, heads, head_dim)``;
# ``b → b.reshape(heads, head_dim)``; ``out_proj.weight`` → ``out.kernel = W.T.reshape(heads, head_dim, E)``;
# torch's MHA-polarity bool masks are inverted into flax's keep polarity.


def flax_applies(vec: Vector) -> bool:
    """Whether flax's ``nnx.MultiHeadAttention`` can express ``vec`` (see the comment above)."""
    import jax

    c: MhaCase = vec.case
    if c.dtype == "float16" and jax.default_backend() == "cpu":
        return False  # XLA:CPU rejects flax's fp16 dot with fp32 accumulation (F16_F16_F32)
    bool_masks = all(
        getattr(c, name) is None or getattr(c, f"{name}_form") == "masked"
        for name in ("attn_mask", "key_padding_mask")
    )
    return (
        c.batched
        and c.kdim in (None, c.E)
        and c.vdim in (None, c.E)
        and not c.add_bias_kv
        and not c.add_zero_attn
        and c.dropout_p == 0.0
        and not c.fully_masked
        and bool_masks
    )


def _keep_mask(c: MhaCase, a: dict[str, np.ndarray]) -> np.ndarray:
    """torch MHA masks (True = ignore) as one flax keep-mask broadcastable to ``(N, heads, L, S)``."""
    keep = np.ones((c.N, 1, 1, c.S), bool)
    if a.get("key_padding_mask") is not None:
        keep = keep & ~a["key_padding_mask"][:, None, None, :]
    if a.get("attn_mask") is not None:
        m = ~a["attn_mask"]
        keep = keep & (m.reshape(c.N, c.num_heads, c.L, c.S) if m.ndim == 3 else m[None, None])
    return keep


def run_flax_nnx(vec: Vector) -> dict[str, np.ndarray]:
    """flax ``nnx.MultiHeadAttention`` under ``jax.jit``: output and gradients (inputs and parameters),
    keyed like the torch state dict."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    c, a = vec.case, vec.arrays
    if not flax_applies(vec):
        raise ValueError(f"case {vec.name!r}: outside what flax's nnx.MultiHeadAttention can express")
    dt = jnp.dtype(NP_DTYPES[c.dtype])
    E, Nh = c.E, c.num_heads
    D = E // Nh
    p = {k: np.asarray(v, np.float64) for k, v in parameters(a).items()}
    module = nnx.MultiHeadAttention(
        Nh, E, use_bias=c.bias, dtype=dt, param_dtype=dt, decode=False, deterministic=True, rngs=nnx.Rngs(0)
    )
    w_q, w_k, w_v = np.split(p["in_proj_weight"], 3)
    for layer, w in ((module.query, w_q), (module.key, w_k), (module.value, w_v)):
        layer.kernel[...] = jnp.asarray(w.T.reshape(E, Nh, D), dt)
    module.out.kernel[...] = jnp.asarray(p["out_proj.weight"].T.reshape(Nh, D, E), dt)
    if c.bias:
        for layer, b in zip((module.query, module.key, module.value), np.split(p["in_proj_bias"], 3)):
            layer.bias[...] = jnp.asarray(b.reshape(Nh, D), dt)
        module.out.bias[...] = jnp.asarray(p["out_proj.bias"], dt)

    def to_nle(x):  # flax is batch first: (N, L, E)
        return x if c.batch_first else jnp.swapaxes(x, 0, 1)

    mask = jnp.asarray(_keep_mask(c, a))
    graphdef, params = nnx.split(module, nnx.Param)

    def forward(params, query, key, value):
        m = nnx.merge(graphdef, params)
        return to_nle(m(to_nle(query), to_nle(key), to_nle(value), mask=mask))

    @jax.jit  # forward and VJP in one compiled program (compiling is what dominates on CPU)
    def forward_and_grads(params, query, key, value, dout):
        out, vjp = jax.vjp(forward, params, query, key, value)
        return out, vjp(dout)

    query, key, value, dout = (jnp.asarray(a[n], dt) for n in ("query", "key", "value", "dout"))
    out, (dparams, dquery, dkey, dvalue) = forward_and_grads(params, query, key, value, dout)
    g = nnx.merge(graphdef, dparams)
    kernels = [np.asarray(layer.kernel[...], np.float64) for layer in (g.query, g.key, g.value)]
    result = {
        "out": out,
        "dquery": dquery,
        "dkey": dkey,
        "dvalue": dvalue,
        "din_proj_weight": np.concatenate([k.reshape(E, E).T for k in kernels]),
        "dout_proj.weight": np.asarray(g.out.kernel[...], np.float64).reshape(E, E).T,
    }
    if c.bias:
        result["din_proj_bias"] = np.concatenate(
            [np.asarray(layer.bias[...], np.float64).reshape(E) for layer in (g.query, g.key, g.value)]
        )
        result["dout_proj.bias"] = g.out.bias[...]
    return {k: to_float64(v) for k, v in result.items()}


def applies(impl: str, vec: Vector) -> bool:
    """Whether ``impl`` can run ``vec``: see :func:`builtin_applies`, :func:`fast_applies` and
    :func:`flax_applies`."""
    if impl == "flax_nnx":
        return flax_applies(vec)
    if impl.endswith(("_blocked", "_fused")):
        return fast_applies(vec)
    return builtin_applies(vec) if impl == "torch_builtin" else True


KIND = Kind(
    name="mha",
    cases=MHA_CASES,
    build_inputs=build_inputs,
    expectations=expectations,
    magnitude=magnitude,
    implementations={**IMPLEMENTATIONS, "flax_nnx": run_flax_nnx},
    applies=applies,
)
