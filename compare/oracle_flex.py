"""The float64 NumPy oracle for FlexAttention: dense scores, the score mod, the mask, a softmax, and the
backward written out (torch semantics: the score mod applies before the mask; a row with nothing kept
gives output 0 and lse -inf; lse in natural log).

Mods are called with broadcastable NumPy index arrays ``b (B,1,1,1)``, ``h (1,N,1,1)``,
``q_idx (1,1,T,1)``, ``kv_idx (1,1,1,S)``: the operator-only mods of ``compare.flex_mods`` run on NumPy
unchanged. The backward is analytic except for the score mod, which is elementwise and smooth: its
derivative w.r.t. the score, and w.r.t. the float parameters it is built from, are central differences in
float64 (step 1e-5: error ~1e-10, far below the 1e-5 fp32 tolerance).

Dimension key (see ``attn_spec``): B batch, N query heads, K key/value heads, G = N / K, T query
length, S key length, H head width, V value width.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-5


def _grid(B, N, T, S):
    return (
        np.arange(B).reshape(B, 1, 1, 1),
        np.arange(N).reshape(1, N, 1, 1),
        np.arange(T).reshape(1, 1, T, 1),
        np.arange(S).reshape(1, 1, 1, S),
    )


def dense_keep(mask_mod, B, N, T, S) -> np.ndarray:
    """``(B, N, T, S)`` bool of ``mask_mod`` (all True for None)."""
    if mask_mod is None:
        return np.ones((B, N, T, S), bool)
    return np.broadcast_to(np.asarray(mask_mod(*_grid(B, N, T, S)), bool), (B, N, T, S))


def _raw_scores(q, k, scale):
    B, N, T, H = q.shape
    G = N // k.shape[1]
    k_rep = np.repeat(np.asarray(k, np.float64), G, axis=1)
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    return np.einsum("bnth,bnsh->bnts", np.asarray(q, np.float64), k_rep) * scale, scale, G


def flex_forward(q, k, v, score_mod=None, mask_mod=None, scale=None):
    """``(out (B, N, T, V), lse (B, N, T))`` in float64. ``score_mod`` as in torch, ``mask_mod`` True =
    keep; key/value heads ``(B, K, ...)`` serve ``G = N / K`` query heads each (repeat_interleave)."""
    raw, scale, G = _raw_scores(q, k, scale)
    B, N, T, S = raw.shape
    s = raw if score_mod is None else np.broadcast_to(score_mod(raw, *_grid(B, N, T, S)), raw.shape)
    keep = dense_keep(mask_mod, B, N, T, S) & ~np.isneginf(s)
    s = np.where(keep, s, -np.inf)
    row_max = np.max(s, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(keep, np.exp(s - row_max), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    p = e / np.where(total == 0.0, 1.0, total)
    out = np.einsum("bnts,bnsv->bntv", p, np.repeat(np.asarray(v, np.float64), G, axis=1))
    lse = np.where(
        total[..., 0] == 0.0, -np.inf, row_max[..., 0] + np.log(np.where(total == 0, 1, total)[..., 0])
    )
    return out, lse


def flex_backward(q, k, v, d_out, d_lse=None, score_factory=None, params=(), mask_mod=None, scale=None):
    """Gradients of ``sum(out * d_out) + sum(lse * d_lse)`` (finite lse entries only) w.r.t. q, k, v and
    the float ``params`` that ``score_factory(*params)`` builds its score mod from.

    Returns:
      ``(dq, dk, dv, [d_param, ...])`` in float64.
    """
    raw, scale, G = _raw_scores(q, k, scale)
    B, N, T, S = raw.shape
    grid = _grid(B, N, T, S)
    params = [np.asarray(p, np.float64) for p in params]
    mod = None if score_factory is None else score_factory(*params)
    s = raw if mod is None else np.broadcast_to(mod(raw, *grid), raw.shape)
    keep = dense_keep(mask_mod, B, N, T, S) & ~np.isneginf(s)
    out, lse = flex_forward(q, k, v, mod, mask_mod, scale)
    v_rep = np.repeat(np.asarray(v, np.float64), G, axis=1)
    k_rep = np.repeat(np.asarray(k, np.float64), G, axis=1)
    p = np.where(keep, np.exp(np.where(keep, s, 0.0) - np.where(np.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    d_out = np.asarray(d_out, np.float64)
    d_lse = (
        np.zeros(lse.shape)
        if d_lse is None
        else np.where(np.isfinite(lse), np.asarray(d_lse, np.float64), 0.0)
    )
    dv = np.einsum("bnts,bntv->bnsv", p, d_out)
    dp = np.einsum("bntv,bnsv->bnts", d_out, v_rep)
    ds = p * (dp - np.sum(d_out * out, axis=-1, keepdims=True) + d_lse[..., None])
    d_params = []
    if mod is not None:
        # the elementwise mod's derivative w.r.t. the score, by central differences
        d_mod = (mod(raw + _EPS, *grid) - mod(raw - _EPS, *grid)) / (2 * _EPS)
        d_raw = ds * np.broadcast_to(d_mod, raw.shape)
        for n, par in enumerate(params):
            grad = np.zeros_like(par)
            for idx in np.ndindex(par.shape):
                plus, minus = [x.copy() for x in params], [x.copy() for x in params]
                plus[n][idx] += _EPS
                minus[n][idx] -= _EPS
                diff = score_factory(*plus)(raw, *grid) - score_factory(*minus)(raw, *grid)
                grad[idx] = np.sum(ds * diff) / (2 * _EPS)
            d_params.append(grad)
    else:
        d_raw = ds
    dq = np.einsum("bnts,bnsh->bnth", d_raw, k_rep) * scale
    dk = np.einsum("bnts,bnth->bnsh", d_raw, np.asarray(q, np.float64)) * scale
    K = k.shape[1]
    dk = dk.reshape(B, K, G, S, -1).sum(axis=2)
    dv = dv.reshape(B, K, G, S, -1).sum(axis=2)
    return dq, dk, dv, d_params
