"""Weight porting: state dicts built the way HF GPT-2 and nanoGPT name and shape them load into both twins
and agree with a plain-torch reference forward written the way each library computes; round trips through
every layout are bit-exact in both directions."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import jax_attn
import torch_attn

B, T, E, N = 2, 5, 24, 4  # H = 6


def _hf_gpt2_state_dict(rng):
    """GPT-2's ``GPT2Attention``: ``Conv1D`` weights stored (in, out), q|k|v packed on the last axis, plus
    the causal-mask buffers real checkpoints carry (``attn.bias`` (1, 1, P, P), ``attn.masked_bias``)."""
    P = 8
    return {
        "c_attn.weight": torch.tensor(rng.standard_normal((E, 3 * E)) / np.sqrt(E), dtype=torch.float32),
        "c_attn.bias": torch.tensor(rng.standard_normal(3 * E) * 0.5, dtype=torch.float32),
        "c_proj.weight": torch.tensor(rng.standard_normal((E, E)) / np.sqrt(E), dtype=torch.float32),
        "c_proj.bias": torch.tensor(rng.standard_normal(E) * 0.5, dtype=torch.float32),
        "bias": torch.tril(torch.ones(P, P, dtype=torch.bool)).view(1, 1, P, P),
        "masked_bias": torch.tensor(-1e4),
    }


def _hf_gpt2_reference(sd, x):
    """GPT-2's attention forward: ``Conv1D`` is ``x @ W + b``; split q, k, v on the last axis."""
    qkv = x @ sd["c_attn.weight"] + sd["c_attn.bias"]
    q, k, v = (t.view(B, T, N, E // N).transpose(1, 2) for t in qkv.split(E, dim=2))
    weights = (q @ k.transpose(-1, -2)) / (E // N) ** 0.5
    weights = weights.masked_fill(~sd["bias"][:, :, :T, :T], torch.finfo(weights.dtype).min).softmax(-1)
    y = (weights @ v).transpose(1, 2).reshape(B, T, E)
    return y @ sd["c_proj.weight"] + sd["c_proj.bias"]


def _nanogpt_state_dict(rng, bias):
    """nanoGPT's ``CausalSelfAttention``: ``nn.Linear`` weights (out, in), q;k;v packed on the first axis."""
    sd = {"c_attn.weight": torch.tensor(rng.standard_normal((3 * E, E)) / np.sqrt(E), dtype=torch.float32)}
    if bias:
        sd["c_attn.bias"] = torch.tensor(rng.standard_normal(3 * E) * 0.5, dtype=torch.float32)
    sd["c_proj.weight"] = torch.tensor(rng.standard_normal((E, E)) / np.sqrt(E), dtype=torch.float32)
    if bias:
        sd["c_proj.bias"] = torch.tensor(rng.standard_normal(E) * 0.5, dtype=torch.float32)
    return sd


def _nanogpt_reference(sd, x):
    """nanoGPT's forward (flash path): ``F.linear``, split q, k, v on the last axis, causal SDPA."""
    q, k, v = F.linear(x, sd["c_attn.weight"], sd.get("c_attn.bias")).split(E, dim=2)
    q, k, v = (t.view(B, T, N, E // N).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(y.transpose(1, 2).contiguous().view(B, T, E), sd["c_proj.weight"], sd.get("c_proj.bias"))


def _twins(bias=True, K=None):
    j = jax_attn.CausalSelfAttention(E, N, K, bias, rngs=nnx.Rngs(1))
    j.eval()
    return j, torch_attn.CausalSelfAttention(E, N, K, bias).eval()


@pytest.mark.parametrize(
    "layout, bias",
    [("hf_gpt2", True), ("nanogpt", True), ("nanogpt", False)],
    ids=["hf_gpt2", "nanogpt", "nanogpt_no_bias"],
)
def test_library_state_dict_loads_and_agrees_with_reference(layout, bias):
    rng = np.random.default_rng(7)
    sd = _hf_gpt2_state_dict(rng) if layout == "hf_gpt2" else _nanogpt_state_dict(rng, bias)
    x = torch.tensor(rng.standard_normal((B, T, E)), dtype=torch.float32)
    reference = (_hf_gpt2_reference if layout == "hf_gpt2" else _nanogpt_reference)(sd, x).numpy()
    j, t = _twins(bias)
    j.load_torch_state_dict(sd, layout=layout)
    t.load_torch_state_dict(sd, layout=layout)
    with torch.no_grad():
        assert np.max(np.abs(t(x).numpy() - reference)) <= 1e-5
    assert np.max(np.abs(np.asarray(j(jnp.asarray(x.numpy()))) - reference)) <= 1e-5
    # Exporting to the same layout gives back the library's tensors bit for bit (buffers aside).
    for exported in (j.torch_state_dict(layout), t.torch_state_dict(layout)):
        assert list(exported) == [k for k in sd if k not in ("bias", "masked_bias")]
        for key, value in exported.items():
            assert np.array_equal(np.asarray(value), sd[key].numpy()), key


def test_layouts_match_the_libraries_shapes():
    j, t = _twins()
    for m in (j, t):
        shapes = {
            layout: {k: tuple(v.shape) for k, v in m.torch_state_dict(layout).items()}
            for layout in ("torch_attn", "hf_gpt2", "nanogpt")
        }
        assert shapes["hf_gpt2"] == {
            "c_attn.weight": (E, 3 * E),
            "c_attn.bias": (3 * E,),
            "c_proj.weight": (E, E),
            "c_proj.bias": (E,),
        }
        assert shapes["nanogpt"] == {
            "c_attn.weight": (3 * E, E),
            "c_attn.bias": (3 * E,),
            "c_proj.weight": (E, E),
            "c_proj.bias": (E,),
        }
    g = jax_attn.CausalSelfAttention(E, N, 2, rngs=nnx.Rngs(0))
    assert {k: v.shape for k, v in g.torch_state_dict().items()} == {
        k: tuple(v.shape) for k, v in torch_attn.CausalSelfAttention(E, N, 2).state_dict().items()
    } == {
        "q_proj.weight": (24, 24), "q_proj.bias": (24,), "k_proj.weight": (12, 24), "k_proj.bias": (12,),
        "v_proj.weight": (12, 24), "v_proj.bias": (12,), "out_proj.weight": (24, 24), "out_proj.bias": (24,),
    }  # fmt: skip


@pytest.mark.parametrize("layout", ["torch_attn", "hf_gpt2", "nanogpt"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_bit_exact_both_directions(layout, dtype):
    """torch → jax → torch and jax → torch → jax through ``layout`` reproduce every parameter bit for bit."""
    K = 2 if layout == "torch_attn" else None
    t = torch_attn.CausalSelfAttention(E, N, K, dtype=getattr(torch, dtype))
    j = jax_attn.CausalSelfAttention(E, N, K, rngs=nnx.Rngs(3), param_dtype=jnp.dtype(dtype))
    original_t = {k: v.clone() for k, v in t.state_dict().items()}
    original_j = {k: v.copy() for k, v in j.torch_state_dict().items()}

    j2 = jax_attn.CausalSelfAttention(E, N, K, rngs=nnx.Rngs(4), param_dtype=jnp.dtype(dtype))
    j2.load_torch_state_dict(t.torch_state_dict(layout), layout=layout)
    t2 = torch_attn.CausalSelfAttention(E, N, K, dtype=getattr(torch, dtype))
    t2.load_torch_state_dict(j2.torch_state_dict(layout), layout=layout)
    for key, value in t2.state_dict().items():
        assert value.dtype == original_t[key].dtype and torch.equal(value, original_t[key]), key

    t3 = torch_attn.CausalSelfAttention(E, N, K, dtype=getattr(torch, dtype))
    t3.load_torch_state_dict(j.torch_state_dict(layout), layout=layout)
    j3 = jax_attn.CausalSelfAttention(E, N, K, rngs=nnx.Rngs(5), param_dtype=jnp.dtype(dtype))
    j3.load_torch_state_dict(t3.torch_state_dict(layout), layout=layout)
    for key, value in j3.torch_state_dict().items():
        assert value.dtype == original_j[key].dtype and np.array_equal(
            value.view(np.uint8), original_j[key].view(np.uint8)
        )


def test_torch_attn_layout_is_the_native_state_dict():
    t = torch_attn.CausalSelfAttention(E, N, 1, bias=False)
    exported = t.torch_state_dict()
    assert (
        list(exported)
        == list(t.state_dict())
        == ["q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight"]
    )
    t2 = torch_attn.CausalSelfAttention(E, N, 1, bias=False)
    t2.load_state_dict(exported)  # torch's own loader takes it too
    assert all(torch.equal(t2.state_dict()[k], v) for k, v in exported.items())


@pytest.mark.parametrize("layout", ["hf_gpt2", "nanogpt"])
def test_gpt_layouts_with_gqa_raise_the_same_error(layout):
    j, t = _twins(K=2)
    msg = (
        f"layout='{layout}' packs q, k and v at full width and needs num_kv_heads == num_heads; "
        "got num_heads=4, num_kv_heads=2"
    )
    errors = []
    for call in (
        lambda: j.torch_state_dict(layout),
        lambda: t.torch_state_dict(layout),
        lambda: j.load_torch_state_dict({}, layout),
        lambda: t.load_torch_state_dict({}, layout),
    ):
        with pytest.raises(ValueError, match=re.escape(msg)) as e:
            call()
        errors.append(str(e.value))
    assert len(set(errors)) == 1


def test_bad_state_dicts_raise_the_same_error():
    j, t = _twins()
    sd = t.torch_state_dict("nanogpt")
    cases = [
        ({k: v for k, v in sd.items() if k != "c_proj.bias"}, "missing keys ['c_proj.bias']"),
        ({**sd, "c_fc.weight": sd["c_proj.weight"]}, "unexpected keys ['c_fc.weight']"),
        (
            {**sd, "c_attn.weight": sd["c_attn.weight"].T},
            "key 'c_attn.weight' has shape (24, 72); layout='nanogpt' needs (72, 24)",
        ),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)) as je:
            j.load_torch_state_dict(bad, layout="nanogpt")
        with pytest.raises(ValueError, match=re.escape(msg)) as te:
            t.load_torch_state_dict(bad, layout="nanogpt")
        assert str(je.value) == str(te.value)
    with pytest.raises(ValueError, match="layout='hf_gpt2' always has biases"):
        _twins(bias=False)[1].torch_state_dict("hf_gpt2")
    with pytest.raises(
        ValueError,
        match=re.escape("layout must be one of ('torch_attn', 'hf_gpt2', 'nanogpt'); got layout='gpt3'"),
    ):
        j.torch_state_dict("gpt3")
