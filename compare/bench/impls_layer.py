"""Benchmark entries of a whole attention layer (family ``layer``), run by the ``layer`` preset: the twins'
default call, as ``from_hf`` builds it, against transformers' own attention module and a flax nnx equivalent,
forward and forward+backward (``jax.vjp`` / ``torch.autograd.grad`` w.r.t. the hidden states and every
parameter), time and peak memory.

The layer is named by ``Case.layer`` (a key of :data:`LAYERS`); ``Case.N``/``Case.H`` are the query heads and
head width, E = N · H the hidden size, the key/value heads N / ``groups``; causal, no padding, positions
``0..T-1``. Every row of a case gets the same input (:func:`hidden_states`, seeded NumPy) and the same
weights: a transformers module built under
``torch.manual_seed(SEED)`` (``nn.Linear``'s default initialisation; the qk-norm weights drawn from
U(0.5, 1.5) so that they matter) in the case's dtype, built the same way in both worker processes. The JAX
rows therefore import torch and transformers to build it (the JAX worker's resident memory includes them).

Rows:

- ``jax_attn.from_hf[jit]`` (the ratios' numerator): ``jax_attn.hf.from_hf(module)`` called as ``attn(x)``
  (``implementation=None``: the library's dispatch picks the path) under ``jax.jit``.
- ``torch_attn.from_hf[eager]``: ``torch_attn.hf.from_hf(module)`` called as ``attn(x)``, eager.
- ``transformers[sdpa]`` / ``transformers[eager]``: ``LlamaAttention`` / ``Qwen3Attention`` instantiated
  directly (no ``*ForCausalLM``) with ``config._attn_implementation`` set, called as a decoder layer calls
  it: ``position_embeddings`` from the family's rotary class and the mask the model would build, both
  computed once outside the timed step (a model computes them once per forward for all its layers; the
  other rows compute their rotary tables inside the call). sdpa: ``attention_mask=None``, so
  ``sdpa_attention_forward`` passes ``is_causal=True`` (and ``enable_gqa``) to
  ``F.scaled_dot_product_attention``, as the model does without padding; eager: the additive float
  ``(1, 1, T, T)`` causal mask (0 / dtype min) that ``create_causal_mask`` gives the eager path
  (``eager_attention_forward`` applies no causality on its own).
- ``flax.nnx.layer[jit]``: no flax layer has GQA + rope + qk-norm, so this is written here from flax parts:
  ``nnx.Linear`` projections (no bias), ``nnx.RMSNorm`` per head for qk-norm, rope (rotate-half, fp32
  angles as transformers computes them) written inline, and ``nnx.dot_product_attention(q, k, v,
  is_causal=True)`` on the K key/value heads (with no dropout and no module it calls
  ``jax.nn.dot_product_attention``, which takes GQA as it is), under ``jax.jit``.

Peak memory is the harness's (``compare.bench.worker.PeakMemory``): every row runs in the one worker process
of its framework, one row after another; on CPU the peak is the process's resident-set high-water mark
(VmHWM) reset when the row starts (``/proc/self/clear_refs``), so it covers building the row (weights,
ported copies, inputs, the JAX compile) and the warm-up and timed calls, on top of what the process already
holds (libraries, memory the allocator kept from earlier rows). Each row also records ``rss_before_bytes``,
the resident set once its imports are done and before it allocates anything: ``peak_mem_bytes -
rss_before_bytes`` is what the row itself added (both read from the kernel's resident-set counters, which
lag by a few pages). On GPU (``rss_before_bytes`` None), torch rows report
``torch.cuda.max_memory_allocated`` (reset per row) and JAX rows ``peak_bytes_in_use``, which is the
process lifetime's peak and cannot be reset: read those with ``xla_temp_bytes`` (XLA's memory analysis of
the compiled step), which ``jax_compile`` records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from compare.bench import flops
from compare.bench.impls import (
    SEED,
    Context,
    Impl,
    Prepared,
    jax_for_mode,
    torch_for_mode,
)
from compare.bench.presets import Case


@dataclass(frozen=True)
class Layer:
    """What a named layer adds to a case's (N, H): its transformers family and knobs."""

    model_type: str  # transformers' model_type: "llama" | "qwen3"
    groups: int  # query heads per key/value head
    rope_theta: float
    qk_norm: bool = False
    rms_norm_eps: float = 1e-6


