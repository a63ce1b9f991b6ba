"""Fuzz, float64: both decoder ``Attention`` twins (default implementation) against transformers' modules.

Families Llama, Qwen3, Gemma 2, Mistral and gpt-oss, built from their transformers configs with the knobs
drawn: query/key-value heads (multi-head, grouped with G = 2, 3, 4, multi-query), ``head_dim`` (≠ E/N),
attention biases, sliding windows (per layer type where the family has them: which layer is built decides
whether it slides), Gemma 2's logit soft-cap and ``query_pre_attn_scalar``, Qwen3's QK-norm epsilon, the
rope (``rope_theta``; Llama's ``llama3`` scaling, ``yarn`` elsewhere), batch, length and left padding.

Each module is transformers' attention class itself (``.double()``, eval, weights of order one by
``compare.port_hf.randomize_``), called the way its model calls it (as ``compare.port_hf.run_transformers``
does, with transformers' own mask functions), through its eager attention and, where that interface applies,
its sdpa one (see ``_references`` for which parts transformers computes in float32 whatever the dtype, and
the tolerance each reference gets). ``torch_attn.hf.from_hf`` / ``jax_attn.hf.from_hf`` port it. Compared:
the output on every real (non-pad) query row, and the gradients w.r.t. ``x`` and every parameter for a
random cotangent that is zero on pad rows (transformers gives pad rows an arbitrary average, the twins
zeros); for a third of the torch draws also the token-by-token KV-cache decode against transformers'
``DynamicCache`` decode.

- torch twin: 1000 configurations, every knob drawn freely (seeded NumPy generator).
- JAX twin (float64 via ``jax.enable_x64``): one ``jax.jit`` forward + ``jax.vjp`` program per row of an
  all-pairs covering array of the knobs (cheap-compile XLA options), each called with many draws of
  weights, inputs, padding and cotangents.

Tolerance ``1e-10 · max(1, max|expected|)`` max abs against float64 references. ``FUZZ_SEED`` (environment,
default 0) shifts every seed; the configuration counts are asserted (printed with ``-s``).
"""

import itertools
import os

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from fuzz_support import all_pairs as _all_pairs
from fuzz_support import one_torch_thread as _one_torch_thread  # noqa: F401 (autouse)
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gpt_oss import modeling_gpt_oss
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen3 import modeling_qwen3

import jax_attn.hf as jhf
import jax_attn.rope as jrope
import torch_attn.hf as thf
import torch_attn.rope as trope
from attn_spec import hf as spec
from compare import port_hf
from compare.port_hf import randomize_, run_torch_twin

FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "0"))
TOL = 1e-10
# references that transformers computes partly in float32 (see _references): float32's tolerance
TOL_FP32 = 1e-5
E = 24  # divisible by every head count (Gemma 2 checks it, even with head_dim given)

HEADS = ((4, 4), (4, 2), (6, 2), (8, 2), (4, 1), (6, 6))  # (N, K): G = 1, 2, 3, 4 and multi-query
WINDOWS = (None, 1, 2, 3, 5)
FACTORS = {  # the JAX rows (each compiles); the torch draws take HEADS and WINDOWS whole
    "family": ("llama", "qwen3", "gemma2", "mistral", "gpt_oss"),
    "heads": HEADS[:3] + HEADS[4:5],
    "head_dim": (4, 6, 8),
    "bias": (False, True),
    "window": (None, 1, 3),
    "rope": ("default", "scaled"),
    "batch": (1, 2, 3),
}
CLASSES = {
    "llama": (tf.LlamaConfig, modeling_llama.LlamaAttention),
    "qwen3": (tf.Qwen3Config, modeling_qwen3.Qwen3Attention),
    "gemma2": (tf.Gemma2Config, modeling_gemma2.Gemma2Attention),
    "mistral": (tf.MistralConfig, modeling_mistral.MistralAttention),
    "gpt_oss": (tf.GptOssConfig, modeling_gpt_oss.GptOssAttention),
}


ROWS = _all_pairs(FACTORS)


def test_covering_array_covers_every_pair():
    assert len(ROWS) <= 30
    for a, b in itertools.combinations(FACTORS, 2):
        seen = {(c[a], c[b]) for c in ROWS}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)


# ----------------------------------------------------------------------------------------- one case


def _knobs(row: dict, rng) -> dict:
    """The row's knobs plus the scalar ones drawn here (fixed for a JAX row: they are static config)."""
    return {
        **row,
        "rope_theta": float(rng.choice([1e2, 1e4, 5e5])),
        "softcap": None if rng.random() < 0.4 else float(rng.uniform(0.5, 20.0)),
        "query_pre_attn_scalar": int(rng.choice([row["head_dim"], 12, 3])),
        "rms_norm_eps": float(rng.choice([1e-6, 1e-2])),
        "T": int(rng.integers(1, 9)),
    }


