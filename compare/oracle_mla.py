"""The float64 NumPy oracle of multi-head latent attention (``jax_attn.mla`` / ``torch_attn.mla``): forward
and a hand-written backward, the rotary and the sparse indexer's selection included, independent of torch
and jax. Given ``dtype=`` a low-precision type (or ``"float32"``), every intermediate is rounded to it: the
*naive same-dtype baseline* of the tolerance policy (see ``compare.oracle``).

Dimension key (see ``attn_spec.mla``): B, T, S (= T, a full pass), E, N, Q, L, D, R, H = D + R, V; the
indexer's M, J and k.

Parameters are keyed like the twins' state dicts (transformers' names): ``q_proj.weight`` or
``q_a_proj.weight`` / ``q_a_layernorm.weight`` / ``q_b_proj.weight``, ``kv_a_proj_with_mqa.weight``,
``kv_a_layernorm.weight``, ``kv_b_proj.weight``, ``o_proj.weight``, the biases with ``attention_bias``,
``indexer.*``.

Forward (backward in reverse):

1. ``a = x Wqaᵀ + bqa``, ``qr = RMSNorm(a)``, ``q0 = qr Wqbᵀ`` (or ``q0 = x Wqᵀ``); split heads,
   ``[q_nope | q_rot]``;
2. ``ckv0 = x Wkvaᵀ + bkva = [c0 | k0]``, ``c = RMSNorm(c0)``;
3. rotary on ``q_rot`` and the shared ``k0`` (float64 tables of ``attn_spec.rope.inv_freq``);
4. ``kv = c Wkvbᵀ`` per head ``[k_nope | v]``; ``k = [k_nope | k_rot]`` (k_rot the same for every head);
5. ``z = scale · q·k``; mask = causal ∧ valid key (∧ the indexer's selection: computed in float64 from
   the indexer's scores whatever ``dtype`` is, with no gradient); masked softmax, fully masked rows zero;
6. ``o = p v``, merge heads, ``y = o Woᵀ + bo``.

The selection: each query keeps its ``min(index_topk, S)`` best-scoring unmasked keys, equal scores ranked
by the lower key index (a stable sort), as both twins do (``attn_spec.mla``).
"""

from __future__ import annotations

import numpy as np

from attn_spec.mla import MLAConfig
from attn_spec.rope import inv_freq
from compare.oracle import _rounder
from compare.oracle_attention import _rope, _rope_backward


def rope_tables(rope, R: int, position_ids: np.ndarray, dtype: str | None = None, layout: str | None = None):
    """cos, sin ``(B, T, R)`` in ``layout`` (default: the rope's), times the attention factor: float64, or
    for ``dtype="float32"`` as a plain float32 evaluation computes them (frequencies rounded to float32,
    positions × frequencies in float32)."""
    layout = layout or rope.layout
    inv, factor = inv_freq(rope, R, seq_len=int(np.max(position_ids)) + 1, dtype=np.float64)
    if dtype == "float32":
        freqs = position_ids.astype(np.float32)[..., None] * inv.astype(np.float32)
    else:
        freqs = position_ids.astype(np.float64)[..., None] * inv
    emb = np.concatenate([freqs, freqs], -1) if layout == "half" else np.repeat(freqs, 2, -1)
    return np.cos(emb) * factor, np.sin(emb) * factor


def _rms(x, w, eps, r):
    inv = r(1.0 / np.sqrt(r(np.mean(r(x * x), -1, keepdims=True) + eps)))
    u = r(x * inv)
    return r(u * w), u, inv


def _rms_backward(dy, u, inv, w, r):
    du = r(dy * w)
    dx = r(inv * r(du - r(u * np.mean(r(du * u), -1, keepdims=True))))
    dw = r(dy * u).reshape(-1, w.shape[0]).sum(0)
    terms = np.abs(dy * u).reshape(-1, w.shape[0]).sum(0)  # the sizes the tolerance policy scales by
    return dx, r(dw), terms


def _linear(x, params, proj, r):
    y = r(x @ params[f"{proj}.weight"].T)
    return r(y + params[f"{proj}.bias"]) if f"{proj}.bias" in params else y


def keep_mask(valid_BT: np.ndarray) -> np.ndarray:
    """bool ``(B, T, T)``: causal and a real key token."""
    T = valid_BT.shape[1]
    return np.tril(np.ones((T, T), bool))[None] & valid_BT[:, None, :].astype(bool)


