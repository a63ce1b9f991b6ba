"""The implementation table: what is benchmarked, how each is built for a case, and where it applies.

Every entry builds, for one :class:`~compare.bench.presets.Case` on one device, a :class:`Prepared`: a
zero-argument ``step`` (one steady-state call, inputs already on the device), the ``sync`` that waits for
it, the backend that will run, and for JAX the compile time measured separately
(``jax.jit(f).lower(*args).compile()``; the loop then calls the compiled executable, so nothing can be
traced or compiled inside the timed region).

Modes: ``forward`` runs the function (torch under ``no_grad``, as inference does); ``forward+backward``
runs it and the vector-Jacobian product with a fixed random cotangent: ``jax.vjp`` in JAX,
``torch.autograd.grad`` in torch (w.r.t. the inputs, and the parameters for modules).

Families group what is comparable for the speed ratios: ``sdpa`` (attention on ``(B, N, T, H)``
tensors), ``mha`` / ``mha+weights`` (a ``MultiheadAttention`` module on ``(B, T, E)``, with and without
returning the weights), ``csa`` (causal self-attention module). The entry with ``role="jax_attn"`` is
the numerator of a family's ratios (the default call, ``implementation=None``, where the family has
one), ``role="torch_attn"`` its eager twin (the readable math path).

Entries whose module does not exist yet (``requires``) are recorded as ``skipped`` with the ImportError,
so they start measuring as soon as the module lands.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compare.bench import flops
from compare.bench.presets import Case
from compare.bench.timing import jax_sync, torch_sync

SEED = 0


@dataclass
class Context:
    """Where a worker runs: ``device`` is ``"cpu"`` or ``"cuda"``; flags from the command line."""

    device: str
    options: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """A ready-to-time implementation on one case."""

    step: Callable[[], Any]
    sync: Callable[[Any], None]
    backend: str
    compile_s: float | None = None
    compile_note: str = ""
    #: entered once around warm-up and timing (e.g. ``sdpa_kernel([backend])``)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Impl:
    """One row of the table."""

    name: str
    framework: str  # "jax" | "torch"
    family: str  # "sdpa" | "mha" | "mha+weights" | "csa"
    build: Callable[[Case, Context], Prepared]
    description: str
    role: str = ""  # "jax_attn": numerator of the ratios; "torch_attn": the eager twin
    applies: Callable[[Case, str], str | None] = lambda case, device: None
    requires: tuple[str, str] | None = None  # (module, attribute) that must import
    opt_in: str | None = None  # option that must be set in Context.options (e.g. "compile")
    flops: Callable[[Case], float] | None = None

    def credited_flops(self, case: Case) -> float:
        if self.flops is not None:
            return self.flops(case)
        if self.family == "sdpa":
            return flops.attention_flops(case.B, case.N, case.T, case.S, case.H, case.causal, case.mode)
        return flops.module_flops(case.B, case.N, case.T, case.H, case.causal, case.mode)


def availability(impl: Impl) -> str | None:
    """``None`` when the entry's module imports, else ``"not available: ImportError: ..."``."""
    if impl.requires is None:
        return None
    module, attr = impl.requires
    try:
        getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        return f"not available: ImportError: {e}"
    return None


def _impl_kwargs(cls, implementation: str | None) -> dict:
    """``{"implementation": ...}`` for a module constructor that takes one; nothing for the default call
    (``None``: the auto rows) or for a constructor without the argument (a plug-in module)."""
    import inspect

    if implementation is None:
        return {}
    try:
        params = inspect.signature(cls.__init__).parameters  # nnx modules hide it behind a metaclass
    except (TypeError, ValueError):
        return {}
    return {"implementation": implementation} if "implementation" in params else {}


# --------------------------------------------------------------------------------------------- JAX


def _jax_random(shape, dtype: str, salt: int):
    import jax
    import jax.numpy as jnp

    return jax.random.normal(jax.random.PRNGKey(SEED + salt), shape, dtype=jnp.dtype(dtype))


