"""Fuzz, float64: both twins' ``flex_attention`` (block-sparse, default path) against torch's own.

torch's ``torch.nn.attention.flex_attention.flex_attention`` runs eagerly on CPU in torch 2.13 but has no
backward there, so the forward (output and lse, with torch's own ``create_block_mask``) is compared with
it, and the gradients (query, key, value and the tensors the mods capture: ALiBi slopes, a relative-bias
table) with torch built-ins on the dense problem: ``F.scaled_dot_product_attention`` with the equivalent
dense float mask when the score_mod is additive (or absent), the same softmax written out with torch ops
when it is not (soft-cap, a multiplier); rows with no key left give output 0 and lse -inf, no gradient.

The mods are drawn as values, not code, so that one compiled JAX program serves many of them: a mask_mod
``doc_q[b, q] == doc_kv[b, kv] & (kv < prefix | lo <= q - kv <= hi[h] & (q - kv - lo) % dilation == 0)``
covers no mask, causal, sliding windows (per head too), prefix LM, documents and dilated windows, and
their combinations, by the values of ``prefix, lo, hi, dilation, doc_q, doc_kv`` (captured arrays, traced
inside ``jax.jit`` where ``create_block_mask`` runs too); the score_mod ``mult · score + slopes[h] · (kv -
q) + table[q - kv + S - 1]``, optionally soft-capped ``cap · tanh(s / cap)``, covers ALiBi, relative
biases, scaling and soft-capping. Besides: no score_mod, no block_mask, ``noop_mask``, block sizes from 1
to 128 (square or not, ragged lengths), block masks broadcast over batch and heads or not, GQA, ``scale``.
The torch twin also draws from the catalogue mods of ``compare.kinds.flex``.

- torch twin: 1000 configurations drawn freely (seeded NumPy generator).
- JAX twin (float64 via ``jax.enable_x64``): one ``jax.jit`` program (``create_block_mask``,
  ``flex_attention`` and ``jax.vjp``) per row of an all-pairs covering array of the structural factors
  (cheap-compile XLA options), called with many draws of mod parameters, inputs and cotangents.

Tolerance ``1e-10 · max(1, max|expected|)`` max abs (lse: on its finite entries, -inf where the reference
has -inf). ``FUZZ_SEED`` (environment, default 0) shifts every seed; counts are asserted (printed with
``-s``).
"""

import itertools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fuzz_support import all_pairs as _all_pairs
from fuzz_support import one_torch_thread as _one_torch_thread  # noqa: F401 (autouse)
from torch.nn.attention import flex_attention as tflex

import jax_attn.flex as jf
import torch_attn.flex as tf
from compare.kinds import flex as fm

FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "0"))
TOL = 1e-10
# torch's own flex forward (a dense implementation vmapped over b, h, q, kv: ~20 ms a call here) on every
# TORCH_FLEX_EVERY-th draw; the dense reference on every draw
TORCH_FLEX_EVERY = 4

FACTORS = {  # the JAX rows (each compiles, ~2 s); the torch draws take more heads and block sizes
    "heads": ((1, 1), (4, 2), (3, 1)),  # (N, K)
    "lengths": ("T<S", "T=S", "T>S"),
    "block": (1, (2, 5), 16),  # 16: one block for most lengths here (128 pads ~8x more work in JAX)
    "mask": ("none", "noop", "generic"),
    "score": ("none", "generic", "softcap"),
    "bm_dims": ("broadcast", "batch", "batch_heads"),
    "scale": (None, "drawn"),
}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


ROWS = _all_pairs(FACTORS, seed=2)  # 14 rows (seed 0 gives 15)


def test_covering_array_covers_every_pair():
    assert len(ROWS) <= 14
    for a, b in itertools.combinations(FACTORS, 2):
        seen = {(c[a], c[b]) for c in ROWS}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)


# ----------------------------------------------------------------------------------------- mods


def generic_mask(p):
    """The value-driven mask_mod (module docstring); ``p`` holds this framework's arrays."""

    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        band = (d >= p["lo"]) & (d <= p["hi"][h]) & ((d - p["lo"]) % p["dilation"] == 0)
        return (p["doc_q"][b, q_idx] == p["doc_kv"][b, kv_idx]) & ((kv_idx < p["prefix"]) | band)

    return mask_mod


