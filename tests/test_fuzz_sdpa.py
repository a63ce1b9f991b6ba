"""Fuzz, float64: both twins' ``scaled_dot_product_attention`` against ``F.scaled_dot_product_attention``.

Every argument is a factor: leading batch/head dimensions (query rank 2-5, key/value broadcasting over
them with size-1 or missing dimensions), T < S / T = S / T > S, head widths H != V, ``attn_mask`` none /
bool / float of rank 1, 2, 3 or the logits' full rank with any pattern of size-1 dimensions (torch's
built-in rejects rank 1, so it is handed the same mask with a leading 1), ``is_causal`` (top-left, T != S
included; with a mask both twins must raise as torch does), ``scale``, ``enable_gqa`` and fully-masked
rows. Outputs and the gradients of query, key, value and a float mask (``backward`` / ``jax.vjp`` with a
random cotangent) must match torch's.

Fully-masked rows: the twins' documented convention is zeros, with no gradient through the row; torch's
math reference gives NaN there in some versions and backends (torch 2.13 on CPU in float64 gave zeros in
every draw here). So the forward is compared with torch's on every row torch defines (finite), must be
exactly 0 on fully-masked rows, and the gradients are compared with torch's built-in on the same problem
with those rows unmasked and their output replaced by 0 (``torch.where``): that convention written with
torch's own kernel.

- torch twin: 2000 configurations of the default path (``implementation=None``) and 300 of each explicit
  path, every factor and size drawn freely from a seeded NumPy generator.
- JAX twin (float64 via ``jax.enable_x64``): ``jax.jit`` of forward + ``jax.vjp``, one compiled program per
  row of an all-pairs covering array of the structural factors (every pair of values of every two factors
  occurs in some row), each called with many draws of values (inputs, mask contents, dead rows,
  cotangents). The default path and the explicit paths have arrays of their own.

Tolerance ``1e-10 · max(1, max|expected|)`` max abs; JAX's explicit ``fused``
(``jax.nn.dot_product_attention``, whose softmax is float32 whatever the input dtype) ``1e-5``. The float
mask's gradient is compared on every path, the JAX ``blocked`` one included (the engine's custom VJP).
``FUZZ_SEED`` (environment, default 0) shifts every seed; configuration counts are asserted (printed with
``-s``).
"""

import functools
import itertools
import os

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fuzz_support import all_pairs as _all_pairs
from fuzz_support import one_torch_thread as _one_torch_thread  # noqa: F401 (autouse)

import jax_attn
import torch_attn

FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "0"))
TOL, TOL_JAX_FUSED = 1e-10, 1e-5
IMPLEMENTATIONS = (None, "math", "blocked", "fused")

FACTORS = {
    "q_rank": (2, 3, 4, 5),
    "gqa": (False, True),
    "kv_broadcast": ("none", "ones", "lower_rank"),
    "lengths": ("T<S", "T=S", "T>S"),
    "mask": ("none", "bool", "float", "is_causal"),
    "mask_rank": (1, 2, 3, "full"),
    "mask_ones": (False, True),
    "dead_rows": (False, True),
    "scale": (None, "drawn"),
}


DEFAULT_ROWS = _all_pairs(FACTORS, seed=13)  # 20 rows (seed 0: 22)
EXPLICIT_FACTORS = {**FACTORS, "implementation": IMPLEMENTATIONS[1:]}
EXPLICIT_ROWS = _all_pairs(EXPLICIT_FACTORS, seed=8)  # 20 rows (seed 1: 21)


@pytest.mark.parametrize("factors, rows", [(FACTORS, DEFAULT_ROWS), (EXPLICIT_FACTORS, EXPLICIT_ROWS)])
def test_covering_arrays_cover_every_pair(factors, rows):
    assert len(rows) <= 30
    for a, b in itertools.combinations(factors, 2):
        seen = {(c[a], c[b]) for c in rows}
        assert seen == set(itertools.product(factors[a], factors[b])), (a, b)


# ----------------------------------------------------------------------------------------- one case