def _jax_cast_floats(tree, dtype: str):
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    return jax.tree_util.tree_map(
        lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def jax_compile(fn: Callable, args: tuple, backend: str) -> Prepared:
    """``jax.jit(fn)`` compiled ahead of time on ``args``; compile time is measured here, once."""
    import jax

    args = jax.block_until_ready(args)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    extra: dict = {}
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            extra = {
                "xla_temp_bytes": int(mem.temp_size_in_bytes),
                "xla_argument_bytes": int(mem.argument_size_in_bytes),
                "xla_output_bytes": int(mem.output_size_in_bytes),
            }
    except Exception:  # memory analysis is optional per backend
        pass
    return Prepared(
        step=lambda: compiled(*args),
        sync=jax_sync,
        backend=backend,
        compile_s=compile_s,
        compile_note="jax.jit(f).lower(*args).compile()",
        extra=extra,
    )


def jax_for_mode(f: Callable, primals: tuple, case: Case, backend: str) -> Prepared:
    """Compile ``f(*primals)`` for ``case.mode``; fwd+bwd is ``jax.vjp`` with a random cotangent."""
    import jax

    if case.mode == flops.FORWARD:
        return jax_compile(f, primals, backend)
    shapes = jax.eval_shape(f, *primals)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    cot = jax.tree_util.tree_unflatten(
        treedef, [_jax_random(s.shape, s.dtype.name, 100 + i) for i, s in enumerate(leaves)]
    )

    def forward_backward(primals, cotangent):
        _, vjp = jax.vjp(f, *primals)
        return vjp(cotangent)

    return jax_compile(forward_backward, (primals, cot), backend)


def _qkv_jax(case: Case, layout: str):
    shape = (case.B, case.N, case.T, case.H) if layout == "BNTH" else (case.B, case.T, case.N, case.H)
    return tuple(_jax_random(shape, case.dtype, i) for i in range(3))


def build_jax_attn_sdpa(case: Case, ctx: Context) -> Prepared:
    import jax_attn

    def f(q_BNTH, k_BNSH, v_BNSH):
        return jax_attn.scaled_dot_product_attention(
            q_BNTH, k_BNSH, v_BNSH, is_causal=case.causal, implementation="math"
        )

    return jax_for_mode(f, _qkv_jax(case, "BNTH"), case, "XLA: jax_attn math (einsum, masked softmax)")


def build_jax_attn_sdpa_auto(case: Case, ctx: Context) -> Prepared:
    import jax

    import jax_attn

    def f(q_BNTH, k_BNSH, v_BNSH):
        return jax_attn.scaled_dot_product_attention(q_BNTH, k_BNSH, v_BNSH, is_causal=case.causal)

    qkv = _qkv_jax(case, "BNTH")
    spec = jax.ShapeDtypeStruct(qkv[0].shape, qkv[0].dtype)
    choice = jax_attn.select_implementation(spec, spec, spec, is_causal=case.causal)
    return jax_for_mode(f, qkv, case, f"XLA: jax_attn default (auto → {choice.implementation})")


def _build_jax_attn_sdpa_impl(implementation: str) -> Callable[[Case, Context], Prepared]:
    def build(case: Case, ctx: Context) -> Prepared:
        import jax_attn
        from attn_spec.blocks import block_sizes
        from jax_attn.functional import fused_backend

        def f(q_BNTH, k_BNSH, v_BNSH):
            return jax_attn.scaled_dot_product_attention(
                q_BNTH, k_BNSH, v_BNSH, is_causal=case.causal, implementation=implementation
            )

        if implementation == "blocked":
            detail = "blocks {}x{}, one head at a time".format(*block_sizes(case.T, case.S, case.causal))
        else:
            detail = fused_backend(case.dtype)
        return jax_for_mode(
            f, _qkv_jax(case, "BNTH"), case, f"XLA: jax_attn implementation={implementation} ({detail})"
        )

    return build


def _build_jax_nn_dpa(implementation: str) -> Callable[[Case, Context], Prepared]:
    def build(case: Case, ctx: Context) -> Prepared:
        import jax

        def f(q_BTNH, k_BSNH, v_BSNH):
            return jax.nn.dot_product_attention(
                q_BTNH, k_BSNH, v_BSNH, is_causal=case.causal, implementation=implementation
            )

        return jax_for_mode(
            f, _qkv_jax(case, "BTNH"), case, f"jax.nn.dot_product_attention[{implementation}]"
        )

    return build


def _needs_cuda(case: Case, device: str) -> str | None:
    return None if device == "cuda" else f"needs a CUDA GPU (device is {device})"


def _jax_module(model, dtype: str):
    """Split an nnx module into (graphdef, state) with floating parameters cast to ``dtype``."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return graphdef, _jax_cast_floats(state, dtype)


def build_flax_mha(case: Case, ctx: Context) -> Prepared:
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.MultiHeadAttention(
        num_heads=case.N,
        in_features=case.E,
        qkv_features=case.E,
        out_features=case.E,
        decode=False,
        dtype=jnp.dtype(case.dtype),
        param_dtype=jnp.dtype(case.dtype),
        rngs=nnx.Rngs(SEED),
    )
    graphdef, state = _jax_module(model, case.dtype)

    def f(state, x_BTE):
        # flax masks are keep-masks of shape (B, 1, T, S); it computes the full matrix and masks it.
        mask = nnx.make_causal_mask(x_BTE[..., 0]) if case.causal else None
        return nnx.merge(graphdef, state)(x_BTE, mask=mask, deterministic=True)

    x = _jax_random((case.B, case.T, case.E), case.dtype, 7)
    return jax_for_mode(f, (state, x), case, "XLA: flax nnx.MultiHeadAttention (dot_product_attention)")


def _build_jax_attn_mha(
    need_weights: bool, implementation: str | None = "math"
) -> Callable[[Case, Context], Prepared]:
    def build(case: Case, ctx: Context) -> Prepared:
        import jax.numpy as jnp
        from flax import nnx

        from jax_attn import MultiheadAttention

        kw = _impl_kwargs(MultiheadAttention, implementation)
        model = MultiheadAttention(case.E, case.N, batch_first=True, rngs=nnx.Rngs(SEED), **kw)
        if hasattr(model, "eval"):
            model.eval()
        graphdef, state = _jax_module(model, case.dtype)
        # nn.MultiheadAttention polarity: True = masked out; is_causal is only a hint next to the mask.
        mask_TS = jnp.triu(jnp.ones((case.T, case.S), dtype=bool), 1) if case.causal else None

        def f(state, x_BTE):
            out, weights = nnx.merge(graphdef, state)(
                x_BTE, x_BTE, x_BTE, need_weights=need_weights, attn_mask=mask_TS, is_causal=case.causal
            )
            return (out, weights) if need_weights else out

        x = _jax_random((case.B, case.T, case.E), case.dtype, 7)
        return jax_for_mode(
            f,
            (state, x),
            case,
            f"XLA: jax_attn.MultiheadAttention need_weights={need_weights} "
            f"implementation={implementation or 'default (auto)'}",
        )

    return build


def _causal_only(case: Case, device: str) -> str | None:
    return None if case.causal else "causal self-attention: measured in causal cases only"


def _build_jax_attn_csa(implementation: str | None) -> Callable[[Case, Context], Prepared]:
    def build(case: Case, ctx: Context) -> Prepared:
        from flax import nnx

        from jax_attn import CausalSelfAttention

        kw = _impl_kwargs(CausalSelfAttention, implementation)
        model = CausalSelfAttention(case.E, case.N, rngs=nnx.Rngs(SEED), **kw)
        if hasattr(model, "eval"):
            model.eval()
        graphdef, state = _jax_module(model, case.dtype)
        impl = getattr(model, "implementation", "default") or "default (auto)"

        def f(state, x_BTE):
            return nnx.merge(graphdef, state)(x_BTE)

        x = _jax_random((case.B, case.T, case.E), case.dtype, 7)
        return jax_for_mode(f, (state, x), case, f"XLA: jax_attn.CausalSelfAttention implementation={impl}")

    return build


build_jax_attn_csa = _build_jax_attn_csa("math")


# ------------------------------------------------------------------------------------------- torch


def _torch_random(shape, case: Case, ctx: Context, salt: int, requires_grad: bool = False):
    import torch

    g = torch.Generator().manual_seed(SEED + salt)
    x = torch.randn(shape, generator=g, dtype=torch.float32).to(
        device=ctx.device, dtype=getattr(torch, case.dtype)
    )
    return x.requires_grad_(requires_grad)


def torch_for_mode(
    f: Callable, inputs: tuple, case: Case, ctx: Context, backend: str, params: tuple = (), **kw
) -> Prepared:
    """Eager torch step for ``case.mode``; fwd+bwd is ``torch.autograd.grad`` with a random cotangent."""
    import torch

    sync = torch_sync(ctx.device)
    if case.mode == flops.FORWARD:

        def step():
            with torch.no_grad():
                return f(*inputs)

        return Prepared(step=step, sync=sync, backend=backend, **kw)

    for x in inputs:
        x.requires_grad_(True)
    with torch.no_grad():
        probe = f(*inputs)
    probe = probe if isinstance(probe, tuple) else (probe,)
    cot = tuple(_torch_random(p.shape, case, ctx, 100 + i) for i, p in enumerate(probe))
    wrt = (*inputs, *params)

    def step():
        out = f(*inputs)
        return torch.autograd.grad(out if isinstance(out, tuple) else (out,), wrt, cot)

    return Prepared(step=step, sync=sync, backend=backend, **kw)


def _qkv_torch(case: Case, ctx: Context):
    return tuple(_torch_random((case.B, case.N, case.T, case.H), case, ctx, i) for i in range(3))


def _sdpa_choice(q, k, v, causal: bool) -> str:
    """The backend torch's dispatcher would pick for these tensors (what ``auto`` runs)."""
    import torch
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=causal)).name.lower()
    except Exception as e:  # private API: report rather than fail
        return f"unknown ({type(e).__name__})"


