"""Kind ``"attention"``: the modern decoder ``Attention`` layer (``jax_attn.attention`` /
``torch_attn.attention``): every knob alone and the combinations of the decoder families of issue 14.

A case is a recipe: sizes, the ``AttentionConfig`` knobs and rotary settings (``attn_spec``), the number of
left pads in the last batch row, optional dropout and KV-cache chunks, and the dtype. :func:`build_inputs`
makes, deterministically: ``x (B, T, E)``, the cotangent ``dy (B, T, E)``, the parameters keyed like the
twins' state dicts (``q_proj.weight`` …, ``q_norm.weight``, ``sinks``), ``attention_mask (B, T)`` (int64
1/0), ``position_ids (B, T)`` (positions that skip the pads, ``cumsum(mask) - 1``) and, with dropout, the
injected keep-mask ``(B, N, T, T)``.

Expected values are the float64 oracle's full pass (``compare.oracle_attention``, rotary in float64):
output and gradients w.r.t. ``x`` and every parameter. A case with ``chunks`` feeds the sequence through a
KV cache and is expected to give the full pass. Quantities: ``out``, ``grad_x``, ``grad_<parameter>``.
Output rows of pad queries are zeros before ``o_proj`` (a fully masked row), and are compared like any
other (the oracle gives the same).

Sizes are small and distinct (B=2, T=6, E=20, N=4, K=2, H=6 ≠ E/N …) so that a swapped axis cannot pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from attn_spec.attention import AttentionConfig, state_dict_shapes
from attn_spec.rope import RopeConfig
from compare import oracle_attention
from compare.kinds import base
from compare.kinds.base import NP_DTYPES, Kind, Vector, chunks, oracle_passes, to_float64, to_torch


@dataclass(frozen=True)
class AttentionCase:
    """One named vector of the decoder attention layer."""

    name: str
    B: int = 2
    T: int = 6
    E: int = 20
    N: int = 4
    K: int | None = 2
    H: int | None = 6
    knobs: tuple = ()  # AttentionConfig keyword arguments as (name, value) pairs, rope excluded
    rope: tuple | None = (("rope_theta", 10000.0),)  # RopeConfig keyword pairs; None: no rotary
    pad: int = 0  # left pads in the last batch row
    dtype: str = "float32"
    chunks: tuple[int, ...] | None = None  # feed x through a KV cache in chunks of these sizes
    max_length: int | None = None
    seed: int = 0
    note: str = field(default="", compare=False)

    def __post_init__(self):
        if self.chunks is not None and (sum(self.chunks) != self.T or (self.max_length or 0) < self.T):
            raise ValueError(f"case {self.name}: chunks must sum to T and max_length must be >= T")

    def config(self) -> AttentionConfig:
        rope = None
        if self.rope is not None:
            rope = RopeConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in self.rope})
        return AttentionConfig(
            hidden_size=self.E,
            num_heads=self.N,
            num_kv_heads=self.K,
            head_dim=self.H,
            rope=rope,
            **dict(self.knobs),
        )

    def params(self) -> dict:
        """JSON-ready parameters (what the manifest records)."""
        out = {}
        for key in ("name", "B", "T", "E", "N", "K", "H", "pad", "dtype", "max_length", "seed", "note"):
            out[key] = getattr(self, key)
        out["knobs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.knobs}
        out["rope"] = (
            None if self.rope is None else {k: list(v) if isinstance(v, tuple) else v for k, v in self.rope}
        )
        out["chunks"] = None if self.chunks is None else list(self.chunks)
        return out


def param_names(case: AttentionCase) -> list[str]:
    return list(state_dict_shapes(case.config()))


def build_inputs(case: AttentionCase) -> dict[str, np.ndarray]:
    """Deterministic inputs for ``case`` in its dtype (mask and positions int64, dropout keep-mask bool)."""
    c = case.config()
    rng = np.random.default_rng(case.seed)
    np_dtype = NP_DTYPES[case.dtype]
    arrays = {"x": rng.standard_normal((case.B, case.T, case.E))}
    for name, shape in state_dict_shapes(c).items():
        if name.endswith("norm.weight"):  # around the norm's identity scale
            arrays[name] = (1.0 - c.qk_norm_offset) + 0.3 * rng.standard_normal(shape)
        elif name.endswith("norm.bias"):  # small shifts
            arrays[name] = 0.2 * rng.standard_normal(shape)
        elif name == "sinks":
            arrays[name] = rng.standard_normal(shape)
        else:  # scaled like torch's Linear init (std ~ 1/sqrt(in)): activations of order 1
            arrays[name] = rng.standard_normal(shape) / np.sqrt(shape[-1] if name.endswith("weight") else 4.0)
    arrays["dy"] = rng.standard_normal((case.B, case.T, case.E))
    arrays = {k: v.astype(np_dtype) for k, v in arrays.items()}
    mask = np.ones((case.B, case.T), np.int64)
    mask[-1, : case.pad] = 0
    arrays["attention_mask"] = mask
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    if c.rope is not None and c.rope.mrope_section is not None:  # three distinct rows (t, h, w)
        pos = np.stack([pos, pos // 2 + 1, (3 * pos) % 5]).astype(np.int64)
    arrays["position_ids"] = pos
    if c.dropout > 0:
        arrays["dropout_mask"] = rng.random((case.B, case.N, case.T, case.T)) >= c.dropout
    return arrays


def _oracle_args(case: AttentionCase, arrays: dict[str, np.ndarray]):
    x, dy = (arrays[n].astype(np.float64) for n in ("x", "dy"))
    params = {n: arrays[n].astype(np.float64) for n in param_names(case)}
    kwargs = {
        "attention_mask": arrays["attention_mask"],
        "position_ids": arrays["position_ids"],
        "dropout_mask": arrays.get("dropout_mask"),
    }
    return x, params, dy, kwargs


def expectations(case: AttentionCase, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Oracle outputs (float64) and, for low precision, the naive same-dtype baseline."""
    x, params, dy, kwargs = _oracle_args(case, inputs)
    c = case.config()
    result = {}
    for prefix, dtype in oracle_passes(case.dtype):
        bwd = oracle_attention.attention_backward(x, params, dy, c, **kwargs, dtype=dtype)
        result[f"{prefix}_out"] = bwd["out"]
        result[f"{prefix}_grad_x"] = bwd["x"]
        for name in param_names(case):
            result[f"{prefix}_grad_{name}"] = bwd[name]
    return result


