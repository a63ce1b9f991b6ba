"""Fuzz, float64: both ``CausalSelfAttention`` twins against a reference built from torch's built-ins.

The reference, with the twin's weights: ``F.linear`` projections, key/value heads repeated with
``repeat_interleave`` (grouped-query attention), ``F.scaled_dot_product_attention(is_causal=True)`` and the
``F.linear`` output projection, in float64; gradients by ``backward`` w.r.t. ``x`` and every parameter,
for a random cotangent. Factors: (embed_dim, heads, kv heads) from multi-head to multi-query, bias,
training mode (dropout 0) or eval mode (dropout 0.3, inactive), batch and length, and the call: a full
pass, or the KV cache filled in chunks (one chunk, several, token by token; buffers longer than the
sequence, so unfilled slots must stay masked), whose concatenated outputs and gradients (through the
chunks and the functional cache) must equal the full pass's reference. ``implementation``: None (the
default) and each explicit path.

- torch twin: 2000 default-path configurations and 300 per explicit path, drawn freely from a seeded
  NumPy generator.
- JAX twin (float64 via ``jax.enable_x64``): one ``jax.jit`` forward + ``jax.vjp`` program per row of an
  all-pairs covering array of the factors (cheap-compile XLA options), called with many draws of weights,
  inputs and cotangents; the default path and the explicit paths have arrays of their own.

Tolerance ``1e-10 · max(1, max|expected|)`` max abs; the JAX twin's explicit ``fused`` path
(``jax.nn.dot_product_attention``, float32 softmax whatever the input dtype) ``1e-5``. ``FUZZ_SEED``
(environment, default 0) shifts every seed; the configuration counts are asserted (printed with ``-s``).
"""

import itertools
import os

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from fuzz_support import all_pairs as _all_pairs
from fuzz_support import one_torch_thread as _one_torch_thread  # noqa: F401 (autouse)

import jax_attn
import torch_attn

FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "0"))
TOL, TOL_JAX_FUSED = 1e-10, 1e-5
IMPLEMENTATIONS = (None, "math", "blocked", "fused")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")

# (E, N, K): multi-head, grouped (G = 2, 3, 4) and multi-query; head widths 1 to 4
HEADS = ((4, 2, 2), (6, 3, 1), (8, 4, 2), (12, 6, 3), (8, 8, 2), (6, 2, 1))
FACTORS = {
    "heads": HEADS[:3],  # the JAX rows: multi-head, multi-query, grouped (each compiles; torch draws all)
    "bias": (True, False),
    "mode": ("eval", "train", "eval_dropout"),
    "cache": ("none", "one_chunk", "chunks", "tokens"),
    "batch": (1, 2),
}


DEFAULT_ROWS = _all_pairs(FACTORS, seed=2)  # 14 rows (seed 0: 15)
EXPLICIT_FACTORS = {**FACTORS, "implementation": IMPLEMENTATIONS[1:]}
EXPLICIT_ROWS = _all_pairs(EXPLICIT_FACTORS, seed=0)  # 15 rows (seed 1: 16)


@pytest.mark.parametrize("factors, rows", [(FACTORS, DEFAULT_ROWS), (EXPLICIT_FACTORS, EXPLICIT_ROWS)])
def test_covering_arrays_cover_every_pair(factors, rows):
    assert len(rows) <= 30
    for a, b in itertools.combinations(factors, 2):
        seen = {(c[a], c[b]) for c in rows}
        assert seen == set(itertools.product(factors[a], factors[b])), (a, b)


# ----------------------------------------------------------------------------------------- one case


def _structure(row: dict, rng) -> dict:
    """Sizes and the chunk plan of one row (the implementation's dropout rule applied)."""
    E, N, K = row["heads"]
    T = int(rng.integers(1, 5 if row["cache"] == "tokens" else 8))
    plan = None
    if row["cache"] == "one_chunk":
        plan = [T]
    elif row["cache"] == "tokens":
        plan = [1] * T
    elif row["cache"] == "chunks":
        cuts = sorted(set(rng.integers(1, T, size=2).tolist())) if T > 1 else []
        plan = [b - a for a, b in zip([0, *cuts], [*cuts, T])]
    mode = row["mode"]
    if row.get("implementation") not in (None, "math") and mode == "eval_dropout":
        mode = "eval"  # the explicit fast paths refuse dropout > 0 at construction
    return {
        "E": E,
        "N": N,
        "K": K,
        "bias": row["bias"],
        "mode": mode,
        "B": row["batch"],
        "T": T,
        "plan": plan,
        "L": T + int(rng.integers(0, 3)),  # cache length: unfilled slots when > T
        "implementation": row.get("implementation"),
    }


