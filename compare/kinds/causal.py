"""Kind ``"causal"``: the named causal-self-attention vectors and the twins run on them.

A case is a small recipe (sizes, heads, bias, dtype, dropout, and optionally the chunks in which the
sequence is fed through a KV cache); :func:`build_inputs` turns it into NumPy arrays deterministically:
``x (B, T, E)``, the cotangent ``dy (B, T, E)``, the parameters keyed like the twins' state dicts
(``q_proj.weight`` …, torch's (out, in) layout) and, with dropout, the injected keep-mask.

Expected values are the float64 oracle's full causal pass (``compare.oracle``): a case with ``chunks``
is expected to give exactly the full pass's output and gradients, which is what a KV cache must do.

Quantities: ``out``, ``grad_x`` and ``grad_<parameter name>`` (e.g. ``grad_q_proj.weight``).

Sizes are distinct (B=2, T=5, E=24, N=4, K=2, H=6 …) so that a swapped axis cannot pass.

Every runner takes a :class:`compare.kinds.base.Vector` of this kind and returns ``{"out", "grad_x",
"grad_<parameter name>"...}``: the output and the gradients of ``sum(out * dy)`` with respect to ``x``
and every parameter. A vector with ``chunks`` is fed through a KV cache chunk by chunk (the outputs
concatenated, gradients flowing through the cache).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from compare import oracle
from compare.kinds import base
from compare.kinds.base import NP_DTYPES, Kind, Vector, chunks, oracle_passes, to_float64, to_torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class CausalCase:
    """One named causal-self-attention vector."""

    name: str
    B: int
    T: int
    E: int
    N: int
    K: int | None = None  # key/value heads; None = N
    bias: bool = True
    dtype: str = "float32"
    dropout_p: float = 0.0  # > 0: an injected (B, N, T, T) keep-mask is stored; full pass only
    chunks: tuple[int, ...] | None = None  # feed x through a KV cache in chunks of these sizes
    max_length: int | None = None  # the cache's length (>= T) when chunks is given
    seed: int = 0
    note: str = field(default="", compare=False)

    def __post_init__(self):
        if self.chunks is not None and (sum(self.chunks) != self.T or (self.max_length or 0) < self.T):
            raise ValueError(f"case {self.name}: chunks must sum to T and max_length must be >= T")
        if self.chunks is not None and self.dropout_p > 0:
            raise ValueError(f"case {self.name}: dropout vectors are full passes (no chunks)")

    def params(self) -> dict:
        """JSON-ready parameters (what the manifest records)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def num_kv_heads(self) -> int:
        return self.N if self.K is None else self.K

    @property
    def H(self) -> int:
        return self.E // self.N

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        E, NH, KH = self.E, self.N * self.H, self.num_kv_heads * self.H
        outs = {"q_proj": (NH, E), "k_proj": (KH, E), "v_proj": (KH, E), "out_proj": (E, NH)}
        shapes = {}
        for proj, shape in outs.items():
            shapes[f"{proj}.weight"] = shape
            if self.bias:
                shapes[f"{proj}.bias"] = (shape[0],)
        return shapes


def param_names(case: CausalCase) -> list[str]:
    return list(case.param_shapes())


def build_inputs(case: CausalCase) -> dict[str, np.ndarray]:
    """Deterministic inputs for ``case`` in its dtype (the dropout keep-mask is bool)."""
    rng = np.random.default_rng(case.seed)
    np_dtype = NP_DTYPES[case.dtype]
    arrays = {"x": rng.standard_normal((case.B, case.T, case.E))}
    for name, shape in case.param_shapes().items():
        # Scaled like torch's Linear init (std ~ 1/sqrt(in)), so every activation is of order 1.
        arrays[name] = rng.standard_normal(shape) / np.sqrt(shape[-1] if name.endswith("weight") else 4.0)
    arrays["dy"] = rng.standard_normal((case.B, case.T, case.E))
    arrays = {k: v.astype(np_dtype) for k, v in arrays.items()}
    if case.dropout_p > 0:
        arrays["dropout_mask"] = rng.random((case.B, case.N, case.T, case.T)) >= case.dropout_p
    return arrays


def _oracle_args(case: CausalCase, arrays: dict[str, np.ndarray]):
    x, dy = (arrays[n].astype(np.float64) for n in ("x", "dy"))
    params = {n: arrays[n].astype(np.float64) for n in param_names(case)}
    kwargs = {
        "num_heads": case.N,
        "num_kv_heads": case.num_kv_heads,
        "dropout_mask": arrays.get("dropout_mask"),
        "dropout_p": case.dropout_p,
    }
    return x, params, dy, kwargs