def _module(k: dict, seed: int):
    """transformers' attention module for the knobs (float64, eval, eager, weights of order one)."""
    family, (N, K), H, window = k["family"], k["heads"], k["head_dim"], k["window"]
    rope = {"rope_type": "default", "rope_theta": k["rope_theta"]}
    if k["rope"] == "scaled" and family == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": k["rope_theta"],
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 4,
        }
    elif k["rope"] == "scaled" or family == "gpt_oss":
        rope = {
            "rope_type": "yarn",
            "rope_theta": k["rope_theta"],
            "factor": 4.0,
            "original_max_position_embeddings": 4,
            **({"beta_fast": 32.0, "beta_slow": 1.0, "truncate": False} if family == "gpt_oss" else {}),
        }
    kw = dict(
        hidden_size=E,
        num_attention_heads=N,
        num_key_value_heads=K,
        head_dim=H,
        num_hidden_layers=2,
        intermediate_size=8,
        vocab_size=8,
        max_position_embeddings=64,
        rms_norm_eps=k["rms_norm_eps"],
        rope_parameters=rope,
    )
    layer = 0
    if family in ("llama", "qwen3", "gemma2", "gpt_oss"):
        kw["attention_bias"] = k["bias"]
    if family == "mistral":
        kw["sliding_window"] = window
    elif family == "qwen3":
        kw.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)
        kw["layer_types"] = ["sliding_attention" if window else "full_attention"] * 2
    elif family in ("gemma2", "gpt_oss"):
        # layer 0 slides, layer 1 attends to everything: the window knob picks the layer
        kw.update(sliding_window=window or 3, layer_types=["sliding_attention", "full_attention"])
        layer = 0 if window else 1
    if family == "gemma2":
        kw.update(attn_logit_softcapping=k["softcap"], query_pre_attn_scalar=k["query_pre_attn_scalar"])
    if family == "gpt_oss":
        kw.update(num_local_experts=2, num_experts_per_tok=1)
    config_cls, attention_cls = CLASSES[family]
    cfg = config_cls(**kw)
    cfg._attn_implementation = "eager"
    module = attention_cls(cfg, layer_idx=layer).double().eval()
    return randomize_(module, seed)


def _inputs(k: dict, rng) -> dict:
    B, T = k["batch"], k["T"]
    mask = np.ones((B, T), np.int64)
    for b in range(B):
        mask[b, : int(rng.integers(0, T))] = 0  # left padding, at least one real token
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    x = rng.standard_normal((B, T, E))
    dy = rng.standard_normal(x.shape) * mask[..., None]  # pad rows carry no gradient
    return {"x": x, "mask": mask, "pos": pos, "dy": dy}


def _close(name, got, want, context, rows=None, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape, context)
    if rows is not None:  # real query rows only
        got, want = got[rows], want[rows]
    assert np.isfinite(got).all() and np.isfinite(want).all(), (name, context)
    err = np.max(np.abs(got - want), initial=0.0)
    bound = tol * max(1.0, np.max(np.abs(want), initial=0.0))
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g} in {context}"


def _judge(got: dict, refs: list, inputs: dict, context) -> None:
    real = inputs["mask"].astype(bool)
    for name, want, tol in refs:
        _judge_one(got, want, real, (name, context), tol)


def _judge_one(got: dict, want: dict, real, context, tol) -> None:
    for q, w in want.items():
        if q in got:
            _close(q, got[q], w, context, real if q in ("out", "decode_out") else None, tol)
    missing = {q for q in want if q.startswith("grad_")} - set(got)
    assert not missing, (missing, context)


