"""Kind ``"mla"``: multi-head latent attention (``jax_attn.mla`` / ``torch_attn.mla``): one case per knob
(query latent or none, odd widths, rotary layouts, yarn with ``mscale``, biases, left padding, a KV cache in
chunks and token by token, bf16), the DeepSeek-V3.2 sparse indexer (its top-k, its ties, a shared layer)
and the family combinations.

A case is a recipe: sizes, the ``MLAConfig`` knobs and rotary settings, the number of left pads in the last
batch row, optional KV-cache chunks, the dtype. :func:`build_inputs` makes, deterministically: ``x (B, T,
E)``, the cotangent ``dy``, the parameters keyed like the twins' state dicts (transformers' names),
``attention_mask (B, T)`` (int64 1/0), ``position_ids`` (``cumsum(mask) - 1``) and, for a shared sparse
layer, ``topk_indices (B, T, k)``.

Expected values are the float64 oracle's full pass (``compare.oracle_mla``): output and gradients w.r.t.
``x`` and every parameter (the indexer's are zero: the selection has no gradient). A case with ``chunks``
feeds the sequence through the compressed cache and is expected to give the full pass. Every vector runs
through the three computations: ``*_absorbed`` implementations force the absorbed one, ``*_blocked`` the
blocked one (FlexAttention; every call, one-token cache chunks included), the others take the default
(``attn_spec.mla.choose``: plain for these small calls; absorbed for one-token chunks of a cache).

Sizes are small and distinct (E=20, N=3, Q=10, L=8, D=4, R=6, V=5) so that a swapped axis cannot pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from attn_spec.mla import MLAConfig, state_dict_shapes
from attn_spec.rope import RopeConfig
from compare import oracle_mla
from compare.kinds import base
from compare.kinds.base import NP_DTYPES, Kind, Vector, chunks, oracle_passes, to_float64, to_torch


@dataclass(frozen=True)
class MLACase:
    """One named vector of the multi-head latent attention layer."""

    name: str
    B: int = 2
    T: int = 6
    E: int = 20
    N: int = 3
    Q: int | None = 10  # q_lora_rank; None: a direct q_proj
    L: int = 8
    D: int = 4
    R: int = 6
    V: int = 5
    knobs: tuple = ()  # other MLAConfig keyword arguments as (name, value) pairs
    rope: tuple = (("layout", "interleaved"), ("rope_theta", 10000.0))  # RopeConfig keyword pairs
    pad: int = 0  # left pads in the last batch row
    dtype: str = "float32"
    chunks: tuple[int, ...] | None = None  # feed x through the cache in chunks of these sizes
    max_length: int | None = None
    zero_index_q: bool = False  # indexer.wq_b = 0: every key scores 0, the top-k is decided by ties
    seed: int = 0
    note: str = field(default="", compare=False)

    def __post_init__(self):
        if self.chunks is not None and (sum(self.chunks) != self.T or (self.max_length or 0) < self.T):
            raise ValueError(f"case {self.name}: chunks must sum to T and max_length must be >= T")

    def config(self) -> MLAConfig:
        return MLAConfig(
            hidden_size=self.E,
            num_heads=self.N,
            q_lora_rank=self.Q,
            kv_lora_rank=self.L,
            qk_nope_head_dim=self.D,
            qk_rope_head_dim=self.R,
            v_head_dim=self.V,
            rope=RopeConfig(**dict(self.rope)),
            **dict(self.knobs),
        )

    def params(self) -> dict:
        """JSON-ready parameters (what the manifest records)."""
        out = {}
        for key in ("name", "B", "T", "E", "N", "Q", "L", "D", "R", "V", "pad", "dtype", "max_length"):
            out[key] = getattr(self, key)
        out.update(zero_index_q=self.zero_index_q, seed=self.seed, note=self.note)
        out["knobs"] = dict(self.knobs)
        out["rope"] = dict(self.rope)
        out["chunks"] = None if self.chunks is None else list(self.chunks)
        return out


def param_names(case: MLACase) -> list[str]:
    return list(state_dict_shapes(case.config()))


def build_inputs(case: MLACase) -> dict[str, np.ndarray]:
    """Deterministic inputs for ``case`` in its dtype (mask, positions and indices int64)."""
    c = case.config()
    rng = np.random.default_rng(case.seed)
    np_dtype = NP_DTYPES[case.dtype]
    arrays = {"x": rng.standard_normal((case.B, case.T, case.E))}
    for name, shape in state_dict_shapes(c).items():
        if name.endswith("norm.weight"):  # around the norm's identity scale
            arrays[name] = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            arrays[name] = 0.3 * rng.standard_normal(shape)
        else:  # scaled like torch's Linear init (std ~ 1/sqrt(in)): activations of order 1
            arrays[name] = rng.standard_normal(shape) / np.sqrt(shape[-1])
    if case.zero_index_q:
        arrays["indexer.wq_b.weight"] = np.zeros_like(arrays["indexer.wq_b.weight"])
    arrays["dy"] = rng.standard_normal((case.B, case.T, case.E))
    arrays = {k: v.astype(np_dtype) for k, v in arrays.items()}
    mask = np.ones((case.B, case.T), np.int64)
    mask[-1, : case.pad] = 0
    arrays["attention_mask"] = mask
    arrays["position_ids"] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    if c.index_shared:  # an earlier layer's selection: any key indices (masked ones stay masked)
        arrays["topk_indices"] = rng.integers(0, case.T, (case.B, case.T, c.index_topk)).astype(np.int64)
    return arrays


def _oracle_args(case: MLACase, arrays: dict[str, np.ndarray]):
    x, dy = (arrays[n].astype(np.float64) for n in ("x", "dy"))
    params = {n: arrays[n].astype(np.float64) for n in param_names(case)}
    kwargs = {
        "attention_mask": arrays["attention_mask"],
        "position_ids": arrays["position_ids"],
        "topk_indices": arrays.get("topk_indices"),
    }
    return x, params, dy, kwargs


def expectations(case: MLACase, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Oracle outputs (float64) and, for low precision, the naive same-dtype baseline."""
    x, params, dy, kwargs = _oracle_args(case, inputs)
    c = case.config()
    result = {}
    for prefix, dtype in oracle_passes(case.dtype):
        bwd = oracle_mla.mla_backward(x, params, dy, c, **kwargs, dtype=dtype)
        result[f"{prefix}_out"] = bwd["out"]
        result[f"{prefix}_grad_x"] = bwd["x"]
        for name in param_names(case):
            result[f"{prefix}_grad_{name}"] = bwd[name]
    return result