def generic_score(p, S: int, softcap: bool, tanh):
    """The value-driven score_mod (module docstring)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        s = p["mult"] * score + p["slopes"][h] * (kv_idx - q_idx) + p["table"][q_idx - kv_idx + (S - 1)]
        return p["cap"] * tanh(s / p["cap"]) if softcap else s

    return score_mod


def _structure(row: dict, rng) -> dict:
    N, K = row["heads"]
    T = int(rng.integers(1, 18))
    S = {"T<S": T + int(rng.integers(1, 6)), "T=S": T, "T>S": max(1, T - int(rng.integers(1, 6)))}[
        row["lengths"]
    ]
    if row["lengths"] == "T>S" and T == 1:
        T, S = 3, 1
    return {
        **row,
        "B": int(rng.integers(1, 3)),
        "N": N,
        "K": K,
        "T": T,
        "S": S,
        "H": int(rng.integers(1, 7)),
        "V": int(rng.integers(1, 6)),
        "scale": None if row["scale"] is None else float(rng.uniform(0.1, 2.0)),
    }


def _values(s: dict, rng) -> dict:
    """Inputs, cotangents and the mods' parameters (NumPy) for one draw."""
    B, N, K, T, S = s["B"], s["N"], s["K"], s["T"], s["S"]
    v = {
        "q": rng.standard_normal((B, N, T, s["H"])),
        "k": rng.standard_normal((B, K, S, s["H"])),
        "v": rng.standard_normal((B, K, S, s["V"])),
        "d_out": rng.standard_normal((B, N, T, s["V"])),
        "d_lse": rng.standard_normal((B, N, T)),
    }
    # mask parameters: lo in {-big (no causal), 0 (causal), >0}, windows per head or shared
    big = T + S
    lo = int(rng.choice([-big, 0, 0, 1]))
    hi = np.full(N, big) if rng.random() < 0.4 else rng.integers(max(lo, 0), max(lo, 0) + 6, N)
    if s["bm_dims"] != "batch_heads":
        hi = np.full(N, hi[0])  # a block mask broadcast over heads needs a head-independent mask
    n_docs = int(rng.integers(1, 4)) if s["bm_dims"] != "broadcast" else 1
    doc_q = np.sort(rng.integers(0, n_docs, (B, T)), axis=1)
    doc_kv = np.sort(rng.integers(0, n_docs, (B, S)), axis=1)
    v["mask"] = {
        "lo": np.asarray(lo),
        "hi": hi.astype(np.int64),
        "dilation": np.asarray(int(rng.choice([1, 1, 2, 3]))),
        "prefix": np.asarray(int(rng.choice([0, 0, 1, 3]))),
        "doc_q": doc_q.astype(np.int64),
        "doc_kv": doc_kv.astype(np.int64),
    }
    v["score"] = {
        "mult": np.asarray(float(rng.choice([1.0, 2.0, rng.uniform(0.3, 3.0)]))),
        "slopes": rng.standard_normal(N) * (rng.random() < 0.5),
        "table": rng.standard_normal(T + S - 1) * (rng.random() < 0.5),
        "cap": np.asarray(float(rng.uniform(0.5, 5.0))),
    }
    return v


def _bm_dims(s):
    return {"broadcast": (None, None), "batch": (s["B"], None), "batch_heads": (s["B"], s["N"])}[s["bm_dims"]]


# ----------------------------------------------------------------------------------------- references


def _torch_mods(s, v, mask_params, score_params, noop=tf.noop_mask):
    """This draw's mods over torch tensors (the reference's and the torch twin's)."""
    mask_mod = noop if s["mask"] == "noop" else None
    if s["mask"] == "generic":
        mask_mod = generic_mask(mask_params)
    elif s["mask"] == "catalogue":
        mask_mod = s["catalogue_mask"]
    score_mod = None
    if s["score"] in ("generic", "softcap"):
        score_mod = generic_score(score_params, s["S"], s["score"] == "softcap", torch.tanh)
    elif s["score"] == "catalogue":
        score_mod = s["catalogue_score"](score_params, s["S"])
    return mask_mod, score_mod


def _torch_params(v, requires_grad: bool):
    mask = {k: torch.from_numpy(np.asarray(a)) for k, a in v["mask"].items()}
    score = {
        k: torch.tensor(a, requires_grad=requires_grad and k in ("slopes", "table"))
        for k, a in v["score"].items()
    }
    return mask, score


