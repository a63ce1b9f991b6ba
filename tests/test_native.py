"""The JAX twin's compiled CPU kernel (jax_attn/native, the engine's dense plan on the CPU backend) against
the float64 NumPy oracle: outputs and every gradient, grouped heads, causal with T < S and T > S, head
widths that are not a multiple of the vector width, lengths that are not a multiple of the blocks, the lse
cotangent, vmap. Each case first checks that the kernel is what ran (its FFI target in the lowered program),
and that the calls it does not take (a mask array) never reach it. (bf16 SDPA inputs reach it: the blocked
path computes in float32 on CPU.)"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn
from compare.oracle import sdpa_backward, sdpa_forward
from jax_attn import engine, native

pytestmark = pytest.mark.skipif(
    bool(native.unavailable()), reason=f"the CPU kernel is unavailable here: {native.unavailable()}"
)

# (B, N, K, T, S, H, V, causal): GQA, T != S both ways (top-left causal), widths off the vector width,
# lengths off the forward (128 x 256) and backward (64 x 128) blocks, single rows and keys.
CASES = [
    (2, 4, 4, 70, 70, 64, 64, True),
    (1, 6, 2, 130, 300, 80, 48, False),
    (2, 3, 1, 257, 129, 24, 40, True),
    (1, 4, 2, 100, 600, 32, 32, True),
    (1, 2, 2, 1, 1, 16, 8, False),
    (3, 2, 1, 1, 513, 64, 64, False),
    (1, 2, 1, 300, 17, 8, 72, False),
    (1, 3, 1, 200, 300, 32, 32, True),  # one key row: the backward splits its key blocks between threads
]


def _inputs(B, N, K, T, S, H, V, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, N, T, H)).astype(np.float32)
    k = rng.standard_normal((B, K, S, H)).astype(np.float32)
    v = rng.standard_normal((B, K, S, V)).astype(np.float32)
    dy = rng.standard_normal((B, N, T, V)).astype(np.float32)
    return q, k, v, dy


def _sdpa(causal, scale=None, mask=None, implementation="blocked"):
    def f(q, k, v):
        return jax_attn.scaled_dot_product_attention(
            q, k, v, mask, is_causal=causal, scale=scale, enable_gqa=True, implementation=implementation
        )

    return f


def _uses_kernel(f, *args) -> bool:
    return "jax_attn_cpu_forward" in jax.jit(f).lower(*args).as_text()


def _close(got, ref, name):
    ref = np.asarray(ref)
    err = float(np.max(np.abs(np.asarray(got, np.float64) - ref)))
    bound = 2e-6 * max(1.0, float(np.max(np.abs(ref)))) * 10
    assert err <= bound, f"{name}: max |err| {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_kernel_matches_the_oracle(case):
    B, N, K, T, S, H, V, causal = case
    q, k, v, dy = _inputs(B, N, K, T, S, H, V)
    scale = 0.7 / np.sqrt(H)
    f = _sdpa(causal, scale)
    assert _uses_kernel(f, q, k, v)
    out, vjp = jax.vjp(jax.jit(f), q, k, v)
    dq, dk, dv = vjp(jnp.asarray(dy))
    q64, k64, v64, dy64 = (x.astype(np.float64) for x in (q, k, v, dy))
    ref_out = sdpa_forward(q64, k64, v64, is_causal=causal, scale=scale, groups=N // K)["out"]
    ref = sdpa_backward(q64, k64, v64, dy64, is_causal=causal, scale=scale, groups=N // K)
    _close(out, ref_out, "out")
    for name, got in zip(("dq", "dk", "dv"), (dq, dk, dv)):
        _close(got, ref[name], name)


def _lse_oracle(q, k, scale, causal, groups):
    """float64 lse (B, N, T) and the gradients of sum(lse * dl) by hand: d lse_t / d s_ts = p_ts."""
    k = np.repeat(k, groups, axis=1)
    s = scale * np.einsum("bnth,bnsh->bnts", q, k)
    T, S = s.shape[-2:]
    if causal:
        s = np.where(np.arange(S)[None] <= np.arange(T)[:, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    lse = (m + np.log(e.sum(-1, keepdims=True)))[..., 0]
    p = e / e.sum(-1, keepdims=True)

    def grads(dl):
        ds = p * dl[..., None]
        dq = scale * np.einsum("bnts,bnsh->bnth", ds, k)
        dk = scale * np.einsum("bnts,bnth->bnsh", ds, q)
        return dq, dk.reshape(dk.shape[0], -1, groups, *dk.shape[2:]).sum(2)

    return lse, grads


@pytest.mark.parametrize("causal", [False, True])
def test_lse_and_its_cotangent(causal):
    B, N, K, T, S, H = 2, 4, 2, 150, 280, 40
    q, k, v, _ = _inputs(B, N, K, T, S, H, H, seed=3)
    dl = np.random.default_rng(4).standard_normal((B, N, T)).astype(np.float32)
    scale = 1 / np.sqrt(H)

    def lse_of(q, k, v):
        out, lse = engine.block_attention(
            q.reshape(B, K, N // K, T, H), k, v, None, T=T, S=S, bt=128, bs=128, scale=scale, causal=causal
        )
        return lse.reshape(B, N, T)

    assert "jax_attn_cpu_forward" in jax.jit(lse_of).lower(q, k, v).as_text()
    lse, vjp = jax.vjp(lse_of, q, k, v)
    dq, dk, _ = vjp(jnp.asarray(dl))
    ref_lse, grads = _lse_oracle(q.astype(np.float64), k.astype(np.float64), scale, causal, N // K)
    ref_dq, ref_dk = grads(dl.astype(np.float64))
    _close(lse, ref_lse, "lse")
    _close(dq, ref_dq, "dq")
    _close(dk, ref_dk, "dk")


def test_vmap_over_the_kernel():
    q, k, v, _ = _inputs(3, 2, 2, 40, 90, 16, 16, seed=5)
    f = _sdpa(True)
    out = jax.jit(jax.vmap(f))(q[:, None], k[:, None], v[:, None])[:, 0]
    ref = sdpa_forward(*(x.astype(np.float64) for x in (q, k, v)), is_causal=True)["out"]
    _close(out, ref, "out")


def test_calls_it_does_not_take_stay_on_xla():
    q, k, v, _ = _inputs(1, 2, 2, 64, 64, 16, 16)
    mask = np.tril(np.ones((64, 64), bool))
    assert not _uses_kernel(_sdpa(False, mask=mask), q, k, v)
    assert engine.native_reason(jnp.float32, mask=mask) == "a mask array is given"
    assert engine.native_reason(jnp.bfloat16) == "the kernel takes float32, not bfloat16"


def test_the_xla_loops_serve_when_the_kernel_is_switched_off(monkeypatch):
    monkeypatch.setattr(engine, "NATIVE", False)
    q, k, v, _ = _inputs(1, 4, 2, 100, 100, 16, 16)
    f = _sdpa(True)
    assert not _uses_kernel(f, q, k, v)
    ref = sdpa_forward(*(x.astype(np.float64) for x in (q, k, v)), is_causal=True, groups=2)["out"]
    _close(jax.jit(f)(q, k, v), ref, "out")


def test_disabled_by_the_environment():
    code = (
        "from jax_attn import native, engine; import jax.numpy as jnp; "
        "print(repr(native.unavailable())); print(repr(engine.native_reason(jnp.float32)))"
    )
    env = dict(os.environ, JAX_ATTN_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["'disabled by JAX_ATTN_NATIVE=0'"] * 2


@pytest.mark.parametrize("compiler", ["g++", "clang++"])
def test_each_compiler_builds_a_correct_kernel(compiler, tmp_path):
    """The kernel source builds with each compiler the build looks for (GCC vector extensions and shuffles
    are spelled differently in clang), into a fresh cache, and the result matches the float64 oracle."""
    import shutil

    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed")
    code = """
