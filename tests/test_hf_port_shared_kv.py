"""Key/value-shared layers (Gemma 4's last ``num_kv_shared_layers``; ``AttentionConfig.kv_shared``): the
layers port and agree with transformers (outputs, gradients w.r.t. the consumer's x and parameters, decode
through one cache), the twins agree with each other and with the float64 oracle (full pass, cached decode,
every path), and bad calls raise naming the shapes or knobs."""

import dataclasses

import numpy as np
import pytest
import torch

from attn_spec.attention import AttentionConfig, state_dict_shapes
from attn_spec.rope import RopeConfig
from compare import oracle_attention

tf = pytest.importorskip("transformers")

from port_support import bad  # noqa: E402

from attn_spec import hf as spec  # noqa: E402
from compare import port, port_hf  # noqa: E402

PAIRS = ("jax_attn vs transformers", "torch_attn vs transformers")


_bad = bad


@pytest.mark.parametrize(
    "layer, dtype",
    [(2, "float32"), (3, "float32"), (2, "bfloat16")],
    ids=["sliding-fp32", "full-fp32", "sliding-bf16"],
)
def test_shared_layer_agrees_with_transformers(layer, dtype):
    """Layer 2 (sliding, window 3 < T: decode runs through the producer's ring) reads layer 0; layer 3 (full,
    head 16, one kv head, proportional rope) reads layer 1, whose values are its keys' projection."""
    module, model = port_hf.tiny_module("gemma4_text", layer, dtype, shared_kv=True)
    assert module.is_kv_shared_layer and not hasattr(module, "k_proj")
    producer = port_hf.producer_of(model, layer)
    assert producer.layer_idx == layer - 2 and producer.store_full_length_kv
    record = port.check_port(module, print_table=False, producer=producer)
    assert record.ok and record.round_trip_bit_exact, _bad(record)
    got = {a.quantity for a in record.agreements["jax_attn vs transformers"]}
    assert got == {
        "out",
        "grad_x",
        "grad_q_proj.weight",
        "grad_q_norm.weight",
        "grad_o_proj.weight",
        "decode_out",
    }
    assert record.config["kv_shared"] and not record.config["v_norm"]


def test_reader_and_module_description_of_a_shared_layer():
    module, model = port_hf.tiny_module("gemma4_text", 3, shared_kv=True)
    family, c = spec.describe_module(module)
    _, p = spec.describe_module(port_hf.producer_of(model, 3))
    assert family == "gemma4_text" and c.kv_shared and not c.k_eq_v and p.k_eq_v and p.v_norm
    assert (c.K, c.H, c.rope) == (p.K, p.H, p.rope)
    assert list(state_dict_shapes(c)) == ["q_proj.weight", "o_proj.weight", "q_norm.weight"]
    assert [spec.kv_producer(model.config, i) for i in range(4)] == [None, None, 0, 1]
    assert model.config.kv_sharing_modes == ["store", "store", "reuse", "reuse"]


def test_check_hf_port_needs_the_right_producer():
    module, model = port_hf.tiny_module("gemma4_text", 2, shared_kv=True)
    with pytest.raises(ValueError, match=r"pass producer=.*\(layer 0 of its model\)"):
        port_hf.check_hf_port(module, print_table=False)
    with pytest.raises(ValueError, match=r"keys do not fit the consumer.*\(1, 16, None\) vs \(2, 8, 3\)"):
        port_hf.check_hf_port(module, print_table=False, producer=port_hf.attention_of(model, 1))
    with pytest.raises(ValueError, match="computing its keys and values"):
        port_hf.check_hf_port(module, print_table=False, producer=port_hf.attention_of(model, 3))
    other = port_hf.attention_of(model, 0)
    with pytest.raises(ValueError, match="producer= is for key/value-shared layers"):
        port_hf.check_hf_port(other, print_table=False, producer=other)


# --- the twins and the oracle, on configs built directly ---------------------------------------------------

BASE = dict(
    hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm="head", qk_norm_offset=1.0, scale=1.0
)
CASES = {
    "sliding": dict(sliding_window=3),
    "full-partial-rope": dict(rope=RopeConfig(rope_theta=1e6, partial_rotary_factor=0.5)),
    "chunked": dict(chunk_size=3, rope=None),
}


