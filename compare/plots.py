"""The pictures of a report folder: ``agreement.png`` (per kind a heatmap of worst error / tolerance),
``bench.png`` (throughput, only the lines a reader compares), ``bench_all.png`` (every implementation)
and ``bench_ratio.png`` (speedups).

An implementation has the same colour in every figure (:func:`impl_color`: a fixed table, and a hash of
the name for implementations the table does not know yet). Files are written through
:func:`compare.fileio.atomic_write`. This module imports no report module (they import it).
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

from compare.bench.flops import MODES
from compare.fileio import atomic_write

# ------------------------------------------------------------------------------------------ colours

#: the lines a reader compares in ``bench.png`` (besides the fastest torch implementation of each panel);
#: the only place where implementation names are written down for the pictures
HEADLINE = (
    "jax_attn.auto.sdpa[jit]",  # jax_attn's default path (implementation=None)
    "torch_attn.sdpa[eager]",  # the eager torch twin
    "flax.nnx.MHA[jit]",  # flax nnx
    "jax.nn.dpa[xla]",  # jax.nn.dot_product_attention
)

#: fixed colours, so that an implementation looks the same in every figure and every run
IMPL_COLORS = {
    "jax_attn.auto.sdpa[jit]": "#1f77b4",
    "jax_attn.sdpa[jit]": "#aec7e8",
    "torch_attn.sdpa[eager]": "#ff7f0e",
    "flax.nnx.MHA[jit]": "#2ca02c",
    "jax.nn.dpa[xla]": "#9467bd",
    "torch.F.sdpa[flash]": "#d62728",
    "torch.F.sdpa[math]": "#8c564b",
    "torch.F.sdpa[auto]": "#e377c2",
    "torch.F.sdpa[efficient]": "#bcbd22",
    "torch.F.sdpa[cudnn]": "#17becf",
    "jax.nn.dpa[cudnn]": "#393b79",
    "jax_attn.blocked.sdpa[jit]": "#6baed6",
    "jax_attn.fused.sdpa[jit]": "#08306b",
    "torch_attn.blocked.sdpa[eager]": "#000000",
    "torch.compile(torch_attn.sdpa)": "#a55194",
    "jax_attn.MHA[jit]": "#3182bd",
    "jax_attn.blocked.MHA[jit]": "#9ecae1",
    "jax_attn.MHA[jit,weights]": "#31a354",
    "torch.nn.MHA[eager]": "#8c6d31",
    "torch.nn.MHA[eager,weights]": "#843c39",
    "torch_attn.MHA[eager]": "#fdae6b",
    "torch_attn.MHA[eager,weights]": "#e7969c",
    "jax_attn.CSA[jit]": "#637939",
    "torch_attn.CSA[eager]": "#d6616b",
    "jax_attn.auto.MHA[jit]": "#2171b5",
    "jax_attn.auto.CSA[jit]": "#4a6b1f",
    "jax_attn.blocked.CSA[jit]": "#a1d99b",
    "torch_attn.fused.sdpa[eager]": "#fd8d3c",
    "torch_attn.auto.sdpa[eager]": "#e6550d",
    "torch_attn.fused.MHA[eager]": "#fdd0a2",
    "torch_attn.auto.MHA[eager]": "#a63603",
    "torch_attn.fused.CSA[eager]": "#f4a6ad",
    "torch_attn.auto.CSA[eager]": "#7f2704",
    "jax_attn.flex[jit]": "#17456e",
    "jax_attn.blocked.sdpa+mask[jit]": "#5b9bd5",
    "torch_attn.flex[eager]": "#ffbb78",
    "torch.flex[eager]": "#98df8a",
    "torch.compile(flex)": "#ff9896",
    "torch.F.sdpa+mask": "#c5b0d5",
    "jax_attn.attention[jit]": "#0b3d91",
    "torch_attn.attention[eager]": "#f28e2b",
    "torch.compile(torch_attn.attention)": "#c49c94",
    "jax_attn.attention.decode[jit]": "#4e79a7",
    "torch_attn.attention.decode[eager]": "#e15759",
    "torch.compile(torch_attn.attention.decode)": "#f7b6d2",
}
_FALLBACK = (
    "#7f7f7f", "#b5cf6b", "#cedb9c", "#8ca252", "#bd9e39", "#e7ba52", "#ad494a", "#7b4173", "#ce6dbd",
    "#de9ed6", "#5254a3", "#6b6ecf", "#9c9ede", "#636363", "#969696",
)  # fmt: skip


def impl_color(name: str) -> str:
    """The colour of an implementation in every figure."""
    return IMPL_COLORS.get(name) or _FALLBACK[zlib.crc32(name.encode()) % len(_FALLBACK)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=110))
    return Path(path)


# ------------------------------------------------------------------------------------ agreement.png

#: the colour scale of the heatmap: log10(error / tolerance) from 1e-4 (deep blue) through 1 (white, the
#: tolerance line) to 1e2 (deep red)
LOG_RANGE = (-4.0, 2.0)


def fmt_ratio(x: float | None) -> str:
    """A worst error / tolerance for a table cell."""
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    if x >= 10:
        return f"{x:.0f}"
    return f"{x:.2f}" if x >= 0.01 else f"{x:.0e}"


def agreement_grid(m: dict, dtype: str) -> tuple[list[str], list[str], list[list[float]]]:
    """(row labels, column labels, worst error / tolerance) of one kind's heatmap panel: the oracle as the
    first row, then the implementations; NaN where two implementations share no check (the diagonal, or
    an implementation not run in this dtype)."""
    impls = m["impls"]
    pairs = m["pairs"].get(dtype, {})
    rows = ["oracle", *impls]
    grid = []
    for a in rows:
        line = []
        for b in impls:
            if a == "oracle":
                x = pairs.get((b, "oracle"))
            elif a == b:
                x = None
            else:
                x = pairs.get((a, b), pairs.get((b, a)))
            line.append(math.nan if x is None else x)
        grid.append(line)
    return rows, impls, grid


def plot_agreement(ms: list[dict], verdict_line: str, path: Path) -> Path:
    """Per kind (a row of panels) and dtype (a panel): worst error / tolerance of every pair over all
    cases and quantities, implementations × implementations with the oracle as the first row; log colour
    scale, diverging at 1 (the tolerance line); cells above it are outlined."""
    import matplotlib.colors as mcolors
    import numpy as np

    plt = _pyplot()
    ms = ms or [{"kind": "none", "impls": [], "dtypes": [], "pairs": {}, "cases": 0}]
    ncols = max(1, max(len(m["dtypes"]) for m in ms))
    most = max(1, max(len(m["impls"]) for m in ms))
    cell = 0.62
    fig_w = ncols * (most * cell + 1.6) + 1.5
    heights = [max(1, len(m["impls"])) * cell + 1.6 for m in ms]
    fig, axes = plt.subplots(
        len(ms),
        ncols,
        figsize=(fig_w, sum(heights) + 1.0),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
        layout="constrained",
    )
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dddddd")
    norm = mcolors.TwoSlopeNorm(vmin=LOG_RANGE[0], vcenter=0.0, vmax=LOG_RANGE[1])
    image = None
    for i, m in enumerate(ms):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(m["dtypes"]):
                ax.axis("off")
                continue
            dtype = m["dtypes"][j]
            rows, cols, grid = agreement_grid(m, dtype)
            values = np.array(grid, dtype=float)
            with np.errstate(divide="ignore"):
                logs = np.where(np.isnan(values), np.nan, np.log10(np.maximum(values, 1e-300)))
            image = ax.imshow(np.clip(logs, *LOG_RANGE), cmap=cmap, norm=norm, aspect="equal")
            for r in range(len(rows)):
                for c in range(len(cols)):
                    x = values[r, c]
                    if math.isnan(x):
                        continue
                    over = x > 1
                    ax.text(
                        c,
                        r,
                        fmt_ratio(x),
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if abs(np.clip(logs[r, c], *LOG_RANGE)) > 2.5 else "black",
                        fontweight="bold" if over else "normal",
                    )
                    if over:
                        ax.add_patch(
                            plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="black", lw=2)
                        )
            ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right", fontsize=7.5)
            ax.set_yticks(range(len(rows)), rows, fontsize=7.5)
            ax.axhline(0.5, color="black", lw=1.2)  # the oracle row apart from the pairs
            n = m.get("dtype_cases", {}).get(dtype, "?")
            ax.set_title(f"{m['kind']} · {dtype} ({n} cases)", fontsize=9)
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, pad=0.02)
        ticks = list(range(int(LOG_RANGE[0]), int(LOG_RANGE[1]) + 1))
        bar.set_ticks(ticks, labels=[f"{10.0**t:g}" for t in ticks])
        bar.set_label("worst max-abs error / tolerance (1 = tolerance line; > 1 fails, outlined)")
    fig.suptitle(
        f"Agreement: worst error / tolerance per pair, over all cases and quantities. {verdict_line}",
        fontsize=10,
    )
    out = _save(fig, path)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------- bench.png


def _plot_records(doc: dict) -> list[dict]:
    B, N, H = doc.get("plot_config") or (None, None, None)
    return [
        r
        for r in doc["records"]
        if r.get("status") == "ok"
        and r.get("family") != "ceiling"
        and not r.get("window")  # sliding-window rows: in the tables only
        and (B is None or r["B"] == B)
        and (N is None or r["N"] == N)
        and (H is None or r["H"] == H)
    ]


def _panels(plt, doc: dict):
    modes = [
        m for m in MODES if any(r.get("mode") == m for r in doc["records"] if r.get("family") != "ceiling")
    ]
    modes = modes or list(MODES)
    fig, axes = plt.subplots(len(modes), 2, figsize=(15, 5.2 * len(modes)), squeeze=False, sharex=True)
    return fig, axes, modes


def headline_names(recs: list[dict]) -> set[str]:
    """The lines a reader compares in one panel: :data:`HEADLINE` and the fastest torch implementation
    (highest throughput at the largest sequence length any torch implementation ran)."""
    torch_rows = [r for r in recs if r.get("framework") == "torch" or r["impl"].startswith("torch")]
    names = set(HEADLINE)
    if torch_rows:
        T = max(r["T"] for r in torch_rows)
        names.add(max((r for r in torch_rows if r["T"] == T), key=lambda r: r["gflops"])["impl"])
    return names


def plot_throughput(doc: dict, path: Path, only_headline: bool = True) -> None:
    """GFLOP/s vs T per implementation; one panel per mode × causality; GEMM ceilings dashed.

    ``only_headline``: in each panel only the lines a reader compares (:func:`headline_names`); else every
    implementation (``bench_all.png``)."""
    plt = _pyplot()
    recs = _plot_records(doc)
    names = sorted({r["impl"] for r in recs}, key=lambda n: (not n.startswith("jax"), n))
    fig, axes, modes = _panels(plt, doc)
    dtypes = sorted({r["dtype"] for r in recs})
    B, N, H = doc.get("plot_config") or (None, None, None)
    for i, mode in enumerate(modes):
        for j, causal in enumerate((False, True)):
            ax = axes[i][j]
            panel = [r for r in recs if r["mode"] == mode and r["causal"] == causal]
            shown = headline_names(panel) if only_headline else set(names)
            for name in names:
                if name not in shown:
                    continue
                for d, dt in enumerate(dtypes):
                    pts = sorted(
                        (r["T"], r["gflops"])
                        for r in recs
                        if r["impl"] == name
                        and r["mode"] == mode
                        and r["causal"] == causal
                        and r["dtype"] == dt
                    )
                    if not pts:
                        continue
                    jax_side = not name.startswith("torch")
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        marker="o" if jax_side else "s",
                        linestyle=("-" if jax_side else "--") if d == 0 else ":",
                        color=impl_color(name),
                        lw=2.6 if name.startswith(("jax_attn", "torch_attn")) else 1.4,
                        label=name + (f" {dt}" if len(dtypes) > 1 else ""),
                    )
            for r in doc["records"]:
                if r.get("family") == "ceiling" and r.get("status") == "ok":
                    ax.axhline(r["gflops"], color="grey", linestyle=":" if "jax" in r["impl"] else "-.", lw=1)
                    ax.annotate(
                        f"{r['impl']} {r['dtype']} n={r['gemm_n']}: {r['gflops']:.0f}",
                        (0.01, r["gflops"]),
                        xycoords=("axes fraction", "data"),
                        fontsize=8,
                        color="grey",
                        va="bottom",
                    )
            _seq_axis(ax, sorted({r["T"] for r in recs}))
            ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length T (= S)")
            ax.set_ylabel("throughput, GFLOP/s (credited FLOPs / median time)")
            ax.set_ylim(bottom=0)
            ax.grid(True, which="both", alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=min(4, len(handles)),
        fontsize=9,
        title="solid/circle: JAX (jit)   dashed/square: PyTorch   grey: GEMM ceilings",
    )
    shape = f"B={B if B is not None else 'varies'} N={N} H={H}, {', '.join(dtypes)}"
    which = (
        "the lines a reader compares (every implementation: bench_all.png)"
        if only_headline
        else "every implementation"
    )
    fig.suptitle(
        f"Attention throughput vs sequence length, {which}\n({doc['device']}: {_device_name(doc)}; {shape})"
    )
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(handles) / 4), 1, 0.97))
    _save(fig, path)
    plt.close(fig)


def _seq_axis(ax, Ts: list[int]) -> None:
    """Log-2 sequence axis labelled with the measured lengths as plain numbers."""
    import matplotlib.ticker

    ax.set_xscale("log", base=2)
    if Ts:
        ax.set_xticks(Ts)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _device_name(doc: dict) -> str:
    return next((r["device_name"] for r in doc["records"] if r.get("device_name")), "?")


def plot_ratio(doc: dict, path: Path) -> None:
    """Speedup of jax_attn (jit) vs the best torch implementation and vs torch_attn eager, per T."""
    import matplotlib.ticker

    plt = _pyplot()

    B, N, H = doc.get("plot_config") or (None, None, None)
    ratios = [
        s
        for s in doc["ratios"]
        if not s.get("window")
        and (B is None or s["B"] == B)
        and (N is None or s["N"] == N)
        and (H is None or s["H"] == H)
    ]
    fig, axes, modes = _panels(plt, doc)
    families = sorted({s["family"] for s in ratios})
    cmap = plt.get_cmap("tab10")
    for i, mode in enumerate(modes):
        for j, causal in enumerate((False, True)):
            ax = axes[i][j]
            for k, fam in enumerate(families):
                for dt in sorted({s["dtype"] for s in ratios}):
                    sel = sorted(
                        (
                            s
                            for s in ratios
                            if s["family"] == fam
                            and s["mode"] == mode
                            and s["causal"] == causal
                            and s["dtype"] == dt
                        ),
                        key=lambda s: s["T"],
                    )
                    if not sel:
                        continue
                    ax.plot(
                        [s["T"] for s in sel],
                        [s["speedup_vs_best_torch"] for s in sel],
                        marker="o",
                        color=cmap(k),
                        label=f"{fam}: vs best torch {dt}",
                    )
                    twin = [s for s in sel if s["speedup_vs_torch_attn"]]
                    if twin:
                        ax.plot(
                            [s["T"] for s in twin],
                            [s["speedup_vs_torch_attn"] for s in twin],
                            marker="s",
                            linestyle="--",
                            color=cmap(k),
                            label=f"{fam}: vs torch_attn eager {dt}",
                        )
            ax.axhline(1.0, color="black", lw=1)
            _seq_axis(ax, sorted({s["T"] for s in ratios}))
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}×"))
            ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length T (= S)")
            ax.set_ylabel("speedup = torch time / jax_attn time (>1: JAX faster)")
            ax.grid(True, which="both", alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(
            list(handles.values()), list(handles), loc="lower center", ncol=min(3, len(handles)), fontsize=9
        )
    fig.suptitle(f"jax_attn under jax.jit vs PyTorch ({doc['device']}: {_device_name(doc)})")
    fig.tight_layout(rect=(0, 0.03 + 0.025 * math.ceil(max(1, len(handles)) / 3), 1, 0.97))
    _save(fig, path)
    plt.close(fig)