def _reference(s, v, torch_flex: bool = True) -> dict:
    """The dense reference (forward and gradients) and, with ``torch_flex``, torch's own flex_attention
    forward (out, lse)."""
    if not torch_flex:
        return _dense(s, v)
    mask_p, score_p = _torch_params(v, requires_grad=False)
    mask_mod, score_mod = _torch_mods(s, v, mask_p, score_p, noop=tflex.noop_mask)
    q, k, val = (torch.from_numpy(v[n]) for n in ("q", "k", "v"))
    bm = None
    if mask_mod is not None:
        bm = tflex.create_block_mask(
            mask_mod, *_bm_dims(s), s["T"], s["S"], device="cpu", BLOCK_SIZE=s["block"]
        )
    with torch.no_grad():
        out, aux = tflex.flex_attention(
            q,
            k,
            val,
            score_mod,
            bm,
            scale=s["scale"],
            enable_gqa=s["N"] != s["K"],
            return_aux=tflex.AuxRequest(lse=True),
        )
    ref = {"flex_out": out.numpy(), "flex_lse": aux.lse.numpy()}
    ref.update(_dense(s, v))
    return ref


def _dense(s, v) -> dict:
    """Output, lse and gradients on the dense problem with torch built-ins (module docstring)."""
    mask_p, score_p = _torch_params(v, requires_grad=True)
    mask_mod, score_mod = _torch_mods(s, v, mask_p, score_p)
    B, N, K, T, S = s["B"], s["N"], s["K"], s["T"], s["S"]
    q, k, val = (torch.tensor(v[n], requires_grad=True) for n in ("q", "k", "v"))
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(N).view(1, N, 1, 1)
    qi = torch.arange(T).view(1, 1, T, 1)
    ki = torch.arange(S).view(1, 1, 1, S)
    keep = torch.ones((B, N, T, S), dtype=torch.bool)
    if mask_mod is not None:
        keep = keep & torch.as_tensor(mask_mod(b, h, qi, ki)).expand(B, N, T, S)
    dead = ~keep.any(dim=-1, keepdim=True)
    alive = keep | dead  # a dead row gets every key (finite softmax), its output replaced by 0 below
    scale = s["H"] ** -0.5 if s["scale"] is None else s["scale"]
    kr, vr = k.repeat_interleave(N // K, dim=1), val.repeat_interleave(N // K, dim=1)
    additive = {
        "none": True,
        "generic": float(v["score"]["mult"]) == 1.0,
        "softcap": False,
        "catalogue": s.get("additive"),
    }[s["score"]]
    if additive:  # F.sdpa with the equivalent dense float mask
        bias = torch.zeros((B, N, T, S), dtype=torch.float64)
        if score_mod is not None:
            bias = score_mod(torch.zeros((), dtype=torch.float64), b, h, qi, ki).expand(B, N, T, S)
        mask = torch.where(alive, bias, -torch.inf)
        out = F.scaled_dot_product_attention(q, k, val, mask, scale=scale, enable_gqa=N != K)
        logits = torch.matmul(q, kr.transpose(-1, -2)) * scale + mask
    else:  # the same softmax written out
        logits = torch.matmul(q, kr.transpose(-1, -2)) * scale
        logits = score_mod(logits, b, h, qi, ki) if score_mod is not None else logits
        logits = logits.masked_fill(~alive, -torch.inf)
        out = torch.matmul(torch.softmax(logits, dim=-1), vr)
    out = torch.where(dead, 0.0, out)
    lse = torch.where(dead[..., 0], -torch.inf, torch.logsumexp(logits, dim=-1))
    d_lse = torch.where(dead[..., 0], 0.0, torch.from_numpy(v["d_lse"]))
    loss = (out * torch.from_numpy(v["d_out"])).sum() + torch.where(dead[..., 0], 0.0, lse * d_lse).sum()
    loss.backward()
    grads = {"dq": q.grad, "dk": k.grad, "dv": val.grad}
    grads.update({f"d{n}": score_p[n].grad for n in ("slopes", "table") if score_p[n].grad is not None})
    res = {"out": out.detach().numpy(), "lse": lse.detach().numpy()}
    res.update({n: g.numpy() for n, g in grads.items()})
    return res


def _close(name, got, want, context):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape, context)
    if "lse" in name:
        finite = np.isfinite(want)
        assert (np.isneginf(got) == ~finite).all() and not np.isposinf(want).any(), (name, context)
        got, want = got[finite], want[finite]
    assert np.isfinite(got).all() and np.isfinite(want).all(), (name, context)
    err = np.max(np.abs(got - want), initial=0.0)
    bound = TOL * max(1.0, np.max(np.abs(want), initial=0.0))
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g} in {context}"