def magnitude(case: AttentionCase, arrays: dict[str, np.ndarray], quantity: str) -> float:
    """Gradient term size for the tolerance policy (``compare.oracle_attention.gradient_magnitudes``), from
    the float64 oracle; 0 for the output."""
    if not quantity.startswith("grad_"):
        return 0.0
    x, params, dy, kwargs = _oracle_args(case, arrays)
    bwd = oracle_attention.attention_backward(x, params, dy, case.config(), **kwargs)
    return oracle_attention.gradient_magnitudes(x, params, dy, bwd)[quantity.removeprefix("grad_")]


# --- cases ----------------------------------------------------------------------------------------------


def _rope(**kw) -> tuple:
    return tuple(sorted({"rope_theta": 10000.0, **kw}.items()))


def _knobs(**kw) -> tuple:
    return tuple(sorted(kw.items()))


BIASES = {"q_bias": True, "k_bias": True, "v_bias": True, "o_bias": True}
LLAMA3 = _rope(
    rope_type="llama3",
    rope_theta=5e5,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=4,
)
YARN = _rope(
    rope_type="yarn", rope_theta=15e4, factor=8.0, original_max_position_embeddings=4, beta_fast=32.0
)
LONGROPE = _rope(
    rope_type="longrope",
    short_factor=(1.0, 1.25),
    long_factor=(1.5, 4.0),
    original_max_position_embeddings=4,
    max_position_embeddings=16,
    partial_rotary_factor=0.5,
)


