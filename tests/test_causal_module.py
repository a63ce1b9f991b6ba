"""The module contract: parameter names and shapes, torch's initialization range, the explicit and reported
implementation choice, and attention dropout in training mode only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn
import torch_attn

B, T, E, N, K = 2, 5, 24, 4, 2  # H = 6


def test_parameter_names_shapes_and_init_range():
    j = jax_attn.CausalSelfAttention(E, N, K, rngs=nnx.Rngs(0))
    t = torch_attn.CausalSelfAttention(E, N, K)
    flat = {".".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(j, nnx.Param))}
    torch_shapes = {name: tuple(p.shape) for name, p in t.named_parameters()}
    assert {name: tuple(v.shape) for name, v in flat.items()} == torch_shapes
    assert torch_shapes["k_proj.weight"] == (K * E // N, E) and torch_shapes["out_proj.weight"] == (E, E)
    for name, v in flat.items():  # torch's nn.Linear init: U(-1/sqrt(in), 1/sqrt(in))
        assert np.max(np.abs(np.asarray(v[...]))) <= 1 / np.sqrt(E), name
        assert np.std(np.asarray(v[...])) > 0.25 / np.sqrt(E), name


@pytest.mark.parametrize("implementation", ["math", "fused"])
def test_implementation_is_reported(implementation):
    j = jax_attn.CausalSelfAttention(E, N, K, implementation=implementation, rngs=nnx.Rngs(0))
    t = torch_attn.CausalSelfAttention(E, N, K, implementation=implementation)
    for m in (j, t):
        assert m.implementation == implementation
        assert f"implementation={implementation!r}" in repr(m)


def test_math_and_fused_agree_both_frameworks():
    t_math = torch_attn.CausalSelfAttention(E, N, K).eval()
    t_fused = torch_attn.CausalSelfAttention(E, N, K, implementation="fused").eval()
    t_fused.load_state_dict(t_math.state_dict())
    j_math = jax_attn.CausalSelfAttention(E, N, K, rngs=nnx.Rngs(0))
    j_fused = jax_attn.CausalSelfAttention(E, N, K, implementation="fused", rngs=nnx.Rngs(1))
    for j in (j_math, j_fused):
        j.load_torch_state_dict(t_math.state_dict())
    x = np.random.default_rng(0).standard_normal((B, T, E)).astype(np.float32)
    with torch.no_grad():
        a, b = t_math(torch.from_numpy(x)).numpy(), t_fused(torch.from_numpy(x)).numpy()
    c, d = np.asarray(j_math(jnp.asarray(x))), np.asarray(j_fused(jnp.asarray(x)))
    for got in (b, c, d):
        assert np.max(np.abs(got - a)) <= 1e-5


def _dropout_twins(p=0.5):
    t = torch_attn.CausalSelfAttention(E, N, K, dropout=p)
    j = jax_attn.CausalSelfAttention(E, N, K, dropout=p, rngs=nnx.Rngs(0, dropout=1))
    j.load_torch_state_dict(t.state_dict())
    return j, t


def test_dropout_only_in_training_mode():
    j, t = _dropout_twins()
    x = np.random.default_rng(1).standard_normal((B, T, E)).astype(np.float32)
    xt, xj = torch.from_numpy(x), jnp.asarray(x)
    with torch.no_grad():
        t_train_1, t_train_2 = t(xt).numpy(), t(xt).numpy()
        t.eval()
        t_eval = t(xt).numpy()
    j_train_1, j_train_2 = np.asarray(j(xj)), np.asarray(j(xj))
    j.eval()
    j_eval = np.asarray(j(xj))
    assert np.max(np.abs(t_eval - j_eval)) <= 1e-5  # eval: no dropout, the twins agree
    for a, b in ((t_train_1, t_train_2), (j_train_1, j_train_2)):
        assert not np.allclose(a, b)  # fresh masks per call
        assert not np.allclose(a, t_eval)
    j.train()
    assert not np.allclose(np.asarray(j(xj)), j_eval)


def test_injected_dropout_mask_agrees_and_matches_hand_masking():
    """With the same keep-mask both twins agree; keeping everything equals eval scaled by nothing but
    ``1 / (1 - p)`` on the weights, i.e. attention values times 2 before out_proj."""
    j, t = _dropout_twins(0.5)
    x = np.random.default_rng(2).standard_normal((B, T, E)).astype(np.float32)
    keep = np.random.default_rng(3).random((B, N, T, T)) >= 0.5
    with torch.no_grad():
        yt = t(torch.from_numpy(x), dropout_mask=torch.from_numpy(keep)).numpy()
    yj = np.asarray(j(jnp.asarray(x), dropout_mask=jnp.asarray(keep)))
    assert np.max(np.abs(yt - yj)) <= 1e-5
    # All kept: weights scaled by 2, so (y - b_out) doubles relative to eval.
    all_kept = np.ones((B, N, T, T), bool)
    with torch.no_grad():
        y_all = t(torch.from_numpy(x), dropout_mask=torch.from_numpy(all_kept)).numpy()
        t.eval()
        y_eval = t(torch.from_numpy(x)).numpy()
    b_out = t.out_proj.bias.detach().numpy()
    assert np.max(np.abs((y_all - b_out) - 2 * (y_eval - b_out))) <= 1e-5


def test_jax_dropout_under_jit_uses_the_module_stream():
    j, _ = _dropout_twins()
    graphdef, state = nnx.split(j)

    @jax.jit
    def f(state, x):
        model = nnx.merge(graphdef, state)
        y = model(x)
        return y, nnx.state(model)

    x = jnp.ones((B, T, E))
    y1, state = f(state, x)
    y2, state = f(state, x)
    assert np.all(np.isfinite(np.asarray(y1))) and not np.allclose(np.asarray(y1), np.asarray(y2))
