"""Benchmark entries of the multi-head latent attention twins (families ``mla`` and ``mla_decode``), run by
the ``mla`` preset, on a DeepSeek-V2-Lite-like layer at half width: ``Case.N`` heads, ``Case.H`` the
non-rotary query/key and value head width (D = V = H), rotary width R = H / 2, key/value latent
L = 4 H, no query latent, hidden E = N · H (N 16, H 64: E 1024, L 256, R 32).

- prefill (family ``mla``): ``y = attn(x)``, the plain computation (keys and values decompressed per
  head), forward and forward+backward (w.r.t. x and the parameters).
- decode (family ``mla_decode``, forward only): one new token per call against a compressed cache holding
  ``T - 1`` tokens (``T`` = the cache's ``max_length``); tokens/s = B / time. The default rows take the
  absorbed computation (``implementation=None``: one token with a cache); the ``.plain`` rows decompress the
  whole cache every step, for comparison.

Each decode row reports its cache: ``cache_bytes`` (ckv + k_rot), ``cache_bytes_per_token`` = (L + R) ×
dtype size, and for the same width ``gqa_cache_bytes_per_token`` (an ``Attention`` layer with N / 4
key/value heads of H: 2 · N/4 · H values) and ``mha_cache_bytes_per_token`` (2 · N · H): reported, not
asserted.

Rows: ``jax_attn.mla[jit]`` (the ratios' numerator) and ``torch_attn.mla[eager]`` (the twin).
"""

from __future__ import annotations

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

GROUPS = 4  # the GQA layer of the comparison: N / 4 key/value heads


def config(case: Case):
    from attn_spec.mla import MLAConfig
    from attn_spec.rope import RopeConfig

    return MLAConfig(
        hidden_size=case.E,
        num_heads=case.N,
        kv_lora_rank=4 * case.H,
        qk_nope_head_dim=case.H,
        qk_rope_head_dim=case.H // 2,
        v_head_dim=case.H,
        rope=RopeConfig(rope_theta=1e4, layout="interleaved"),
    )


