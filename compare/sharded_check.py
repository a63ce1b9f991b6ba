"""Sharded JAX == single-device JAX == torch twin, on device meshes (``python -m compare agree --devices N``).

For each mesh ``data x model`` in (1 x N, 2 x N/2, N x 1) it runs SDPA, ``MultiheadAttention`` and
``CausalSelfAttention`` (GQA with split key/value heads, multi-query with replicated ones, and a KV-cache
decode step) jitted on the mesh, and compares the forward output and the gradients of
``sum(out * dout)`` with respect to the inputs and every parameter against the same module jitted on one
device and against the torch twin, with the fp32 policy of ``compare.tolerance``. It also reads the
compiled HLO of the sharded ``MultiheadAttention`` (forward and gradient) and lists every ``all-gather``:
one whose result has the shape of a full weight matrix means the heads were not kept split.

On CPU the N devices are emulated (``XLA_FLAGS=--xla_force_host_platform_device_count=N``), which must be
set before JAX starts: when JAX is already running with fewer devices this re-executes itself in a fresh
process with the flag. Exit status: 0 all agree and no full-weight all-gather, 1 otherwise, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np

FLAG = "--xla_force_host_platform_device_count"


def meshes(n: int) -> list[tuple[int, int]]:
    """``(data, model)`` shapes to test on ``n`` devices: 1 x n, 2 x n/2, n x 1 (those that exist)."""
    out = [(1, n)] + ([(2, n // 2)] if n % 2 == 0 and n > 2 else []) + [(n, 1)]
    return list(dict.fromkeys(out))


def _needs_reexec(n: int) -> bool:
    """True when JAX is (or would start) with fewer than ``n`` devices; sets the CPU flag if JAX has not
    started yet."""
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if FLAG not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={n}".strip()
    import jax

    return len(jax.devices()) < n


def _reexec(argv: list[str], n: int) -> int:
    env = dict(os.environ)
    flags = re.sub(rf"{FLAG}=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} {FLAG}={n}".strip()
    return subprocess.run([sys.executable, "-m", "compare.sharded_check", *argv], env=env).returncode


# --- cases ---------------------------------------------------------------------------------------------

B, T, S = 8, 5, 7  # batch divisible by every data axis; T != S so a swapped axis cannot pass


def _rng(seed):
    return np.random.default_rng(seed)


def _normal(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _tree_np(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def _sdpa_case(config):
    """SDPA with GQA: query ``(B, 16, T, H)``, key/value ``(B, 8, S, H)``, a bool mask."""
    import jax
    import jax.numpy as jnp
    import torch

    import jax_attn
    import torch_attn
    from jax_attn.sharding import sdpa_specs

    rng = _rng(0)
    N, K, H = 16, 8, 6
    inputs = {
        "q": _normal(rng, (B, N, T, H)),
        "k": _normal(rng, (B, K, S, H)),
        "v": _normal(rng, (B, K, S, H)),
    }
    mask = rng.random((T, S)) < 0.8
    mask[:, 0] = True
    dout = _normal(rng, (B, N, T, H))

    def loss(x):
        out = jax_attn.scaled_dot_product_attention(x["q"], x["k"], x["v"], mask, enable_gqa=True)
        return jnp.sum(out * dout), out

    step = jax.value_and_grad(loss, has_aux=True)
    if config is None:
        (_, out), g = jax.jit(step)(inputs)
    else:
        s = sdpa_specs(config, N, K)
        shard = {"q": config.named(s["query"]), "k": config.named(s["key"]), "v": config.named(s["value"])}
        (_, out), g = jax.jit(step, in_shardings=(shard,))(inputs)
    jax_res = {"forward": {"out": np.asarray(out)}, "grad": {f"d{k}": np.asarray(v) for k, v in g.items()}}

    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in inputs.items()}
    tout = torch_attn.scaled_dot_product_attention(
        t["q"], t["k"], t["v"], torch.tensor(mask), enable_gqa=True
    )
    (tout * torch.tensor(dout, dtype=torch.float64)).sum().backward()
    torch_res = {
        "forward": {"out": tout.detach().numpy()},
        "grad": {f"d{k}": v.grad.numpy() for k, v in t.items()},
    }
    return jax_res, torch_res


def _module_grads(module, inputs: dict, call, dout):
    """(forward, grads) of ``sum(call(module, **inputs) * dout)`` jitted: grads by torch parameter name
    (through a module holding the gradients, so ``torch_state_dict`` undoes the sharded layout) and by
    input name ``d<name>``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, inputs):
        out = call(nnx.merge(graphdef, params, rest), **inputs)
        return jnp.sum(out * dout), out

    (_, out), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, inputs)
    grads = {k: np.asarray(v) for k, v in nnx.merge(graphdef, gp, rest).torch_state_dict().items()}
    grads.update({f"d{k}": np.asarray(v) for k, v in gx.items()})
    return {"out": np.asarray(out)}, grads