def index_scores(x, params, config: MLAConfig, position_ids) -> np.ndarray:
    """float64 ``(B, T, S)``: the indexer's ``Σ_m w_tm · relu(J^-½ q_tm·k_s)`` (unmasked)."""
    c = config
    B, T, E = x.shape
    M, J, R = c.index_n_heads, c.index_head_dim, c.R
    ident = _rounder(None)
    a = _linear(x, params, "q_a_proj", ident)
    qr, _, _ = _rms(a, params["q_a_layernorm.weight"], c.q_lora_eps, ident)
    iq = (qr @ params["indexer.wq_b.weight"].T).reshape(B, T, M, J).transpose(0, 2, 1, 3)
    k = x @ params["indexer.wk.weight"].T
    mu = k.mean(-1, keepdims=True)
    var = ((k - mu) ** 2).mean(-1, keepdims=True)
    k = (k - mu) / np.sqrt(var + c.index_norm_eps) * params["indexer.k_norm.weight"] + params[
        "indexer.k_norm.bias"
    ]
    cos, sin = rope_tables(c.rope, R, position_ids, layout=c.index_rope_layout)
    iq = _rope(iq, cos, sin, c.index_rope_layout, ident)
    ik = _rope(k[:, None], cos, sin, c.index_rope_layout, ident)[:, 0]
    s = np.maximum(np.einsum("bmtj,bsj->bmts", iq, ik) * J**-0.5, 0.0)
    w = (x @ params["indexer.weights_proj.weight"].T) * M**-0.5
    return np.einsum("btm,bmts->bts", w, s)