def build_torch_attn_sdpa(case: Case, ctx: Context) -> Prepared:
    import torch_attn

    def f(q_BNTH, k_BNSH, v_BNSH):
        return torch_attn.scaled_dot_product_attention(
            q_BNTH, k_BNSH, v_BNSH, is_causal=case.causal, implementation="math"
        )

    return torch_for_mode(
        f, _qkv_torch(case, ctx), case, ctx, "eager: torch_attn math (matmul, masked softmax)"
    )


def build_torch_attn_sdpa_auto(case: Case, ctx: Context) -> Prepared:
    import torch_attn

    def f(q_BNTH, k_BNSH, v_BNSH):
        return torch_attn.scaled_dot_product_attention(q_BNTH, k_BNSH, v_BNSH, is_causal=case.causal)

    qkv = _qkv_torch(case, ctx)
    choice = torch_attn.select_implementation(*qkv, is_causal=case.causal)
    return torch_for_mode(f, qkv, case, ctx, f"eager: torch_attn default (auto → {choice.implementation})")


def _build_torch_attn_sdpa_impl(implementation: str) -> Callable[[Case, Context], Prepared]:
    def build(case: Case, ctx: Context) -> Prepared:
        import torch_attn

        def f(q_BNTH, k_BNSH, v_BNSH):
            return torch_attn.scaled_dot_product_attention(
                q_BNTH, k_BNSH, v_BNSH, is_causal=case.causal, implementation=implementation
            )

        return torch_for_mode(
            f, _qkv_torch(case, ctx), case, ctx, f"eager: torch_attn implementation={implementation}"
        )

    return build