import numpy as np, jax, jax.numpy as jnp, jax_attn
from jax_attn import native
from compare.oracle import sdpa_backward, sdpa_forward
print(repr(native.unavailable()))
rng = np.random.default_rng(1)
shapes = [(1, 4, 150, 40), (1, 2, 150, 40), (1, 2, 150, 24), (1, 4, 150, 24)]
q, k, v, dy = (rng.standard_normal(s).astype(np.float32) for s in shapes)
def f(q, k, v):
    return jax_attn.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True, implementation="blocked"
    )
print("jax_attn_cpu_forward" in jax.jit(f).lower(q, k, v).as_text())
out, vjp = jax.vjp(jax.jit(f), q, k, v)
got = [out, *vjp(jnp.asarray(dy))]
x64 = [a.astype(np.float64) for a in (q, k, v, dy)]
ref = sdpa_forward(*x64[:3], is_causal=True, groups=2)
grads = sdpa_backward(*x64[:3], x64[3], is_causal=True, groups=2)
want = [ref["out"], grads["dq"], grads["dk"], grads["dv"]]
rel = [np.max(np.abs(np.asarray(g, np.float64) - w)) / max(1.0, np.max(np.abs(w))) for g, w in zip(got, want)]
print(float(max(rel)))
"""
    env = dict(os.environ, CXX=compiler, JAX_ATTN_CACHE=str(tmp_path), JAX_ATTN_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    reason, ran, err = out.stdout.splitlines()[-3:]
    assert reason == "''" and ran == "True", out.stdout + out.stderr
    assert list(tmp_path.glob("attention_cpu-*.so")), "the kernel was not built into the fresh cache"
    assert float(err) <= 2e-5, f"{compiler}: relative max error {err}"


def test_the_choice_names_the_kernel():
    q = jax.ShapeDtypeStruct((2, 8, 1024, 64), jnp.float32)
    assert "runs on jax_attn's CPU kernel" in jax_attn.select_implementation(q, q, q, is_causal=True).reason
    mask = jax.ShapeDtypeStruct((1024, 1024), jnp.bool_)
    choice = jax_attn.select_implementation(q, q, q, mask)
    assert choice.implementation == "blocked" and "CPU kernel" not in choice.reason


def test_flex_with_no_mods_runs_on_the_kernel():
    """``flex_attention`` with neither block mask nor score_mod takes the dense plan, hence the kernel:
    output, lse and the gradients of both (GQA, T != S)."""
    import jax_attn.flex as jf

    B, N, K, T, S, H = 1, 4, 2, 90, 200, 24
    q, k, v, dy = _inputs(B, N, K, T, S, H, H, seed=9)
    dl = np.random.default_rng(10).standard_normal((B, N, T)).astype(np.float32)

    def f(q, k, v):
        return jf.flex_attention(q, k, v, enable_gqa=True, return_lse=True)

    assert "jax_attn_cpu_forward" in jax.jit(f).lower(q, k, v).as_text()
    (out, lse), vjp = jax.vjp(jax.jit(f), q, k, v)
    dq, dk, dv = vjp((jnp.asarray(dy), jnp.asarray(dl)))
    q64, k64, v64, dy64 = (x.astype(np.float64) for x in (q, k, v, dy))
    scale = 1 / np.sqrt(H)
    ref_lse, grads = _lse_oracle(q64, k64, scale, False, N // K)
    ref = sdpa_backward(q64, k64, v64, dy64, groups=N // K)
    lse_dq, lse_dk = grads(dl.astype(np.float64))
    _close(out, sdpa_forward(q64, k64, v64, groups=N // K)["out"], "out")
    _close(lse, ref_lse, "lse")
    _close(dq, ref["dq"] + lse_dq, "dq")
    _close(dk, ref["dk"] + lse_dk, "dk")
    _close(dv, ref["dv"], "dv")


@pytest.mark.parametrize("name", ["large_logits", "large_mean_offset", "basic", "gqa_G2"])
def test_shared_vectors_on_the_kernel(all_vectors, name):
    """Shared SDPA vectors through the kernel, judged by the tolerance policy against the oracle. Logits of
    order 1e4 (``large_logits``) hold only where the backward recomputes the forward's logits to the bit:
    a backward that scaled the product instead of the query (one rounding of 1e4 apart) put dv off by
    8e-3 against a tolerance of 4e-5."""
    from compare import agree

    vec = all_vectors[name]
    c, a = vec.case, vec.arrays
    assert c.dtype == "float32" and "attn_mask" not in a
    q, k, v, dout = (jnp.asarray(a[n], jnp.float32) for n in ("q", "k", "v", "dout"))

    def f(q, k, v):
        return jax_attn.scaled_dot_product_attention(
            q, k, v, None, 0.0, c.is_causal, c.scale, c.enable_gqa, implementation="blocked"
        )

    assert _uses_kernel(f, q, k, v)
    out, vjp = jax.vjp(f, q, k, v)
    res = dict(zip(("out", "dq", "dk", "dv"), (np.asarray(x, np.float64) for x in (out, *vjp(dout)))))
    bad = [x for x in agree.against_oracle(vec, res) if not x.ok]
    assert not bad, "; ".join(f"{x.quantity} max_abs={x.max_abs:.3e} tol={x.tol:.3e}" for x in bad)


def test_the_kernel_refuses_inconsistent_inputs():
    """The kernel reads raw buffers: wrong shapes or dtypes are a ValueError naming them, never a read
    past a buffer."""
    f32 = np.float32
    q, k, v = np.zeros((4, 5, 8), f32), np.zeros((2, 6, 8), f32), np.zeros((2, 6, 3), f32)
    native.forward(q, k, v, groups=2, scale=1.0, causal=False)  # consistent: no error
    with pytest.raises(ValueError, match=r"groups=3"):
        native.forward(q, k, v, groups=3, scale=1.0, causal=False)
    with pytest.raises(ValueError, match=r"head width.*k.shape=\(2, 6, 7\)"):
        native.forward(q, np.zeros((2, 6, 7), f32), v, groups=2, scale=1.0, causal=False)
    with pytest.raises(ValueError, match=r"v.shape=\(2, 5, 3\)"):
        native.forward(q, k, np.zeros((2, 5, 3), f32), groups=2, scale=1.0, causal=False)
    with pytest.raises(ValueError, match=r"q must be float32; got q.dtype=float16"):
        native.forward(q.astype(np.float16), k, v, groups=2, scale=1.0, causal=False)
    stats, d_out, delta = np.zeros((4, 5, 3), f32), np.zeros((4, 5, 3), f32), np.zeros((4, 5), f32)
    native.backward(q, k, v, stats, d_out, delta, groups=2, scale=1.0, causal=False)
    with pytest.raises(ValueError, match=r"stats must be \(4, 5, 3\); got stats.shape=\(4, 5\)"):
        native.backward(q, k, v, delta, d_out, delta, groups=2, scale=1.0, causal=False)
    with pytest.raises(ValueError, match=r"d_out must be \(4, 5, 3\)"):
        native.backward(q, k, v, stats, np.zeros((4, 5, 8), f32), delta, groups=2, scale=1.0, causal=False)


@pytest.mark.parametrize("causal", [False, True])
def test_a_nan_reaches_exactly_the_rows_that_see_it(causal):
    """A NaN in a query row makes that row NaN; a NaN in key s makes every row that sees key s NaN (all of
    them, or under top-left causal the rows t >= s) and no other, as torch's own SDPA says (the reference
    here: compare.oracle treats a NaN logit as masked). The kernel's exp must not turn a NaN logit into a
    zero weight, and its causal strips must mask a NaN key away from the rows that do not see it."""
    torch = pytest.importorskip("torch")
    B, N, T, H = 1, 2, 300, 64
    q, k, v, _ = _inputs(B, N, N, T, T, H, H)
    q[0, 0, 5, 3] = np.nan
    k[0, 1, 200, 1] = np.nan
    f = _sdpa(causal)
    assert _uses_kernel(f, q, k, v)
    got = np.isnan(np.asarray(jax.jit(f)(q, k, v))).any(-1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x.astype(np.float64)) for x in (q, k, v)), is_causal=causal
    )
    want = torch.isnan(ref).any(-1).numpy()
    assert want[0, 0, 5] and want[0, 1, 250] and not want[0, 0, 6]  # the case is what it claims
    assert want[0, 1, 199] == (not causal)
    np.testing.assert_array_equal(got, want)