def topk_selection(scores_BTS: np.ndarray, keep_BTS: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices (B, T, min(k, S)), selected bool (B, T, S))``: the best-scoring kept keys, ties to the
    lower index (a stable sort of the negated scores)."""
    scores = np.where(keep_BTS, scores_BTS, -np.inf)
    k = min(k, scores.shape[-1])
    idx = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    sel = np.zeros(scores.shape, bool)
    np.put_along_axis(sel, idx, True, axis=-1)
    return idx, sel


def tied_rows(scores_BTS: np.ndarray, keep_BTS: np.ndarray, k: int, rel: float = 1e-5) -> np.ndarray:
    """bool ``(B, T)``: query rows whose k-th and (k+1)-th best kept scores are equal or within ``rel`` of
    each other (relative to the row's largest score, at least 1): there the selection depends on how ties
    (or float32 rounding) are resolved, so implementations with other rules may select other keys."""
    scores = np.where(keep_BTS, scores_BTS, -np.inf)
    if k >= scores.shape[-1]:
        return np.zeros(scores.shape[:2], bool)
    srt = -np.sort(-scores, axis=-1)
    kth, nxt = srt[..., k - 1], srt[..., k]
    scale = np.maximum(1.0, np.max(np.abs(np.where(np.isfinite(srt), srt, 0.0)), axis=-1))
    gap = np.where(np.isfinite(nxt), kth - np.where(np.isfinite(nxt), nxt, 0.0), np.inf)
    return gap <= rel * scale


def selection(x, params, config: MLAConfig, valid_BT, position_ids, topk_indices=None) -> np.ndarray | None:
    """bool ``(B, T, T)`` of the keys a sparse layer attends to (None for a dense layer)."""
    c = config
    if not c.sparse:
        return None
    keep = keep_mask(valid_BT)
    if c.index_shared:
        sel = np.zeros(keep.shape, bool)
        np.put_along_axis(sel, np.asarray(topk_indices, np.int64), True, axis=-1)
        return sel
    return topk_selection(index_scores(x, params, c, position_ids), keep, c.index_topk)[1]


def mla_forward(
    x, params, config: MLAConfig, attention_mask=None, position_ids=None, topk_indices=None, dtype=None
) -> dict:
    """The layer over the whole sequence ``x (B, T, E)``: dict with ``out (B, T, E)`` and the intermediates
    the backward pass reuses. ``topk_indices (B, T, k)``: a shared sparse layer's given selection."""
    c, r = config, _rounder(dtype)
    x64 = np.asarray(x, np.float64)
    x = r(x64)
    params64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    params = {k: r(v) for k, v in params64.items()}
    B, T, _ = x.shape
    N, D, R, H, V, L = c.N, c.D, c.R, c.H, c.V, c.L
    valid = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    pos = np.broadcast_to(np.arange(T), (B, T)) if position_ids is None else np.asarray(position_ids)
    f = {"x": x, "params": params}
    if c.q_lora_rank is None:
        q0 = _linear(x, params, "q_proj", r)
    else:
        a = _linear(x, params, "q_a_proj", r)
        f["qr"], f["uq"], f["iq"] = _rms(a, params["q_a_layernorm.weight"], c.q_lora_eps, r)
        q0 = r(f["qr"] @ params["q_b_proj.weight"].T)
    q = q0.reshape(B, T, N, H).transpose(0, 2, 1, 3)
    ckv0 = _linear(x, params, "kv_a_proj_with_mqa", r)
    cl, f["uc"], f["ic"] = _rms(ckv0[..., :L], params["kv_a_layernorm.weight"], c.kv_lora_eps, r)
    cos, sin = (r(a) for a in rope_tables(c.rope, R, pos, dtype))
    f["cos"], f["sin"] = cos, sin
    q_rot = _rope(q[..., D:], cos, sin, c.rope.layout, r)
    k_rot = _rope(ckv0[:, None, :, L:], cos, sin, c.rope.layout, r)  # (B, 1, T, R)
    kv = r(cl @ params["kv_b_proj.weight"].T).reshape(B, T, N, D + V).transpose(0, 2, 1, 3)
    qf = np.concatenate([q[..., :D], q_rot], -1)
    kf = np.concatenate([kv[..., :D], np.broadcast_to(k_rot, (B, N, T, R))], -1)
    v = kv[..., D:]
    z = r(r(np.einsum("bnth,bnsh->bnts", qf, kf)) * c.logit_scale)
    keep = keep_mask(valid)
    sel = selection(x64, params64, c, valid, pos, topk_indices)
    if sel is not None:
        keep = keep & sel
    keep = keep[:, None]
    zm = np.where(keep, z, -np.inf)
    m = np.max(zm, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(keep, r(np.exp(r(zm - m))), 0.0)
    denom = r(e.sum(-1, keepdims=True))
    p = r(e / np.where(denom > 0, denom, 1.0))
    o = r(np.einsum("bnts,bnsv->bntv", p, v))
    o2 = o.transpose(0, 2, 1, 3).reshape(B, T, N * V)
    out = _linear(o2, params, "o_proj", r)
    f.update(cl=cl, qf=qf, kf=kf, v=v, p=p, o=o2, out=out, keep=keep)
    return f


def mla_backward(
    x, params, dy, config: MLAConfig, attention_mask=None, position_ids=None, topk_indices=None, dtype=None
) -> dict:
    """Gradients of ``sum(out * dy)`` w.r.t. ``x`` and every parameter (their names; the indexer's are
    zero: the selection carries no gradient), plus for the tolerance policy the gradients at the
    projections' outputs (``dq0``, ``dckv0``, ``dkv``, ``da``), ``o`` and ``terms_<name>`` of the norms."""
    c, r = config, _rounder(dtype)
    f = mla_forward(x, params, c, attention_mask, position_ids, topk_indices, dtype)
    x, params, dy = f["x"], f["params"], r(dy)
    B, T, E = x.shape
    N, D, R, H, V, L = c.N, c.D, c.R, c.H, c.V, c.L
    g = {}
    dy2 = dy.reshape(-1, E)
    g["o_proj.weight"] = r(dy2.T @ f["o"].reshape(-1, N * V))
    if "o_proj.bias" in params:
        g["o_proj.bias"] = r(dy2.sum(0))
    do = r(dy @ params["o_proj.weight"]).reshape(B, T, N, V).transpose(0, 2, 1, 3)
    p = f["p"]
    dp = r(np.einsum("bntv,bnsv->bnts", do, f["v"]))
    dv = r(np.einsum("bnts,bntv->bnsv", p, do))
    row = r((p * dp).sum(-1, keepdims=True))
    dz = np.where(f["keep"], r(p * r(dp - row)), 0.0)
    dz = r(dz * c.logit_scale)
    dqf = r(np.einsum("bnts,bnsh->bnth", dz, f["kf"]))
    dkf = r(np.einsum("bnts,bnth->bnsh", dz, f["qf"]))
    dk_rot = r(dkf[..., D:].sum(1))  # (B, S, R): one rotary key shared by the heads
    dkv = np.concatenate([dkf[..., :D], dv], -1).transpose(0, 2, 1, 3).reshape(B, T, N * (D + V))
    g["kv_b_proj.weight"] = r(dkv.reshape(-1, N * (D + V)).T @ f["cl"].reshape(-1, L))
    dcl = r(dkv @ params["kv_b_proj.weight"])
    dc0, g["kv_a_layernorm.weight"], g["terms_kv_a_layernorm.weight"] = _rms_backward(
        dcl, f["uc"], f["ic"], params["kv_a_layernorm.weight"], r
    )
    dk0 = _rope_backward(dk_rot[:, None], f["cos"], f["sin"], c.rope.layout, r)[:, 0]
    dckv0 = np.concatenate([dc0, dk0], -1)
    dq_rot = _rope_backward(dqf[..., D:], f["cos"], f["sin"], c.rope.layout, r)
    dq0 = np.concatenate([dqf[..., :D], dq_rot], -1).transpose(0, 2, 1, 3).reshape(B, T, N * H)
    x2 = x.reshape(-1, E)
    g["kv_a_proj_with_mqa.weight"] = r(dckv0.reshape(-1, L + R).T @ x2)
    if "kv_a_proj_with_mqa.bias" in params:
        g["kv_a_proj_with_mqa.bias"] = r(dckv0.reshape(-1, L + R).sum(0))
    dx = r(dckv0 @ params["kv_a_proj_with_mqa.weight"])
    da = None
    if c.q_lora_rank is None:
        g["q_proj.weight"] = r(dq0.reshape(-1, N * H).T @ x2)
        dx = r(dx + r(dq0 @ params["q_proj.weight"]))
    else:
        Q = c.q_lora_rank
        g["q_b_proj.weight"] = r(dq0.reshape(-1, N * H).T @ f["qr"].reshape(-1, Q))
        dqr = r(dq0 @ params["q_b_proj.weight"])
        da, g["q_a_layernorm.weight"], g["terms_q_a_layernorm.weight"] = _rms_backward(
            dqr, f["uq"], f["iq"], params["q_a_layernorm.weight"], r
        )
        g["q_a_proj.weight"] = r(da.reshape(-1, Q).T @ x2)
        if "q_a_proj.bias" in params:
            g["q_a_proj.bias"] = r(da.reshape(-1, Q).sum(0))
        dx = r(dx + r(da @ params["q_a_proj.weight"]))
    for name in params:
        if name.startswith("indexer."):
            g[name] = np.zeros_like(params[name])
    g["x"] = dx
    g.update(dq0=dq0, dckv0=dckv0, dkv=dkv, da=da, o=f["o"], out=f["out"], cl=f["cl"], qr=f.get("qr"))
    return g


def gradient_magnitudes(x, params, dy, bwd: dict) -> dict[str, float]:
    """The tolerance policy's term size for each gradient of :func:`mla_backward` (``bwd``): the largest
    sum of ``|terms|`` the gradient's last contraction adds up, keyed like the gradients."""
    E = x.shape[-1]
    ax = np.abs(np.asarray(x, np.float64)).reshape(-1, E)
    ady = np.abs(np.asarray(dy, np.float64)).reshape(-1, E)
    rows = ax.shape[0]
    P = {k: np.abs(np.asarray(v, np.float64)) for k, v in params.items()}
    dq0 = np.abs(bwd["dq0"]).reshape(rows, -1)
    dckv0 = np.abs(bwd["dckv0"]).reshape(rows, -1)
    dkv = np.abs(bwd["dkv"]).reshape(rows, -1)
    x_terms = dckv0 @ P["kv_a_proj_with_mqa.weight"]
    out = {}
    if "q_proj.weight" in P:
        x_terms = x_terms + dq0 @ P["q_proj.weight"]
        out["q_proj.weight"] = dq0.T @ ax
    else:
        da = np.abs(bwd["da"]).reshape(rows, -1)
        x_terms = x_terms + da @ P["q_a_proj.weight"]
        out["q_a_proj.weight"] = da.T @ ax
        out["q_a_proj.bias"] = da.sum(0)
        out["q_b_proj.weight"] = dq0.T @ np.abs(bwd["qr"]).reshape(rows, -1)
        out["q_a_layernorm.weight"] = bwd["terms_q_a_layernorm.weight"]
    out["x"] = x_terms
    out["kv_a_proj_with_mqa.weight"] = dckv0.T @ ax
    out["kv_a_proj_with_mqa.bias"] = dckv0.sum(0)
    out["kv_a_layernorm.weight"] = bwd["terms_kv_a_layernorm.weight"]
    out["kv_b_proj.weight"] = dkv.T @ np.abs(bwd["cl"]).reshape(rows, -1)
    out["o_proj.weight"] = ady.T @ np.abs(bwd["o"]).reshape(rows, -1)
    out["o_proj.bias"] = ady.sum(0)
    res = {k: float(np.max(v, initial=0.0)) for k, v in out.items() if k == "x" or k in params}
    for name in params:
        res.setdefault(name, 0.0)  # the indexer's: zero gradients
    return res