def build_torch_compile_sdpa(case: Case, ctx: Context) -> Prepared:
    import torch

    import torch_attn

    torch._dynamo.reset()  # one compile per case; no recompile-limit surprises across the sweep

    @torch.compile(dynamic=False)
    def f(q_BNTH, k_BNSH, v_BNSH):
        return torch_attn.scaled_dot_product_attention(q_BNTH, k_BNSH, v_BNSH, is_causal=case.causal)

    prepared = torch_for_mode(f, _qkv_torch(case, ctx), case, ctx, "torch.compile(torch_attn) inductor")
    # torch.compile compiles on the first call: time that call (and its backward) separately.
    t0 = time.perf_counter()
    prepared.sync(prepared.step())
    prepared.compile_s = time.perf_counter() - t0
    prepared.compile_note = "first call (compile + one execution)"
    return prepared


_TORCH_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "math": "MATH",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}


def _build_torch_sdpa(backend: str) -> Callable[[Case, Context], Prepared]:
    def build(case: Case, ctx: Context) -> Prepared:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qkv = _qkv_torch(case, ctx)

        def f(q_BNTH, k_BNSH, v_BNSH):
            return F.scaled_dot_product_attention(q_BNTH, k_BNSH, v_BNSH, is_causal=case.causal)

        if backend == "auto":
            chosen = _sdpa_choice(*qkv, case.causal)
            return torch_for_mode(f, qkv, case, ctx, f"F.sdpa auto → {chosen}")
        pinned = getattr(SDPBackend, _TORCH_BACKENDS[backend])
        # Pinned, so an unsupported input raises ("No available kernel") instead of silently falling back.
        with sdpa_kernel([pinned]):
            return torch_for_mode(
                f,
                qkv,
                case,
                ctx,
                f"F.sdpa pinned {pinned.name.lower()}",
                context=lambda: sdpa_kernel([pinned]),
            )

    return build