def _attention_cases() -> list[AttentionCase]:
    a = AttentionCase
    cases = [
        # Each knob alone (default rope unless said otherwise).
        a("attn_plain_mha", K=None, H=None, rope=None, seed=300, note="no rotary, K == N, H = E / N = 5"),
        a("attn_gqa_rope", seed=301, note="H = 6 != E / N"),
        a("attn_mqa", K=1, seed=302),
        a("attn_rope_interleaved", rope=_rope(layout="interleaved"), seed=303),
        a("attn_rope_partial", H=8, rope=_rope(partial_rotary_factor=0.25), seed=304, note="R = 2 of H = 8"),
        a("attn_rope_linear", rope=_rope(rope_type="linear", factor=4.0), seed=305),
        a(
            "attn_rope_dynamic",
            rope=_rope(rope_type="dynamic", factor=2.0, max_position_embeddings=4),
            seed=306,
            note="T = 6 > 4: the rescaled base",
        ),
        a("attn_rope_llama3", rope=LLAMA3, seed=307),
        a("attn_rope_yarn", rope=YARN, seed=308, note="attention factor on cos/sin"),
        a("attn_rope_longrope", H=8, rope=LONGROPE, seed=309, note="T = 6 > 4: long factors"),
        a("attn_qkv_bias", knobs=_knobs(q_bias=True, k_bias=True, v_bias=True), seed=310),
        a("attn_o_bias", knobs=_knobs(o_bias=True), seed=311),
        a("attn_qknorm_head", knobs=_knobs(qk_norm="head", qk_norm_eps=1e-5), seed=312),
        a("attn_qknorm_full", knobs=_knobs(qk_norm="full"), seed=313),
        a(
            "attn_qknorm_offset",
            knobs=_knobs(qk_norm="head", qk_norm_offset=1.0),
            seed=314,
            note="Gemma 1 + w",
        ),
        a("attn_scale", knobs=_knobs(scale=0.7), seed=315),
        a("attn_query_pre_attn_scalar", knobs=_knobs(query_pre_attn_scalar=3.0), seed=316),
        a("attn_softcap", knobs=_knobs(softcap=1.5), seed=317),
        a("attn_window3", knobs=_knobs(sliding_window=3), seed=318, note="T = 6 > w"),
        a("attn_window1", knobs=_knobs(sliding_window=1), seed=319, note="each query sees only itself"),
        a("attn_sinks", knobs=_knobs(sinks=True), seed=320),
        a("attn_bidirectional", knobs=_knobs(causal=False), seed=321),
        a("attn_bidirectional_window", knobs=_knobs(causal=False, sliding_window=2), seed=322),
        a("attn_left_padding", pad=2, seed=323),
        a("attn_dropout_injected", knobs=_knobs(dropout=0.25), seed=324),
        a("attn_odd_sizes", B=3, T=5, E=14, N=3, K=1, H=4, seed=325),
        # The families of issue 14's table.
        a("fam_llama3", rope=LLAMA3, pad=2, seed=340),
        a("fam_mistral", knobs=_knobs(sliding_window=3), pad=1, seed=341),
        a(
            "fam_qwen2",
            knobs=_knobs(q_bias=True, k_bias=True, v_bias=True),
            rope=_rope(rope_theta=1e6),
            seed=342,
        ),
        a("fam_qwen3", knobs=_knobs(qk_norm="head", qk_norm_eps=1e-6), pad=2, seed=343),
        a(
            "fam_gemma2",
            H=8,
            knobs=_knobs(softcap=50.0 / 20, query_pre_attn_scalar=8.0, sliding_window=4),
            pad=1,
            seed=344,
            note="soft-cap 2.5 so that it bends these logits",
        ),
        a(
            "fam_gemma3_local",
            K=1,
            H=8,
            knobs=_knobs(qk_norm="head", qk_norm_offset=1.0, query_pre_attn_scalar=8.0, sliding_window=3),
            seed=345,
        ),
        a(
            "fam_gemma3_global",
            K=1,
            H=8,
            knobs=_knobs(qk_norm="head", qk_norm_offset=1.0, query_pre_attn_scalar=8.0),
            rope=_rope(rope_theta=1e6, rope_type="linear", factor=8.0),
            seed=346,
        ),
        a("fam_phi3", K=None, H=8, E=32, rope=LONGROPE, pad=1, seed=347),
        a("fam_olmo2", K=None, knobs=_knobs(qk_norm="full"), seed=348),
        a(
            "fam_gpt_neox",
            K=None,
            H=8,
            E=32,
            knobs=_knobs(**BIASES),
            rope=_rope(partial_rotary_factor=0.25),
            seed=349,
        ),
        a("fam_gpt_oss", knobs=_knobs(sinks=True, sliding_window=3, **BIASES), rope=YARN, pad=2, seed=350),
        # Through a KV cache: must equal the full pass.
        a(
            "fam_gpt_oss_cache_chunks",
            T=7,
            knobs=_knobs(sinks=True, sliding_window=3, **BIASES),
            rope=YARN,
            pad=2,
            chunks=(3, 1, 2, 1),
            max_length=9,
            seed=360,
            note="ring of 3 slots wraps",
        ),
        a(
            "fam_mistral_decode",
            knobs=_knobs(sliding_window=2),
            pad=1,
            chunks=(1,) * 6,
            max_length=6,
            seed=361,
        ),
        a("fam_qwen3_cache_chunks", knobs=_knobs(qk_norm="head"), chunks=(4, 2), max_length=8, seed=362),
        # Low precision.
        a("fam_llama3_bf16", rope=LLAMA3, pad=2, dtype="bfloat16", seed=370),
        a(
            "fam_gemma2_fp16",
            H=8,
            knobs=_knobs(softcap=2.5, query_pre_attn_scalar=8.0, sliding_window=4),
            dtype="float16",
            seed=371,
        ),
        a(
            "fam_gpt_oss_bf16",
            knobs=_knobs(sinks=True, sliding_window=3, **BIASES),
            rope=YARN,
            dtype="bfloat16",
            seed=372,
        ),
        a("attn_qknorm_full_fp16", knobs=_knobs(qk_norm="full"), pad=1, dtype="float16", seed=373),
        # The mechanisms of 2025-2026 families (issue 22).
        a(
            "attn_clip_qkv",
            knobs=_knobs(clip_qkv=0.6, **BIASES),
            seed=380,
            note="OLMo/DBRX: some values clip",
        ),
        a("attn_qknorm_unit", knobs=_knobs(qk_norm="unit", qk_norm_eps=1e-5), seed=381, note="Llama 4 L2"),
        a(
            "attn_output_gate",
            H=8,
            knobs=_knobs(output_gate=True, qk_norm="head", qk_norm_offset=1.0),
            rope=_rope(partial_rotary_factor=0.25),
            pad=2,
            seed=382,
            note="Qwen3-Next / Qwen3.5 full attention",
        ),
        a(
            "attn_chunked",
            T=7,
            knobs=_knobs(chunk_size=3),
            pad=2,
            seed=383,
            note="chunks from the first token",
        ),
        a(
            "attn_temperature",
            rope=None,
            knobs=_knobs(attn_temperature=(2.0, 0.5)),
            pad=1,
            seed=384,
            note="Llama 4 NoPE layer: scales 1, 1.35, 1.35, 1.55 …",
        ),
        a(
            "attn_alibi",
            K=None,
            rope=None,
            knobs=_knobs(alibi_slopes=(0.5, 0.25, 0.125, 0.0625)),
            pad=1,
            seed=385,
        ),
        a(
            "attn_mrope",
            H=8,
            rope=_rope(mrope_section=(1, 1, 2), rope_theta=1e6),
            pad=1,
            seed=386,
            note="Qwen2-VL sections over 3-row positions",
        ),
        a(
            "attn_mrope_interleaved",
            H=16,
            rope=_rope(mrope_section=(1, 1, 1), mrope_interleaved=True, partial_rotary_factor=0.5),
            seed=387,
            note="Qwen3.5: frequencies 1 and 2 from rows 1 and 2",
        ),
        a(
            "fam_llama4_chunked_cache",
            T=8,
            knobs=_knobs(chunk_size=3, qk_norm="unit"),
            rope=_rope(layout="interleaved", rope_theta=5e5),
            pad=1,
            chunks=(2, 3, 1, 2),
            max_length=9,
            seed=388,
            note="ring of 3 slots, chunk boundaries after the pad",
        ),
        a(
            "fam_llama4_nope_cache",
            T=7,
            rope=None,
            knobs=_knobs(attn_temperature=(2.0, 0.3)),
            pad=2,
            chunks=(4, 1, 2),
            max_length=8,
            seed=389,
        ),
        a(
            "fam_qwen35_gate_cache",
            H=8,
            knobs=_knobs(output_gate=True, qk_norm="head", qk_norm_offset=1.0),
            rope=_rope(mrope_section=(1, 1, 0), mrope_interleaved=True, partial_rotary_factor=0.5),
            pad=1,
            chunks=(3, 1, 2),
            max_length=6,
            seed=390,
        ),
        a(
            "fam_bloom_alibi_cache",
            K=None,
            rope=None,
            knobs=_knobs(alibi_slopes=(0.7, 0.3, 0.1, 0.05), **BIASES),
            pad=2,
            chunks=(3, 3),
            max_length=6,
            seed=391,
        ),
        a(
            "fam_qwen35_gate_bf16",
            H=8,
            knobs=_knobs(output_gate=True, qk_norm="head", qk_norm_offset=1.0),
            rope=_rope(partial_rotary_factor=0.25),
            dtype="bfloat16",
            seed=392,
        ),
        a("attn_chunked_bf16", T=7, knobs=_knobs(chunk_size=2, qk_norm="unit"), dtype="bfloat16", seed=393),
        a(
            "fam_gemma4_full",
            K=1,
            H=8,
            knobs=_knobs(qk_norm="head", scale=1.0, v_norm=True, k_eq_v=True),
            rope=_rope(rope_type="proportional", partial_rotary_factor=0.5, rope_theta=1e6),
            pad=2,
            seed=401,
            note="values = the key projection, v-norm, rope on 2 of 4 frequencies",
        ),
        a(
            "fam_gemma4_sliding_cache",
            H=8,
            knobs=_knobs(qk_norm="head", scale=1.0, v_norm=True, sliding_window=3),
            pad=1,
            chunks=(2, 3, 1),
            max_length=6,
            seed=402,
        ),
        a(
            "attn_qknorm_after_rope",
            knobs=_knobs(qk_norm="head", qk_norm_after_rope=True),
            pad=1,
            chunks=(4, 2),
            max_length=6,
            seed=403,
            note="Hunyuan: the rotated heads are normed, through a KV cache",
        ),
        # LayerNorm qk-norm (issue 22: Cohere, StableLM, Phi, Persimmon).
        a(
            "attn_qknorm_layer_head",
            H=8,
            knobs=_knobs(qk_norm="head", qk_norm_kind="layer", qk_norm_bias=True, qk_norm_eps=1e-5, **BIASES),
            rope=_rope(partial_rotary_factor=0.5),
            pad=1,
            seed=394,
            note="Phi / Persimmon: one LayerNorm (H,) with a bias shared by the heads, partial rotary",
        ),
        a(
            "attn_qknorm_layer_full",
            knobs=_knobs(qk_norm="full", qk_norm_kind="layer", qk_norm_bias=True),
            seed=395,
            note="LayerNorm over the projected N·H / K·H width",
        ),
        a(
            "fam_cohere_qknorm",
            knobs=_knobs(qk_norm="head", qk_norm_kind="layer", qk_norm_per_head=True, qk_norm_eps=1e-5),
            rope=_rope(layout="interleaved"),
            pad=2,
            seed=396,
            note="CohereLayerNorm: weights (N, H) / (K, H), no bias",
        ),
        a(
            "fam_stablelm_qknorm_cache",
            T=7,
            H=8,
            knobs=_knobs(qk_norm="head", qk_norm_kind="layer", qk_norm_per_head=True, qk_norm_bias=True),
            rope=_rope(partial_rotary_factor=0.25),
            pad=1,
            chunks=(3, 1, 2, 1),
            max_length=8,
            seed=397,
            note="one LayerNorm per head (StableLM; with biases), through a KV cache",
        ),
        a(
            "fam_persimmon_qknorm_bf16",
            H=8,
            knobs=_knobs(qk_norm="head", qk_norm_kind="layer", qk_norm_bias=True, **BIASES),
            rope=_rope(partial_rotary_factor=0.5),
            pad=1,
            dtype="bfloat16",
            seed=398,
        ),
    ]
    return cases


