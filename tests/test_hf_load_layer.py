"""``load_layer`` reads a ``save_pretrained`` checkpoint (sharded or not) with NumPy only, in a process where
importing torch or transformers raises; ``python -m compare port DIR`` on such checkpoints."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from compare import cli, port_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (family, dtype, max_shard_size): a fused-qkv family, a Conv1D one in bf16, sharded and single-file saves.
SAVES = [("llama", "float32", "20KB"), ("gpt2", "bfloat16", "20KB"), ("phi3", "float32", "5GB")]

NO_TORCH = """
import sys, json
sys.modules["torch"] = None          # importing torch (or transformers) now raises ImportError
sys.modules["transformers"] = None
import numpy as np, jax.numpy as jnp
import jax_attn.hf as jhf
for d, family in json.loads(sys.argv[1]):
    attn = jhf.load_layer(d, 1, implementation="math")
    x = np.load(d + "/x.npy")
    y = attn(jnp.asarray(x, attn.q_proj.weight[...].dtype))
    sd = jhf.to_hf_state_dict(attn, family)
    arrays = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    np.savez(d + "/out.npz", y=np.asarray(y, np.float32), **arrays)
assert sys.modules["torch"] is None
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family, dtype, shard in SAVES:
        _, model = port_hf.tiny_module(family, 0, dtype)
        for layer in range(2):
            port_hf.randomize_(port_hf.attention_of(model, layer), 10 + layer)
        d = root / family
        model.save_pretrained(d, max_shard_size=shard)
        x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
        np.save(d / "x.npy", x)
        out[family] = (d, model, x)
    return out


def test_load_layer_without_torch(checkpoints):
    assert len(list((checkpoints["llama"][0]).glob("model-*.safetensors"))) > 1  # really sharded
    assert (checkpoints["phi3"][0] / "model.safetensors").exists()
    args = json.dumps([[str(d), f] for f, (d, _, _) in checkpoints.items()])
    subprocess.run([sys.executable, "-c", NO_TORCH, args], cwd=ROOT, check=True, capture_output=True)
    for family, (d, model, x) in checkpoints.items():
        module = port_hf.attention_of(model, 1)
        got = np.load(d / "out.npz")
        for k, v in module.state_dict().items():  # weights bit-exact (bf16 widened to fp32 exactly)
            assert np.array_equal(got[k], v.float().numpy()), (family, k)
        xt = torch.tensor(x).to(next(module.parameters()).dtype)
        mask = np.ones(x.shape[:2], np.int64)
        with torch.no_grad():
            want = port_hf._hf_call(
                module, family, xt, mask, np.arange(5)[None].repeat(2, 0), np.arange(5), 5
            )
        want = want.float().numpy()
        tol = 1e-5 if family != "gpt2" else 3e-2  # bf16: one ulp-level of the outputs
        assert np.abs(got["y"] - want).max() <= tol * max(1.0, np.abs(want).max()), family


def test_load_layer_errors(tmp_path, checkpoints):
    import jax_attn.hf as jhf
    import torch_attn.hf as thf

    with pytest.raises((ValueError, OSError)):
        jhf.load_layer(tmp_path, 0)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no model.safetensors"):
        jhf.load_layer(tmp_path, 0)
    # the errors name the function the user called, in both twins
    d = checkpoints["llama"][0]
    for twin in (jhf, thf):
        with pytest.raises(ValueError, match=r"^load_layer: layer must be an int in \[0, 2\); got layer=5"):
            twin.load_layer(d, 5)
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "not_a_family"}))
    with pytest.raises(ValueError, match="^load_layer: unsupported model_type='not_a_family'"):
        jhf.load_layer(bad, 0)


def test_cli_port_prints_the_verdict_first_and_last(checkpoints, tmp_path, capsys):
    d = checkpoints["llama"][0]
    assert cli.main(["port", str(d), "--layer", "1", "--out", str(tmp_path / "ok")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert lines[0].startswith(f"layer 1 of {d}: ALL AGREE: ") and "LlamaAttention (float32)" in lines[0]
    assert any(ln.startswith(f"layer 1 of {d}: ALL AGREE") for ln in lines[-3:])
    assert any("max abs error / tolerance" in ln for ln in lines[:4])
    assert not any("LOAD REPORT" in ln for ln in lines)  # transformers' own load chatter is silenced
    assert json.loads((tmp_path / "ok" / "port.json").read_text())["verdict"].startswith("ALL AGREE")
    assert cli.main(["port", str(d), "--layer", "9", "--out", str(tmp_path / "x")]) == 2
    assert "compare port: load_layer: layer must be an int" in capsys.readouterr().out.replace("\n", "")


def test_cli_port_exit_codes(checkpoints, tmp_path, monkeypatch):
    d = checkpoints["llama"][0]
    assert cli.main(["port", str(d), "--layer", "1", "--out", str(tmp_path / "ok")]) == 0
    data = json.loads((tmp_path / "ok" / "port.json").read_text())
    assert data["ok"] and data["jax_port"] == "load_layer" and data["kind"] == "hf:llama"
    assert "| jax_attn vs transformers | decode_out |" in (tmp_path / "ok" / "port.md").read_text()
    assert cli.main(["port", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["port", str(d), "--layer", "7", "--out", str(tmp_path / "x")]) == 2

    import jax_attn.hf as jhf

    real = jhf.load_layer

    def flipped(*args, **kw):  # a wrong port: the interleaved rotary layout on half-split weights
        attn = real(*args, **kw)
        c = attn.config
        wrong = dataclasses.replace(c, rope=dataclasses.replace(c.rope, layout="interleaved"))
        return jhf._build(wrong, attn.torch_state_dict(), "math", training=False)

    monkeypatch.setattr(jhf, "load_layer", flipped)
    assert cli.main(["port", str(d), "--layer", "1", "--out", str(tmp_path / "bad")]) == 1
    data = json.loads((tmp_path / "bad" / "port.json").read_text())
    assert data["ok"] is False and data["verdict"].startswith("DISAGREE: ")
    assert "jax_attn" in data["verdict"] and "torch_attn" not in data["verdict"]


def test_torch_twin_load_layer(checkpoints):
    import torch_attn.hf as thf

    for family, (d, model, _) in checkpoints.items():
        module = port_hf.attention_of(model, 1)
        attn = thf.load_layer(d, 1)
        assert not attn.training
        back = thf.to_hf_state_dict(attn, family)
        sd = module.state_dict()
        assert set(back) == set(sd)
        for k, v in sd.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), (family, k)
