"""Benchmark cases and the sweeps (presets) that list them.

Dimension key: B batch, N heads, T sequence length (self-attention, so S = T), H head width,
E = N·H model width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from compare.bench.flops import FORWARD, FORWARD_BACKWARD, MODES
from compare.bench.timing import TimingSettings


@dataclass(frozen=True)
class Case:
    """One shape, dtype, causality and mode; every implementation is measured on the same cases."""

    B: int
    N: int
    T: int
    H: int
    causal: bool
    dtype: str  # "float32" | "bfloat16" | "float16"
    mode: str  # FORWARD | FORWARD_BACKWARD
    window: int | None = None  # causal sliding window of this many keys (flex preset); None: none
    #: a named layer whose other settings (key/value heads, qk-norm, rope) the rows take from their table
    #: (layer preset: ``compare.bench.impls_layer.LAYERS``); None: none. Left out of ``as_dict`` when None.
    layer: str | None = None

    @property
    def S(self) -> int:
        return self.T

    @property
    def E(self) -> int:
        return self.N * self.H

    def key(self) -> tuple:
        """Identity of the case in reports (ratios pair rows with equal keys)."""
        key = (self.mode, self.causal, self.dtype, self.B, self.N, self.T, self.H, self.window or 0)
        return key + (self.layer,) if self.layer else key

    def label(self) -> str:
        c = f"window {self.window}" if self.window else "causal" if self.causal else "full"
        name = f"{self.layer} " if self.layer else ""
        return f"{self.mode} {name}{c} B{self.B} N{self.N} T{self.T} H{self.H} {self.dtype}"

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["layer"] is None:  # the other presets' jobs and records stay as they were
            del d["layer"]
        return d


@dataclass(frozen=True)
class Preset:
    """A sweep: cases, which implementations run up to which T, the ceiling GEMM and the timing budget.

    ``max_T`` maps an implementation family (``"sdpa"``, ``"mha"``, ``"csa"``) or an implementation name to
    the largest T it runs at; larger cases get a ``skipped`` row saying so (materialising the T×T matrix
    eagerly at 32k would only measure the allocator).
    """

    name: str
    device: str
    cases: tuple[Case, ...]
    gemm_n: int  # ceiling: (gemm_n × gemm_n) @ (gemm_n × gemm_n) in each case dtype
    timing: TimingSettings
    max_T: dict = field(default_factory=dict)
    #: the (B, N, H) of the sequence-length sweep the plots draw; other cases appear only in the tables
    plot_config: tuple[int | None, int, int] = (1, 8, 64)
    #: implementations this preset leaves out entirely (listed under "not run")
    exclude: frozenset = frozenset()
    #: seconds for the whole sweep (start-up included), shared between the workers by job count; jobs
    #: that would start after a worker's share are recorded as skipped. None: no limit.
    wall_budget_s: float | None = None
    #: only implementations of these families run (None: all)
    families: frozenset | None = None
    #: ``module:ATTR`` tables of implementations the preset needs on top of ``impls.IMPLS``
    extra_impls: tuple[str, ...] = ()

    def limit_for(self, impl_name: str, family: str) -> int | None:
        return self.max_T.get(impl_name, self.max_T.get(family))


def _sweep(Ts, B, N, H, dtypes, causals=(False, True), modes=MODES) -> list[Case]:
    return [
        Case(B=B(T) if callable(B) else B, N=N, T=T, H=H, causal=c, dtype=dt, mode=m)
        for dt in dtypes
        for m in modes
        for c in causals
        for T in Ts
    ]


def quick(device: str) -> Preset:
    """Under 3 minutes on a 2-core CPU, start-up and compiles included (``python -m compare``)."""
    if device == "cpu":
        cases = _sweep([128, 512, 1024], B=1, N=8, H=64, dtypes=["float32"])
        return Preset(
            name="quick",
            device=device,
            cases=tuple(cases),
            gemm_n=1024,
            # fewer timed runs than the other presets (>= 10 or 0.15 s per row): the main job's quick look;
            # `--preset full` for steadier numbers
            timing=TimingSettings(
                warmup_runs=1, warmup_s=0.02, min_runs=10, min_time_s=0.0, budget_s=0.15, floor_runs=3
            ),
            # modules and the math backend only on the smaller shapes, weights-returning MHA only at 128
            max_T={"mha": 512, "mha+weights": 128, "csa": 512, "torch.F.sdpa[math]": 512},
            # a guarantee on top of the sizing: jobs past it are recorded as skipped, largest T last
            wall_budget_s=160.0,
            plot_config=(1, 8, 64),
            # on CPU "auto" picks the flash kernel, which is measured pinned already
            exclude=frozenset({"torch.F.sdpa[auto]"}),
        )
    cases = _sweep([512, 1024, 2048, 4096], B=lambda T: max(1, 8192 // T), N=16, H=64, dtypes=["bfloat16"])
    return Preset(
        name="quick",
        device=device,
        cases=tuple(cases),
        gemm_n=4096,
        timing=TimingSettings(warmup_runs=3, warmup_s=0.05, min_runs=30, budget_s=0.5),
        max_T={"mha+weights": 2048, "torch.F.sdpa[math]": 2048},
        plot_config=(None, 16, 64),
    )


def full(device: str) -> Preset:
    """CPU: fp32, T 128 → 8192 plus batch / heads / head-width variations at T = 1024."""
    if device != "cpu":
        return gpu(device)
    cases = _sweep([128, 256, 512, 1024, 2048, 4096, 8192], B=1, N=8, H=64, dtypes=["float32"])
    for B, N, H in [(4, 8, 64), (1, 16, 64), (1, 8, 128)]:
        cases += _sweep([1024], B=B, N=N, H=H, dtypes=["float32"])
    return Preset(
        name="full",
        device=device,
        cases=tuple(cases),
        gemm_n=2048,
        timing=TimingSettings(warmup_runs=2, warmup_s=0.1, min_runs=30, min_time_s=0.5, budget_s=3.0),
        max_T={"mha+weights": 2048, "torch.F.sdpa[math]": 4096, "csa": 4096, "mha": 4096},
        plot_config=(1, 8, 64),
    )


def gpu(device: str) -> Preset:
    """GPU: bf16 and fp16, T 512 → 32k at 16k tokens per batch (B = 16384 / T), H 64 and 128, E = 2048."""
    cases: list[Case] = []
    for H in (64, 128):
        cases += _sweep(
            [512, 1024, 2048, 4096, 8192, 16384, 32768],
            B=lambda T: max(1, 16384 // T),
            N=2048 // H,
            H=H,
            dtypes=["bfloat16", "float16"],
        )
    return Preset(
        name="gpu",
        device=device,
        cases=tuple(cases),
        gemm_n=8192,
        timing=TimingSettings(warmup_runs=5, warmup_s=0.1, min_runs=30, min_time_s=0.2, budget_s=2.0),
        max_T={"mha+weights": 8192, "torch.F.sdpa[math]": 16384, "mha": 16384, "csa": 16384},
        plot_config=(None, 16, 128),
    )


def smoke(device: str) -> Preset:
    """Seconds of measuring on tiny shapes: exercises the harness end to end; the numbers mean nothing."""
    dtype = "float32" if device == "cpu" else "bfloat16"
    return Preset(
        name="smoke",
        device=device,
        cases=tuple(_sweep([16, 32], B=1, N=2, H=8, dtypes=[dtype])),
        gemm_n=64,
        timing=TimingSettings(warmup_runs=1, warmup_s=0.0, min_runs=3, budget_s=0.01, floor_runs=3),
        max_T={"mha+weights": 16},
        plot_config=(1, 2, 8),
        exclude=frozenset({"torch.F.sdpa[auto]"}),
    )


def perf(device: str) -> Preset:
    """The issue's target shapes (E = 512, 8 heads of 64): B8 T512 and B2 T2048, fp32, full and causal,
    forward and forward+backward. Run with ``--impl`` to pick the rows (see ``docs/performance.md``)."""
    dtype = "float32" if device == "cpu" else "bfloat16"
    cases = _sweep([512], B=8, N=8, H=64, dtypes=[dtype]) + _sweep([2048], B=2, N=8, H=64, dtypes=[dtype])
    return Preset(
        name="perf",
        device=device,
        cases=tuple(cases),
        gemm_n=2048,
        timing=TimingSettings(warmup_runs=2, warmup_s=0.1, min_runs=10, min_time_s=0.5, budget_s=2.0),
        max_T={"mha+weights": 2048, "torch.F.sdpa[math]": 2048},
        plot_config=(None, 8, 64),
        exclude=frozenset({"torch.F.sdpa[auto]"}),
    )


def flex(device: str) -> Preset:
    """FlexAttention (``compare.bench.impls_flex``): causal and sliding window 512, T 1024 → 16384
    (window also 32768 for the peak-RSS target), B1, 8 heads of 64, fp32, forward and forward+backward."""
    dtype = "float32" if device == "cpu" else "bfloat16"
    Ts = [1024, 2048, 4096, 8192, 16384]
    cases = [
        Case(B=1, N=8, T=T, H=64, causal=True, dtype=dtype, mode=m, window=w)
        for m in MODES
        for w in (None, 512)
        for T in (Ts + [32768] if w else Ts)
    ]
    return Preset(
        name="flex",
        device=device,
        cases=tuple(cases),
        gemm_n=2048,
        timing=TimingSettings(
            warmup_runs=1, warmup_s=0.0, min_runs=5, min_time_s=0.0, budget_s=2.0, floor_runs=2
        ),
        # torch's eager flex materialises the (B, N, T, S) scores; the dense-mask SDPA rows compute all of T×S
        max_T={
            "flex": 16384,
            "jax_attn.flex[jit]": 32768,
            "torch.flex[eager]": 8192,
            "torch.F.sdpa+mask": 8192,
            "jax_attn.blocked.sdpa+mask[jit]": 8192,
        },
        plot_config=(1, 8, 64),
        families=frozenset({"flex"}),
        extra_impls=("compare.bench.impls_flex:FLEX_IMPLS",),
    )


def attention(device: str) -> Preset:
    """The decoder ``Attention`` twins (``compare.bench.impls_attention``), a Llama-like layer (hidden
    1024, 16 heads, 4 kv heads, head 64), B1: causal prefill T 2048 forward and forward+backward; window
    512 prefill T 4096 and 16384 (forward); per-token decode against caches of 2048 and 8192 tokens and a
    window-512 ring."""
    dtype = "float32" if device == "cpu" else "bfloat16"
    c = lambda T, mode, window=None: Case(
        B=1, N=16, T=T, H=64, causal=True, dtype=dtype, mode=mode, window=window
    )
    cases = [c(2048, m) for m in MODES] + [c(8192, FORWARD)] + [c(T, FORWARD, 512) for T in (4096, 16384)]
    return Preset(
        name="attention",
        device=device,
        cases=tuple(cases),
        gemm_n=1024,
        timing=TimingSettings(
            warmup_runs=1, warmup_s=0.0, min_runs=5, min_time_s=0.0, budget_s=2.0, floor_runs=2
        ),
        plot_config=(1, 16, 64),
        families=frozenset({"attention", "attention_decode"}),
        extra_impls=("compare.bench.impls_attention:ATTENTION_IMPLS",),
    )


def mla(device: str) -> Preset:
    """The multi-head latent attention twins (``compare.bench.impls_mla``), a DeepSeek-V2-Lite-like layer at
    half width (16 heads of 64, latent 256, rotary 32, hidden 1024), B1: prefill T 2048 forward and
    forward+backward; per-token decode (absorbed, and plain for comparison) against compressed caches of
    2048 and 8192 tokens, with the cache bytes per token against a GQA layer of the same width."""
    dtype = "float32" if device == "cpu" else "bfloat16"
    c = lambda T, mode: Case(B=1, N=16, T=T, H=64, causal=True, dtype=dtype, mode=mode)
    return Preset(
        name="mla",
        device=device,
        cases=tuple([c(2048, m) for m in MODES] + [c(8192, FORWARD)]),
        gemm_n=1024,
        timing=TimingSettings(
            warmup_runs=1, warmup_s=0.0, min_runs=5, min_time_s=0.0, budget_s=2.0, floor_runs=2
        ),
        plot_config=(1, 16, 64),
        families=frozenset({"mla", "mla_decode"}),
        extra_impls=("compare.bench.impls_mla:MLA_IMPLS",),
    )


def layer(device: str) -> Preset:
    """A whole attention layer, the twins' default call from ``from_hf`` against transformers' own module
    (sdpa and eager) and a flax nnx equivalent (``compare.bench.impls_layer``), forward and
    forward+backward (w.r.t. the hidden states and every parameter), time and peak memory: Llama-style
    (hidden 2048, 32 heads, 8 kv heads, head 64, rope theta 5e5) at B4 T2048 and B1 T4096, Qwen3-style
    (hidden 2048, 16 heads, 8 kv heads, head 128, qk-norm) at B1 T4096; causal; fp32 on CPU, bf16 on GPU."""
    dtype = "float32" if device == "cpu" else "bfloat16"
    shapes = [("llama", 4, 32, 2048, 64), ("llama", 1, 32, 4096, 64), ("qwen3", 1, 16, 4096, 128)]
    cases = [
        Case(B=B, N=N, T=T, H=H, causal=True, dtype=dtype, mode=m, layer=name)
        for name, B, N, T, H in shapes
        for m in MODES
    ]
    return Preset(
        name="layer",
        device=device,
        cases=tuple(cases),
        gemm_n=2048,
        timing=TimingSettings(
            warmup_runs=1, warmup_s=0.0, min_runs=5, min_time_s=0.0, budget_s=2.0, floor_runs=2
        ),
        plot_config=(None, 32, 64),
        families=frozenset({"layer"}),
        extra_impls=("compare.bench.impls_layer:LAYER_IMPLS",),
    )


PRESETS = {
    "perf": perf,
    "layer": layer,
    "flex": flex,
    "attention": attention,
    "mla": mla,
    "quick": quick,
    "full": full,
    "gpu": gpu,
    "smoke": smoke,
}

__all__ = ["Case", "FORWARD", "FORWARD_BACKWARD", "PRESETS", "Preset", "full", "gpu", "quick", "smoke"]