def _torch_module_mask(case: Case, ctx: Context):
    import torch

    if not case.causal:
        return None
    # nn.MultiheadAttention polarity: True = masked out; is_causal alone raises, it is a hint.
    return torch.ones(case.T, case.S, dtype=torch.bool, device=ctx.device).triu(1)


def _build_torch_mha(
    source: str, need_weights: bool, implementation: str | None = "math"
) -> Callable[[Case, Context], Prepared]:
    def build(case: Case, ctx: Context) -> Prepared:
        import torch

        if source == "torch.nn":
            cls = torch.nn.MultiheadAttention
        else:
            from torch_attn import MultiheadAttention as cls
        torch.manual_seed(SEED)
        kw = _impl_kwargs(cls, implementation) if source == "torch_attn" else {}
        model = cls(case.E, case.N, batch_first=True, **kw)
        model = model.to(device=ctx.device, dtype=getattr(torch, case.dtype))
        model.eval()
        mask = _torch_module_mask(case, ctx)
        x = _torch_random((case.B, case.T, case.E), case, ctx, 7)

        def f(x_BTE):
            out, weights = model(
                x_BTE, x_BTE, x_BTE, need_weights=need_weights, attn_mask=mask, is_causal=case.causal
            )
            return (out, weights) if need_weights else out

        probe = _torch_random((case.B, case.N, case.T, case.H), case, ctx, 0)
        route = (
            "math (weights materialised)"
            if need_weights
            else f"F.sdpa auto → {_sdpa_choice(probe, probe, probe, case.causal)}"
        )
        if source == "torch_attn" and not need_weights:
            route = f"implementation={implementation or 'default (auto)'}"
        if source == "torch.nn" and not need_weights and case.mode == flops.FORWARD:
            route += "; fast path eligible"
        params = tuple(p for p in model.parameters() if p.requires_grad)
        return torch_for_mode(f, (x,), case, ctx, f"eager {source} MHA: {route}", params=params)

    return build


def _build_torch_attn_csa(implementation: str | None) -> Callable[[Case, Context], Prepared]:
    def build(case: Case, ctx: Context) -> Prepared:
        import torch

        from torch_attn import CausalSelfAttention

        torch.manual_seed(SEED)
        model = CausalSelfAttention(case.E, case.N, **_impl_kwargs(CausalSelfAttention, implementation))
        model = model.to(device=ctx.device, dtype=getattr(torch, case.dtype))
        model.eval()
        impl = getattr(model, "implementation", "default") or "default (auto)"
        x = _torch_random((case.B, case.T, case.E), case, ctx, 7)
        params = tuple(p for p in model.parameters() if p.requires_grad)
        return torch_for_mode(
            model,
            (x,),
            case,
            ctx,
            f"eager torch_attn.CausalSelfAttention implementation={impl}",
            params=params,
        )

    return build


build_torch_attn_csa = _build_torch_attn_csa("math")


# ------------------------------------------------------------------------------------------ table

