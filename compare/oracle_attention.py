"""The float64 NumPy oracle of the modern decoder ``Attention`` (``jax_attn.attention`` /
``torch_attn.attention``): forward and a hand-written backward, rotary embeddings included, independent of
torch and jax. Given ``dtype=`` a low-precision type, every intermediate is rounded to it, which makes the
same code the *naive same-dtype baseline* of the tolerance policy (see ``compare.oracle``).

Dimension key (see ``attn_spec``): B batch, T tokens, S keys (= T, a full pass), E model width, N query
heads, K key/value heads, G = N // K, H head width, R rotary width.

Parameters are keyed like the twins' state dicts (transformers' names, torch's (out, in) layout):
``q_proj.weight (N·H, E)`` …, ``o_proj.weight (E, N·H)``, ``<proj>.bias``, ``q_norm.weight``,
``k_norm.weight`` (and their ``.bias``), ``sinks (N,)``. The config is
``attn_spec.attention.AttentionConfig``; the rotary table is ``attn_spec.rope.inv_freq(...,
dtype=np.float64)`` (the frequency formulas in float64).

Every step, forward (backward in reverse):

1. ``q0 = x Wqᵀ + bq`` (and k0, v0), clamped to ``±clip_qkv``; with ``output_gate`` each head's second
H features of q0 are its gate; 2. ``qk_norm="full"``: RMSNorm (LayerNorm for ``qk_norm_kind="layer"``:
the RMSNorm of ``x - mean(x)``, plus a bias) over the projected width; 3. split heads;
4. ``qk_norm="head"`` / ``"unit"``: the same norm per head (weights shared, or per head); 5. rotary on the
first R channels (multimodal: each frequency's position row); 5b. Llama 4's temperature scales on q;
6. ``z = scale · q·k`` (key/value head ``n // G`` for query head n); 7. soft-cap ``c·tanh(z/c)``;
7b. ALiBi ``+ slope_n · (s - t)``; 8. masked softmax (causal, window or chunk, padding) whose denominator
also holds ``exp(sink_n)``; fully masked rows give zeros; 9. dropout (injected keep-mask);
10. ``o = p v``, merge heads, times ``sigmoid(gate)``, ``y = o Woᵀ + bo``.

A key/value-sharing consumer (``config.kv_shared``, Gemma 4) is given its producer's keys and values
``shared_kv=(k, v)`` (``(B, K, T, H)``, normed and rotated, a full pass): steps 1-5 make only q, and the
backward treats k and v as constants (the consumer's gradients: its x through q, and its own parameters).
"""

from __future__ import annotations

import numpy as np

from attn_spec.attention import AttentionConfig, left_pads, temperature_scales
from attn_spec.rope import inv_freq, mrope_rows
from compare.oracle import _rounder

NORM_PARAMS = ("q_norm.weight", "k_norm.weight", "q_norm.bias", "k_norm.bias")


def keep_mask(config: AttentionConfig, valid_BT: np.ndarray) -> np.ndarray:
    """bool ``(B, T, T)``: causal, inside the window (a query sees itself and ``w - 1`` keys before it;
    ``|t - s| < w`` bidirectional), and a real key token."""
    T = valid_BT.shape[1]
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    keep = np.ones((T, T), bool)
    if config.causal:
        keep &= s <= t
    if config.sliding_window is not None:
        keep &= (t - s if config.causal else np.abs(t - s)) < config.sliding_window
    keep = keep[None] & valid_BT[:, None, :].astype(bool)
    if config.chunk_size is not None:  # chunks counted from each row's first real token
        lead = left_pads(valid_BT)[:, None, None]
        keep &= (t[None] - lead) // config.chunk_size == (s[None] - lead) // config.chunk_size
    return keep