def _place_inputs(inputs: dict, config, batch_axis: int):
    from jax_attn.sharding import place

    if config is None:
        return inputs
    return {k: place(v, config.named(config.batch_spec(v.ndim, batch_axis))) for k, v in inputs.items()}


def _torch_grads(module, inputs: dict, call, dout):
    import torch

    module = module.double()
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in inputs.items()}
    out = call(module, **t)
    (out * torch.tensor(dout, dtype=torch.float64)).sum().backward()
    grads = {name: p.grad.numpy() for name, p in module.named_parameters()}
    grads.update({f"d{k}": v.grad.numpy() for k, v in t.items()})
    return {"forward": {"out": out.detach().numpy()}, "grad": grads}


def _mha_module(config):
    from flax import nnx

    import jax_attn
    from jax_attn.sharding import shard_module

    E, Nh = 64, 8
    m = jax_attn.MultiheadAttention(E, Nh, rngs=nnx.Rngs(1))  # (L, N, E): batch on axis 1
    m.eval()
    if config is not None:
        shard_module(m, config)
    return m


def _mha_call(m, query, key, value):
    return m(query, key, value, need_weights=False)[0]


def _mha_case(config):
    import torch_attn

    rng = _rng(1)
    E = 64
    inputs = {
        "query": _normal(rng, (T, B, E)),
        "key": _normal(rng, (S, B, E)),
        "value": _normal(rng, (S, B, E)),
    }
    dout = _normal(rng, (T, B, E))
    m = _mha_module(config)
    fwd, grads = _module_grads(m, _place_inputs(inputs, config, 1), _mha_call, dout)
    tm = torch_attn.MultiheadAttention(E, 8)
    tm.load_torch_state_dict(m.torch_state_dict())
    tm.eval()
    return {"forward": fwd, "grad": grads}, _torch_grads(tm, inputs, _mha_call, dout)


def _causal_module(config, K):
    from flax import nnx

    import jax_attn
    from jax_attn.sharding import shard_module

    m = jax_attn.CausalSelfAttention(64, 16, K, rngs=nnx.Rngs(2))
    m.eval()
    if config is not None:
        shard_module(m, config)
    return m


def _causal_case(config, K):
    import torch_attn

    rng = _rng(2)
    inputs = {"x": _normal(rng, (B, T, 64))}
    dout = _normal(rng, (B, T, 64))
    m = _causal_module(config, K)
    fwd, grads = _module_grads(m, _place_inputs(inputs, config, 0), lambda m, x: m(x), dout)
    tm = torch_attn.CausalSelfAttention(64, 16, K)
    tm.load_torch_state_dict(m.torch_state_dict())
    tm.eval()
    return {"forward": fwd, "grad": grads}, _torch_grads(tm, inputs, lambda m, x: m(x), dout)


def _decode_case(config):
    """Prefill T tokens into a cache of length 8, then decode one more token (forward only)."""
    import jax
    import torch
    from flax import nnx

    import torch_attn

    rng = _rng(3)
    x = _normal(rng, (B, T + 1, 64))
    m = _causal_module(config, 8)
    graphdef, state = nnx.split(m)

    @jax.jit
    def run(state, x, cache):
        mod = nnx.merge(graphdef, state)
        y0, cache = mod(x[:, :T], cache)
        y1, cache = mod(x[:, T:], cache)
        return y0, y1, cache.k

    y0, y1, k = run(state, _place_inputs({"x": x}, config, 0)["x"], m.init_cache(B, 8))
    jax_res = {"forward": {"prefill": np.asarray(y0), "decode": np.asarray(y1), "cache_k": np.asarray(k)}}
    tm = torch_attn.CausalSelfAttention(64, 16, 8).double()
    tm.load_torch_state_dict(m.torch_state_dict())
    tm.eval()
    with torch.no_grad():
        tx = torch.tensor(x, dtype=torch.float64)
        cache = tm.init_cache(B, 8)
        t0, cache = tm(tx[:, :T], cache)
        t1, cache = tm(tx[:, T:], cache)
    torch_res = {"forward": {"prefill": t0.numpy(), "decode": t1.numpy(), "cache_k": cache.k.numpy()}}
    return jax_res, torch_res


CASES = {
    "sdpa (GQA 16/8)": _sdpa_case,
    "MultiheadAttention": _mha_case,
    "CausalSelfAttention (GQA 16/8)": lambda c: _causal_case(c, 8),
    "CausalSelfAttention (16/2, kv replicated)": lambda c: _causal_case(c, 2),
    "CausalSelfAttention decode (cache)": _decode_case,
}


# --- comparison and HLO --------------------------------------------------------------------------------


def _compare(got: dict, expected: dict) -> dict:
    """Worst error and tolerance per kind (forward / grad) of ``got`` against ``expected``."""
    from compare.tolerance import compare_arrays

    out = {}
    for kind in got:
        worst = None
        for name, value in got[kind].items():
            a = compare_arrays(name, value, expected[kind][name], "float32")
            rec = {"quantity": name, "max_abs": a.max_abs, "tol": a.tol, "ok": a.ok}
            if worst is None or not a.ok or a.max_abs / a.tol > worst["max_abs"] / worst["tol"]:
                if worst is None or worst["ok"]:
                    worst = rec
        out[kind] = worst
    return out