LAYERS: dict[str, Layer] = {
    # Llama-3.2-1B-like: hidden 2048, 32 heads of 64, 8 key/value heads
    "llama": Layer("llama", groups=4, rope_theta=5e5),
    # Qwen3-1.7B-like: 16 heads of 128, 8 key/value heads, RMSNorm of each query and key head
    "qwen3": Layer("qwen3", groups=2, rope_theta=1e6, qk_norm=True),
}


def layer_of(case: Case) -> Layer:
    if case.layer not in LAYERS:
        raise ValueError(f"layer rows need Case.layer in {sorted(LAYERS)}, got {case.layer!r}")
    return LAYERS[case.layer]


def kv_heads(case: Case) -> int:
    return case.N // layer_of(case).groups


def layer_flops(case: Case) -> float:
    """Causal attention over the kept (i ≥ j) pairs plus the four projections (norms and rope not counted)."""
    kept = case.T * (case.T + 1) // 2
    attn = 4.0 * case.B * case.N * kept * case.H
    NH, KH = case.N * case.H, kv_heads(case) * case.H
    proj = 2.0 * case.B * case.T * case.E * (2 * NH + 2 * KH)
    return (attn + proj) * flops.mode_factor(case.mode)


def _applies(case: Case, device: str) -> str | None:
    if case.layer not in LAYERS:
        return f"layer rows: cases naming a layer ({', '.join(sorted(LAYERS))}) only"
    if not case.causal:
        return "layer rows: causal cases only"
    if case.N % layer_of(case).groups:
        return f"layer rows: {case.N} heads do not split into groups of {layer_of(case).groups}"
    return None


def hidden_states(case: Case):
    """The case's input ``x (B, T, E)`` as a NumPy float32 array, the same in both worker processes (every row
    of a case computes the same output; the forward+backward cotangents are the harness's, per framework)."""
    import numpy as np

    return np.random.default_rng(SEED + 7).standard_normal((case.B, case.T, case.E), dtype=np.float32)


def _torch_x(case: Case, ctx: Context):
    import torch

    return torch.from_numpy(hidden_states(case)).to(device=ctx.device, dtype=getattr(torch, case.dtype))


def _jax_x(case: Case):
    import jax.numpy as jnp

    return jnp.asarray(hidden_states(case)).astype(jnp.dtype(case.dtype))


def rss_bytes(ctx: Context) -> int | None:
    """This process's resident set now (Linux ``VmRSS``) on CPU, where the harness's peak is the resident
    set's; None on GPU (the peak there is device memory) or where unreadable."""
    if ctx.device != "cpu":
        return None
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------------------- transformers


def hf_config(case: Case, attn_implementation: str = "eager"):
    """The family's transformers config for this case (one layer; vocabulary and MLP sizes unused)."""
    spec = layer_of(case)
    common = dict(
        hidden_size=case.E,
        num_attention_heads=case.N,
        num_key_value_heads=kv_heads(case),
        head_dim=case.H,
        num_hidden_layers=1,
        intermediate_size=4 * case.E,
        vocab_size=128,
        max_position_embeddings=max(case.T, 4096),
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        attention_bias=False,
        attention_dropout=0.0,
        rms_norm_eps=spec.rms_norm_eps,
    )
    if spec.model_type == "llama":
        from transformers import LlamaConfig as cls
    else:
        from transformers import Qwen3Config as cls
    config = cls(**common)
    config._attn_implementation = attn_implementation
    return config


def _hf_classes(case: Case):
    """(attention class, rotary embedding class) of the case's family."""
    if layer_of(case).model_type == "llama":
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

        return LlamaAttention, LlamaRotaryEmbedding
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

    return Qwen3Attention, Qwen3RotaryEmbedding


def hf_module(case: Case, device: str = "cpu", attn_implementation: str = "eager"):
    """The case's transformers attention module, the same weights in every process: built in fp32 on the CPU
    under ``torch.manual_seed(SEED)``, then moved to ``device`` and the case's dtype; eval mode."""
    import torch

    config = hf_config(case, attn_implementation)
    cls, _ = _hf_classes(case)
    torch.manual_seed(SEED)
    module = cls(config, layer_idx=0)
    if layer_of(case).qk_norm:
        with torch.no_grad():
            module.q_norm.weight.uniform_(0.5, 1.5)
            module.k_norm.weight.uniform_(0.5, 1.5)
    return module.to(device=device, dtype=getattr(torch, case.dtype)).eval()