def magnitude(case: MLACase, arrays: dict[str, np.ndarray], quantity: str) -> float:
    """Gradient term size for the tolerance policy (``compare.oracle_mla.gradient_magnitudes``); 0 for the
    output."""
    if not quantity.startswith("grad_"):
        return 0.0
    x, params, dy, kwargs = _oracle_args(case, arrays)
    bwd = oracle_mla.mla_backward(x, params, dy, case.config(), **kwargs)
    return oracle_mla.gradient_magnitudes(x, params, dy, bwd)[quantity.removeprefix("grad_")]


# --- cases ----------------------------------------------------------------------------------------------


def _rope(**kw) -> tuple:
    return tuple(sorted({"rope_theta": 10000.0, "layout": "interleaved", **kw}.items()))


def _knobs(**kw) -> tuple:
    return tuple(sorted(kw.items()))


YARN_MSCALE = _rope(
    rope_type="yarn",
    factor=4.0,
    original_max_position_embeddings=4,
    mscale=1.0,
    mscale_all_dim=0.8,
    beta_fast=32.0,
    beta_slow=1.0,
)
DSA = {"index_topk": 3, "index_n_heads": 2, "index_head_dim": 8}  # k = 3 of T = 7: sparse from query 3 on


def _mla_cases() -> list[MLACase]:
    m = MLACase
    return [
        # Each knob alone.
        m("mla_qlora", seed=400, note="query latent Q = 10, interleaved rope"),
        m("mla_no_qlora", Q=None, seed=401, note="direct q_proj (DeepSeek-V2-Lite)"),
        m(
            "mla_odd_widths",
            B=3,
            T=5,
            E=15,
            N=2,
            Q=7,
            L=9,
            D=3,
            R=2,
            V=7,
            seed=402,
            note="odd E, Q, L, D, V; R = 2; V > D",
        ),
        m("mla_rope_half", rope=_rope(layout="half"), seed=403, note="rope_interleave=False"),
        m(
            "mla_yarn_mscale",
            rope=YARN_MSCALE,
            seed=404,
            note="yarn: attention factor on cos/sin, mscale² scale",
        ),
        m("mla_bias", knobs=_knobs(attention_bias=True), seed=405, note="q_a_proj, kv_a_proj, o_proj biases"),
        m("mla_eps", knobs=_knobs(q_lora_eps=0.5, kv_lora_eps=0.25), seed=406, note="latent norm eps matter"),
        m("mla_left_padding", pad=2, seed=407),
        m(
            "mla_cache_chunks",
            T=7,
            pad=2,
            chunks=(3, 1, 2, 1),
            max_length=9,
            seed=408,
            note="plain + absorbed",
        ),
        m("mla_decode", pad=1, chunks=(1,) * 6, max_length=6, seed=409, note="token by token: absorbed"),
        m("mla_bf16", pad=2, rope=YARN_MSCALE, dtype="bfloat16", seed=410),
        m("mla_no_qlora_bf16", Q=None, dtype="bfloat16", seed=411),
        # DeepSeek V3.2 / GLM-5 sparse attention: the lightning indexer's top-k.
        m("mla_dsa", T=7, pad=1, knobs=_knobs(**DSA), seed=420, note="V3.2: indexer rope half, k = 3"),
        m(
            "mla_dsa_glm",
            T=7,
            knobs=_knobs(**DSA, index_rope_layout="interleaved"),
            seed=421,
            note="GLM-5: interleaved indexer rope",
        ),
        m(
            "mla_dsa_ties",
            T=7,
            pad=2,
            knobs=_knobs(**DSA),
            zero_index_q=True,
            seed=422,
            note="every score 0: the lower index (earlier token) wins each tie",
        ),
        m(
            "mla_dsa_cache_chunks",
            T=7,
            pad=1,
            knobs=_knobs(**DSA),
            chunks=(2, 1, 3, 1),
            max_length=8,
            seed=423,
            note="indexer keys cached",
        ),
        m(
            "mla_dsa_shared",
            T=7,
            knobs=_knobs(index_topk=3, index_shared=True),
            seed=424,
            note="GLM-5 shared layer: topk_indices given",
        ),
        # The families (tiny widths; their rotary and scale settings).
        m(
            "fam_deepseek_v2_lite",
            Q=None,
            rope=_rope(
                rope_type="yarn",
                factor=40.0,
                original_max_position_embeddings=4,
                mscale=0.707,
                mscale_all_dim=0.707,
                beta_fast=32.0,
                beta_slow=1.0,
            ),
            pad=1,
            seed=430,
        ),
        m(
            "fam_deepseek_v3",
            rope=_rope(
                rope_type="yarn",
                factor=40.0,
                original_max_position_embeddings=4,
                mscale=1.0,
                mscale_all_dim=1.0,
                beta_fast=32.0,
                beta_slow=1.0,
            ),
            pad=2,
            seed=431,
            note="also Kimi K2",
        ),
        m("fam_glm4_moe_lite", D=6, V=8, rope=_rope(rope_theta=1e6), seed=432, note="GLM-4.7-Flash, V > D"),
        m(
            "fam_deepseek_v32_decode",
            T=7,
            knobs=_knobs(**DSA),
            chunks=(4, 1, 1, 1),
            max_length=7,
            seed=433,
            note="prefill 4, then decode token by token (absorbed)",
        ),
    ]