_SHAPE = re.compile(r"=\s*\(?\w+\[([\d,]*)\]")


def collectives(hlo: str) -> dict[str, list[tuple[int, ...]]]:
    """Result shapes of every all-gather / all-reduce / all-to-all / reduce-scatter in compiled HLO text."""
    found: dict[str, list[tuple[int, ...]]] = {}
    for line in hlo.splitlines():
        for op in ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute"):
            if re.search(rf"\s{op}(-start)?\(", line):
                m = _SHAPE.search(line)
                shape = tuple(int(d) for d in m.group(1).split(",") if d) if m else ()
                found.setdefault(op, []).append(shape)
    return found


def mha_hlo(config) -> dict:
    """Compiled HLO of the sharded MultiheadAttention, forward and gradient: collectives, and the
    all-gathers whose result is a full weight matrix (``(3E, E)``, ``(3, E, E)`` or ``(E, E)``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    E = 64
    m = _mha_module(config)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    x = _place_inputs({"query": np.zeros((T, B, E), np.float32)}, config, 1)["query"]

    def fwd(params, x):
        return _mha_call(nnx.merge(graphdef, params, rest), x, x, x)

    def grad(params, x):
        return jax.grad(lambda p, x: jnp.sum(fwd(p, x)), argnums=(0, 1))(params, x)

    full = {(3 * E, E), (3, E, E), (E, E)}
    out = {}
    for name, f in (("forward", fwd), ("gradient", grad)):
        ops = collectives(jax.jit(f).lower(params, x).compile().as_text())
        out[name] = {
            "collectives": {k: [list(s) for s in v] for k, v in ops.items()},
            "full_weight_all_gathers": [list(s) for s in ops.get("all-gather", []) if tuple(s) in full],
        }
    return out


def run(n: int) -> dict:
    import jax

    from compare import env
    from jax_attn.sharding import AttentionSharding, make_mesh

    precision = env.pin_precision()
    single = {name: case(None) for name, case in CASES.items()}
    records, hlo = [], {}
    for data, model in meshes(n):
        config = AttentionSharding(make_mesh(data=data, model=model))
        for name, case in CASES.items():
            got, torch_res = case(config)
            one, _ = single[name]
            for pair, expected in (("sharded vs 1 device", one), ("sharded vs torch", torch_res)):
                for kind, worst in _compare(got, expected).items():
                    records.append(
                        {"mesh": f"{data}x{model}", "module": name, "pair": pair, "kind": kind, **worst}
                    )
        hlo[f"{data}x{model}"] = mha_hlo(config)
    bad_hlo = [k for k, v in hlo.items() if any(v[p]["full_weight_all_gathers"] for p in v)]
    return {
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "meshes": [f"{d}x{m}" for d, m in meshes(n)],
        "precision": precision,
        "records": records,
        "hlo": hlo,
        "ok": all(r["ok"] for r in records) and not bad_hlo,
    }


def print_report(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    table = Table(title=f"sharded agreement on {len(doc['devices'])} devices: worst max-abs / tolerance")
    for col in ("mesh", "module", "pair", "kind", "worst", "max_abs / tol", "status"):
        table.add_column(col)
    for r in doc["records"]:
        status = "[green]ok[/green]" if r["ok"] else "[red]FAIL[/red]"
        table.add_row(
            r["mesh"],
            r["module"],
            r["pair"],
            r["kind"],
            r["quantity"],
            f"{r['max_abs']:.1e} / {r['tol']:.0e}",
            status,
        )
    console.print(table)
    for mesh, v in doc["hlo"].items():
        for part, h in v.items():
            ops = ", ".join(f"{k} x{len(s)}" for k, s in h["collectives"].items()) or "none"
            bad = h["full_weight_all_gathers"]
            verdict = (
                "[red]full-weight all-gather " + str(bad) + "[/red]" if bad else "no full-weight all-gather"
            )
            console.print(f"HLO MultiheadAttention {part} on {mesh}: collectives {ops}; {verdict}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m compare.sharded_check", description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8, help="devices in the meshes (emulated on CPU)")
    p.add_argument("--json", help="write the records to this JSON file")
    args = p.parse_args(argv)
    if args.devices < 1:
        print(f"--devices must be >= 1, got {args.devices}", file=sys.stderr)
        return 2
    if _needs_reexec(args.devices):
        import jax

        if jax.default_backend() != "cpu":
            print(f"--devices {args.devices}: JAX has only {len(jax.devices())} devices", file=sys.stderr)
            return 2
        return _reexec(argv, args.devices)
    doc = run(args.devices)
    print_report(doc)
    if args.json:
        from compare.report import write_atomic

        write_atomic(args.json, json.dumps(doc, indent=1))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
