"""``python -m compare``: exit codes, filters and tamper detection."""

import json
import shutil
import subprocess
import sys

import pytest

from compare import cli, report, vectors


def test_vectors_check_exit_0(capsys):
    assert cli.main(["vectors", "--check"]) == 0
    assert "checked" in capsys.readouterr().out


def test_vectors_check_exit_1_names_tampered_case(tmp_path, capsys):
    dst = tmp_path / "v"
    shutil.copytree(vectors.DEFAULT_DIR, dst)
    p = dst / "causal_square.safetensors"
    p.write_bytes(p.read_bytes()[:-1] + b"\x00")
    assert cli.main(["vectors", "--check", "--dir", str(dst)]) == 1
    assert "causal_square" in capsys.readouterr().out


def test_vectors_verify_regenerate(tmp_path, capsys):
    dst = tmp_path / "v"
    shutil.copytree(vectors.DEFAULT_DIR, dst)
    assert cli.main(["vectors", "--verify-regenerate", "--dir", str(dst)]) == 0
    assert "equal to" in capsys.readouterr().out
    # a real change (with its hash updated, so only the values can tell) exits 1 and names the case
    from safetensors.numpy import load, save

    arrays = load((dst / "primes.safetensors").read_bytes())
    arrays["expected_dq"] = arrays["expected_dq"] + 1e-9
    data = save(arrays)
    (dst / "primes.safetensors").write_bytes(data)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["cases"]["primes"]["sha256"] = vectors._sha256(data)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["vectors", "--verify-regenerate", "--dir", str(dst)]) == 1
    out = capsys.readouterr().out
    assert "primes" in out and "expected_dq" in out and not list(tmp_path.glob(".vectors-*"))


def test_agree_filtered_writes_json(tmp_path):
    out = tmp_path / "a.json"
    assert cli.main(["agree", "--case", "gqa_G2", "--dtype", "float32", "--json", str(out)]) == 0
    data = report.load_agreement(out)
    assert {r["case"] for r in data["records"]} == {"gqa_G2", "gqa_G2_causal_masked"}
    assert data["precision"]["jax_default_matmul_precision"] == "highest"
    assert all(r["ok"] for r in data["records"])


def test_agree_no_match_is_usage_error():
    assert cli.main(["agree", "--case", "no_such_case"]) == 2


def test_usage_error_exit_2():
    r = subprocess.run([sys.executable, "-m", "compare", "agree", "--dtype", "int8"], capture_output=True)
    assert r.returncode == 2


def test_broken_implementation_exits_1(monkeypatch, capsys):
    """A deliberately wrong scale in one implementation makes agree fail and name the case and pair."""
    from compare.kinds import sdpa

    real = sdpa.run_torch

    def wrong_scale(vec):
        res = real(vec)
        res["out"] = res["out"] * 1.001
        return res

    monkeypatch.setitem(sdpa.IMPLEMENTATIONS, "torch_attn", wrong_scale)
    # in this process: a worker process would import the registry afresh, without the wrong scale
    assert cli.main(["agree", "--case", "basic", "--dtype", "float32", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "DISAGREE" in out and "basic" in out and "torch_attn vs oracle" in out


@pytest.mark.parametrize(
    "argv", [["vectors"], ["vectors", "--write", "--check"], ["vectors", "--check", "--verify-regenerate"]]
)
def test_vectors_needs_one_mode(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_agree_report_folder_is_readable_on_its_own(tmp_path):
    folder = tmp_path / "rep"
    assert cli.main(["agree", "--case", "causal_square", "--out", str(folder)]) == 0
    md = (folder / "agreement.md").read_text()
    for needed in (
        "# Agreement report",
        "ALL AGREE",
        "jax_default_matmul_precision",
        "highest",
        "## Tolerance policy",
        "bfloat16",
        "jax_attn",
        "torch_builtin",
        "causal_square_bf16",
        "torch | 2.",
        "jax | 0.",
        "## Failures",
        "agreement.png",
    ):
        assert needed in md, needed
    data = json.loads((folder / "agreement.json").read_text())
    assert data["schema"] == report.SCHEMA
    assert {"environment", "precision", "tolerance_policy", "cases", "checks", "unmeasured"} <= set(data)
    assert (folder / "agreement.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(folder.glob(".*"))  # no temporary files left behind


def test_agree_device_unavailable_is_usage_error():
    assert cli.main(["agree", "--case", "basic", "--device", "gpu"]) == 2


def test_bench_rounds_below_one_exits_2(capsys):
    assert cli.main(["bench", "--preset", "smoke", "--rounds", "0"]) == 2
    assert "--rounds must be >= 1, got 0" in capsys.readouterr().out
