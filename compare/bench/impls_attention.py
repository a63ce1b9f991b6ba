"""Benchmark entries of the decoder ``Attention`` twins (families ``attention`` and ``attention_decode``),
run by the ``attention`` preset, on a Llama-like layer: hidden 1024, 16 query heads, 4 key/value heads,
head 64, default rope (``Case.N``/``Case.H`` are the query heads and head width; K = N / 4).

- prefill (family ``attention``): ``y = attn(x)`` for ``x (B, T, E)``, forward and forward+backward
  (w.r.t. x and the parameters); causal cases use ``implementation=None`` (math up to 2048² logits,
  blocked above), window cases (``Case.window``) the blocked path (BlockMask: key blocks outside the window
  skipped).
- decode (family ``attention_decode``, forward only): one new token per call against a cache holding
  ``T - 1`` tokens (``T`` = the cache's ``max_length``; a window layer's ring holds ``window`` slots);
  tokens/s = B / time.

Rows: ``jax_attn.attention[jit]`` (the ratios' numerator), ``torch_attn.attention[eager]`` (the twin) and
``torch.compile(torch_attn.attention)`` (opt-in with ``--compile``; compile time reported separately as
the first call).
"""

from __future__ import annotations

import time

from compare.bench import flops
from compare.bench.impls import (
    SEED,
    Context,
    Impl,
    Prepared,
    _jax_cast_floats,
    _jax_random,
    _torch_random,
    jax_compile,
    jax_for_mode,
    torch_for_mode,
    torch_sync,
)
from compare.bench.presets import Case

GROUPS = 4  # query heads per key/value head: 16 heads, 4 kv heads


def config(case: Case):
    from attn_spec.attention import AttentionConfig
    from attn_spec.rope import RopeConfig

    return AttentionConfig(
        hidden_size=case.E,
        num_heads=case.N,
        num_kv_heads=case.N // GROUPS,
        head_dim=case.H,
        rope=RopeConfig(rope_theta=5e5),
        sliding_window=case.window,
    )


def _projection_flops(case: Case, tokens: int) -> float:
    NH, KH = case.N * case.H, case.N // GROUPS * case.H
    return 2.0 * case.B * tokens * case.E * (2 * NH + 2 * KH)


def prefill_flops(case: Case) -> float:
    T, w = case.T, case.window
    kept = T * (T + 1) // 2 if not w else T * min(w, T) - min(w, T) * (min(w, T) - 1) // 2
    attn = 4.0 * case.B * case.N * kept * case.H
    return (attn + _projection_flops(case, T)) * flops.mode_factor(case.mode)


def decode_flops(case: Case) -> float:
    S = case.T if not case.window else min(case.window, case.T)
    return 4.0 * case.B * case.N * S * case.H + _projection_flops(case, 1)


def _implementation(case: Case) -> str | None:
    return "blocked" if case.window else None


# ------------------------------------------------------------------------------------------------ JAX


def _jax_model(case: Case):
    from flax import nnx

    from jax_attn.attention import Attention

    model = Attention(config(case), implementation=_implementation(case), rngs=nnx.Rngs(SEED))
    model.deterministic = True
    graphdef, state = nnx.split(model)
    return model, graphdef, _jax_cast_floats(state, case.dtype)


def build_jax_prefill(case: Case, ctx: Context) -> Prepared:
    from flax import nnx

    model, graphdef, state = _jax_model(case)

    def f(state, x_BTE):
        return nnx.merge(graphdef, state)(x_BTE)

    x = _jax_random((case.B, case.T, case.E), case.dtype, 7)
    return jax_for_mode(
        f, (state, x), case, f"XLA: jax_attn Attention implementation={_implementation(case)}"
    )


def _filled_jax_cache(model, case: Case):
    """A cache of max_length T holding T - 1 random tokens (the ring: its last slots)."""
    import jax.numpy as jnp

    cache = model.init_cache(case.B, case.T)
    C = cache.k.shape[2]
    n = case.T - 1
    seq = jnp.arange(n - C, n, dtype=jnp.int32)  # the last C tokens' sequence indices (-1: empty)
    return cache.replace(
        k=_jax_random(cache.k.shape, case.dtype, 11),
        v=_jax_random(cache.v.shape, case.dtype, 12),
        pos=jnp.full((C,), -1, jnp.int32).at[seq % C].set(seq),
        valid=jnp.ones_like(cache.valid),
        index=jnp.asarray(n, jnp.int32),
    )


def build_jax_decode(case: Case, ctx: Context) -> Prepared:
    from flax import nnx

    model, graphdef, state = _jax_model(case)
    cache = _filled_jax_cache(model, case)

    def f(state, x_B1E, cache):
        return nnx.merge(graphdef, state)(x_B1E, cache=cache)

    x = _jax_random((case.B, 1, case.E), case.dtype, 8)
    prepared = jax_compile(
        f, (state, x, cache), f"XLA: jax_attn Attention decode, cache slots {cache.k.shape[2]}"
    )
    prepared.extra["cache_bytes"] = int(cache.k.nbytes + cache.v.nbytes)
    return prepared


# ---------------------------------------------------------------------------------------------- torch