def cache_bytes_per_token(case: Case) -> dict[str, int]:
    """Cached bytes per token: MLA's latent + rotary key, and a GQA / MHA layer's k + v of the same width."""
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[case.dtype]
    c = config(case)
    return {
        "cache_bytes_per_token": (c.L + c.R) * size,
        "gqa_cache_bytes_per_token": 2 * (case.N // GROUPS) * case.H * size,
        "mha_cache_bytes_per_token": 2 * case.N * case.H * size,
    }


def _projection_flops(case: Case, tokens: int) -> float:
    c = config(case)
    per_token = c.E * c.N * c.H + c.E * (c.L + c.R) + c.N * c.V * c.E
    return 2.0 * case.B * tokens * per_token


def prefill_flops(case: Case) -> float:
    c = config(case)
    kept = case.T * (case.T + 1) // 2
    decompress = 2.0 * case.B * case.T * c.L * c.N * (c.D + c.V)
    attn = 2.0 * case.B * c.N * kept * (c.H + c.V)
    return (attn + decompress + _projection_flops(case, case.T)) * flops.mode_factor(case.mode)


def decode_flops(case: Case) -> float:
    """The absorbed computation: the folded query, logits over L + R, the latent output, its up-projection."""
    c, S = config(case), case.T
    absorbed = c.N * (c.D * c.L + S * (c.L + c.R) + S * c.L + c.L * c.V)
    return 2.0 * case.B * absorbed + _projection_flops(case, 1)


def decode_plain_flops(case: Case) -> float:
    c, S = config(case), case.T
    plain = S * c.L * c.N * (c.D + c.V) + c.N * S * (c.H + c.V)
    return 2.0 * case.B * plain + _projection_flops(case, 1)


# ------------------------------------------------------------------------------------------------ JAX


def _jax_model(case: Case, implementation: str | None = None):
    from flax import nnx

    from jax_attn.mla import MultiHeadLatentAttention

    model = MultiHeadLatentAttention(config(case), implementation=implementation, rngs=nnx.Rngs(SEED))
    graphdef, state = nnx.split(model)
    return model, graphdef, _jax_cast_floats(state, case.dtype)


def build_jax_prefill(case: Case, ctx: Context) -> Prepared:
    from flax import nnx

    _, graphdef, state = _jax_model(case, "plain")

    def f(state, x_BTE):
        return nnx.merge(graphdef, state)(x_BTE)

    x = _jax_random((case.B, case.T, case.E), case.dtype, 7)
    return jax_for_mode(f, (state, x), case, "XLA: jax_attn MultiHeadLatentAttention plain")


def _filled_jax_cache(model, case: Case):
    """A compressed cache of max_length T holding T - 1 random tokens."""
    import jax.numpy as jnp

    cache = model.init_cache(case.B, case.T)
    n = case.T - 1
    return cache.replace(
        ckv=_jax_random(cache.ckv.shape, case.dtype, 11),
        k_rot=_jax_random(cache.k_rot.shape, case.dtype, 12),
        pos=jnp.where(jnp.arange(case.T) < n, jnp.arange(case.T), -1).astype(jnp.int32),
        valid=jnp.ones_like(cache.valid),
        index=jnp.asarray(n, jnp.int32),
    )


def _build_jax_decode(implementation: str | None):
    def build(case: Case, ctx: Context) -> Prepared:
        from flax import nnx

        from jax_attn.mla import cache_bytes_per_token as measured

        model, graphdef, state = _jax_model(case, implementation)
        cache = _filled_jax_cache(model, case)

        def f(state, x_B1E, cache):
            return nnx.merge(graphdef, state)(x_B1E, cache=cache)

        x = _jax_random((case.B, 1, case.E), case.dtype, 8)
        name = implementation or "absorbed (auto)"
        prepared = jax_compile(f, (state, x, cache), f"XLA: jax_attn MLA decode {name}, cache {case.T} slots")
        prepared.extra["cache_bytes"] = int(cache.ckv.nbytes + cache.k_rot.nbytes)
        prepared.extra.update(cache_bytes_per_token(case), measured_cache_bytes_per_token=measured(cache))
        return prepared

    return build


# ---------------------------------------------------------------------------------------------- torch


def _torch_model(case: Case, ctx: Context, implementation: str | None = None):
    import torch

    from torch_attn.mla import MultiHeadLatentAttention

    torch.manual_seed(SEED)
    model = MultiHeadLatentAttention(config(case), implementation=implementation)
    return model.to(device=ctx.device, dtype=getattr(torch, case.dtype)).eval()


def build_torch_prefill(case: Case, ctx: Context) -> Prepared:
    model = _torch_model(case, ctx, "plain")
    x = _torch_random((case.B, case.T, case.E), case, ctx, 7)
    params = tuple(model.parameters())
    return torch_for_mode(
        model, (x,), case, ctx, "eager torch_attn MultiHeadLatentAttention plain", params=params
    )


def _filled_torch_cache(model, case: Case, ctx: Context):
    import dataclasses

    import torch

    cache = model.init_cache(case.B, case.T)
    n = case.T - 1
    pos = torch.arange(case.T, device=ctx.device)
    return dataclasses.replace(
        cache,
        ckv=_torch_random(cache.ckv.shape, case, ctx, 11),
        k_rot=_torch_random(cache.k_rot.shape, case, ctx, 12),
        pos=torch.where(pos < n, pos, -1),
        valid=torch.ones_like(cache.valid),
        index=n,
    )


def _build_torch_decode(implementation: str | None):
    def build(case: Case, ctx: Context) -> Prepared:
        import torch

        from torch_attn.mla import cache_bytes_per_token as measured

        model = _torch_model(case, ctx, implementation)
        cache = _filled_torch_cache(model, case, ctx)
        x = _torch_random((case.B, 1, case.E), case, ctx, 8)

        def step():
            with torch.no_grad():
                return model(x, cache=cache)

        name = implementation or "absorbed (auto)"
        extra = {"cache_bytes": int(cache.ckv.nbytes + cache.k_rot.nbytes), **cache_bytes_per_token(case)}
        extra["measured_cache_bytes_per_token"] = measured(cache)
        return Prepared(
            step=step,
            sync=torch_sync(ctx.device),
            backend=f"eager torch_attn MLA decode {name}, cache {case.T} slots",
            extra=extra,
        )

    return build


PREFILL_MAX_T = 4096  # the plain prefill materialises (N, T, T) logits


def _prefill_only(case: Case, device: str) -> str | None:
    if not case.causal or case.window:
        return "MLA: causal cases without a window only"
    if case.T > PREFILL_MAX_T:
        return f"prefill rows: T > {PREFILL_MAX_T} is a decode-only case here"
    return None


def _decode_only(case: Case, device: str) -> str | None:
    if case.mode != flops.FORWARD:
        return "decode rows: forward only"
    return None if case.causal and not case.window else "MLA: causal cases without a window only"


MLA_IMPLS: tuple[Impl, ...] = (
    Impl(
        "jax_attn.mla[jit]",
        "jax",
        "mla",
        build_jax_prefill,
        "jax_attn MultiHeadLatentAttention (V2-Lite-like, half width) prefill, plain, under jax.jit",
        role="jax_attn",
        applies=_prefill_only,
        flops=prefill_flops,
    ),
    Impl(
        "torch_attn.mla[eager]",
        "torch",
        "mla",
        build_torch_prefill,
        "torch_attn MultiHeadLatentAttention prefill, plain, eager",
        role="torch_attn",
        applies=_prefill_only,
        flops=prefill_flops,
    ),
    Impl(
        "jax_attn.mla.decode[jit]",
        "jax",
        "mla_decode",
        _build_jax_decode(None),
        "jax_attn MLA, one token against a compressed cache of T - 1 tokens (absorbed), under jax.jit",
        role="jax_attn",
        applies=_decode_only,
        flops=decode_flops,
    ),
    Impl(
        "torch_attn.mla.decode[eager]",
        "torch",
        "mla_decode",
        _build_torch_decode(None),
        "torch_attn MLA, one token against a compressed cache of T - 1 tokens (absorbed), eager",
        role="torch_attn",
        applies=_decode_only,
        flops=decode_flops,
    ),
    Impl(
        "jax_attn.mla.decode.plain[jit]",
        "jax",
        "mla_decode",
        _build_jax_decode("plain"),
        "jax_attn MLA decode decompressing the whole cache each step (plain), under jax.jit",
        applies=_decode_only,
        flops=decode_plain_flops,
    ),
    Impl(
        "torch_attn.mla.decode.plain[eager]",
        "torch",
        "mla_decode",
        _build_torch_decode("plain"),
        "torch_attn MLA decode decompressing the whole cache each step (plain), eager",
        applies=_decode_only,
        flops=decode_plain_flops,
    ),
)