def _pair(case):
    kw = dict(BASE, **CASES[case])
    return AttentionConfig(**kw, v_norm=True), AttentionConfig(**kw, kv_shared=True)


def _inputs():
    g = torch.Generator().manual_seed(1)
    x_p = torch.randn(2, 7, 16, generator=g, dtype=torch.float64)
    x = torch.randn(2, 7, 16, generator=g, dtype=torch.float64)
    m = torch.ones(2, 7, dtype=torch.long)
    m[1, :2] = 0
    pos = torch.clamp(torch.cumsum(m, 1) - 1, min=0)
    return x_p, x, m, pos


def _torch_pair(case, implementation="math", dtype=torch.float64):
    import torch_attn.attention as ta

    pc, cc = _pair(case)
    torch.manual_seed(0)
    prod = ta.Attention(pc, implementation="math", dtype=dtype)
    cons = ta.Attention(cc, implementation=implementation, dtype=dtype)
    with torch.no_grad():
        for prm in [*prod.parameters(), *cons.parameters()]:
            prm.copy_(torch.randn_like(prm) * 0.5)
    return prod, cons


@pytest.mark.parametrize("case", list(CASES))
def test_torch_twin_matches_the_oracle_full_pass_decode_and_paths(case):
    prod, cons = _torch_pair(case)
    x_p, x, m, pos = _inputs()
    real = m.bool().numpy()
    _, kv = prod(x_p, m, pos, return_kv=True)
    kv = dataclasses.replace(kv, k=kv.k.detach(), v=kv.v.detach())
    xg = x.clone().requires_grad_(True)
    y = cons(xg, m, pos, shared_kv=kv)
    dy = torch.randn(y.shape, dtype=torch.float64) * m[..., None]
    y.backward(dy)

    pc, cc = _pair(case)
    p_params = {k: v.numpy() for k, v in prod.torch_state_dict().items()}
    params = {k: v.numpy() for k, v in cons.torch_state_dict().items()}
    fp = oracle_attention.attention_forward(x_p.numpy(), p_params, pc, m.numpy(), pos.numpy())
    g = oracle_attention.attention_backward(
        x.numpy(), params, dy.numpy(), cc, m.numpy(), pos.numpy(), shared_kv=(fp["k"], fp["v"])
    )
    # float64 twin vs float64 oracle: only the twins' float32 rotary tables differ
    np.testing.assert_allclose(y.detach().numpy()[real], g["out"][real], atol=1e-5)
    np.testing.assert_allclose(xg.grad.numpy(), g["x"], atol=1e-5)
    for k, prm in cons.named_parameters():
        np.testing.assert_allclose(prm.grad.numpy(), g[k], atol=1e-5, err_msg=k)
    assert g["dk0"] is None and "k_proj.weight" not in g

    # decode through the producer's cache (a ring of the window / chunk for the windowed layers)
    cache, ys = prod.init_cache(2, 7), []
    with torch.no_grad():
        for t in range(7):
            sl = (slice(None), slice(t, t + 1))
            _, cache, kv_t = prod(x_p[sl], m[sl], pos[sl], cache=cache, return_kv=True)
            ys.append(cons(x[sl], m[sl], pos[sl], shared_kv=kv_t))
    np.testing.assert_allclose(torch.cat(ys, 1).numpy()[real], y.detach().numpy()[real], atol=1e-12)
    for path in ("fused", "blocked"):
        other = type(cons)(cc, implementation=path, dtype=torch.float64)
        other.load_torch_state_dict(cons.torch_state_dict())
        with torch.no_grad():
            got = other(x, m, pos, shared_kv=kv).numpy()
        np.testing.assert_allclose(got[real], y.detach().numpy()[real], atol=1e-12, err_msg=path)