def _judge(got: dict, ref: dict, context) -> None:
    if "flex_out" in ref:
        _close("out vs torch flex", got["out"], ref["flex_out"], context)
        _close("lse vs torch flex", got["lse"], ref["flex_lse"], context)
    for name in ("out", "lse", "dq", "dk", "dv", "dslopes", "dtable"):
        if name in ref:
            assert got.get(name) is not None, (name, context)
            _close(name, got[name], ref[name], context)


# ----------------------------------------------------------------------------------------- torch twin


def test_empty_block_mask_output_keeps_the_graph():
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    bm = tf.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx < 0, None, None, 3, 5, BLOCK_SIZE=2)
    k = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    out = tf.flex_attention(q, k, k, block_mask=bm)
    out.sum().backward()  # RuntimeError: element 0 of tensors does not require grad
    assert q.grad is not None and not q.grad.any()


CATALOGUE_MASKS = (
    lambda s, rng: fm.causal,
    lambda s, rng: fm.generate_sliding_window(int(rng.integers(1, 6))),
    lambda s, rng: fm.generate_prefix_lm(int(rng.integers(0, 5))),
    lambda s, rng: fm.generate_dilated_sliding_window(int(rng.integers(1, 9)), int(rng.integers(1, 4))),
    lambda s, rng: tf.and_masks(fm.causal, fm.generate_sliding_window(int(rng.integers(1, 6)))),
    lambda s, rng: tf.or_masks(fm.generate_prefix_lm(2), fm.generate_sliding_window(2)),
)
CATALOGUE_SCORES = (  # (factory(params, S), additive)
    (lambda p, S: fm.generate_alibi(p["slopes"]), True),
    (lambda p, S: fm.generate_rel_bias(p["table"], S), True),
    (lambda p, S: fm.times_two, False),
)


def _torch_twin(s, v) -> dict:
    mask_p, score_p = _torch_params(v, requires_grad=True)
    mask_mod, score_mod = _torch_mods(s, v, mask_p, score_p)
    q, k, val = (torch.tensor(v[n], requires_grad=True) for n in ("q", "k", "v"))
    bm = None
    if mask_mod is not None:
        bm = tf.create_block_mask(mask_mod, *_bm_dims(s), s["T"], s["S"], BLOCK_SIZE=s["block"])
    out, aux = tf.flex_attention(
        q,
        k,
        val,
        score_mod,
        bm,
        scale=s["scale"],
        enable_gqa=s["N"] != s["K"],
        return_aux=tf.AuxRequest(lse=True),
    )
    lse = aux.lse
    got = {"out": out.detach().numpy(), "lse": lse.detach().numpy()}
    assert out.requires_grad  # also when the block mask keeps nothing (test_empty_block_mask_...)
    d_lse = torch.where(torch.isfinite(lse), torch.from_numpy(v["d_lse"]), 0.0)
    loss = (out * torch.from_numpy(v["d_out"])).sum() + torch.where(
        torch.isfinite(lse), lse * d_lse, 0.0
    ).sum()
    loss.backward()
    got.update({"dq": q.grad.numpy(), "dk": k.grad.numpy(), "dv": val.grad.numpy()})
    for n in ("slopes", "table"):
        if score_p[n].grad is not None:
            got[f"d{n}"] = score_p[n].grad.numpy()
        elif score_p[n].requires_grad and not out.detach().any():
            # a block mask that keeps nothing never calls the score_mod: its parameters get no gradient
            # (None: zero, as torch's convention for a leaf outside the graph)
            got[f"d{n}"] = np.zeros(tuple(score_p[n].shape))
    return got


