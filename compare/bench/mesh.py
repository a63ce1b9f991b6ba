"""``python -m compare bench --mesh data=D,model=M``: the sharded ``MultiheadAttention`` (jit, forward and
forward+backward) timed on a ``D x M`` mesh and on one device, with the harness's timing loop
(``compare.bench.timing``), FLOP formulas (``compare.bench.flops``) and environment record.

Recorded per mode: step time (every device runs its shard concurrently, so this is also the per-device
time), total throughput (GFLOP/s and tokens/s over all devices), per-device throughput, and scaling
efficiency ``t_1 / (D·M · t_DM)`` against the same global problem on one device (weak-scaling would
grow the problem; this is strong scaling). On CPU the devices are emulated
(``--xla_force_host_platform_device_count``) and share the machine's cores, so CPU numbers only show
that the path runs: efficiency there is bounded by ``cores / devices``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

FLAG = "--xla_force_host_platform_device_count"
SHAPE = {"B": 8, "T": 256, "E": 512, "N": 8}  # H = 64


def parse_mesh(spec: str) -> tuple[int, int]:
    """``"data=2,model=4"`` -> ``(2, 4)``; raises ``ValueError`` on anything else."""
    m = re.fullmatch(r"\s*data=(\d+)\s*,\s*model=(\d+)\s*", spec)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"--mesh: expected data=D,model=M with D, M >= 1, got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def _measure(config, mode: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jax_attn
    from compare.bench.timing import TimingSettings, jax_sync, measure
    from jax_attn.sharding import place, shard_module

    B, T, E, N = SHAPE["B"], SHAPE["T"], SHAPE["E"], SHAPE["N"]
    m = jax_attn.MultiheadAttention(E, N, batch_first=True, rngs=nnx.Rngs(0))
    m.eval()
    shard_module(m, config)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    x = place(
        np.random.default_rng(0).standard_normal((B, T, E)).astype(np.float32),
        config.named(config.batch_spec(3)),
    )

    def fwd(params, x):
        return nnx.merge(graphdef, params, rest)(x, x, x, need_weights=False)[0]

    f = fwd if mode == "forward" else jax.grad(lambda p, x: jnp.sum(fwd(p, x)), argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = jax.jit(f).lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    timing = measure(lambda: compiled(params, x), jax_sync, TimingSettings(budget_s=3.0))
    return timing, compile_s


def run_mesh(data: int, model: int) -> dict:
    import jax

    from compare import env
    from compare.bench.flops import module_flops
    from jax_attn.sharding import AttentionSharding, make_mesh

    precision = env.pin_precision()
    n = data * model
    B, T, E, N = SHAPE["B"], SHAPE["T"], SHAPE["E"], SHAPE["N"]
    rows = []
    for mode in ("forward", "forward+backward"):
        flops = module_flops(B, N, T, E // N, causal=False, mode=mode)
        base, _ = _measure(AttentionSharding(make_mesh(1, 1)), mode)
        timing, compile_s = _measure(AttentionSharding(make_mesh(data, model)), mode)
        t1, tn = base.median_s, timing.median_s
        rows.append(
            {
                "impl": "jax_attn.MultiheadAttention (sharded, jit)",
                "mode": mode,
                "mesh": f"data={data},model={model}",
                "devices": n,
                **SHAPE,
                "dtype": "float32",
                "median_s_1_device": t1,
                "median_s": tn,
                "iqr_s": timing.iqr_s,
                "n_runs": timing.n_runs,
                "compile_s": compile_s,
                "per_device_s": tn,
                "total_gflops": flops / tn / 1e9,
                "per_device_gflops": flops / tn / 1e9 / n,
                "tokens_per_s": B * T / tn,
                "speedup": t1 / tn,
                "scaling_efficiency": t1 / (n * tn),
            }
        )
    emulated = jax.default_backend() == "cpu"
    return {
        "kind": "mesh",
        "environment": env.environment(),
        "precision": precision,
        "process_count": jax.process_count(),
        "emulated_cpu_devices": emulated,
        "note": (
            f"{n} emulated CPU devices share {os.cpu_count()} cores: these numbers show the sharded path "
            "runs, not how it scales on real devices"
            if emulated
            else ""
        ),
        "records": rows,
    }


def markdown(doc: dict) -> str:
    lines = [
        "# Sharded benchmark (MultiheadAttention)",
        "",
        doc["note"],
        "",
        "| mode | mesh | devices | 1-device ms | mesh ms (per device) | total GFLOP/s | per-device GFLOP/s "
        "| tokens/s | speedup | scaling eff. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["records"]:
        lines.append(
            f"| {r['mode']} | {r['mesh']} | {r['devices']} | {r['median_s_1_device'] * 1e3:.2f} | "
            f"{r['median_s'] * 1e3:.2f} | {r['total_gflops']:.1f} | {r['per_device_gflops']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['speedup']:.2f} | {r['scaling_efficiency']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m compare.bench.mesh data=D,model=M OUT``: re-executes with emulated CPU devices when
    JAX would start with too few."""
    argv = sys.argv[1:] if argv is None else argv
    spec, out = argv[0], Path(argv[1])
    data, model = parse_mesh(spec)
    if "jax" not in sys.modules and FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}={data * model}".strip()
    import jax

    if len(jax.devices()) < data * model:
        if jax.default_backend() != "cpu":
            print(f"--mesh {spec}: JAX has only {len(jax.devices())} devices", file=sys.stderr)
            return 2
        env = dict(os.environ)
        flags = re.sub(rf"{FLAG}=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} {FLAG}={data * model}".strip()
        return subprocess.run([sys.executable, "-m", "compare.bench.mesh", *argv], env=env).returncode
    doc = run_mesh(data, model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_mesh.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "bench_mesh.md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {out / 'bench_mesh.json'} and {out / 'bench_mesh.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