def hf_inputs(case: Case, module, x):
    """``(position_embeddings, attention_mask)`` as the model hands them to its layers: the rotary class's
    (cos, sin) for positions 0..T-1; the mask None for sdpa (``is_causal``), the additive float causal mask
    for eager."""
    import torch

    _, rotary_cls = _hf_classes(case)
    rotary = rotary_cls(module.config).to(x.device)
    position_ids = torch.arange(case.T, device=x.device)[None]
    with torch.no_grad():
        cos, sin = rotary(x, position_ids)
    mask = None
    if module.config._attn_implementation != "sdpa":
        mask = torch.full((case.T, case.T), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device)
        mask = mask.triu(1)[None, None]
    return (cos, sin), mask


def _build_hf(attn_implementation: str):
    def build(case: Case, ctx: Context) -> Prepared:
        _hf_classes(case)  # imports first: rss_before_bytes is what the row allocates
        before = rss_bytes(ctx)
        module = hf_module(case, ctx.device, attn_implementation)
        x = _torch_x(case, ctx)
        position_embeddings, mask = hf_inputs(case, module, x)

        def f(x_BTE):
            return module(x_BTE, position_embeddings=position_embeddings, attention_mask=mask)[0]

        where = "attention_mask=None, is_causal" if mask is None else "additive causal mask (1, 1, T, T)"
        prepared = torch_for_mode(
            f,
            (x,),
            case,
            ctx,
            f"eager transformers {type(module).__name__} attn_implementation={attn_implementation} ({where})",
            params=tuple(module.parameters()),
        )
        prepared.extra["rss_before_bytes"] = before
        return prepared

    return build


# ------------------------------------------------------------------------------------------- twins


def build_torch_twin(case: Case, ctx: Context) -> Prepared:
    import torch_attn.hf

    _hf_classes(case)
    before = rss_bytes(ctx)
    module = hf_module(case, ctx.device)
    attn = torch_attn.hf.from_hf(module)
    del module
    x = _torch_x(case, ctx)
    prepared = torch_for_mode(
        attn,
        (x,),
        case,
        ctx,
        "eager torch_attn.hf.from_hf(module), default call (implementation=None)",
        params=tuple(attn.parameters()),
    )
    prepared.extra["rss_before_bytes"] = before
    return prepared


def jax_twin(case: Case):
    """``jax_attn.hf.from_hf`` of the case's transformers module (built on the CPU, then dropped)."""
    import jax_attn.hf

    return jax_attn.hf.from_hf(hf_module(case))


def build_jax_twin(case: Case, ctx: Context) -> Prepared:
    from flax import nnx

    import jax_attn.hf  # noqa: F401

    _hf_classes(case)
    before = rss_bytes(ctx)
    graphdef, state = nnx.split(jax_twin(case))

    def f(state, x_BTE):
        return nnx.merge(graphdef, state)(x_BTE)

    x = _jax_x(case)
    prepared = jax_for_mode(
        f, (state, x), case, "XLA: jax_attn.hf.from_hf(module), default call (implementation=None)"
    )
    prepared.extra["rss_before_bytes"] = before
    return prepared


# -------------------------------------------------------------------------------------------- flax