ATTENTION_CASES: dict[str, AttentionCase] = {case.name: case for case in _attention_cases()}


# --- runners --------------------------------------------------------------------------------------------


def run_jax(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``jax_attn.attention.Attention`` under ``jax.jit``: output and gradients w.r.t. x and parameters."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_attn.attention import Attention

    case, a = vec.case, vec.arrays
    c = case.config()
    dt = jnp.dtype(NP_DTYPES[case.dtype])
    module = base.jax_module(
        lambda: Attention(c, implementation=implementation, rngs=nnx.Rngs(0), param_dtype=dt),
        {n: a[n] for n in param_names(case)},
    )
    module.deterministic = c.dropout == 0
    drop = None if "dropout_mask" not in a else jnp.asarray(a["dropout_mask"])
    mask, pos = jnp.asarray(a["attention_mask"]), jnp.asarray(a["position_ids"])
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def forward(params, x):
        model = nnx.merge(graphdef, params, rest)
        if case.chunks is None:
            return model(x, mask, pos, dropout_mask=drop)
        cache, ys = model.init_cache(case.B, case.max_length), []
        for start, stop in chunks(case):
            y, cache = model(x[:, start:stop], mask[:, start:stop], pos[..., start:stop], cache=cache)
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


def run_torch(vec: Vector, implementation: str = "math") -> dict[str, np.ndarray]:
    """``torch_attn.attention.Attention`` (eager): output and gradients w.r.t. x and parameters."""
    import torch

    from torch_attn.attention import Attention

    case, a = vec.case, vec.arrays
    c = case.config()
    module = Attention(c, implementation=implementation, dtype=getattr(torch, case.dtype))
    module.to(base.TORCH_DEVICE)  # set by --device
    module.load_torch_state_dict({n: a[n] for n in param_names(case)})
    module.train(c.dropout > 0)
    drop = None if "dropout_mask" not in a else to_torch(a["dropout_mask"])
    mask, pos = to_torch(a["attention_mask"]), to_torch(a["position_ids"])
    x, dy = (to_torch(a[n], case.dtype) for n in ("x", "dy"))
    x.requires_grad_(True)
    if case.chunks is None:
        out = module(x, mask, pos, dropout_mask=drop)
    else:
        cache, ys = module.init_cache(case.B, case.max_length), []
        for start, stop in chunks(case):
            y, cache = module(x[:, start:stop], mask[:, start:stop], pos[..., start:stop], cache=cache)
            ys.append(y)
        out = torch.cat(ys, dim=1)
    out.backward(dy)
    result = {"out": to_float64(out), "grad_x": to_float64(x.grad)}
    for name, p in module.named_parameters():
        result[f"grad_{name}"] = to_float64(p.grad)
    return result


def applies(impl: str, vec: Vector) -> bool:
    """The fused paths run the vectors without soft-cap, sinks, ALiBi and dropout (XLA:CPU: no fp16, see the
    causal kind), the blocked paths those without dropout; the math paths run everything."""
    c = vec.case.config()
    if impl.endswith("_blocked"):
        return c.dropout == 0
    if impl.endswith("_fused"):
        if c.softcap is not None or c.sinks or c.dropout > 0 or c.alibi_slopes is not None:
            return False
        if impl == "jax_attn_fused" and vec.case.dtype == "float16":
            import jax

            return jax.default_backend() != "cpu"
    return True


IMPLEMENTATIONS = {
    "jax_attn": run_jax,
    "torch_attn": run_torch,
    "jax_attn_fused": lambda vec: run_jax(vec, "fused"),
    "torch_attn_fused": lambda vec: run_torch(vec, "fused"),
    "jax_attn_blocked": lambda vec: run_jax(vec, "blocked"),
    "torch_attn_blocked": lambda vec: run_torch(vec, "blocked"),
}


KIND = Kind(
    name="attention",
    cases=ATTENTION_CASES,
    build_inputs=build_inputs,
    expectations=expectations,
    magnitude=magnitude,
    implementations=IMPLEMENTATIONS,
    applies=applies,
)
