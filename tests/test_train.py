"""Training-step agreement (``python -m compare train``): the tiny GPT twins and the harness."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn.gpt as jgpt
import torch_attn.gpt as tgpt
from attn_spec.gpt import GPTConfig
from compare import cli, train

SMALL = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def _pair(config=SMALL):
    tm = tgpt.GPT(config, seed=3)
    jm = jgpt.GPT(config, rngs=nnx.Rngs(0))
    jm.load_torch_state_dict(tm.state_dict())
    return tm, jm


@pytest.mark.parametrize("tied", [True, False])
def test_gpt_twins_agree_and_round_trip(tied):
    config = GPTConfig(**{**SMALL.as_dict(), "tie_weights": tied})
    tm, jm = _pair(config)
    sd = jm.torch_state_dict()
    assert set(sd) == set(tm.state_dict())
    assert all(np.array_equal(sd[k], v.numpy()) for k, v in tm.state_dict().items())  # bit-exact port
    idx = np.random.default_rng(0).integers(0, config.vocab_size, size=(3, 11))
    want = tm(torch.from_numpy(idx)).detach().numpy()
    got = np.asarray(jm(jnp.asarray(idx)))
    assert np.max(np.abs(got - want)) <= 1e-5


def test_token_checks_match_in_both_twins():
    tm, jm = _pair()
    msgs = []
    for fn, x in ((tm, torch.zeros((2, 13), dtype=torch.int64)), (jm, jnp.zeros((2, 13), jnp.int32))):
        with pytest.raises(ValueError, match=r"T=13 exceeds block_size=12") as e:
            fn(x)
        msgs.append(str(e.value).split("(idx")[0])
    assert msgs[0] == msgs[1]
    with pytest.raises(ValueError, match="token ids must be integers"):
        jm(jnp.zeros((2, 3), jnp.float32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_embd": 30, "n_head": 4}, "divisible"),
        ({"n_kv_head": 3}, "must divide"),
        ({"n_layer": 0}, "positive"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_stream_and_batches_are_deterministic():
    a, b = train.token_stream(64, 500, 1), train.token_stream(64, 500, 1)
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() < 64
    x, y = train.batch(a, 3, 4, 8, 1)
    x2, _ = train.batch(a, 3, 4, 8, 1)
    assert np.array_equal(x, x2) and np.array_equal(x[:, 1:], y[:, :-1])


def test_short_training_run_agrees():
    record = train.run(SMALL, train.TrainConfig(steps=8, batch_size=4))
    assert record["ok"], {k: record[k] for k in ("worst_loss_rel_diff", "final_param_max_abs_diff")}
    assert record["initial_param_max_abs_diff"] == 0.0
    assert record["steps"][-1]["loss_torch"] < record["steps"][0]["loss_torch"]  # it learns
    for row in record["steps"]:
        assert row["grad_norm_jax"] == pytest.approx(row["grad_norm_torch"], rel=1e-4)


@pytest.mark.parametrize("mismatch", ["adam_eps", "ln_eps", "weight_decay"])
def test_deliberate_mismatch_is_detected(mismatch):
    record = train.run(SMALL, train.TrainConfig(steps=8, batch_size=4, mismatch=mismatch))
    assert not record["ok"]
    assert record["mismatch_description"] == train.MISMATCHES[mismatch]


def test_cli_train_writes_report(tmp_path):
    assert cli.main(["train", "--steps", "3", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "train.json").read_text())
    assert len(data["steps"]) == 3 and data["ok"]
    assert (tmp_path / "train.png").stat().st_size > 10_000


def test_cli_train_mismatch_exits_1(tmp_path):
    assert cli.main(["train", "--steps", "6", "--mismatch", "ln_eps", "--out", str(tmp_path)]) == 1


def test_cli_train_bad_config_is_usage_error(tmp_path):
    assert cli.main(["train", "--kv-heads", "3", "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, "steps must be a positive int"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"mismatch": "nope"}, "unknown mismatch"),
        ({"beta2": 1.0}, "betas"),
    ],
)
def test_train_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**kwargs)


def test_cli_train_zero_steps_is_usage_error(tmp_path):
    assert cli.main(["train", "--steps", "0", "--out", str(tmp_path)]) == 2