def _flax_layer_class():
    import jax.numpy as jnp
    from flax import nnx

    class FlaxLayer(nnx.Module):
        """GQA attention with rope (and qk-norm) from flax nnx parts; weights set by :func:`flax_layer`."""

        def __init__(self, case: Case, spec: Layer, rngs: nnx.Rngs):
            dt = jnp.dtype(case.dtype)
            E, N, K, H = case.E, case.N, case.N // spec.groups, case.H
            self.N, self.K, self.H, self.theta = N, K, H, spec.rope_theta
            lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs)
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
                lin(E, N * H),
                lin(E, K * H),
                lin(E, K * H),
                lin(N * H, E),
            )
            norm = lambda: nnx.RMSNorm(H, epsilon=spec.rms_norm_eps, dtype=dt, param_dtype=dt, rngs=rngs)
            self.q_norm = norm() if spec.qk_norm else None
            self.k_norm = norm() if spec.qk_norm else None

        def rope(self, x_BTNH):
            T, H = x_BTNH.shape[1], self.H
            inv_freq = 1.0 / (self.theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
            freqs = jnp.arange(T, dtype=jnp.float32)[:, None] * inv_freq[None, :]
            emb = jnp.concatenate([freqs, freqs], axis=-1)
            cos, sin = (a.astype(x_BTNH.dtype)[None, :, None, :] for a in (jnp.cos(emb), jnp.sin(emb)))
            x1, x2 = x_BTNH[..., : H // 2], x_BTNH[..., H // 2 :]
            return x_BTNH * cos + jnp.concatenate([-x2, x1], axis=-1) * sin

        def __call__(self, x_BTE):
            B, T, _ = x_BTE.shape
            q = self.q_proj(x_BTE).reshape(B, T, self.N, self.H)
            k = self.k_proj(x_BTE).reshape(B, T, self.K, self.H)
            v = self.v_proj(x_BTE).reshape(B, T, self.K, self.H)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rope(q), self.rope(k)
            out = nnx.dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(out.reshape(B, T, self.N * self.H))

    return FlaxLayer


def flax_layer(case: Case):
    """The flax nnx equivalent holding the case's transformers module's weights (kernels = weights.T)."""
    import jax.numpy as jnp
    from flax import nnx

    module = hf_module(case)
    sd = {k: v.detach().float().numpy() for k, v in module.state_dict().items()}
    del module
    layer = nnx.eval_shape(lambda: _flax_layer_class()(case, layer_of(case), nnx.Rngs(SEED)))
    dt = jnp.dtype(case.dtype)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(layer, name).kernel.set_value(jnp.asarray(sd[f"{name}.weight"].T, dt))
    if layer.q_norm is not None:
        layer.q_norm.scale.set_value(jnp.asarray(sd["q_norm.weight"], dt))
        layer.k_norm.scale.set_value(jnp.asarray(sd["k_norm.weight"], dt))
    return layer


def build_flax(case: Case, ctx: Context) -> Prepared:
    from flax import nnx

    _hf_classes(case)
    before = rss_bytes(ctx)
    graphdef, state = nnx.split(flax_layer(case))

    def f(state, x_BTE):
        return nnx.merge(graphdef, state)(x_BTE)

    x = _jax_x(case)
    prepared = jax_for_mode(
        f,
        (state, x),
        case,
        "XLA: flax nnx.Linear/RMSNorm, inline rope, nnx.dot_product_attention(is_causal=True), kv heads",
    )
    prepared.extra["rss_before_bytes"] = before
    return prepared


# ------------------------------------------------------------------------------------------- table

LAYER_IMPLS: tuple[Impl, ...] = (
    Impl(
        "jax_attn.from_hf[jit]",
        "jax",
        "layer",
        build_jax_twin,
        "jax_attn.hf.from_hf(transformers module), the default call, under jax.jit",
        role="jax_attn",
        applies=_applies,
        flops=layer_flops,
    ),
    Impl(
        "torch_attn.from_hf[eager]",
        "torch",
        "layer",
        build_torch_twin,
        "torch_attn.hf.from_hf(transformers module), the default call, eager",
        role="torch_attn",
        applies=_applies,
        flops=layer_flops,
    ),
    Impl(
        "transformers[sdpa]",
        "torch",
        "layer",
        _build_hf("sdpa"),
        "transformers LlamaAttention / Qwen3Attention, attn_implementation='sdpa', eager",
        applies=_applies,
        flops=layer_flops,
    ),
    Impl(
        "transformers[eager]",
        "torch",
        "layer",
        _build_hf("eager"),
        "transformers LlamaAttention / Qwen3Attention, attn_implementation='eager'",
        applies=_applies,
        flops=layer_flops,
    ),
    Impl(
        "flax.nnx.layer[jit]",
        "jax",
        "layer",
        build_flax,
        "flax nnx parts (Linear, RMSNorm, dot_product_attention) with inline rope, under jax.jit",
        applies=_applies,
        flops=layer_flops,
    ),
)
