"""Sharded attention on 8 emulated CPU devices agrees with one device and the torch twin.

JAX in this pytest process already runs on one device, and the device count is fixed when JAX starts,
so the sharded checks run once in a subprocess (``python -m compare agree --devices 8``) and the tests
assert on its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from compare.sharded_check import meshes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharded") / "sharded.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    proc = subprocess.run(
        [sys.executable, "-m", "compare", "agree", "--devices", "8", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    result["returncode"] = proc.returncode
    return result


def test_meshes():
    assert meshes(8) == [(1, 8), (2, 4), (8, 1)]
    assert meshes(1) == [(1, 1)]


def test_ran_on_eight_devices(doc):
    assert len(doc["devices"]) == 8
    assert doc["meshes"] == ["1x8", "2x4", "8x1"]


@pytest.mark.parametrize("mesh", ["1x8", "2x4", "8x1"])
def test_sharded_agrees(doc, mesh):
    records = [r for r in doc["records"] if r["mesh"] == mesh]
    modules = {r["module"] for r in records}
    assert {"sdpa (GQA 16/8)", "MultiheadAttention", "CausalSelfAttention (GQA 16/8)"} <= modules
    assert {(r["pair"], r["kind"]) for r in records if r["module"] == "MultiheadAttention"} == {
        (p, k) for p in ("sharded vs 1 device", "sharded vs torch") for k in ("forward", "grad")
    }
    bad = [r for r in records if not r["ok"]]
    assert not bad, bad


@pytest.mark.parametrize("mesh", ["1x8", "2x4"])
@pytest.mark.parametrize("part", ["forward", "gradient"])
def test_mha_hlo_keeps_heads_split(doc, mesh, part):
    hlo = doc["hlo"][mesh][part]
    assert hlo["full_weight_all_gathers"] == []
    assert "all-gather" not in hlo["collectives"], hlo["collectives"]
    # The partitioner really split the heads: the row-parallel out_proj sums partial outputs.
    assert "all-reduce" in hlo["collectives"]


def test_exit_status(doc):
    assert doc["ok"] and doc["returncode"] == 0


def test_param_specs_one_device():
    from flax import nnx

    import jax_attn
    from jax_attn.sharding import AttentionSharding, make_mesh, param_specs, shard_module

    config = AttentionSharding(make_mesh(1, 1))
    m = jax_attn.MultiheadAttention(16, 4, rngs=nnx.Rngs(0))
    before = m.torch_state_dict()
    assert param_specs(m, config) == {
        "in_proj_weight": P(None, "model", None),
        "in_proj_bias": P(None, "model"),
        "out_proj.weight": P(None, "model"),
        "out_proj.bias": P(None),
    }
    shard_module(m, config)
    assert m.in_proj_weight.shape == (3, 16, 16)
    after = m.torch_state_dict()
    assert all((before[k] == after[k]).all() and before[k].shape == after[k].shape for k in before)
    c = jax_attn.CausalSelfAttention(16, 4, 2, rngs=nnx.Rngs(0))
    specs = param_specs(c, config)
    assert specs["q_proj.weight"] == P("model", None) and specs["out_proj.weight"] == P(None, "model")


def test_make_mesh_too_many_devices():
    from jax_attn.sharding import make_mesh

    with pytest.raises(ValueError, match="needs 64 devices"):
        make_mesh(8, 8)