MLA_CASES: dict[str, MLACase] = {case.name: case for case in _mla_cases()}


# --- runners --------------------------------------------------------------------------------------------


def run_jax(vec: Vector, implementation: str | None = None) -> dict[str, np.ndarray]:
    """``jax_attn.mla.MultiHeadLatentAttention`` under ``jax.jit``: output and gradients."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_attn.mla import MultiHeadLatentAttention

    case, a = vec.case, vec.arrays
    c = case.config()
    dt = jnp.dtype(NP_DTYPES[case.dtype])
    module = base.jax_module(
        lambda: MultiHeadLatentAttention(c, implementation=implementation, rngs=nnx.Rngs(0), param_dtype=dt),
        {n: a[n] for n in param_names(case)},
    )
    mask, pos = jnp.asarray(a["attention_mask"]), jnp.asarray(a["position_ids"])
    topk = None if "topk_indices" not in a else jnp.asarray(a["topk_indices"])
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def forward(params, x):
        model = nnx.merge(graphdef, params, rest)
        if case.chunks is None:
            return model(x, mask, pos, topk_indices=topk)
        cache, ys = model.init_cache(case.B, case.max_length), []
        for start, stop in chunks(case):
            y, cache = model(x[:, start:stop], mask[:, start:stop], pos[:, start:stop], cache=cache)
            ys.append(y)
        return jnp.concatenate(ys, axis=1)

    @jax.jit
    def forward_backward(params, x, dy):
        out, vjp = jax.vjp(forward, params, x)
        return out, *vjp(dy)

    x, dy = (jnp.asarray(a[n], dtype=dt) for n in ("x", "dy"))
    out, dparams, dx = forward_backward(params, x, dy)
    result = {"out": to_float64(out), "grad_x": to_float64(dx)}
    for path, value in nnx.to_flat_state(dparams):
        result["grad_" + ".".join(str(p) for p in path)] = to_float64(value[...])
    return result


def run_torch(vec: Vector, implementation: str | None = None) -> dict[str, np.ndarray]:
    """``torch_attn.mla.MultiHeadLatentAttention`` (eager): output and gradients (the indexer's, which
    autograd leaves None, as zeros)."""
    import torch

    from torch_attn.mla import MultiHeadLatentAttention

    case, a = vec.case, vec.arrays
    c = case.config()
    module = MultiHeadLatentAttention(c, implementation=implementation, dtype=getattr(torch, case.dtype))
    module.to(base.TORCH_DEVICE)
    module.load_torch_state_dict({n: a[n] for n in param_names(case)})
    mask, pos = to_torch(a["attention_mask"]), to_torch(a["position_ids"])
    topk = None if "topk_indices" not in a else to_torch(a["topk_indices"])
    x, dy = (to_torch(a[n], case.dtype) for n in ("x", "dy"))
    x.requires_grad_(True)
    if case.chunks is None:
        out = module(x, mask, pos, topk_indices=topk)
    else:
        cache, ys = module.init_cache(case.B, case.max_length), []
        for start, stop in chunks(case):
            y, cache = module(x[:, start:stop], mask[:, start:stop], pos[:, start:stop], cache=cache)
            ys.append(y)
        out = torch.cat(ys, dim=1)
    out.backward(dy)
    result = {"out": to_float64(out), "grad_x": to_float64(x.grad)}
    for name, p in module.named_parameters():
        result[f"grad_{name}"] = np.zeros(tuple(p.shape)) if p.grad is None else to_float64(p.grad)
    return result


# The JAX twin's forced absorbed computation on a spread of vectors (each JAX vector is one XLA compile of
# seconds on a loaded CPU); the torch twin runs it on all of them, and ``jax_mla`` takes it by default on
# every one-token chunk of the cached vectors.
JAX_ABSORBED_CASES = ("mla_no_qlora", "mla_odd_widths", "mla_bf16", "mla_dsa")


def applies(impl: str, vec: Vector) -> bool:
    """``jax_mla_absorbed`` runs the vectors of :data:`JAX_ABSORBED_CASES` (and any vector not of this
    module's cases, e.g. a port check's); everything else (the blocked paths included) runs every vector."""
    if impl == "jax_mla_absorbed" and vec.name in MLA_CASES:
        return vec.name in JAX_ABSORBED_CASES
    return True


IMPLEMENTATIONS = {
    "jax_mla": run_jax,
    "torch_mla": run_torch,
    "jax_mla_absorbed": lambda vec: run_jax(vec, "absorbed"),
    "torch_mla_absorbed": lambda vec: run_torch(vec, "absorbed"),
    "jax_mla_blocked": lambda vec: run_jax(vec, "blocked"),
    "torch_mla_blocked": lambda vec: run_torch(vec, "blocked"),
}


KIND = Kind(
    name="mla",
    cases=MLA_CASES,
    build_inputs=build_inputs,
    expectations=expectations,
    magnitude=magnitude,
    implementations=IMPLEMENTATIONS,
    applies=applies,
)
