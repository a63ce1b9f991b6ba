"""Benchmark entries of the FlexAttention twins (family ``flex``), run by the ``flex`` preset.

Cases are causal, or a causal sliding window (``Case.window``), on ``(B, N, T, H)`` tensors. Every entry
builds its BlockMask (BLOCK_SIZE 128, torch's default) or dense mask outside the timed step:

- ``jax_attn.flex[jit]``: ``jax_attn.flex_attention`` with the BlockMask, under ``jax.jit`` (the ratios'
  numerator); forward and forward+backward (the custom VJP over the same blocks).
- ``torch_attn.flex[eager]``: the torch twin (eager loops over the blocks, autograd backward).
- ``torch.flex[eager]``: torch's own ``flex_attention`` without compile (CPU: a dense vmapped math path;
  no backward on CPU).
- ``torch.compile(flex)``: torch's ``flex_attention`` under ``torch.compile`` (forward; opt-in with
  ``--compile``; compile time reported separately, as the first call).
- ``jax_attn.blocked.sdpa+mask[jit]`` and ``torch.F.sdpa+mask``: our blocked SDPA and torch's SDPA with
  the equivalent dense ``(T, S)`` bool mask (what one writes without flex).

FLOPs credited: those of the kept entries only (causal half; a window of w about ``T·w``), so GFLOP/s
compare implementations on the work the mask leaves.
"""

from __future__ import annotations

import time

from compare.bench import flops
from compare.bench.impls import Context, Impl, Prepared, _jax_random, _qkv_torch, jax_for_mode, torch_for_mode
from compare.bench.presets import Case

BLOCK = 128


def kept_entries(case: Case) -> int:
    """Query/key pairs the mask keeps (causal, or causal window)."""
    T, w = case.T, case.window
    if not w:
        return T * (T + 1) // 2
    w = min(w, T)
    return T * w - w * (w - 1) // 2


def flex_flops(case: Case) -> float:
    return 4.0 * case.B * case.N * kept_entries(case) * case.H * flops.mode_factor(case.mode)


def _mask_mod(case: Case):
    from compare.kinds.flex import causal, generate_sliding_window

    return generate_sliding_window(case.window) if case.window else causal


def _qkv_jax(case: Case):
    return tuple(_jax_random((case.B, case.N, case.T, case.H), case.dtype, i) for i in range(3))


def build_jax_flex(case: Case, ctx: Context) -> Prepared:
    import jax_attn.flex as jf

    bm = jf.create_block_mask(_mask_mod(case), None, None, case.T, case.S, BLOCK_SIZE=BLOCK)

    def f(q_BNTH, k_BNSH, v_BNSH):
        return jf.flex_attention(q_BNTH, k_BNSH, v_BNSH, block_mask=bm)

    return jax_for_mode(f, _qkv_jax(case), case, f"XLA: jax_attn.flex_attention, BlockMask {BLOCK}x{BLOCK}")


def build_torch_twin_flex(case: Case, ctx: Context) -> Prepared:
    import torch_attn.flex as tf

    bm = tf.create_block_mask(
        _mask_mod(case), None, None, case.T, case.S, device=ctx.device, BLOCK_SIZE=BLOCK
    )

    def f(q_BNTH, k_BNSH, v_BNSH):
        return tf.flex_attention(q_BNTH, k_BNSH, v_BNSH, block_mask=bm)

    return torch_for_mode(
        f, _qkv_torch(case, ctx), case, ctx, f"eager: torch_attn.flex_attention, {BLOCK}-blocks"
    )


def _build_torch_flex(compiled: bool):
    def build(case: Case, ctx: Context) -> Prepared:
        import warnings

        import torch
        from torch.nn.attention import flex_attention as tflex

        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        bm = tflex.create_block_mask(
            _mask_mod(case), None, None, case.T, case.S, device=ctx.device, BLOCK_SIZE=BLOCK
        )
        fn = tflex.flex_attention
        if compiled:
            torch._dynamo.reset()
            fn = torch.compile(tflex.flex_attention, dynamic=False)

        def f(q_BNTH, k_BNSH, v_BNSH):
            return fn(q_BNTH, k_BNSH, v_BNSH, block_mask=bm)

        backend = (
            "torch.compile(flex_attention) inductor"
            if compiled
            else "torch flex_attention eager (dense math)"
        )
        prepared = torch_for_mode(f, _qkv_torch(case, ctx), case, ctx, backend)
        if compiled:
            t0 = time.perf_counter()
            prepared.sync(prepared.step())
            prepared.compile_s = time.perf_counter() - t0
            prepared.compile_note = "first call (compile + one execution)"
        return prepared

    return build