def expectations(case: CausalCase, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Oracle outputs (float64) and, for low precision, the naive same-dtype baseline."""
    x, params, dy, kwargs = _oracle_args(case, inputs)
    result = {}
    for prefix, dtype in oracle_passes(case.dtype):
        fwd = oracle.causal_self_attention_forward(x, params, **kwargs, dtype=dtype)
        bwd = oracle.causal_self_attention_backward(x, params, dy, **kwargs, dtype=dtype)
        result[f"{prefix}_out"] = fwd["out"]
        result[f"{prefix}_grad_x"] = bwd["x"]
        for name in param_names(case):
            result[f"{prefix}_grad_{name}"] = bwd[name]
    return result


def magnitude(case: CausalCase, arrays: dict[str, np.ndarray], quantity: str) -> float:
    """Gradient term size for the tolerance policy: the largest sum of |terms| that the gradient's last
    contraction adds up (e.g. ``max(|dq|ᵀ|x|)`` for ``grad_q_proj.weight``), from the float64 oracle;
    0 for the output."""
    if not quantity.startswith("grad_"):
        return 0.0
    x, params, dy, kwargs = _oracle_args(case, arrays)
    bwd = oracle.causal_self_attention_backward(x, params, dy, **kwargs)
    E = case.E
    ax, ady = np.abs(x).reshape(-1, E), np.abs(dy).reshape(-1, E)
    d = {p: np.abs(bwd[f"d{p[0]}"]).reshape(ady.shape[0], -1) for p in ("q_proj", "k_proj", "v_proj")}
    name = quantity.removeprefix("grad_")
    if name == "x":
        terms = sum(d[p] @ np.abs(params[f"{p}.weight"]) for p in d)
    elif name == "out_proj.weight":
        terms = ady.T @ np.abs(bwd["o"]).reshape(ady.shape[0], -1)
    elif name == "out_proj.bias":
        terms = ady.sum(axis=0)
    elif name.endswith(".weight"):
        terms = d[name.split(".")[0]].T @ ax
    else:
        terms = d[name.split(".")[0]].sum(axis=0)
    return float(np.max(terms, initial=0.0))


def _causal_cases() -> list[CausalCase]:
    B, T, E, N = 2, 5, 24, 4  # H = 6
    c = CausalCase
    cases = [
        c("csa_mha", B, T, E, N, seed=200, note="multi-head: K == N"),
        c("csa_gqa_K2", B, T, E, N, K=2, seed=201, note="grouped-query: 2 query heads per KV head"),
        c("csa_mqa_K1", B, T, E, N, K=1, seed=202, note="multi-query: one KV head"),
        c("csa_no_bias", 3, 4, 21, 3, bias=False, seed=203, note="H = 7"),
        c("csa_no_bias_mqa", 3, 4, 21, 3, K=1, bias=False, seed=204),
        c("csa_odd_heads", 3, 6, 35, 5, seed=205, note="N = 5, H = 7"),
        c("csa_T1", B, 1, E, N, K=2, seed=206, note="a single token sees only itself"),
        c("csa_sizes_one", 1, 1, 1, 1, seed=207),
        c("csa_dropout_injected", B, T, E, N, dropout_p=0.25, seed=208),
        c("csa_gqa_dropout_injected", B, T, E, N, K=2, dropout_p=0.5, seed=209),
        # Through a KV cache: must equal the full pass (the oracle's expectation).
        c("csa_gqa_K2_cache_chunks", B, T, E, N, K=2, chunks=(2, 1, 2), max_length=7, seed=210),
        c("csa_mqa_K1_decode", B, 4, E, N, K=1, chunks=(1, 1, 1, 1), max_length=6, seed=211),
    ]
    cases += [
        c("csa_mha_bf16", B, T, E, N, dtype="bfloat16", seed=220),
        c("csa_gqa_K2_fp16", B, T, E, N, K=2, dtype="float16", seed=221),
        c("csa_mqa_K1_decode_bf16", B, T, E, N, K=1, dtype="bfloat16", chunks=(4, 1), max_length=6, seed=222),
    ]
    return cases


CAUSAL_CASES: dict[str, CausalCase] = {case.name: case for case in _causal_cases()}


# --- runners -------------------------------------------------------------------------------------------


def run_jax(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``jax_attn.CausalSelfAttention`` under ``jax.jit``: output and gradients w.r.t. x and parameters."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_attn

    c, a = vec.case, vec.arrays
    dt = jnp.dtype(NP_DTYPES[c.dtype])
    module = base.jax_module(
        lambda: jax_attn.CausalSelfAttention(
            c.E, c.N, c.K, c.bias, c.dropout_p, implementation=implementation, rngs=nnx.Rngs(0), param_dtype=dt
        ),
        {n: a[n] for n in param_names(c)},
    )
    if c.dropout_p == 0:
        module.eval()
    drop = None if "dropout_mask" not in a else jnp.asarray(a["dropout_mask"])
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def forward(params, x):
        model = nnx.merge(graphdef, params, rest)
        if c.chunks is None:
            return model(x, dropout_mask=drop)
        cache, ys = model.init_cache(c.B, c.max_length), []
        for start, stop in chunks(c):
            y, cache = model(x[:, start:stop], cache=cache)
            ys.append(y)
        return jnp.concatenate(ys, axis=1)

    @jax.jit  # forward and backward in one program: one XLA compilation per vector
    def forward_backward(params, x, dy):
        out, vjp = jax.vjp(forward, params, x)
        return out, *vjp(dy)

    x, dy = (jnp.asarray(a[n], dtype=dt) for n in ("x", "dy"))
    out, dparams, dx = forward_backward(params, x, dy)
    result = {"out": to_float64(out), "grad_x": to_float64(dx)}
    for path, value in nnx.to_flat_state(dparams):
        result["grad_" + ".".join(str(p) for p in path)] = to_float64(value[...])
    return result


def run_jax_fused(vec: Vector) -> dict[str, np.ndarray]:
    """:func:`run_jax` with ``implementation="fused"`` (``jax.nn.dot_product_attention``, XLA)."""
    return run_jax(vec, "fused")


def run_torch(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``torch_attn.CausalSelfAttention`` (eager): output and gradients w.r.t. x and parameters."""
    import torch

    import torch_attn

    c, a = vec.case, vec.arrays
    dt = getattr(torch, c.dtype)
    module = torch_attn.CausalSelfAttention(
        c.E, c.N, c.K, c.bias, c.dropout_p, implementation=implementation, dtype=dt
    )
    module.to(base.TORCH_DEVICE)  # set by --device
    module.load_torch_state_dict({n: a[n] for n in param_names(c)})
    module.train(c.dropout_p > 0)
    drop = None if "dropout_mask" not in a else to_torch(a["dropout_mask"])
    x, dy = (to_torch(a[n], c.dtype) for n in ("x", "dy"))
    x.requires_grad_(True)
    if c.chunks is None:
        out = module(x, dropout_mask=drop)
    else:
        cache, ys = module.init_cache(c.B, c.max_length), []
        for start, stop in chunks(c):
            y, cache = module(x[:, start:stop], cache=cache)
            ys.append(y)
        out = torch.cat(ys, dim=1)
    out.backward(dy)
    result = {"out": to_float64(out), "grad_x": to_float64(x.grad)}
    for name, p in module.named_parameters():
        result[f"grad_{name}"] = to_float64(p.grad)
    return result


def run_torch_fused(vec: Vector) -> dict[str, np.ndarray]:
    """:func:`run_torch` with ``implementation="fused"`` (``F.scaled_dot_product_attention``)."""
    return run_torch(vec, "fused")


def applies(impl: str, vec: Vector) -> bool:
    """The fused paths have no injectable dropout: they run the dropout-free vectors. XLA:CPU's
    ``dot_general`` rejects fp16 inputs with fp32 accumulation ("The precision 'F16_F16_F32' is not
    supported by dot_general on CPU"), which ``jax.nn.dot_product_attention`` asks for: the JAX fused path
    runs fp16 only on an accelerator."""
    if impl.endswith(("_fused", "_blocked")) and vec.case.dropout_p > 0.0:
        return False
    if impl == "jax_attn_fused" and vec.case.dtype == "float16":
        import jax

        return jax.default_backend() != "cpu"
    return True


IMPLEMENTATIONS = {
    "jax_attn": run_jax,
    "torch_attn": run_torch,
    "jax_attn_fused": run_jax_fused,
    "torch_attn_fused": run_torch_fused,
    "jax_attn_blocked": lambda vec: run_jax(vec, "blocked"),
    "torch_attn_blocked": lambda vec: run_torch(vec, "blocked"),
}


KIND = Kind(
    name="causal",
    cases=CAUSAL_CASES,
    build_inputs=build_inputs,
    expectations=expectations,
    magnitude=magnitude,
    implementations=IMPLEMENTATIONS,
    applies=applies,
)