def _tables(tables, module, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``(B, T, R)`` for ``pos``: the torch twin's for ``module``'s config
    (``tables="torch"``), or the ``(cos, sin)`` arrays given (the JAX twin's, from its compiled program)."""
    if isinstance(tables, str):
        c = spec.describe_module(module)[1]
        return trope.rope_cos_sin(c.rope, c.H, torch.from_numpy(pos))
    return tuple(torch.from_numpy(np.array(t)) for t in tables)


def _hf_call(module, family, x, mask, pos, q_idx, S, cache=None, tables="torch"):
    """transformers' module on ``x (B, t, E)``, queries at sequence indices ``q_idx`` over ``S`` keys.

    The mask: transformers' own mask functions (``compare.port_hf._keep``), additive ``finfo(float32).min``.
    The rotary tables: those of the twin under test (``rope_cos_sin``: float32 values like transformers'
    own, but from exactly reduced angles), since transformers' rotary module rounds ``p · inv_freq`` to
    float32, a ~1e-7 difference by design that would hide everything else at float64;
    ``test_rope_tables_match_transformers`` holds the twins' tables against that module at float32's
    tolerance instead."""
    keep = port_hf._keep(module, family, mask, q_idx, S)
    # finfo(float32).min, not float64's: the eager float32 softmax turns float64's into -inf, and a pad
    # query row (every key masked) into NaN, whose backward makes every gradient NaN
    additive = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, torch.finfo(torch.float32).min)
    cos, sin = (t.to(x.dtype) for t in _tables(tables, module, pos))
    if family == "gpt_oss":  # its rotary module gives the F = R / 2 frequencies once
        cos, sin = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
    kwargs = {"attention_mask": additive[:, None], "position_embeddings": (cos, sin)}
    if cache is not None:
        kwargs["cache"] = cache
    return module(x, **kwargs)[0]


def _run_transformers(
    module, family, x, mask, pos, dy, decode: bool, implementation: str = "eager", tables: str = "torch"
) -> dict:
    """Output, gradients (in the twins' parameter names) and optionally the token-by-token decode with a
    ``DynamicCache``, of transformers' module in float64 through its ``implementation`` attention interface
    (``"eager"`` or ``"sdpa"``)."""
    config = module.config
    old, config._attn_implementation = config._attn_implementation, implementation
    try:
        c = spec.describe_module(module)[1]
        xt = torch.tensor(x, requires_grad=True)
        params = dict(module.named_parameters())
        for p in params.values():
            p.grad = None
        y = _hf_call(module, family, xt, mask, pos, np.arange(x.shape[1]), x.shape[1], tables=tables)
        y.backward(torch.from_numpy(dy))
        res = {"out": y.detach().numpy(), "grad_x": xt.grad.numpy()}
        grads = spec.from_hf({k: p.grad.numpy() for k, p in params.items() if p.grad is not None}, family, c)
        res.update({f"grad_{k}": g for k, g in grads.items()})
        if decode:
            cache, ys = tf.DynamicCache(), []
            with torch.no_grad():
                for t in range(x.shape[1]):
                    xs = torch.from_numpy(x[:, t : t + 1].copy())
                    pos_t, q_idx = pos[:, t : t + 1], np.arange(t, t + 1)
                    ys.append(_hf_call(module, family, xs, mask, pos_t, q_idx, t + 1, cache, tables))
            res["decode_out"] = torch.cat(ys, dim=1).numpy()
    finally:
        config._attn_implementation = old
    return res


def _references(module, family, k: dict, inputs: dict, decode: bool, tables: str) -> list:
    """``(name, result, tolerance)`` of transformers' eager module and, where its interface applies (no
    soft-cap, no sinks), its sdpa one. transformers is not float64 throughout: the eager softmax of Llama,
    Qwen3, Gemma 2 and Mistral is float32 whatever the input dtype (``softmax(..., dtype=torch.float32)``;
    gpt-oss's is float64) and Qwen3's QK RMSNorm computes in float32; those references are judged at
    :data:`TOL_FP32` (float32's 1e-5), the float64 ones (gpt-oss eager, sdpa without QK-norm) at
    :data:`TOL`."""
    args = (inputs["x"], inputs["mask"], inputs["pos"], inputs["dy"], decode)
    eager_tol = TOL if family == "gpt_oss" else TOL_FP32
    refs = [("transformers eager", _run_transformers(module, family, *args, tables=tables), eager_tol)]
    if family != "gpt_oss" and not (family == "gemma2" and k["softcap"] is not None):
        sdpa_tol = TOL_FP32 if family == "qwen3" else TOL
        sdpa = _run_transformers(module, family, *args, implementation="sdpa", tables=tables)
        refs.append(("transformers sdpa", sdpa, sdpa_tol))
    return refs


_jax_tables = jax.jit(jrope.rope_cos_sin, static_argnums=(0, 1))


@pytest.mark.parametrize(
    "family, rope",
    [
        ("llama", "default"),
        ("llama", "scaled"),
        ("qwen3", "scaled"),
        ("gemma2", "default"),
        ("gpt_oss", "scaled"),
    ],
)
def test_rope_tables_match_transformers(family, rope):
    """The twins' rotary tables (handed to transformers' module above) against its own rotary module, at
    float32's tolerance: both are float32, transformers' from ``p · inv_freq`` rounded to float32 (off by up
    to half an ulp of the angle), the twins' from exactly reduced angles."""
    for theta in (1e2, 5e5):
        k = {**{n: v[0] for n, v in FACTORS.items()}, "family": family, "rope": rope, "head_dim": 8}
        k.update(rope_theta=theta, softcap=None, query_pre_attn_scalar=8, rms_norm_eps=1e-6, T=64)
        module = _module(k, seed=0)
        rotary, _ = port_hf._rotary(module, family)
        pos = np.arange(64)[None]
        want = rotary(torch.zeros((1, 64, E), dtype=torch.float64), torch.from_numpy(pos))
        c = spec.describe_module(module)[1]
        with jax.enable_x64(True):
            got_jax = _jax_tables(c.rope, c.H, pos)
        for twin, got in (
            ("torch", trope.rope_cos_sin(c.rope, c.H, torch.from_numpy(pos))),
            ("jax", got_jax),
        ):
            for name, g, w in zip(("cos", "sin"), got, want):
                g = np.asarray(g, np.float64)
                g = g[..., : g.shape[-1] // 2] if family == "gpt_oss" else g
                _close(f"{twin} {name}", g, w.numpy(), k, tol=TOL_FP32)


# ----------------------------------------------------------------------------------------- torch twin


def test_fuzz_torch_twin_matches_transformers_fp64():
    rng = np.random.default_rng([FUZZ_SEED, 0])
    count = 1000
    for _ in range(count):
        row = {name: values[rng.integers(len(values))] for name, values in FACTORS.items()}
        row.update(heads=HEADS[rng.integers(len(HEADS))], window=WINDOWS[rng.integers(len(WINDOWS))])
        k = _knobs(row, rng)
        module = _module(k, seed=int(rng.integers(2**31)))
        inputs = _inputs(k, rng)
        decode = bool(rng.random() < 1 / 3)
        family = spec.describe_module(module)[0]
        refs = _references(module, family, k, inputs, decode, "torch")
        twin = thf.from_hf(module)
        assert twin.implementation is None
        args = (inputs["x"], inputs["mask"], inputs["pos"], inputs["dy"], decode)
        _judge(run_torch_twin(twin, *args), refs, inputs, k)
    print(f"torch twin Attention (default path) vs transformers: {count} configurations")


# ----------------------------------------------------------------------------------------- JAX twin


def _compile(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with XLA:CPU's cheap-compile options: these programs are small
    and called a few dozen times each, so backend optimisation costs more than it saves."""
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(fn).lower(*args).compile(compiler_options=options)


def _nest(flat: dict) -> dict:
    nested = {}
    for name, value in flat.items():
        *path, last = name.split(".")
        node = nested
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


class _JaxRow:
    """One covering-array row: the JAX port's graph and one compiled forward + VJP program."""

    def __init__(self, module):
        port = jhf.from_hf(module)
        assert port.implementation is None
        port.deterministic = True
        self.family, self.config = spec.describe_module(module)
        self.graph, self.params, self.rest = nnx.split(port, nnx.Param, ...)
        self.program = None

    def run(self, module, inputs: dict) -> dict:
        sd = {name: t.detach().numpy() for name, t in module.state_dict().items()}
        nnx.replace_by_pure_dict(self.params, _nest(spec.from_hf(sd, self.family, self.config)))
        graph, rest = self.graph, self.rest

        def forward_vjp(params, x, mask, pos, dy):
            out, vjp = jax.vjp(lambda p, x: nnx.merge(graph, p, rest)(x, mask, pos), params, x)
            return out, vjp(dy), jrope.rope_cos_sin(self.config.rope, self.config.H, pos)

        args = (self.params, inputs["x"], inputs["mask"], inputs["pos"], inputs["dy"])
        if self.program is None:
            self.program = _compile(forward_vjp, *args)
        out, (d_params, dx), tables = self.program(*args)
        got = {"out": out, "grad_x": dx, "tables": tables}
        for path, value in nnx.to_flat_state(d_params):
            got["grad_" + ".".join(str(p) for p in path)] = value[...]
        return got


def test_fuzz_jax_twin_matches_transformers_fp64():
    draws = -(-1000 // len(ROWS))
    done = 0
    with jax.enable_x64(True):
        for index, row in enumerate(ROWS):
            rng = np.random.default_rng([FUZZ_SEED, 10, index])
            k = _knobs(row, rng)
            jrow = _JaxRow(_module(k, seed=0))
            for _ in range(draws):
                module = _module(k, seed=int(rng.integers(2**31)))
                inputs = _inputs(k, rng)
                got = jrow.run(module, inputs)
                refs = _references(module, jrow.family, k, inputs, False, got.pop("tables"))
                _judge(got, refs, inputs, k)
                done += 1
    print(f"JAX Attention (default path) vs transformers: {done} configurations over {len(ROWS)} rows")
    assert done == draws * len(ROWS) >= 1000