def _forward_only_on_cpu(case: Case, device: str) -> str | None:
    if case.mode != flops.FORWARD and device == "cpu":
        return "torch's flex_attention has no backward on CPU"
    return None


def _dense_keep(T: int, window: int | None):
    import numpy as np

    rows, cols = np.arange(T)[:, None], np.arange(T)[None, :]
    keep = cols <= rows
    return keep & (rows - cols < window) if window else keep


def build_jax_sdpa_mask(case: Case, ctx: Context) -> Prepared:
    import jax.numpy as jnp

    import jax_attn

    keep = jnp.asarray(_dense_keep(case.T, case.window))

    def f(q_BNTH, k_BNSH, v_BNSH):
        return jax_attn.scaled_dot_product_attention(q_BNTH, k_BNSH, v_BNSH, keep, implementation="blocked")

    return jax_for_mode(f, _qkv_jax(case), case, "XLA: jax_attn SDPA implementation=blocked, dense bool mask")


def build_torch_sdpa_mask(case: Case, ctx: Context) -> Prepared:
    import torch
    import torch.nn.functional as F

    keep = torch.from_numpy(_dense_keep(case.T, case.window)).to(ctx.device)

    def f(q_BNTH, k_BNSH, v_BNSH):
        return F.scaled_dot_product_attention(q_BNTH, k_BNSH, v_BNSH, keep)

    return torch_for_mode(
        f, _qkv_torch(case, ctx), case, ctx, "F.sdpa (torch picks the backend), dense bool mask"
    )


def _causal_only(case: Case, device: str) -> str | None:
    return None if case.causal else "flex rows: causal and sliding-window cases only"


FLEX_IMPLS: tuple[Impl, ...] = (
    Impl(
        "jax_attn.flex[jit]",
        "jax",
        "flex",
        build_jax_flex,
        "jax_attn.flex_attention with a BlockMask under jax.jit",
        role="jax_attn",
        applies=_causal_only,
        flops=flex_flops,
    ),
    Impl(
        "jax_attn.blocked.sdpa+mask[jit]",
        "jax",
        "flex",
        build_jax_sdpa_mask,
        "jax_attn SDPA implementation='blocked' with the dense bool mask under jax.jit",
        applies=_causal_only,
        flops=flex_flops,
    ),
    Impl(
        "torch_attn.flex[eager]",
        "torch",
        "flex",
        build_torch_twin_flex,
        "torch_attn.flex_attention with a BlockMask, eager",
        role="torch_attn",
        applies=_causal_only,  # (its custom backward keeps no block: no T limit for fwd+bwd)
        flops=flex_flops,
    ),
    Impl(
        "torch.flex[eager]",
        "torch",
        "flex",
        _build_torch_flex(compiled=False),
        "torch.nn.attention.flex_attention, eager",
        applies=lambda case, device: _forward_only_on_cpu(case, device) or _causal_only(case, device),
        flops=flex_flops,
    ),
    Impl(
        "torch.compile(flex)",
        "torch",
        "flex",
        _build_torch_flex(compiled=True),
        "torch.compile(flex_attention) (inductor; opt-in with --compile)",
        applies=lambda case, device: _forward_only_on_cpu(case, device) or _causal_only(case, device),
        opt_in="compile",
        flops=flex_flops,
    ),
    Impl(
        "torch.F.sdpa+mask",
        "torch",
        "flex",
        build_torch_sdpa_mask,
        "F.scaled_dot_product_attention with the dense bool mask",
        applies=_causal_only,
        flops=flex_flops,
    ),
)
