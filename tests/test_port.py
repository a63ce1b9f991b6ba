"""``compare.port.check_port``: the bring-your-own-module entry point."""

import pytest
import torch

import torch_attn
from compare import port, registry


def test_builtin_mha_with_user_inputs_and_causal_mask():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=True)
    q = torch.randn(3, 5, 16)
    mask = ~torch.tril(torch.ones(5, 5)).bool()  # seed 002's causal mask, torch polarity
    record = port.check_port(mha, q, q, q, attn_mask=mask, average_attn_weights=False, print_table=False)
    assert record.ok and record.round_trip_bit_exact
    assert {"jax_attn vs oracle", "torch_builtin vs oracle", "jax_attn vs torch_builtin"} == set(
        record.agreements
    )
    quantities = {a.quantity for a in record.agreements["jax_attn vs oracle"]}
    assert {"out", "weights", "dquery", "din_proj_weight", "dbias_k", "dout_proj.weight"} <= quantities
    assert mha.training  # the user's module is left as it was


def test_default_random_inputs_seq_first_kdim():
    mha = torch.nn.MultiheadAttention(12, 3, kdim=5, vdim=7)
    record = port.check_port(mha, print_table=False)
    assert record.ok and record.config["kdim"] == 5


def test_torch_attn_causal_self_attention_gqa():
    torch.manual_seed(1)
    module = torch_attn.CausalSelfAttention(16, 4, 2)
    record = port.check_port(module, torch.randn(2, 6, 16), print_table=False)
    assert record.ok and record.kind == "causal"
    assert "jax_attn vs torch_attn" in record.agreements


def test_a_broken_port_is_reported(monkeypatch):
    real = registry.KINDS["mha"].implementations["jax_attn"]

    def broken(vec):
        res = real(vec)
        res["out"] = res["out"] * 1.01
        return res

    monkeypatch.setitem(registry.KINDS["mha"].implementations, "jax_attn", broken)
    record = port.check_port(torch.nn.MultiheadAttention(8, 2), print_table=False)
    assert not record.ok
    bad = [a.quantity for a in record.agreements["jax_attn vs oracle"] if not a.ok]
    assert bad == ["out"]
    assert record.as_dict()["ok"] is False


def test_bad_arguments():
    with pytest.raises(ValueError, match="expected torch.nn.MultiheadAttention"):
        port.check_port(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="takes query, key, value"):
        port.check_port(torch.nn.MultiheadAttention(8, 2), torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match="takes no masks"):
        port.check_port(torch_attn.CausalSelfAttention(8, 2), attn_mask=torch.ones(2, 2, dtype=torch.bool))


def test_is_causal_hint_with_an_appended_key_follows_torch():
    """torch's rule: without key_padding_mask and weights, the hint is causal over every key (bias_k too);
    the oracle and both twins apply it, so check_port on such a call agrees (it failed "torch_builtin vs
    oracle" when the oracle applied the mask instead)."""
    torch.manual_seed(0)
    m = torch.nn.MultiheadAttention(8, 2, add_bias_kv=True)
    q = torch.randn(5, 2, 8)
    mask = ~torch.tril(torch.ones(5, 5)).bool()
    record = port.check_port(
        m, q, q, q, attn_mask=mask, is_causal=True, need_weights=False, print_table=False
    )
    assert record.ok, [(p, a.quantity, a.max_abs) for p, rows in record.agreements.items() for a in rows]