def _shapes(row: dict, rng) -> dict:
    """The structure of one call (shapes, flags), from a row of factor values and a generator."""
    rank = max(row["q_rank"], 3) if row["gqa"] else row["q_rank"]
    lead = [int(rng.integers(1, 4)) for _ in range(rank - 2)]
    kv_heads = None
    if row["gqa"]:
        kv_heads = int(rng.integers(1, 3))
        lead[-1] = kv_heads * int(rng.integers(2, 4))
    kv_lead = list(lead)
    if kv_heads is not None:
        kv_lead[-1] = kv_heads
    # with GQA the head axis (-3) is the groups' own; only the dimensions before it broadcast
    free = len(kv_lead) - (1 if row["gqa"] else 0)
    if row["kv_broadcast"] == "ones" and free:
        for i in range(free):
            if rng.random() < 0.6:
                kv_lead[i] = 1
    elif row["kv_broadcast"] == "lower_rank" and free:
        kv_lead = kv_lead[int(rng.integers(1, free + 1)) :]
    T = int(rng.integers(1, 6))
    S = {"T<S": T + int(rng.integers(1, 4)), "T=S": T, "T>S": max(1, T - int(rng.integers(1, 4)))}[
        row["lengths"]
    ]
    if row["lengths"] == "T>S" and T == 1:
        T, S = 2, 1
    logits = (*lead, T, S)
    mask_shape = None
    if row["mask"] in ("bool", "float"):
        m_rank = len(logits) if row["mask_rank"] == "full" else min(row["mask_rank"], len(logits))
        mask_shape = list(logits[len(logits) - m_rank :])
        if row["mask_ones"]:
            for i in range(m_rank):
                if rng.random() < 0.5:
                    mask_shape[i] = 1
    scale = None if row["scale"] is None else float(rng.uniform(0.05, 2.0))
    return {
        "q": (*lead, T, int(rng.integers(1, 9))),
        "kv_lead": tuple(kv_lead),
        "S": S,
        "V": int(rng.integers(1, 9)),
        "mask": row["mask"] if mask_shape is not None else "none",
        "mask_shape": None if mask_shape is None else tuple(mask_shape),
        "dead_rows": row["dead_rows"],
        "is_causal": row["mask"] == "is_causal",
        "scale": scale,
        "gqa": row["gqa"],
    }


def _values(shapes: dict, rng) -> dict:
    """Inputs, mask contents and cotangent for a structure."""
    q_shape = shapes["q"]
    H, V, S = q_shape[-1], shapes["V"], shapes["S"]
    q = rng.standard_normal(q_shape)
    k = rng.standard_normal((*shapes["kv_lead"], S, H))
    v = rng.standard_normal((*shapes["kv_lead"], S, V))
    mask = None
    if shapes["mask"] != "none":
        m_shape = shapes["mask_shape"]
        keep = rng.random(m_shape) < 0.7
        keep[..., 0] = True  # no dead row unless asked for
        if shapes["dead_rows"]:
            rows = keep.reshape(-1, m_shape[-1])
            rows[rng.random(rows.shape[0]) < 0.4] = False
            rows[rng.integers(rows.shape[0])] = False
        mask = keep if shapes["mask"] == "bool" else np.where(keep, rng.standard_normal(m_shape), -np.inf)
    out_shape = np.broadcast_shapes(q_shape[:-2], shapes["kv_lead"][:-1] + q_shape[-3:-2])
    if not shapes["gqa"]:
        out_shape = np.broadcast_shapes(q_shape[:-2], shapes["kv_lead"])
    dout = rng.standard_normal((*out_shape, q_shape[-2], V))
    return {"q": q, "k": k, "v": v, "mask": mask, "dout": dout}


def _reference(shapes: dict, values: dict) -> dict:
    """torch's built-in: the raw output, and output + gradients under the zero-row convention."""
    q, k, v = (torch.tensor(values[n], requires_grad=True) for n in ("q", "k", "v"))
    mask = values["mask"]
    tm = None
    if mask is not None:
        tm = torch.tensor(mask, requires_grad=mask.dtype != bool)
    kwargs = {"scale": shapes["scale"], "enable_gqa": shapes["gqa"]}

    def sdpa(m):
        if m is not None and m.dim() == 1:
            m = m[None]  # torch's built-in rejects rank-1 masks; (1, S) broadcasts the same
        return F.scaled_dot_product_attention(q, k, v, m, 0.0, shapes["is_causal"], **kwargs)

    raw = sdpa(tm)
    out = raw
    dead = None
    if tm is not None:
        keep = tm if tm.dtype == torch.bool else tm > -torch.inf
        dead = ~keep.any(dim=-1, keepdim=True)  # (..., T|1, 1) rows with no key
        if bool(dead.any()):
            fixed = (tm | dead) if tm.dtype == torch.bool else torch.where(dead, torch.zeros_like(tm), tm)
            out = torch.where(dead, 0.0, sdpa(fixed))
    (out * torch.from_numpy(values["dout"])).sum().backward()
    grads = {"dq": q.grad, "dk": k.grad, "dv": v.grad}
    if tm is not None and tm.requires_grad:
        grads["dmask"] = tm.grad
    result = {"raw": raw.detach().numpy(), "out": out.detach().numpy()}
    result.update({n: g.numpy() for n, g in grads.items()})
    if dead is not None:
        result["dead"] = np.broadcast_to(dead.numpy(), result["out"].shape[:-1] + (1,))
    return result