def _torch_model(case: Case, ctx: Context):
    import torch

    from torch_attn.attention import Attention

    torch.manual_seed(SEED)
    model = Attention(config(case), implementation=_implementation(case))
    return model.to(device=ctx.device, dtype=getattr(torch, case.dtype)).eval()


def _build_torch_prefill(compiled: bool):
    def build(case: Case, ctx: Context) -> Prepared:
        import torch

        model = _torch_model(case, ctx)
        f = model
        if compiled:
            torch._dynamo.reset()
            f = torch.compile(model, dynamic=False)
        x = _torch_random((case.B, case.T, case.E), case, ctx, 7)
        params = tuple(model.parameters())
        name = "torch.compile(torch_attn) inductor" if compiled else "eager torch_attn"
        prepared = torch_for_mode(
            f, (x,), case, ctx, f"{name} Attention implementation={_implementation(case)}", params=params
        )
        if compiled:
            t0 = time.perf_counter()
            prepared.sync(prepared.step())
            prepared.compile_s = time.perf_counter() - t0
            prepared.compile_note = "first call (compile + one execution)"
        return prepared

    return build


def _filled_torch_cache(model, case: Case, ctx: Context):
    import dataclasses

    import torch

    cache = model.init_cache(case.B, case.T)
    C = cache.k.shape[2]
    n = case.T - 1
    seq = torch.arange(n - C, n, device=ctx.device)
    pos = torch.full((C,), -1, dtype=torch.int64, device=ctx.device).index_copy(0, seq % C, seq)
    return dataclasses.replace(
        cache,
        k=_torch_random(cache.k.shape, case, ctx, 11),
        v=_torch_random(cache.v.shape, case, ctx, 12),
        pos=pos,
        valid=torch.ones_like(cache.valid),
        index=n,
    )


def _build_torch_decode(compiled: bool):
    def build(case: Case, ctx: Context) -> Prepared:
        import torch

        model = _torch_model(case, ctx)
        cache = _filled_torch_cache(model, case, ctx)
        x = _torch_random((case.B, 1, case.E), case, ctx, 8)
        f = model
        if compiled:
            torch._dynamo.reset()
            f = torch.compile(model, dynamic=False)

        def step():
            with torch.no_grad():
                return f(x, cache=cache)

        name = "torch.compile(torch_attn) inductor" if compiled else "eager torch_attn"
        prepared = Prepared(
            step=step,
            sync=torch_sync(ctx.device),
            backend=f"{name} Attention decode, cache slots {cache.k.shape[2]}",
            extra={"cache_bytes": int(cache.k.nbytes + cache.v.nbytes)},
        )
        if compiled:
            t0 = time.perf_counter()
            prepared.sync(prepared.step())
            prepared.compile_s = time.perf_counter() - t0
            prepared.compile_note = "first call (compile + one execution)"
        return prepared

    return build


PREFILL_MAX_DENSE_T = 4096  # causal prefill without a window materialises (N, T, T) logits on the math path


def _prefill_only(case: Case, device: str) -> str | None:
    if not case.causal:
        return "decoder attention: causal cases only"
    if not case.window and case.T > PREFILL_MAX_DENSE_T:
        return f"prefill rows: causal T > {PREFILL_MAX_DENSE_T} without a window is a decode-only case here"
    return None


def _decode_only(case: Case, device: str) -> str | None:
    if case.mode != flops.FORWARD:
        return "decode rows: forward only"
    return None if case.causal else "decoder attention: causal cases only"


ATTENTION_IMPLS: tuple[Impl, ...] = (
    Impl(
        "jax_attn.attention[jit]",
        "jax",
        "attention",
        build_jax_prefill,
        "jax_attn Attention (Llama-like, GQA 16/4, rope) prefill under jax.jit",
        role="jax_attn",
        applies=_prefill_only,
        flops=prefill_flops,
    ),
    Impl(
        "torch_attn.attention[eager]",
        "torch",
        "attention",
        _build_torch_prefill(False),
        "torch_attn Attention prefill, eager",
        role="torch_attn",
        applies=_prefill_only,
        flops=prefill_flops,
    ),
    Impl(
        "torch.compile(torch_attn.attention)",
        "torch",
        "attention",
        _build_torch_prefill(True),
        "torch.compile of the torch_attn Attention prefill",
        applies=_prefill_only,
        opt_in="compile",
        flops=prefill_flops,
    ),
    Impl(
        "jax_attn.attention.decode[jit]",
        "jax",
        "attention_decode",
        build_jax_decode,
        "jax_attn Attention, one token against a cache of T - 1 tokens, under jax.jit",
        role="jax_attn",
        applies=_decode_only,
        flops=decode_flops,
    ),
    Impl(
        "torch_attn.attention.decode[eager]",
        "torch",
        "attention_decode",
        _build_torch_decode(False),
        "torch_attn Attention, one token against a cache of T - 1 tokens, eager",
        role="torch_attn",
        applies=_decode_only,
        flops=decode_flops,
    ),
    Impl(
        "torch.compile(torch_attn.attention.decode)",
        "torch",
        "attention_decode",
        _build_torch_decode(True),
        "torch.compile of the torch_attn Attention decode step",
        applies=_decode_only,
        opt_in="compile",
        flops=decode_flops,
    ),
)