def rope_tables(
    config: AttentionConfig, position_ids: np.ndarray, dtype: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin ``(B, T, R)`` in the config's layout, times the attention factor: in float64, or for
    ``dtype="float32"`` as a plain float32 evaluation computes them (as transformers and both twins do: the
    frequencies rounded to float32, positions × frequencies in float32, cos/sin of those angles)."""
    rope = config.rope
    seq_len = int(np.max(position_ids)) + 1
    inv, factor = inv_freq(rope, config.H, seq_len=seq_len, dtype=np.float64)
    if dtype == "float32":
        freqs = position_ids.astype(np.float32)[..., None] * inv.astype(np.float32)
    else:
        freqs = position_ids.astype(np.float64)[..., None] * inv
    rows = mrope_rows(rope, config.H)
    if rows is not None and position_ids.ndim == 3:  # (3, B, T): each frequency from its row
        freqs = np.where(rows == 0, freqs[0], np.where(rows == 1, freqs[1], freqs[2]))
    emb = np.concatenate([freqs, freqs], -1) if rope.layout == "half" else np.repeat(freqs, 2, -1)
    return np.cos(emb) * factor, np.sin(emb) * factor


def _rotate(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "half":
        x1, x2 = np.split(x, 2, axis=-1)
        return np.concatenate([-x2, x1], -1)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return out


def _rope(x_BnTH, cos, sin, layout, r):
    R = cos.shape[-1]
    rot = r(r(x_BnTH[..., :R] * cos[:, None]) + r(_rotate(x_BnTH[..., :R], layout) * sin[:, None]))
    return np.concatenate([rot, x_BnTH[..., R:]], -1)


def _rope_backward(g_BnTH, cos, sin, layout, r):
    # The rotation's transpose: rotate() is a 90° turn of each pair, so rotateᵀ = -rotate.
    R = cos.shape[-1]
    g = g_BnTH[..., :R]
    back = r(r(g * cos[:, None]) - r(_rotate(r(g * sin[:, None]), layout)))
    return np.concatenate([back, g_BnTH[..., R:]], -1)


def _per_head(w):
    """A norm weight for ``x (B, heads, T, H)``: a per-head ``(heads, H)`` one broadcast over the tokens."""
    return w[:, None, :] if w.ndim == 2 else w


def _param_sum(a, w):
    """``a`` (shaped like the normed x) summed over every axis the weight ``w`` is broadcast along."""
    return a.sum(axis=(0, 2)) if w.ndim == 2 else a.reshape(-1, w.shape[0]).sum(0)


def _rms(x, w, config, r):
    """RMSNorm over the last axis scaled by ``offset + w`` (``w`` None: no scale, ``qk_norm="unit"``)."""
    inv = r(1.0 / np.sqrt(r(np.mean(r(x * x), -1, keepdims=True) + config.qk_norm_eps)))
    u = r(x * inv)
    if w is None:
        return u, u, inv
    return r(u * (config.qk_norm_offset + _per_head(w))), u, inv


def _rms_backward(dy, u, inv, w, config, r):
    du = dy if w is None else r(dy * (config.qk_norm_offset + _per_head(w)))
    dx = r(inv * r(du - r(u * np.mean(r(du * u), -1, keepdims=True))))
    if w is None:
        return dx, None, None
    dw = _param_sum(r(dy * u), w)
    terms = _param_sum(np.abs(dy * u), w)  # the sizes the tolerance policy scales by
    return dx, r(dw), terms


def _norm(x, params, which, config, r):
    """The weighted qk-norm ``which`` (``"q_norm"``/``"k_norm"``) over the last axis: an RMSNorm, or for
    ``qk_norm_kind="layer"`` a LayerNorm, the RMSNorm of the centered ``x - mean(x)``, plus its bias.
    Returns ``(y, u, inv)``: ``u`` the normalized x, ``inv`` the inverse root of its centered mean square."""
    if config.qk_norm_kind == "layer":
        x = r(x - r(np.mean(x, -1, keepdims=True)))
    y, u, inv = _rms(x, params[f"{which}.weight"], config, r)
    if f"{which}.bias" in params:
        y = r(y + _per_head(params[f"{which}.bias"]))
    return y, u, inv


def _norm_backward(dy, u, inv, params, which, config, r, g):
    """The backward of :func:`_norm`: returns ``dx`` and records in ``g`` the weight's (and bias's) gradient
    with ``terms_<name>``, the sums of |terms| of each. Centering is an orthogonal projection, its own
    transpose: the LayerNorm's ``dx`` is the RMSNorm's, centered."""
    w = params[f"{which}.weight"]
    dx, g[f"{which}.weight"], g[f"terms_{which}.weight"] = _rms_backward(dy, u, inv, w, config, r)
    if config.qk_norm_kind == "layer":
        dx = r(dx - r(np.mean(dx, -1, keepdims=True)))
    if f"{which}.bias" in params:
        g[f"{which}.bias"], g[f"terms_{which}.bias"] = r(_param_sum(dy, w)), _param_sum(np.abs(dy), w)
    return dx


def _linear(x, params, proj, r, rs=None):
    """``x @ W.T + b``: each operation rounded by ``r``, the result by ``rs`` (default ``r``)."""
    rs = rs or r
    y = r(x @ params[f"{proj}.weight"].T)
    return rs(y + params[f"{proj}.bias"]) if f"{proj}.bias" in params else rs(y)


def attention_forward(
    x,
    params,
    config: AttentionConfig,
    attention_mask=None,
    position_ids=None,
    dropout_mask=None,
    dtype=None,
    storage_only: bool = False,
    shared_kv=None,
) -> dict:
    """Output of the layer over the whole sequence ``x (B, T, E)``.

    Args:
      params: ``{name: float64 array}`` as above. attention_mask: ``(B, T)`` 1/0 (None: all real).
      position_ids: ``(B, T)`` (None: ``0..T-1``). dropout_mask: bool ``(B, N, T, T)`` keep-mask.
      dtype: round to this dtype: every intermediate, or with ``storage_only`` only the tensors a kernel with
        float32 internals stores in ``dtype`` (x and the weights, the projections, the normed and rotated
        q/k, the attention output, the result; in the backward the same tensors' gradients): the second
        naive evaluation of the port checks (both are what the dtype can do; which lands nearer the float64
        result on an ill-conditioned row is chance).
      shared_kv: ``(k, v)`` ``(B, K, T, H)``: a ``kv_shared`` layer's keys and values (its producer's, normed
        and rotated; stored in ``dtype``), constants of this layer.

    Returns:
      dict with ``out (B, T, E)`` and the intermediates the backward pass reuses.
    """
    c, rs = config, _rounder(dtype)
    r = _rounder(None) if storage_only else rs
    x = rs(x)
    params = {k: rs(v) for k, v in params.items()}
    B, T, _ = x.shape
    N, K, G, H = c.N, c.K, c.G, c.H
    valid = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    pos = np.broadcast_to(np.arange(T), (B, T)) if position_ids is None else np.asarray(position_ids)
    f = {"x": x, "params": params}
    shared = c.kv_shared
    if shared != (shared_kv is not None):
        raise ValueError(
            f"attention_forward: shared_kv=(k, v) goes with a kv_shared config; got kv_shared={shared}, "
            f"shared_kv {'given' if shared_kv is not None else 'missing'}"
        )
    q0 = _linear(x, params, "q_proj", r, rs)
    if shared:  # placeholders, unused: the keys and values are the producer's
        k0 = v0 = np.zeros((B, T, K * H))
    else:
        k0 = _linear(x, params, "k_proj", r, rs)
        v0 = k0 if c.k_eq_v else _linear(x, params, "v_proj", r, rs)  # k_eq_v: values = the keys' projection
    if c.clip_qkv is not None:  # the bound in the dtype (as torch and jax compare); gradient 1 on [-lim, lim]
        lim = rs(np.float64(c.clip_qkv))
        f["clip"] = [np.abs(a) <= lim for a in (q0, k0, v0)]
        q0, k0, v0 = (np.clip(a, -lim, lim) for a in (q0, k0, v0))
    if c.output_gate:  # per head: H query channels, then H gate channels
        qg = q0.reshape(B, T, N, 2 * H)
        q0, f["gate"] = qg[..., :H].reshape(B, T, N * H), qg[..., H:].reshape(B, T, N * H)
    if c.qk_norm == "full":
        q0, f["uq"], f["iq"] = _norm(q0, params, "q_norm", c, r)
        if not shared:
            k0, f["uk"], f["ik"] = _norm(k0, params, "k_norm", c, r)
        q0, k0 = rs(q0), rs(k0)
    q = q0.reshape(B, T, N, H).transpose(0, 2, 1, 3)
    k = k0.reshape(B, T, K, H).transpose(0, 2, 1, 3)
    v = v0.reshape(B, T, K, H).transpose(0, 2, 1, 3)
    if c.qk_norm == "head" and not c.qk_norm_after_rope:
        q, f["uq"], f["iq"] = _norm(q, params, "q_norm", c, r)
        if not shared:
            k, f["uk"], f["ik"] = _norm(k, params, "k_norm", c, r)
        q, k = rs(q), rs(k)
    elif c.qk_norm == "unit":
        q, f["uq"], f["iq"] = _rms(q, None, c, r)
        k, f["uk"], f["ik"] = _rms(k, None, c, r)
        q, k = rs(q), rs(k)
    if c.v_norm:
        v, f["uv"], f["iv"] = _rms(v, None, c, r)
        v = rs(v)
    if c.rope is not None:
        cos, sin = (r(a) for a in rope_tables(c, pos, dtype))
        f["cos"], f["sin"] = cos, sin
        q, k = rs(_rope(q, cos, sin, c.rope.layout, r)), rs(_rope(k, cos, sin, c.rope.layout, r))
    if c.qk_norm_after_rope:  # Hunyuan: the rotated heads are normed
        q, f["uq"], f["iq"] = _norm(q, params, "q_norm", c, r)
        k, f["uk"], f["ik"] = _norm(k, params, "k_norm", c, r)
        q, k = rs(q), rs(k)
    if shared:
        k, v = (rs(np.asarray(a, np.float64)) for a in shared_kv)
        if k.shape != (B, K, T, H) or v.shape != (B, K, T, H):
            raise ValueError(
                f"attention_forward: shared_kv must be (k, v) of (B, K, T, H) = {(B, K, T, H)}; got "
                f"{k.shape}, {v.shape}"
            )
    if c.attn_temperature is not None:  # by sequence index (not position_ids), float32 in the twins
        f["temp"] = r(temperature_scales(c, np.arange(T)))[None, None, :, None]
        q = rs(q * f["temp"])
    kr, vr = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # kv head n // G serves query head n
    z = r(r(np.einsum("bnth,bnsh->bnts", q, kr)) * c.logit_scale)
    if c.softcap is not None:
        th = r(np.tanh(r(z / c.softcap)))
        f["tanh"] = th
        z = r(c.softcap * th)
    if c.alibi_slopes is not None:
        dist = np.arange(T)[None, :] - np.arange(T)[:, None]  # s - t
        z = r(z + r(np.asarray(c.alibi_slopes).reshape(1, N, 1, 1) * dist))
    keep = keep_mask(c, valid)[:, None]
    zm = np.where(keep, z, -np.inf)
    m = np.max(zm, -1, keepdims=True)
    if c.sinks:
        sink = params["sinks"].reshape(1, N, 1, 1)
        m = np.maximum(m, sink)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(keep, r(np.exp(r(zm - m))), 0.0)
    denom = r(e.sum(-1, keepdims=True))
    if c.sinks:
        e_sink = r(np.exp(r(sink - m)))
        denom = r(denom + e_sink)
        f["p_sink"] = r(e_sink / np.where(denom > 0, denom, 1.0))
    p = r(e / np.where(denom > 0, denom, 1.0))
    pd = p
    if dropout_mask is not None:
        pd = r(np.where(dropout_mask, p / (1.0 - c.dropout), 0.0))
    o = rs(np.einsum("bnts,bnsh->bnth", pd, vr))
    o2 = o.transpose(0, 2, 1, 3).reshape(B, T, N * H)
    if c.output_gate:
        f["o_ungated"], f["sig"] = o2, r(1.0 / (1.0 + np.exp(-f["gate"])))
        o2 = rs(o2 * f["sig"])
    out = _linear(o2, params, "o_proj", r, rs)
    f.update(q=q, k=k, v=v, kr=kr, vr=vr, p=p, pd=pd, o=o2, out=out, keep=keep, dropout_mask=dropout_mask)
    return f


def attention_backward(
    x,
    params,
    dy,
    config: AttentionConfig,
    attention_mask=None,
    position_ids=None,
    dropout_mask=None,
    dtype=None,
    storage_only: bool = False,
    shared_kv=None,
) -> dict:
    """Gradients of ``sum(out * dy)`` w.r.t. ``x`` and every parameter (their names), plus, for the
    tolerance policy's term sizes, the gradients at the projections' outputs ``dq0, dk0, dv0 (B, T, ·)``,
    ``o`` and ``terms_<name>`` (sums of |terms|) for the norm weights and biases and the sinks. With
    ``shared_kv`` (a ``kv_shared`` layer) the keys and values are constants: no dk0, dv0."""
    c, rs = config, _rounder(dtype)
    r = _rounder(None) if storage_only else rs
    f = attention_forward(
        x, params, c, attention_mask, position_ids, dropout_mask, dtype, storage_only, shared_kv
    )
    shared = c.kv_shared
    x, params, dy = f["x"], f["params"], rs(dy)
    B, T, E = x.shape
    N, K, G, H = c.N, c.K, c.G, c.H
    g = {}
    dy2 = dy.reshape(-1, E)
    g["o_proj.weight"] = rs(dy2.T @ f["o"].reshape(-1, N * H))
    if "o_proj.bias" in params:
        g["o_proj.bias"] = rs(dy2.sum(0))
    do = rs(dy @ params["o_proj.weight"])
    if c.output_gate:  # o = o_ungated · σ(gate)
        sig = f["sig"]
        dgate = rs(r(do * f["o_ungated"]) * r(sig * r(1.0 - sig)))
        do = rs(do * sig)
    do = do.reshape(B, T, N, H).transpose(0, 2, 1, 3)
    dpd = r(np.einsum("bnth,bnsh->bnts", do, f["vr"]))
    dvr = r(np.einsum("bnts,bnth->bnsh", f["pd"], do))
    dp = dpd
    if f["dropout_mask"] is not None:
        dp = r(np.where(f["dropout_mask"], dpd / (1.0 - c.dropout), 0.0))
    p = f["p"]
    row = r((p * dp).sum(-1, keepdims=True))
    dz = np.where(f["keep"], r(p * r(dp - row)), 0.0)
    if c.sinks:  # d p_s / d sink = -p_s · p_sink: the sink only takes weight away from the keys
        g["sinks"] = r(-(f["p_sink"] * row).sum(axis=(0, 2, 3)))
        g["terms_sinks"] = np.abs(f["p_sink"] * p * dp).sum(axis=(0, 2, 3))
    if c.softcap is not None:
        dz = r(dz * r(1.0 - r(f["tanh"] * f["tanh"])))
    dz = r(dz * c.logit_scale)
    dq = r(np.einsum("bnts,bnsh->bnth", dz, f["kr"]))
    dkr = r(np.einsum("bnts,bnth->bnsh", dz, f["q"]))
    dk = r(dkr.reshape(B, K, G, T, H).sum(2))
    dv = rs(dvr.reshape(B, K, G, T, H).sum(2))
    if c.v_norm and not shared:
        dv = rs(_rms_backward(dv, f["uv"], f["iv"], None, c, r)[0])
    dq, dk = rs(dq), rs(dk)
    if c.attn_temperature is not None:
        dq = rs(dq * f["temp"])
    if c.qk_norm_after_rope:
        dq = rs(_norm_backward(dq, f["uq"], f["iq"], params, "q_norm", c, r, g))
        dk = rs(_norm_backward(dk, f["uk"], f["ik"], params, "k_norm", c, r, g))
    if c.rope is not None:
        dq = rs(_rope_backward(dq, f["cos"], f["sin"], c.rope.layout, r))
        dk = rs(_rope_backward(dk, f["cos"], f["sin"], c.rope.layout, r))
    if c.qk_norm == "unit":
        dq = _rms_backward(dq, f["uq"], f["iq"], None, c, r)[0]
        if not shared:
            dk = _rms_backward(dk, f["uk"], f["ik"], None, c, r)[0]
    if c.qk_norm == "head" and not c.qk_norm_after_rope:
        dq = _norm_backward(dq, f["uq"], f["iq"], params, "q_norm", c, r, g)
        if not shared:
            dk = _norm_backward(dk, f["uk"], f["ik"], params, "k_norm", c, r, g)
    dq0 = dq.transpose(0, 2, 1, 3).reshape(B, T, N * H)
    dk0 = dk.transpose(0, 2, 1, 3).reshape(B, T, K * H)
    dv0 = dv.transpose(0, 2, 1, 3).reshape(B, T, K * H)
    if c.qk_norm == "full":
        dq0 = _norm_backward(dq0, f["uq"], f["iq"], params, "q_norm", c, r, g)
        if not shared:
            dk0 = _norm_backward(dk0, f["uk"], f["ik"], params, "k_norm", c, r, g)
    if c.output_gate:  # back to q_proj's layout: per head H query then H gate features
        dq0 = np.concatenate([dq0.reshape(B, T, N, H), dgate.reshape(B, T, N, H)], -1).reshape(B, T, -1)
    if c.clip_qkv is not None:  # clamp: gradient 1 inside [-clip, clip], 0 outside
        dq0, dk0, dv0 = (np.where(m, d, 0.0) for m, d in zip(f["clip"], (dq0, dk0, dv0)))
    if c.k_eq_v:  # k0 fed the keys and the values
        dk0 = rs(dk0 + dv0)
    x2 = x.reshape(-1, E)
    dx = None
    for proj, d in (("q_proj", dq0), ("k_proj", dk0), ("v_proj", dv0)):
        if f"{proj}.weight" not in params:
            continue
        d2 = d.reshape(-1, d.shape[-1])
        g[f"{proj}.weight"] = rs(d2.T @ x2)
        if f"{proj}.bias" in params:
            g[f"{proj}.bias"] = rs(d2.sum(0))
        term = r(d @ params[f"{proj}.weight"])
        dx = term if dx is None else r(dx + term)
    dx = rs(dx)
    for name in NORM_PARAMS + ("sinks",):
        if name in g:
            g[name] = rs(g[name])
    g["x"] = dx
    if shared:  # the producer's keys and values: constants here
        dk0 = dv0 = None
    g.update(dq0=dq0, dk0=dk0, dv0=dv0, o=f["o"], out=f["out"])
    return g


def gradient_magnitudes(x, params, dy, bwd: dict) -> dict[str, float]:
    """The tolerance policy's term size for each gradient of :func:`attention_backward` (its ``bwd``): the
    largest sum of ``|terms|`` that the gradient's last contraction adds up (``max(|dq0|ᵀ|x|)`` for
    ``q_proj.weight``, ``max(Σ_rows |dq0|)`` for ``q_proj.bias``, ``max(Σ_proj |d·0| |W|)`` for ``x`` …),
    keyed like the gradients (``x`` and the parameter names)."""
    E = x.shape[-1]
    ax, ady = np.abs(x).reshape(-1, E), np.abs(dy).reshape(-1, E)
    d = {
        p: np.abs(bwd[f"d{p[0]}0"]).reshape(ady.shape[0], -1)
        for p in ("q_proj", "k_proj", "v_proj")
        if f"{p}.weight" in params
    }
    out = {"x": sum(d[p] @ np.abs(params[f"{p}.weight"]) for p in d)}
    for name in params:
        if name == "o_proj.weight":
            terms = ady.T @ np.abs(bwd["o"]).reshape(ady.shape[0], -1)
        elif name == "o_proj.bias":
            terms = ady.sum(axis=0)
        elif name in NORM_PARAMS + ("sinks",):
            terms = bwd[f"terms_{name}"]
        elif name.endswith(".weight"):
            terms = d[name.split(".")[0]].T @ ax
        else:
            terms = d[name.split(".")[0]].sum(axis=0)
        out[name] = terms
    return {k: float(np.max(v, initial=0.0)) for k, v in out.items()}