def _close(name, got, want, context, tol):
    got = np.asarray(got)
    assert got.dtype == np.float64, (name, got.dtype, context)
    assert got.shape == want.shape, (name, got.shape, want.shape, context)
    assert np.isfinite(got).all(), (name, context)
    err = np.max(np.abs(got - want), initial=0.0)
    bound = tol * max(1.0, np.max(np.abs(want), initial=0.0))
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g} in {context}"


def _judge(got: dict, want: dict, context, tol=TOL, mask_grad=True) -> None:
    out = np.asarray(got["out"])
    raw = want["raw"]
    defined = np.isfinite(raw)
    _close("out", np.where(defined, out, raw), np.where(defined, raw, 0.0), context, tol)
    if not defined.all():  # rows torch leaves undefined: ours are zeros
        assert (out[~defined] == 0.0).all(), ("out on fully-masked rows", context)
    if "dead" in want:
        dead = np.broadcast_to(want["dead"], out.shape)
        assert (out[dead] == 0.0).all(), ("out on fully-masked rows", context)
    _close("out (zero-row convention)", out, want["out"], context, tol)
    for name in ("dq", "dk", "dv", "dmask"):
        if name in want and (name != "dmask" or mask_grad):
            _close(name, got[name], want[name], context, tol)


# ----------------------------------------------------------------------------------------- torch twin


def _torch_twin(shapes, values, implementation) -> dict:
    q, k, v = (torch.tensor(values[n], requires_grad=True) for n in ("q", "k", "v"))
    mask = values["mask"]
    tm = None if mask is None else torch.tensor(mask, requires_grad=mask.dtype != bool)
    out = torch_attn.scaled_dot_product_attention(
        q,
        k,
        v,
        tm,
        0.0,
        shapes["is_causal"],
        shapes["scale"],
        shapes["gqa"],
        implementation=implementation,
    )
    (out * torch.from_numpy(values["dout"])).sum().backward()
    got = {"out": out.detach().numpy(), "dq": q.grad.numpy(), "dk": k.grad.numpy(), "dv": v.grad.numpy()}
    if tm is not None and tm.requires_grad:
        got["dmask"] = tm.grad.numpy()
    return got


def _raises_like_torch(shapes, values, call) -> None:
    """is_causal with attn_mask: the twins raise (``attn_spec.checks``, shared text). torch 2.13 raises
    too on its math backend (2-D/3-D inputs, broadcast batches) but its fused CPU kernel (4-D inputs,
    GQA) computes the conjunction instead: see ``test_is_causal_with_mask_where_torch_computes``."""
    with pytest.raises(ValueError, match="is_causal=True with an explicit attn_mask"):
        call()


TORCH_COUNTS = [(None, 2000), ("math", 300), ("blocked", 300), ("fused", 300)]


@pytest.mark.parametrize("implementation, count", TORCH_COUNTS)
def test_fuzz_torch_twin_matches_builtin_fp64(implementation, count):
    rng = np.random.default_rng([FUZZ_SEED, IMPLEMENTATIONS.index(implementation)])
    done = raised = 0
    for _ in range(count):
        row = {name: values[rng.integers(len(values))] for name, values in FACTORS.items()}
        shapes = _shapes(row, rng)
        values = _values(shapes, rng)
        context = {**shapes, "implementation": implementation}
        if values["mask"] is not None:  # the same call with is_causal=True must raise
            causal = {**shapes, "is_causal": True}
            _raises_like_torch(causal, values, functools.partial(_torch_twin, causal, values, implementation))
            raised += 1
        _judge(_torch_twin(shapes, values, implementation), _reference(shapes, values), context)
        done += 1
    print(f"torch twin SDPA implementation={implementation}: {done} configurations (+{raised} must-raise)")
    assert done == count and raised > 0