@pytest.mark.parametrize("case", ["sliding", "chunked"])
def test_jax_twin_matches_the_torch_twin_full_pass_and_jitted_decode(case):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_attn.attention as ja

    prod, cons = _torch_pair(case, dtype=torch.float32)
    pc, cc = _pair(case)
    jp = ja.Attention(pc, implementation="math", rngs=nnx.Rngs(0))
    jc = ja.Attention(cc, implementation="math", rngs=nnx.Rngs(0))
    jp.load_torch_state_dict(prod.torch_state_dict())
    jc.load_torch_state_dict(cons.torch_state_dict())
    x_p, x, m, pos = (a.float() if a.is_floating_point() else a for a in _inputs())
    real = m.bool().numpy()
    with torch.no_grad():
        want = cons(x, m, pos, shared_kv=prod(x_p, m, pos, return_kv=True)[1]).numpy()
    J = jnp.asarray
    _, kv = jp(J(x_p.numpy()), J(m.numpy()), J(pos.numpy()), return_kv=True)
    full = np.asarray(jc(J(x.numpy()), J(m.numpy()), J(pos.numpy()), shared_kv=kv))
    np.testing.assert_allclose(full[real], want[real], atol=2e-5)

    @jax.jit
    def step(xp_t, x_t, m_t, p_t, cache):
        _, cache, kv_t = jp(xp_t, m_t, p_t, cache=cache, return_kv=True)
        return jc(x_t, m_t, p_t, shared_kv=kv_t), cache

    cache, ys = jp.init_cache(2, 7), []
    for t in range(7):
        sl = (slice(None), slice(t, t + 1))
        y, cache = step(J(x_p.numpy()[sl]), J(x.numpy()[sl]), J(m.numpy()[sl]), J(pos.numpy()[sl]), cache)
        ys.append(np.asarray(y))
    np.testing.assert_allclose(np.concatenate(ys, 1)[real], full[real], atol=2e-5)
    for path in ("fused", "blocked"):
        other = ja.Attention(cc, implementation=path, rngs=nnx.Rngs(0))
        other.load_torch_state_dict(cons.torch_state_dict())
        got = np.asarray(other(J(x.numpy()), J(m.numpy()), J(pos.numpy()), shared_kv=kv))
        np.testing.assert_allclose(got[real], full[real], atol=2e-5, err_msg=path)


# --- bad calls ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("knob", [dict(v_norm=True), dict(k_eq_v=True), dict(k_bias=True), dict(v_bias=True)])
def test_config_refuses_key_value_knobs_on_a_shared_layer(knob):
    (name,) = knob
    with pytest.raises(ValueError, match=rf"kv_shared=True .* got {name}=True"):
        AttentionConfig(**BASE, kv_shared=True, **knob)


def test_bad_calls_name_the_shapes():
    import jax.numpy as jnp
    from flax import nnx

    import jax_attn.attention as ja

    prod, cons = _torch_pair("sliding")
    x_p, x, m, pos = _inputs()
    _, kv = prod(x_p, m, pos, return_kv=True)
    with pytest.raises(ValueError, match="needs shared_kv="):
        cons(x, m, pos)
    with pytest.raises(ValueError, match="no cache of its own"):
        cons(x, m, pos, cache=prod.init_cache(2, 7), shared_kv=kv)
    with pytest.raises(ValueError, match="keeps no cache"):
        cons.init_cache(2, 7)
    with pytest.raises(ValueError, match="shared_kv= is for kv_shared layers"):
        prod(x, m, pos, shared_kv=kv)
    with pytest.raises(ValueError, match="return_kv=True is for producer layers"):
        cons(x, m, pos, shared_kv=kv, return_kv=True)
    with pytest.raises(ValueError, match=r"needs k \(1, 2, 7, 8\).*got k \(2, 2, 7, 8\)"):
        cons(x[:1], m[:1], pos[:1], shared_kv=kv)
    with pytest.raises(ValueError, match=r"q_pos \(3,\).*got .*q_pos \(7,\)"):
        cons(x[:, :3], m[:, :3], pos[:, :3], shared_kv=kv)
    pc, cc = _pair("sliding")
    jc = ja.Attention(cc, rngs=nnx.Rngs(0))
    jkv = ja.SharedKV(
        *(jnp.asarray(getattr(kv, f).detach().numpy()) for f in ("k", "v", "pos", "valid", "q_pos", "lead"))
    )
    with pytest.raises(ValueError, match=r"needs k \(1, 2, 7, 8\)"):
        jc(jnp.asarray(x[:1].numpy()), shared_kv=jkv)
    with pytest.raises(ValueError, match="needs shared_kv="):
        jc(jnp.asarray(x.numpy()))
    with pytest.raises(ValueError, match="shared_kv=\\(k, v\\) goes with a kv_shared config"):
        oracle_attention.attention_forward(x.numpy(), {}, cc)