@pytest.fixture
def torch_flex_without_dynamo(monkeypatch):
    """torch's eager flex_attention wraps its dense implementation in ``torch.compile(backend="eager")``,
    retraced (~0.7 s) for every new mod closure; torch's own debug switch runs the same implementation
    without dynamo (``test_torch_flex_debug_switch_is_the_same_computation`` checks that it is)."""
    monkeypatch.setattr(tflex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


def _draw_torch(rng) -> dict:
    """A configuration for the torch twin: every factor drawn, catalogue mods included."""
    row = {name: values[rng.integers(len(values))] for name, values in FACTORS.items()}
    row["block"] = [1, 2, 3, 4, 8, 16, 128, (2, 5), (4, 1), (8, 3)][rng.integers(10)]
    row["heads"] = [(1, 1), (2, 2), (4, 2), (3, 1), (4, 1), (6, 3)][rng.integers(6)]
    if rng.random() < 0.3:
        row["mask"] = "catalogue"
    if rng.random() < 0.2:
        row["score"] = "catalogue"
    s = _structure(row, rng)
    if s["mask"] == "catalogue":
        s["catalogue_mask"] = CATALOGUE_MASKS[rng.integers(len(CATALOGUE_MASKS))](s, rng)
    if s["score"] == "catalogue":
        s["catalogue_score"], s["additive"] = CATALOGUE_SCORES[rng.integers(len(CATALOGUE_SCORES))]
    return s


def test_torch_flex_debug_switch_is_the_same_computation(monkeypatch):
    rng = np.random.default_rng([FUZZ_SEED, 1])
    for _ in range(2):
        s = _draw_torch(rng)
        v = _values(s, rng)
        compiled = _reference(s, v)
        monkeypatch.setattr(tflex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
        direct = _reference(s, v)
        monkeypatch.undo()
        for name in ("flex_out", "flex_lse"):
            np.testing.assert_array_equal(direct[name], compiled[name], err_msg=name)


def test_fuzz_torch_twin_matches_torch_flex_fp64(torch_flex_without_dynamo):
    rng = np.random.default_rng([FUZZ_SEED, 0])
    count = 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(count):
            s = _draw_torch(rng)
            v = _values(s, rng)
            got = _torch_twin(s, v)
            ref = _reference(s, v, torch_flex=i % TORCH_FLEX_EVERY == 0)
            _judge(got, ref, s)
    flex = -(-count // TORCH_FLEX_EVERY)
    print(f"torch twin flex_attention: {count} configurations (forward also vs torch's flex on {flex})")


# ----------------------------------------------------------------------------------------- JAX twin


def _compile(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with XLA:CPU's cheap-compile options: these programs are small
    and called a few dozen times each, so backend optimisation costs more than it saves."""
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(fn).lower(*args).compile(compiler_options=options)


def _jax_program(s, v):
    """One compiled program: the mods from traced parameters, ``create_block_mask`` and ``flex_attention``
    under ``jit``, and the VJP w.r.t. query, key, value, slopes and table."""

    def forward_vjp(q, k, val, mask_p, score_p, d_out, d_lse):
        def f(q, k, val, slopes, table):
            score_mod = None
            if s["score"] != "none":
                p = {**score_p, "slopes": slopes, "table": table}
                score_mod = generic_score(p, s["S"], s["score"] == "softcap", jnp.tanh)
            bm = None
            if s["mask"] != "none":
                mask_mod = jf.noop_mask if s["mask"] == "noop" else generic_mask(mask_p)
                bm = jf.create_block_mask(mask_mod, *_bm_dims(s), s["T"], s["S"], BLOCK_SIZE=s["block"])
            out, aux = jf.flex_attention(
                q,
                k,
                val,
                score_mod,
                bm,
                scale=s["scale"],
                enable_gqa=s["N"] != s["K"],
                return_aux=jf.AuxRequest(lse=True),
            )
            return out, aux.lse

        (out, lse), vjp = jax.vjp(f, q, k, val, score_p["slopes"], score_p["table"])
        grads = vjp((d_out, jnp.where(jnp.isfinite(lse), d_lse, 0.0)))
        return out, lse, grads

    args = (v["q"], v["k"], v["v"], v["mask"], v["score"], v["d_out"], v["d_lse"])
    return _compile(forward_vjp, *args), args


def test_fuzz_jax_twin_matches_torch_flex_fp64(torch_flex_without_dynamo):
    draws = -(-1000 // len(ROWS))
    done = 0
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, row in enumerate(ROWS):
            rng = np.random.default_rng([FUZZ_SEED, 10, index])
            s = _structure(row, rng)
            program = None
            for draw in range(draws):
                v = _values(s, rng)
                if program is None:
                    program, _ = _jax_program(s, v)
                args = (v["q"], v["k"], v["v"], v["mask"], v["score"], v["d_out"], v["d_lse"])
                out, lse, (dq, dk, dv, dslopes, dtable) = program(*args)
                got = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
                if s["score"] != "none":
                    got.update(dslopes=dslopes, dtable=dtable)
                _judge(got, _reference(s, v, torch_flex=draw % TORCH_FLEX_EVERY == 0), s)
                done += 1
    flex = len(ROWS) * -(-draws // TORCH_FLEX_EVERY)
    print(f"JAX flex_attention: {done} configurations over {len(ROWS)} rows (also vs torch's flex on {flex})")
    assert done == draws * len(ROWS) >= 1000