@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason="twins raise on is_causal + attn_mask (attn_spec/checks.py, per the README's SDPA table); torch"
    " 2.13's fused CPU kernel computes causal AND mask for 4-D inputs (its math backend raises)",
)
@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_is_causal_with_mask_where_torch_computes(twin):
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 2, 3, 5)), rng.standard_normal((1, 2, 4, 5))
    keep = np.ones((3, 4), bool)
    keep[:, 1] = False
    want = F.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(k), torch.from_numpy(keep), 0.0, True
    )
    conj = F.scaled_dot_product_attention(
        torch.from_numpy(q),
        torch.from_numpy(k),
        torch.from_numpy(k),
        torch.from_numpy(keep & np.tri(3, 4, dtype=bool)),
    )
    torch.testing.assert_close(want, conj, rtol=0, atol=1e-12)  # what torch computes: the conjunction
    if twin == "torch":
        got = torch_attn.scaled_dot_product_attention(
            torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(k), torch.from_numpy(keep), 0.0, True
        )
    else:
        with jax.enable_x64(True):
            got = jax_attn.scaled_dot_product_attention(q, k, k, keep, 0.0, True)
    _close("out", np.asarray(got), want.numpy(), "is_causal + mask", TOL)


# ----------------------------------------------------------------------------------------- JAX twin


def _compile(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with XLA:CPU's cheap-compile options: these programs are tiny
    and called a few dozen times each, so backend optimisation costs more than it saves."""
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(fn).lower(*args).compile(compiler_options=options)


def _jax_program(shapes, values, implementation):
    is_causal, scale, gqa = shapes["is_causal"], shapes["scale"], shapes["gqa"]
    float_mask = values["mask"] is not None and values["mask"].dtype != bool

    def forward_vjp(q, k, v, mask, dout):
        def f(q, k, v, mask):
            return jax_attn.scaled_dot_product_attention(
                q, k, v, mask, 0.0, is_causal, scale, gqa, implementation=implementation
            )

        if float_mask:
            out, vjp = jax.vjp(f, q, k, v, mask)
            return (out, *vjp(dout))
        out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, mask), q, k, v)
        return (out, *vjp(dout), None)

    return _compile(forward_vjp, *(values[n] for n in ("q", "k", "v", "mask", "dout")))


def _jax_trace_causal(shapes, values, implementation):
    def f(q, k, v, m):
        return jax_attn.scaled_dot_product_attention(
            q, k, v, m, 0.0, True, shapes["scale"], shapes["gqa"], implementation=implementation
        )

    return jax.eval_shape(f, *(values[n] for n in ("q", "k", "v", "mask")))


def _fuzz_jax(rows, draws: int, salt: int) -> tuple[int, int]:
    done = raised = 0
    with jax.enable_x64(True):
        for index, row in enumerate(rows):
            rng = np.random.default_rng([FUZZ_SEED, salt, index])
            implementation = row.get("implementation")
            shapes = _shapes(row, rng)
            values = _values(shapes, rng)
            context = {**shapes, "implementation": implementation}
            if values["mask"] is not None:  # the same call with is_causal=True must raise (at trace time)
                call = functools.partial(_jax_trace_causal, shapes, values, implementation)
                _raises_like_torch(shapes, values, call)
                raised += 1
            program = _jax_program(shapes, values, implementation)
            tol = TOL_JAX_FUSED if implementation == "fused" else TOL
            for _ in range(draws):
                values = _values(shapes, rng)
                out, dq, dk, dv, dmask = program(*(values[n] for n in ("q", "k", "v", "mask", "dout")))
                got = {"out": out, "dq": dq, "dk": dk, "dv": dv, "dmask": dmask}
                _judge(got, _reference(shapes, values), context, tol)
                done += 1
    return done, raised


def test_fuzz_jax_default_path_matches_builtin_fp64():
    rows = DEFAULT_ROWS
    draws = -(-2000 // len(rows))
    done, raised = _fuzz_jax(rows, draws, salt=10)
    print(f"JAX SDPA default path: {done} configurations over {len(rows)} rows (+{raised} must-raise)")
    assert done == draws * len(rows) >= 2000


def test_fuzz_jax_explicit_paths_match_builtin_fp64():
    done, raised = _fuzz_jax(EXPLICIT_ROWS, 20, salt=11)
    rows = len(EXPLICIT_ROWS)
    print(f"JAX SDPA explicit paths: {done} configurations over {rows} rows (+{raised} must-raise)")
    assert done == 20 * len(EXPLICIT_ROWS)