IMPLS: tuple[Impl, ...] = (
    # JAX, everything under jax.jit
    Impl(
        "jax_attn.sdpa[jit]",
        "jax",
        "sdpa",
        build_jax_attn_sdpa,
        "jax_attn SDPA under jax.jit",
    ),
    Impl(
        "jax_attn.blocked.sdpa[jit]",
        "jax",
        "sdpa",
        _build_jax_attn_sdpa_impl("blocked"),
        "jax_attn SDPA implementation='blocked' (online softmax, causal block skipping) under jax.jit",
    ),
    Impl(
        "jax_attn.fused.sdpa[jit]",
        "jax",
        "sdpa",
        _build_jax_attn_sdpa_impl("fused"),
        "jax_attn SDPA implementation='fused' (jax.nn.dot_product_attention) under jax.jit",
    ),
    # The default call (implementation=None): attn_spec.dispatch's rule picks math, blocked or fused. The
    # ".auto." infix keeps the explicit rows' names (and --impl substrings such as "jax_attn.sdpa[jit]")
    # from matching these.
    Impl(
        "jax_attn.auto.sdpa[jit]",
        "jax",
        "sdpa",
        build_jax_attn_sdpa_auto,
        "jax_attn SDPA, the default call (implementation=None: auto) under jax.jit",
        role="jax_attn",
    ),
    Impl("jax.nn.dpa[xla]", "jax", "sdpa", _build_jax_nn_dpa("xla"), "jax.nn.dot_product_attention, XLA"),
    Impl(
        "jax.nn.dpa[cudnn]",
        "jax",
        "sdpa",
        _build_jax_nn_dpa("cudnn"),
        "jax.nn.dot_product_attention, cuDNN fused kernel (GPU, bf16/fp16)",
        applies=_needs_cuda,
    ),
    Impl("flax.nnx.MHA[jit]", "jax", "mha", build_flax_mha, "flax nnx.MultiHeadAttention under jax.jit"),
    Impl(
        "jax_attn.MHA[jit]",
        "jax",
        "mha",
        _build_jax_attn_mha(need_weights=False),
        "jax_attn.MultiheadAttention(need_weights=False) under jax.jit",
        requires=("jax_attn", "MultiheadAttention"),
    ),
    Impl(
        "jax_attn.blocked.MHA[jit]",
        "jax",
        "mha",
        _build_jax_attn_mha(need_weights=False, implementation="blocked"),
        "jax_attn.MultiheadAttention(implementation='blocked', need_weights=False) under jax.jit",
        requires=("jax_attn", "MultiheadAttention"),
    ),
    Impl(
        "jax_attn.auto.MHA[jit]",
        "jax",
        "mha",
        _build_jax_attn_mha(need_weights=False, implementation=None),
        "jax_attn.MultiheadAttention(need_weights=False), the default implementation (auto), under jax.jit",
        role="jax_attn",
        requires=("jax_attn", "MultiheadAttention"),
    ),
    Impl(
        "jax_attn.MHA[jit,weights]",
        "jax",
        "mha+weights",
        _build_jax_attn_mha(need_weights=True),
        "jax_attn.MultiheadAttention(need_weights=True) under jax.jit",
        role="jax_attn",
        requires=("jax_attn", "MultiheadAttention"),
    ),
    Impl(
        "jax_attn.CSA[jit]",
        "jax",
        "csa",
        build_jax_attn_csa,
        "jax_attn.CausalSelfAttention under jax.jit",
        applies=_causal_only,
        requires=("jax_attn", "CausalSelfAttention"),
    ),
    Impl(
        "jax_attn.blocked.CSA[jit]",
        "jax",
        "csa",
        _build_jax_attn_csa("blocked"),
        "jax_attn.CausalSelfAttention(implementation='blocked') under jax.jit",
        applies=_causal_only,
        requires=("jax_attn", "CausalSelfAttention"),
    ),
    Impl(
        "jax_attn.auto.CSA[jit]",
        "jax",
        "csa",
        _build_jax_attn_csa(None),
        "jax_attn.CausalSelfAttention, the default implementation (auto), under jax.jit",
        role="jax_attn",
        applies=_causal_only,
        requires=("jax_attn", "CausalSelfAttention"),
    ),
    # PyTorch, eager unless said otherwise
    Impl(
        "torch_attn.sdpa[eager]",
        "torch",
        "sdpa",
        build_torch_attn_sdpa,
        "torch_attn SDPA, eager",
        role="torch_attn",
    ),
    Impl(
        "torch_attn.blocked.sdpa[eager]",
        "torch",
        "sdpa",
        _build_torch_attn_sdpa_impl("blocked"),
        "torch_attn SDPA implementation='blocked', eager",
    ),
    Impl(
        "torch_attn.fused.sdpa[eager]",
        "torch",
        "sdpa",
        _build_torch_attn_sdpa_impl("fused"),
        "torch_attn SDPA implementation='fused' (F.scaled_dot_product_attention), eager",
    ),
    Impl(
        "torch_attn.auto.sdpa[eager]",
        "torch",
        "sdpa",
        build_torch_attn_sdpa_auto,
        "torch_attn SDPA, the default call (implementation=None: auto), eager",
    ),
    Impl(
        "torch.compile(torch_attn.sdpa)",
        "torch",
        "sdpa",
        build_torch_compile_sdpa,
        "torch.compile of torch_attn SDPA (inductor; opt-in with --compile)",
        opt_in="compile",
    ),
    Impl("torch.F.sdpa[auto]", "torch", "sdpa", _build_torch_sdpa("auto"), "F.sdpa, torch picks the backend"),
    Impl(
        "torch.F.sdpa[flash]", "torch", "sdpa", _build_torch_sdpa("flash"), "F.sdpa pinned to flash attention"
    ),
    Impl(
        "torch.F.sdpa[efficient]",
        "torch",
        "sdpa",
        _build_torch_sdpa("efficient"),
        "F.sdpa pinned to memory-efficient attention (CUDA)",
        applies=_needs_cuda,
    ),
    Impl(
        "torch.F.sdpa[cudnn]",
        "torch",
        "sdpa",
        _build_torch_sdpa("cudnn"),
        "F.sdpa pinned to cuDNN attention (CUDA)",
        applies=_needs_cuda,
    ),
    Impl(
        "torch.F.sdpa[math]",
        "torch",
        "sdpa",
        _build_torch_sdpa("math"),
        "F.sdpa pinned to the math reference",
    ),
    Impl(
        "torch.nn.MHA[eager]",
        "torch",
        "mha",
        _build_torch_mha("torch.nn", need_weights=False),
        "torch.nn.MultiheadAttention(need_weights=False), eager",
    ),
    Impl(
        "torch.nn.MHA[eager,weights]",
        "torch",
        "mha+weights",
        _build_torch_mha("torch.nn", need_weights=True),
        "torch.nn.MultiheadAttention(need_weights=True), eager",
    ),
    Impl(
        "torch_attn.MHA[eager]",
        "torch",
        "mha",
        _build_torch_mha("torch_attn", need_weights=False),
        "torch_attn.MultiheadAttention(need_weights=False), eager",
        role="torch_attn",
        requires=("torch_attn", "MultiheadAttention"),
    ),
    Impl(
        "torch_attn.fused.MHA[eager]",
        "torch",
        "mha",
        _build_torch_mha("torch_attn", need_weights=False, implementation="fused"),
        "torch_attn.MultiheadAttention(implementation='fused', need_weights=False), eager",
        requires=("torch_attn", "MultiheadAttention"),
    ),
    Impl(
        "torch_attn.auto.MHA[eager]",
        "torch",
        "mha",
        _build_torch_mha("torch_attn", need_weights=False, implementation=None),
        "torch_attn.MultiheadAttention(need_weights=False), the default implementation (auto), eager",
        requires=("torch_attn", "MultiheadAttention"),
    ),
    Impl(
        "torch_attn.MHA[eager,weights]",
        "torch",
        "mha+weights",
        _build_torch_mha("torch_attn", need_weights=True),
        "torch_attn.MultiheadAttention(need_weights=True), eager",
        role="torch_attn",
        requires=("torch_attn", "MultiheadAttention"),
    ),
    Impl(
        "torch_attn.CSA[eager]",
        "torch",
        "csa",
        build_torch_attn_csa,
        "torch_attn.CausalSelfAttention, eager",
        role="torch_attn",
        applies=_causal_only,
        requires=("torch_attn", "CausalSelfAttention"),
    ),
    Impl(
        "torch_attn.fused.CSA[eager]",
        "torch",
        "csa",
        _build_torch_attn_csa("fused"),
        "torch_attn.CausalSelfAttention(implementation='fused'), eager",
        applies=_causal_only,
        requires=("torch_attn", "CausalSelfAttention"),
    ),
    Impl(
        "torch_attn.auto.CSA[eager]",
        "torch",
        "csa",
        _build_torch_attn_csa(None),
        "torch_attn.CausalSelfAttention, the default implementation (auto), eager",
        applies=_causal_only,
        requires=("torch_attn", "CausalSelfAttention"),
    ),
)

FRAMEWORKS = ("jax", "torch")


def by_name(impls: tuple[Impl, ...] = IMPLS) -> dict[str, Impl]:
    return {impl.name: impl for impl in impls}


# ----------------------------------------------------------------------------------------- ceiling


def build_gemm(framework: str, n: int, dtype: str, ctx: Context) -> Prepared:
    """The ceiling: ``(n, n) @ (n, n)`` in ``dtype`` on the worker's device, through the same loop."""
    case = Case(B=1, N=1, T=n, H=n, causal=False, dtype=dtype, mode=flops.FORWARD)
    if framework == "jax":
        a, b = _jax_random((n, n), dtype, 1), _jax_random((n, n), dtype, 2)
        return jax_compile(lambda a, b: a @ b, (a, b), "XLA dot")
    a, b = _torch_random((n, n), case, ctx, 1), _torch_random((n, n), case, ctx, 2)
    return torch_for_mode(lambda a, b: a @ b, (a, b), case, ctx, "torch.matmul")
