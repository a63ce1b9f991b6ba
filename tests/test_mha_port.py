"""Weight porting: torch's names and shapes, strict loading both ways, bit-exact round trips, init."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn
import torch_attn

CONFIGS = {
    "packed": {},
    "no_bias": {"bias": False},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim_vdim": {"kdim": 7, "vdim": 10},
    "kdim_only_batch_first": {"kdim": 5, "batch_first": True},
}


def _builtin(cfg, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.MultiheadAttention(12, 3, **cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape))  # every value distinct, biases non-zero
    return m


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_names_and_shapes_are_torchs(name):
    cfg = CONFIGS[name]
    want = {k: tuple(v.shape) for k, v in torch.nn.MultiheadAttention(12, 3, **cfg).state_dict().items()}
    jm = jax_attn.MultiheadAttention(12, 3, **cfg, rngs=nnx.Rngs(0))
    tm = torch_attn.MultiheadAttention(12, 3, **cfg)
    assert list(want) == list(jm.torch_state_dict())  # same names, same order
    assert {k: v.shape for k, v in jm.torch_state_dict().items()} == want
    assert {k: tuple(v.shape) for k, v in tm.state_dict().items()} == want


@pytest.mark.parametrize("name", list(CONFIGS))
def test_strict_loading_both_ways_and_bit_exact_round_trip(name):
    cfg = CONFIGS[name]
    builtin = _builtin(cfg)
    twin = torch_attn.MultiheadAttention(12, 3, **cfg)
    twin.load_state_dict(builtin.state_dict(), strict=True)
    back = torch.nn.MultiheadAttention(12, 3, **cfg)
    back.load_state_dict(twin.state_dict(), strict=True)

    ported = jax_attn.MultiheadAttention.from_torch(builtin)  # torch -> jax
    again = torch.nn.MultiheadAttention(12, 3, **cfg)
    again.load_state_dict({k: torch.from_numpy(v) for k, v in ported.torch_state_dict().items()}, strict=True)
    for k, v in builtin.state_dict().items():  # torch -> jax -> torch, bit for bit
        assert torch.equal(again.state_dict()[k], v), k
        assert torch.equal(back.state_dict()[k], v), k
        assert np.array_equal(np.asarray(ported.torch_state_dict()[k]), v.numpy()), k


def test_load_accepts_numpy_and_jax_arrays_and_twin_from_torch():
    builtin = _builtin({"kdim": 7})
    sd_np = {k: v.numpy() for k, v in builtin.state_dict().items()}
    jm = jax_attn.MultiheadAttention(12, 3, kdim=7, rngs=nnx.Rngs(1))
    jm.load_torch_state_dict({k: jnp.asarray(v) for k, v in sd_np.items()})
    tm = torch_attn.MultiheadAttention.from_torch(builtin.eval())
    assert not tm.training
    for k, v in sd_np.items():
        assert np.array_equal(jm.torch_state_dict()[k], v)
        assert np.array_equal(tm.torch_state_dict()[k], v)


def test_from_torch_copies_configuration_and_mode():
    builtin = torch.nn.MultiheadAttention(12, 4, dropout=0.1, bias=False, add_zero_attn=True, vdim=5).eval()
    jm = jax_attn.MultiheadAttention.from_torch(builtin)
    assert (jm.embed_dim, jm.num_heads, jm.dropout, jm.kdim, jm.vdim) == (12, 4, 0.1, 12, 5)
    assert jm.add_zero_attn and not jm.training and jm.in_proj_bias is None and jm.out_proj.bias is None
    assert builtin.training is False


def test_bf16_round_trip_is_exact():
    builtin = _builtin({}).to(torch.bfloat16)
    jm = jax_attn.MultiheadAttention.from_torch(builtin)
    assert jm.param_dtype == jnp.bfloat16
    back = torch.nn.MultiheadAttention(12, 3, dtype=torch.bfloat16)
    tm = torch_attn.MultiheadAttention(12, 3, dtype=torch.bfloat16)
    tm.load_torch_state_dict(jm.torch_state_dict())
    back.load_state_dict(tm.state_dict(), strict=True)
    for k, v in builtin.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_initialisation_distribution_like_torch():
    """xavier_uniform in-projection, zero biases, Linear-default out_proj: the same bounds and spread."""
    E = 64
    jm = jax_attn.MultiheadAttention(E, 4, add_bias_kv=True, rngs=nnx.Rngs(0))
    tm = torch.nn.MultiheadAttention(E, 4, add_bias_kv=True)
    j, t = jm.torch_state_dict(), {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    bound = np.sqrt(6.0 / (E + 3 * E))
    assert np.abs(j["in_proj_weight"]).max() <= bound
    np.testing.assert_allclose(j["in_proj_weight"].std(), t["in_proj_weight"].std(), rtol=0.05)
    np.testing.assert_allclose(j["out_proj.weight"].std(), t["out_proj.weight"].std(), rtol=0.05)
    assert np.abs(j["out_proj.weight"]).max() <= 1 / np.sqrt(E)
    assert not j["in_proj_bias"].any() and not j["out_proj.bias"].any()
    np.testing.assert_allclose(j["bias_k"].std(), 1 / np.sqrt(E), rtol=0.3)
