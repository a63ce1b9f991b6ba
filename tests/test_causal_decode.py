"""KV-cache decoding equals one full causal pass (both twins, MHA/GQA/MQA); JAX decode compiles once;
overflow raises (torch, JAX eager) or gives NaN (JAX under jit)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn
import torch_attn
from compare import oracle

B, T, E, N, L = 3, 7, 24, 4, 9  # H = 6
SCHEDULES = {"token_by_token": (1,) * T, "uneven_3121": (3, 1, 2, 1), "uneven_142": (1, 4, 2)}


def _weights(K, seed=0):
    rng = np.random.default_rng(seed)
    H = E // N
    shapes = {"q_proj": (N * H, E), "k_proj": (K * H, E), "v_proj": (K * H, E), "out_proj": (E, N * H)}
    sd = {}
    for proj, shape in shapes.items():
        sd[f"{proj}.weight"] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        sd[f"{proj}.bias"] = (0.5 * rng.standard_normal(shape[0])).astype(np.float32)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    return sd, x


def _expected(sd, x, K):
    params = {k: v.astype(np.float64) for k, v in sd.items()}
    return oracle.causal_self_attention_forward(x.astype(np.float64), params, N, K)["out"]


def _jax_module(sd, K, implementation="math"):
    m = jax_attn.CausalSelfAttention(E, N, K, implementation=implementation, rngs=nnx.Rngs(0))
    m.load_torch_state_dict(sd)
    m.eval()
    return m


def _torch_module(sd, K, implementation="math"):
    m = torch_attn.CausalSelfAttention(E, N, K, implementation=implementation)
    m.load_torch_state_dict(sd)
    return m.eval()


def _jit_step(module):
    """A jitted cached call and the list its traces append to (one entry per compilation)."""
    graphdef, state = nnx.split(module)
    traces = []

    @jax.jit
    def step(state, x, cache):
        traces.append(x.shape)
        return nnx.merge(graphdef, state)(x, cache=cache)

    return (lambda x, cache: step(state, x, cache)), traces, step


def _decode(call, init, x, schedule):
    cache, ys, start = init, [], 0
    for size in schedule:
        y, cache = call(x[:, start : start + size], cache)
        ys.append(np.asarray(y.detach() if hasattr(y, "detach") else y, np.float64))
        start += size
    return np.concatenate(ys, axis=1), cache


@pytest.mark.parametrize("K", [4, 2, 1], ids=["mha", "gqa_K2", "mqa_K1"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_torch_cache_equals_full_pass(K, schedule):
    sd, x = _weights(K)
    m = _torch_module(sd, K)
    with torch.no_grad():
        full = m(torch.from_numpy(x)).double().numpy()
        got, cache = _decode(
            lambda xc, c: m(torch.from_numpy(np.ascontiguousarray(xc)), cache=c),
            m.init_cache(B, L),
            x,
            SCHEDULES[schedule],
        )
    assert cache.index == T
    assert np.max(np.abs(got - _expected(sd, x, K))) <= 1e-5
    assert np.max(np.abs(got - full)) <= 1e-5


@pytest.mark.parametrize("K", [4, 2, 1], ids=["mha", "gqa_K2", "mqa_K1"])
def test_jax_jit_token_by_token_equals_full_pass_and_compiles_once(K):
    sd, x = _weights(K)
    m = _jax_module(sd, K)
    call, traces, step = _jit_step(m)
    got, cache = _decode(call, m.init_cache(B, L), jnp.asarray(x), SCHEDULES["token_by_token"])
    assert int(cache.index) == T
    assert len(traces) == 1 and step._cache_size() == 1  # one compilation for all T decode steps
    assert np.max(np.abs(got - _expected(sd, x, K))) <= 1e-5
    assert np.max(np.abs(got - np.asarray(m(jnp.asarray(x)), np.float64))) <= 1e-5


@pytest.mark.parametrize(
    "K, schedule",
    [(4, "uneven_3121"), (2, "uneven_142"), (1, "uneven_3121")],
    ids=["mha", "gqa_K2", "mqa_K1"],
)
def test_jax_eager_uneven_chunks_equal_full_pass(K, schedule):
    sd, x = _weights(K)
    m = _jax_module(sd, K)
    got, cache = _decode(
        lambda xc, c: m(xc, cache=c), m.init_cache(B, L), jnp.asarray(x), SCHEDULES[schedule]
    )
    assert int(cache.index) == T
    assert np.max(np.abs(got - _expected(sd, x, K))) <= 1e-5


def test_jax_prefill_then_decode_compiles_once_per_chunk_length():
    sd, x = _weights(2)
    m = _jax_module(sd, 2)
    call, traces, _ = _jit_step(m)
    got, _ = _decode(call, m.init_cache(B, L), jnp.asarray(x), (3, 1, 1, 1, 1))
    assert traces == [(B, 3, E), (B, 1, E)]  # the prefill length, then one decode program
    assert np.max(np.abs(got - _expected(sd, x, 2))) <= 1e-5


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_fused_path_cache_equals_full_pass(framework):
    sd, x = _weights(2, seed=1)
    if framework == "jax":
        m = _jax_module(sd, 2, "fused")
        call, traces, _ = _jit_step(m)
        got, _ = _decode(call, m.init_cache(B, L), jnp.asarray(x), (3, 1, 1, 1, 1))
        assert len(traces) == 2
    else:
        m = _torch_module(sd, 2, "fused")
        with torch.no_grad():
            got, _ = _decode(
                lambda xc, c: m(torch.from_numpy(np.ascontiguousarray(xc)), cache=c),
                m.init_cache(B, L),
                x,
                (3, 1, 2, 1),
            )
    assert np.max(np.abs(got - _expected(sd, x, 2))) <= 1e-5


def test_calls_do_not_modify_the_given_cache():
    """Functional updates in both twins: a cache can be branched (e.g. two continuations of a prompt)."""
    sd, x = _weights(1)
    tm, jm = _torch_module(sd, 1), _jax_module(sd, 1)
    with torch.no_grad():
        _, t_prompt = tm(torch.from_numpy(x[:, :3]), cache=tm.init_cache(B, L))
        t_k = t_prompt.k.clone()
        ya, _ = tm(torch.from_numpy(x[:, 3:4]), cache=t_prompt)
        tm(torch.from_numpy(x[:, 4:5]), cache=t_prompt)  # another branch
        ya2, _ = tm(torch.from_numpy(x[:, 3:4]), cache=t_prompt)
    assert t_prompt.index == 3 and torch.equal(t_prompt.k, t_k)  # the buffer itself: bit for bit
    # The continuation is recomputed: equal within fp32 tolerance (not bits: BLAS may pick other kernels).
    ya, ya2 = ya.numpy(), ya2.numpy()
    assert np.max(np.abs(ya2 - ya)) <= 1e-5 * max(1.0, float(np.max(np.abs(ya))))
    _, j_prompt = jm(jnp.asarray(x[:, :3]), cache=jm.init_cache(B, L))
    j_k = np.asarray(j_prompt.k).copy()
    jm(jnp.asarray(x[:, 4:5]), cache=j_prompt)
    assert int(j_prompt.index) == 3 and np.array_equal(np.asarray(j_prompt.k), j_k)


def test_cache_layout_and_unfilled_slots():
    sd, x = _weights(2)
    for m, to_np in ((_torch_module(sd, 2), lambda a: a.detach().numpy()), (_jax_module(sd, 2), np.asarray)):
        cache = m.init_cache(B, L)
        assert tuple(cache.k.shape) == tuple(cache.v.shape) == (B, 2, L, E // N) and int(cache.index) == 0
        assert cache.max_length == L
        xs = torch.from_numpy(x[:, :3]) if isinstance(m, torch.nn.Module) else jnp.asarray(x[:, :3])
        with torch.no_grad():
            _, cache = m(xs, cache=cache)
        assert int(cache.index) == 3
        assert np.all(to_np(cache.k)[:, :, 3:] == 0) and np.all(np.abs(to_np(cache.k)[:, :, :3]) > 0)


def test_overflow_torch_and_jax_eager_raise_the_same_error():
    sd, x = _weights(4)
    tm, jm = _torch_module(sd, 4), _jax_module(sd, 4)
    with torch.no_grad():
        _, tc = tm(torch.from_numpy(x[:, :3]), cache=tm.init_cache(B, 4))
    _, jc = jm(jnp.asarray(x[:, :3]), cache=jm.init_cache(B, 4))
    msg = re.escape("KV cache overflow: 3 cached + 2 new tokens > max_length=4")
    with pytest.raises(ValueError, match=msg) as t_err:
        tm(torch.from_numpy(x[:, 3:5]), cache=tc)
    with pytest.raises(ValueError, match=msg) as j_err:
        jm(jnp.asarray(x[:, 3:5]), cache=jc)
    assert str(t_err.value) == str(j_err.value)


def test_overflow_under_jit_gives_nan_never_garbage():
    """Under jit the index is traced and cannot raise: the overflowing call's output is all NaN, and so is
    every later call's (the index stays past max_length); calls before it are exact."""
    sd, x = _weights(2)
    m = _jax_module(sd, 2)
    call, traces, _ = _jit_step(m)
    cache, outs = m.init_cache(B, 3), []
    for t in range(5):
        y, cache = call(jnp.asarray(x[:, t : t + 1]), cache)
        outs.append(np.asarray(y, np.float64))
    assert len(traces) == 1
    assert np.max(np.abs(np.concatenate(outs[:3], axis=1) - _expected(sd, x[:, :3], 2))) <= 1e-5
    assert np.all(np.isnan(outs[3])) and np.all(np.isnan(outs[4]))
    assert int(cache.index) == 5
    # A chunk that only partly fits is NaN as a whole.
    _, cache = call(jnp.asarray(x[:, :2]), m.init_cache(B, 3))
    y, _ = call(jnp.asarray(x[:, 2:4]), cache)
    assert np.all(np.isnan(np.asarray(y)))