def _values(s: dict, rng) -> dict:
    E, N, K = s["E"], s["N"], s["K"]
    H = E // N
    shapes = {"q_proj": (N * H, E), "k_proj": (K * H, E), "v_proj": (K * H, E), "out_proj": (E, N * H)}
    params = {}
    for proj, shape in shapes.items():
        params[f"{proj}.weight"] = rng.standard_normal(shape) * 0.5
        if s["bias"]:
            params[f"{proj}.bias"] = rng.standard_normal(shape[0]) * 0.5
    x = rng.standard_normal((s["B"], s["T"], E))
    return {"params": params, "x": x, "dy": rng.standard_normal(x.shape)}


def _reference(s: dict, v: dict) -> dict:
    """Full causal pass from torch built-ins (F.linear, repeat_interleave, F.sdpa), with gradients."""
    p = {k: torch.tensor(a, requires_grad=True) for k, a in v["params"].items()}
    x = torch.tensor(v["x"], requires_grad=True)
    B, T, E, N, K = s["B"], s["T"], s["E"], s["N"], s["K"]
    H = E // N

    def proj(name, inp):
        return F.linear(inp, p[f"{name}.weight"], p.get(f"{name}.bias"))

    q = proj("q_proj", x).view(B, T, N, H).transpose(1, 2)
    k = proj("k_proj", x).view(B, T, K, H).transpose(1, 2).repeat_interleave(N // K, dim=1)
    val = proj("v_proj", x).view(B, T, K, H).transpose(1, 2).repeat_interleave(N // K, dim=1)
    y = F.scaled_dot_product_attention(q, k, val, is_causal=True)
    y = proj("out_proj", y.transpose(1, 2).reshape(B, T, N * H))
    (y * torch.from_numpy(v["dy"])).sum().backward()
    grads = {"x": x.grad.numpy(), **{k: t.grad.numpy() for k, t in p.items()}}
    return {"y": y.detach().numpy(), "grads": grads}


def _close(name, got, want, context, tol):
    got = np.asarray(got)
    assert got.dtype == np.float64, (name, got.dtype, context)
    assert got.shape == want.shape, (name, got.shape, want.shape, context)
    assert np.isfinite(got).all(), (name, context)
    err = np.max(np.abs(got - want), initial=0.0)
    bound = tol * max(1.0, np.max(np.abs(want), initial=0.0))
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g} in {context}"


def _judge(got: dict, want: dict, context, tol=TOL) -> None:
    _close("y", got["y"], want["y"], context, tol)
    assert got["grads"].keys() == want["grads"].keys(), context
    for name, g in want["grads"].items():
        _close(f"d{name}", got["grads"][name], g, context, tol)


# ----------------------------------------------------------------------------------------- torch twin


def _torch_twin(s: dict, v: dict) -> dict:
    twin = torch_attn.CausalSelfAttention(
        s["E"],
        s["N"],
        s["K"],
        bias=s["bias"],
        dropout=0.3 if s["mode"] == "eval_dropout" else 0.0,
        implementation=s["implementation"],
        dtype=torch.float64,
    )
    twin.load_torch_state_dict({k: torch.from_numpy(a) for k, a in v["params"].items()})
    twin.train(s["mode"] == "train")
    x = torch.tensor(v["x"], requires_grad=True)
    if s["plan"] is None:
        y = twin(x)
    else:
        cache, ys, start = twin.init_cache(s["B"], s["L"]), [], 0
        for size in s["plan"]:
            y_chunk, cache = twin(x[:, start : start + size], cache=cache)
            ys.append(y_chunk)
            start += size
        assert cache.index == s["T"]
        y = torch.cat(ys, dim=1)
    (y * torch.from_numpy(v["dy"])).sum().backward()
    grads = {"x": x.grad.numpy(), **{k: t.grad.numpy() for k, t in twin.named_parameters()}}
    return {"y": y.detach().numpy(), "grads": grads}


TORCH_COUNTS = [(None, 2000), ("math", 300), ("blocked", 300), ("fused", 300)]


@pytest.mark.parametrize("implementation, count", TORCH_COUNTS)
def test_fuzz_torch_twin_matches_builtins_fp64(implementation, count):
    rng = np.random.default_rng([FUZZ_SEED, IMPLEMENTATIONS.index(implementation)])
    for _ in range(count):
        row = {name: values[rng.integers(len(values))] for name, values in FACTORS.items()}
        row.update(heads=HEADS[rng.integers(len(HEADS))], batch=int(rng.integers(1, 4)))
        s = _structure({**row, "implementation": implementation}, rng)
        v = _values(s, rng)
        _judge(_torch_twin(s, v), _reference(s, v), s)
    print(f"torch twin CausalSelfAttention implementation={implementation}: {count} configurations")


# ----------------------------------------------------------------------------------------- JAX twin


def _compile(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with XLA:CPU's cheap-compile options: these programs are tiny
    and called a few dozen times each, so backend optimisation costs more than it saves."""
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(fn).lower(*args).compile(compiler_options=options)


class _JaxRow:
    """One covering-array row: the JAX module's graph and one compiled forward + VJP program."""

    def __init__(self, s: dict):
        self.s = s
        # Abstract construction: the random initialisation (one eager compile per shape) is overwritten.
        module = nnx.eval_shape(
            lambda: jax_attn.CausalSelfAttention(
                s["E"],
                s["N"],
                s["K"],
                bias=s["bias"],
                dropout=0.3 if s["mode"] == "eval_dropout" else 0.0,
                implementation=s["implementation"],
                rngs=nnx.Rngs(0),
                param_dtype=np.float64,
            )
        )
        if s["mode"] != "train":
            module.eval()
        self.graph, self.params, rest = nnx.split(module, nnx.Param, ...)
        # the dropout stream's key and count (dropout is never active here): any concrete value
        self.rest = jax.tree.map(
            lambda a: (
                jax.random.key(0)
                if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                else np.zeros(a.shape, a.dtype)
            ),
            rest,
        )
        self.program = None

    def run(self, v: dict) -> dict:
        s, graph, rest = self.s, self.graph, self.rest
        nested = {}
        for name, a in v["params"].items():
            proj, leaf = name.split(".")
            nested.setdefault(proj, {})[leaf] = a
        nnx.replace_by_pure_dict(self.params, nested)

        def forward_vjp(params, x, dy):
            def f(params, x):
                m = nnx.merge(graph, params, rest)
                if s["plan"] is None:
                    return m(x)
                cache, ys, start = m.init_cache(s["B"], s["L"]), [], 0
                for size in s["plan"]:
                    y_chunk, cache = m(x[:, start : start + size], cache=cache)
                    ys.append(y_chunk)
                    start += size
                return jax.numpy.concatenate(ys, axis=1)

            y, vjp = jax.vjp(f, params, x)
            return y, vjp(dy)

        args = (self.params, v["x"], v["dy"])
        if self.program is None:
            self.program = _compile(forward_vjp, *args)
        y, (d_params, dx) = self.program(*args)
        grads = {"x": dx}
        for proj, leaves in nnx.to_pure_dict(d_params).items():
            for leaf, g in leaves.items():
                grads[f"{proj}.{leaf}"] = g
        return {"y": y, "grads": grads}


def _fuzz_jax(rows, draws: int, salt: int) -> int:
    done = 0
    with jax.enable_x64(True):
        for index, row in enumerate(rows):
            rng = np.random.default_rng([FUZZ_SEED, salt, index])
            s = _structure({"implementation": None, **row}, rng)
            jrow = _JaxRow(s)
            tol = TOL_JAX_FUSED if s["implementation"] == "fused" else TOL
            for _ in range(draws):
                v = _values(s, rng)
                _judge(jrow.run(v), _reference(s, v), s, tol)
                done += 1
    return done


def test_fuzz_jax_default_path_matches_builtins_fp64():
    draws = -(-2000 // len(DEFAULT_ROWS))
    done = _fuzz_jax(DEFAULT_ROWS, draws, salt=10)
    print(f"JAX CausalSelfAttention default path: {done} configurations over {len(DEFAULT_ROWS)} rows")
    assert done == draws * len(DEFAULT_ROWS) >= 2000


def test_fuzz_jax_explicit_paths_match_builtins_fp64():
    done = _fuzz_jax(EXPLICIT_ROWS, 12, salt=11)
    print(f"JAX CausalSelfAttention explicit paths: {done} configurations over {len(EXPLICIT_ROWS)} rows")
    assert done == 12 * len(EXPLICIT_ROWS)
