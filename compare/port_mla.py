"""Port check for transformers' multi-head latent attention modules (``DeepseekV2Attention``,
``DeepseekV3Attention``, ``Glm4MoeLiteAttention``, ``DeepseekV32Attention``, ``GlmMoeDsaAttention``);
``compare.port.check_port`` dispatches here.

The record holds, as ``compare.port_hf`` does for the other families:

- **forward and gradients**: transformers' own module (eager attention, its family's rotary-embedding module
  for ``position_embeddings``, an additive 4-D causal + padding mask from transformers' mask functions), the
  JAX port under ``jax.jit`` (``jax_attn.mla.from_hf``) and the torch twin (``torch_attn.mla.from_hf``): the
  output and the gradients of ``sum(y · dy)`` w.r.t. the hidden states and every parameter (the indexer's
  get none in transformers, zero in ours); also ``out_absorbed``, the twins' full pass through the absorbed
  computation, judged like ``out``.
- **the reference**: the float64 oracle (``compare.oracle_mla``) on the ported config and weights; the
  tolerance, in every dtype, is the policy's (``compare.tolerance``: twice the naive same-dtype
  evaluation's error plus the dtype's slack; for gradients the sums of ``|terms|`` at float32's slack).
  transformers' module is judged against it too.
- **a left-padded batch**: row 1 starts with pads; positions skip them. Pad query rows are excluded from
  every comparison with transformers (their ``dy`` is zero).
- **decode**: one token at a time through transformers' ``DynamicCache`` (its indexed layers for the sparse
  families) and through our compressed cache (jitted step in JAX; one-token calls take the absorbed
  computation), compared with each other and with the reference's full pass.
- **the sparse indexer's ties**: query rows whose k-th and (k+1)-th best index scores are equal (or within
  1e-5 relative: float32 rounding may order them either way) are counted (``config["tied_rows"]``) and,
  like pad rows, excluded from the comparisons with transformers (their ``dy`` is zero): ours break ties
  by the lower key index, ``torch.topk`` by no specified rule. Against the reference they are compared.
- **GLM-5 shared layers** (``indexer_types[i] == "shared"``): a random selection ``topk_indices`` goes to
  both (transformers' ``prev_topk_indices``; in decode mapped onto our cache's key axis).
"""

from __future__ import annotations

import sys

import numpy as np

from attn_spec import mla as spec
from attn_spec.rope import SEQ_DEPENDENT
from compare.port_hf import PAD, B, T, _between, _bits, _f64, _judge, _unbits, randomize_
from compare.port_record import PortRecord

MODULE_CLASSES = (
    "DeepseekV2Attention",
    "DeepseekV3Attention",
    "Glm4MoeLiteAttention",
    "DeepseekV32Attention",
    "GlmMoeDsaAttention",
)
TIE_REL = 1e-5


def is_mla_module(module) -> bool:
    """A transformers module whose config is of an MLA family (``attn_spec.mla.FAMILIES``)."""
    config = getattr(module, "config", None)
    return (
        type(module).__module__.startswith("transformers.")
        and config is not None
        and spec.is_mla_family(config)
    )


# ---------------------------------------------------------------------------------------------------------
# Tiny random modules of each family (tests, the docs table).
# ---------------------------------------------------------------------------------------------------------

YARN = {
    "rope_type": "yarn",
    "rope_theta": 1e4,
    "factor": 8.0,
    "original_max_position_embeddings": 4,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}


def tiny_config(family: str, **overrides):
    """A transformers config of ``family`` with two layers of width 32 and MLA widths that differ from each
    other (Q 12, L 10, D 6, R 4, V 5), MoE kept tiny; sparse families: indexer k = 3 of up to 7 keys."""
    import transformers as tf

    classes = {
        "deepseek_v2": tf.DeepseekV2Config,
        "deepseek_v3": tf.DeepseekV3Config,
        "glm4_moe_lite": tf.Glm4MoeLiteConfig,
        "deepseek_v32": tf.DeepseekV32Config,
        "glm_moe_dsa": tf.GlmMoeDsaConfig,
    }
    if family not in classes:
        raise ValueError(f"tiny_config: unknown MLA family {family!r}; known: {sorted(classes)}")
    kw = dict(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=2,
        intermediate_size=64,
        moe_intermediate_size=16,
        vocab_size=64,
        max_position_embeddings=64,
        q_lora_rank=12,
        kv_lora_rank=10,
        qk_nope_head_dim=6,
        qk_rope_head_dim=4,
        v_head_dim=5,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
    )
    if family in spec.SPARSE_FAMILIES:
        kw.update(index_topk=3, index_head_dim=8, index_n_heads=2)
    kw.update(overrides)
    cfg = classes[family](**kw)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_module(family: str, layer: int = 0, dtype: str = "float32", seed: int = 0, **overrides):
    """Layer ``layer``'s attention of a tiny random ``family`` model (eval mode, ``dtype``), weights of order
    one (``compare.port_hf.randomize_``)."""
    import torch
    import transformers as tf

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype)).eval()
    return randomize_(model.model.layers[layer].self_attn, seed), model


# ---------------------------------------------------------------------------------------------------------
# Running transformers' module.
# ---------------------------------------------------------------------------------------------------------


def _keep(mask: np.ndarray, q_idx: np.ndarray, S: int):
    """bool ``(B, len(q_idx), S)`` from transformers' mask functions: causal and the padding mask."""
    import torch
    from transformers import masking_utils as mu

    pad = mu.padding_mask_function(torch.from_numpy(mask[:, :S].astype(bool)))
    fn = mu.and_masks(mu.causal_mask_function, pad)
    b, q, kv = np.meshgrid(np.arange(mask.shape[0]), q_idx, np.arange(S), indexing="ij")
    return fn(torch.from_numpy(b), 0, torch.from_numpy(q), torch.from_numpy(kv))


def _rotary(module):
    """The family's own rotary-embedding module (``DeepseekV3RotaryEmbedding`` …) for this config."""
    mod = sys.modules[type(module).__module__]
    return getattr(mod, type(module).__name__.removesuffix("Attention") + "RotaryEmbedding")(module.config)


def _hf_call(module, family, x, mask, pos, q_idx, S, cache=None, prev_topk=None):
    """transformers' module on ``x (B, t, E)`` (queries at sequence indices ``q_idx``, ``S`` keys)."""
    import torch

    keep = _keep(mask, q_idx, S)
    additive = torch.where(keep, 0.0, torch.finfo(x.dtype).min)[:, None].to(x.dtype)
    rotary = _rotary(module)
    pos_t = torch.from_numpy(pos)
    kwargs = {"attention_mask": additive, "position_embeddings": rotary(x, pos_t)}
    if family in spec.SPARSE_FAMILIES:
        kwargs["position_ids"] = pos_t
    if prev_topk is not None:
        kwargs["prev_topk_indices"] = prev_topk
    if cache is not None:
        kwargs["cache"] = cache
    return module(x, **kwargs)[0]


def run_transformers(module, family, x, mask, pos, dy, decode: bool, topk=None) -> dict[str, np.ndarray]:
    import torch
    from transformers import DynamicCache

    cfg = module.config
    old = getattr(cfg, "_attn_implementation", None)
    cfg._attn_implementation = "eager"
    was_training = module.training
    module.eval()
    try:
        dt = next(module.parameters()).dtype
        xt = torch.tensor(x, dtype=dt, requires_grad=True)
        params = dict(module.named_parameters())
        for p in params.values():
            p.grad = None
        prev = None if topk is None else torch.from_numpy(topk).to(torch.int32)
        y = _hf_call(module, family, xt, mask, pos, np.arange(x.shape[1]), x.shape[1], prev_topk=prev)
        y.backward(torch.tensor(dy, dtype=dt))
        res = {"out": _f64(y), "grad_x": _f64(xt.grad)}
        for k, p in params.items():
            if p.grad is not None:  # the indexer runs under no_grad: its parameters get none
                res[f"grad_{k}"] = _unbits(_bits(p.grad), dt)
            p.grad = None
        if decode:
            cache, ys = DynamicCache(config=cfg), []
            with torch.no_grad():
                xt = torch.tensor(x, dtype=dt)
                for t in range(x.shape[1]):
                    prev = (
                        None
                        if topk is None
                        else torch.from_numpy(topk[:, t : t + 1, : t + 1]).to(torch.int32)
                    )
                    ys.append(
                        _hf_call(
                            module,
                            family,
                            xt[:, t : t + 1],
                            mask,
                            pos[:, t : t + 1],
                            np.arange(t, t + 1),
                            t + 1,
                            cache,
                            prev,
                        )
                    )
            res["decode_out"] = _f64(torch.cat(ys, dim=1))
    finally:
        cfg._attn_implementation = old
        module.train(was_training)
    return res


# ---------------------------------------------------------------------------------------------------------
# Running the twins.
# ---------------------------------------------------------------------------------------------------------


def random_selection(mask: np.ndarray, k: int, rng) -> np.ndarray:
    """int64 ``(B, T, min(k, T))``: a selection as an indexer makes one, for a shared layer: query t ranks
    its real earlier keys first (in random order), then its pad keys, then the later keys (masked), so the
    first ``min(k, t + 1)`` indices of row t are all ``<= t`` (what a decode step's indexer returns)."""
    B, T = mask.shape
    t = np.arange(T)
    causal = t[None, None, :] <= t[None, :, None]
    valid = causal & mask.astype(bool)[:, None, :]
    u = rng.random((B, T, T))
    score = np.where(valid, u + 2.0, np.where(causal, u, -np.inf))
    return np.argsort(-score, axis=-1, kind="stable")[..., : min(k, T)]


def cache_axis_indices(topk_BTk: np.ndarray, start: int, C: int) -> np.ndarray:
    """Key indices into a full sequence (transformers' key axis: the cached tokens, then this call's) as
    indices into our cached call's key axis (the C slots, then this call's T tokens): sequence index s
    stays s before ``start`` and moves to ``C + s - start`` from it."""
    return np.where(topk_BTk < start, topk_BTk, C + topk_BTk - start)


def run_torch_twin(attn, x, mask, pos, dy, decode: bool, topk=None, dtype=None) -> dict[str, np.ndarray]:
    import torch

    dt = dtype or next(attn.parameters()).dtype
    attn = attn.to(dt).eval()
    m, p = torch.from_numpy(mask), torch.from_numpy(pos)
    tk = None if topk is None else torch.from_numpy(topk)
    xt = torch.tensor(x, dtype=dt, requires_grad=True)
    attn.implementation = None
    y = attn(xt, m, p, topk_indices=tk)
    y.backward(torch.tensor(dy, dtype=dt))
    res = {"out": _f64(y), "grad_x": _f64(xt.grad)}
    for k, prm in attn.named_parameters():
        res[f"grad_{k}"] = np.zeros(tuple(prm.shape)) if prm.grad is None else _f64(prm.grad)
        prm.grad = None
    with torch.no_grad():
        attn.implementation = "absorbed"
        res["out_absorbed"] = _f64(attn(torch.tensor(x, dtype=dt), m, p, topk_indices=tk))
        attn.implementation = None
        if decode:
            Tn = x.shape[1]
            cache, ys = attn.init_cache(x.shape[0], Tn), []
            xt = torch.tensor(x, dtype=dt)
            for t in range(Tn):
                sel = None if topk is None else cache_axis_indices(topk[:, t : t + 1, : t + 1], t, Tn)
                tk_t = None if sel is None else torch.from_numpy(sel)
                y, cache = attn(
                    xt[:, t : t + 1], m[:, t : t + 1], p[:, t : t + 1], cache=cache, topk_indices=tk_t
                )
                ys.append(y)
            res["decode_out"] = _f64(torch.cat(ys, dim=1))
    return res


def run_jax_port(attn, x, mask, pos, dy, decode: bool, topk=None) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)
    dt = attn.kv_a_proj_with_mqa.weight[...].dtype
    tk = None if topk is None else jnp.asarray(topk)

    def forward(params, x):
        return nnx.merge(graphdef, params, rest)(x, mask, pos, topk_indices=tk)

    @jax.jit
    def forward_backward(params, x, dy):
        out, vjp = jax.vjp(forward, params, x)
        return out, *vjp(dy)

    out, dparams, dx = forward_backward(params, jnp.asarray(x, dt), jnp.asarray(dy, dt))
    res = {"out": np.asarray(out, np.float64), "grad_x": np.asarray(dx, np.float64)}
    for path, value in nnx.to_flat_state(dparams):
        res["grad_" + ".".join(str(q) for q in path)] = np.asarray(value[...], np.float64)

    @jax.jit
    def absorbed(params, x):
        model = nnx.merge(graphdef, params, rest)
        model.implementation = "absorbed"
        return model(x, mask, pos, topk_indices=tk)

    res["out_absorbed"] = np.asarray(absorbed(params, jnp.asarray(x, dt)), np.float64)
    if decode:

        @jax.jit
        def step(params, x, m, p, cache, tk):
            return nnx.merge(graphdef, params, rest)(x, m, p, cache=cache, topk_indices=tk)

        Tn = x.shape[1]
        cache, ys = attn.init_cache(x.shape[0], Tn), []
        for t in range(Tn):
            sl = slice(t, t + 1)
            tk_t = None if topk is None else jnp.asarray(cache_axis_indices(topk[:, sl, : t + 1], t, Tn))
            y, cache = step(
                params,
                jnp.asarray(x[:, sl], dt),
                jnp.asarray(mask[:, sl]),
                jnp.asarray(pos[:, sl]),
                cache,
                tk_t,
            )
            ys.append(np.asarray(y, np.float64))
        res["decode_out"] = np.concatenate(ys, axis=1)
    return res


# ---------------------------------------------------------------------------------------------------------
# The record.
# ---------------------------------------------------------------------------------------------------------


def _reference(ours_t, c, x, mask, pos, dy, decode: bool, dtype: str, topk):
    """The float64 oracle on the ported config and weights: ``(reference, naive same-dtype baseline,
    gradient magnitudes)``; decoding is expected to give the full pass (for a length-dependent rope, the
    torch twin decoding in float64, as ``compare.port_hf`` does)."""
    import torch

    from compare import oracle_mla

    params = {k: v.double().numpy() for k, v in ours_t.torch_state_dict().items()}
    out, magnitudes = {}, {}
    for name, rounding in (("ref", None), ("naive", dtype)):
        bwd = oracle_mla.mla_backward(x, params, dy, c, mask, pos, topk, dtype=rounding)
        res = {"out": np.asarray(bwd["out"], np.float64), "grad_x": np.asarray(bwd["x"], np.float64)}
        res["out_absorbed"] = res["out"]
        res.update({f"grad_{k}": np.asarray(bwd[k], np.float64) for k in params})
        if decode:
            res["decode_out"] = res["out"]
        out[name] = res
        if rounding is None:
            terms = oracle_mla.gradient_magnitudes(x, params, dy, bwd)
            magnitudes = {f"grad_{k}": v for k, v in terms.items()}
    if decode and c.rope.rope_type in SEQ_DEPENDENT:
        twin = type(ours_t)(c, dtype=torch.float64)
        twin.load_torch_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
        out["ref"]["decode_out"] = run_torch_twin(twin, x, mask, pos, dy, True, topk, torch.float64)[
            "decode_out"
        ]
        del out["naive"]["decode_out"]
    return out["ref"], out["naive"], magnitudes


# Near-tie band of the indexer's top-k boundary, relative to the row's largest score (at least 1): float32
# rounding moves scores by ~1e-7 of their size; bf16/fp16 projections by a few units of 2^-8 (J products).
TIE_REL = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 2.0**-5, "float16": 2.0**-7}


def _selections(module, family, ours_t, ours_j, c, x, mask, pos, dtype):
    """For a layer with an indexer: ``(band (B, T), {impl: rows whose selection differs from the
    reference's (B, T)})``. The band holds the query rows whose k-th and (k+1)-th best float64 scores lie
    within :data:`TIE_REL` of each other; transformers' selection is read off its indexer with a hook."""
    import jax.numpy as jnp
    import torch

    from compare import oracle_mla

    params = {k: v.double().numpy() for k, v in ours_t.torch_state_dict().items()}
    scores = oracle_mla.index_scores(x, params, c, pos)
    keep = oracle_mla.keep_mask(mask.astype(bool))
    band = oracle_mla.tied_rows(scores, keep, c.index_topk, TIE_REL[dtype])
    ref = oracle_mla.topk_selection(scores, keep, c.index_topk)[1] & keep
    captured = []
    handle = module.indexer.register_forward_hook(lambda mod, args, out: captured.append(out))
    cfg = module.config
    old, cfg._attn_implementation = getattr(cfg, "_attn_implementation", None), "eager"
    try:
        with torch.no_grad():
            dt = next(module.parameters()).dtype
            _hf_call(module, family, torch.tensor(x, dtype=dt), mask, pos, np.arange(x.shape[1]), x.shape[1])
    finally:
        handle.remove()
        cfg._attn_implementation = old
    with torch.no_grad():
        dt = next(ours_t.parameters()).dtype
        m, p = torch.from_numpy(mask), torch.from_numpy(pos)
        _, idx_t = ours_t(torch.tensor(x, dtype=dt), m, p, return_topk=True)
    import jax
    from flax import nnx

    dt_j = ours_j.kv_a_proj_with_mqa.weight[...].dtype
    graphdef, state = nnx.split(ours_j)
    select = jax.jit(lambda s, x, m, p: nnx.merge(graphdef, s)(x, m, p, return_topk=True)[1])
    idx_j = select(state, jnp.asarray(x, dt_j), jnp.asarray(mask), jnp.asarray(pos))
    differ = {}
    for impl, idx in (("transformers", captured[0]), ("torch_attn", idx_t), ("jax_attn", idx_j)):
        sel = np.zeros(keep.shape, bool)
        np.put_along_axis(sel, np.asarray(idx).astype(np.int64), True, axis=-1)
        differ[impl] = np.any((sel & keep) != ref, axis=-1) & mask.astype(bool)
    return band, differ


def _selection_check(impl, differ, band, dtype):
    """A check that fails when ``impl`` selected other keys than the reference outside the tie band."""
    from compare.tolerance import compare_arrays

    unexplained = (differ & ~band).astype(np.float64)
    return compare_arrays("topk_selection", unexplained, np.zeros_like(unexplained), dtype, tol=0.0)


def check_mla_port(
    module,
    x=None,
    attention_mask=None,
    *,
    seed: int = 0,
    decode: bool = True,
    print_table: bool = True,
    jax_port=None,
    topk_indices=None,
) -> PortRecord:
    """Port a transformers MLA module to both twins and judge everything against the float64 reference
    (see the module docstring). ``x (B, T, E)`` and ``attention_mask (B, T)`` default to a random
    left-padded batch; ``jax_port`` replaces ``jax_attn.mla.from_hf(module)`` (e.g. ``load_layer``'s);
    ``topk_indices (B, T, k)`` is a shared layer's selection (default: random)."""
    import torch

    import jax_attn.mla as jmla
    import torch_attn.mla as tmla
    from compare import env

    env.pin_precision()
    family, c = spec.describe_module(module)
    dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    rng = np.random.default_rng(seed)
    if x is None:
        x = rng.standard_normal((B, T, c.E))
    x = np.asarray(x.detach().cpu().double() if hasattr(x, "detach") else x, np.float64)
    if attention_mask is None:
        attention_mask = np.ones(x.shape[:2], np.int64)
        if x.shape[0] > 1:
            attention_mask[1, : min(PAD, x.shape[1] - 1)] = 0
    mask = np.asarray(attention_mask.cpu() if hasattr(attention_mask, "cpu") else attention_mask).astype(
        np.int64
    )
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    topk = None
    if c.index_shared:
        topk = random_selection(mask, c.index_topk, rng) if topk_indices is None else topk_indices
        topk = np.asarray(topk.cpu() if hasattr(topk, "cpu") else topk).astype(np.int64)
    tdt = getattr(torch, dtype)
    x = torch.tensor(x).to(tdt).double().numpy()  # rounded to the module's dtype once, for every side

    ours_t = tmla.from_hf(module)
    ours_j = jax_port if jax_port is not None else jmla.from_hf(module)
    tied, differ = np.zeros(x.shape[:2], bool), {}
    if c.has_indexer:
        band, differ = _selections(module, family, ours_t, ours_j, c, x, mask, pos, dtype)
        tied = band | np.any(list(differ.values()), axis=0)
    real = mask.astype(bool) & ~tied  # the rows compared with transformers
    dy = rng.standard_normal(x.shape) * real[..., None]  # pad and tied rows carry no gradient
    dy = torch.tensor(dy).to(tdt).double().numpy()
    low = dtype in ("bfloat16", "float16")
    results = {
        "transformers": run_transformers(module, family, x, mask, pos, dy, decode, topk),
        "jax_attn": run_jax_port(ours_j, x, mask, pos, dy, decode, topk),
        "torch_attn": run_torch_twin(ours_t, x, mask, pos, dy, decode, topk),
    }
    ref, naive, magnitudes = _reference(ours_t, c, x, mask, pos, dy, decode, dtype, topk)

    sd = module.state_dict()
    back, back_j = tmla.to_hf_state_dict(ours_t), jmla.to_hf_state_dict(ours_j)
    round_trip = set(back) == set(sd) and all(
        torch.equal(back[k], sd[k])
        and np.array_equal(np.asarray(back_j[k], np.float64), sd[k].double().numpy())
        for k in back
    )
    config = spec.config_dict(c)
    config.update(
        family=family,
        tied_rows=int(tied.sum()),
        compared_rows=int(real.sum()),
        selection_differs={k: int(v.sum()) for k, v in differ.items()},
    )
    record = PortRecord(
        module=type(module).__module__ + "." + type(module).__name__,
        kind=f"hf:{family}",
        dtype=dtype,
        config=config,
        round_trip_bit_exact=bool(round_trip),
    )
    rows_q = ("out", "out_absorbed", "decode_out")
    hf = results["transformers"]
    # Row quantities judged against the reference: transformers' real untied rows; the twins' every row in
    # float32 but those where their own selection differs (inside the tie band, else topk_selection fails),
    # in bf16/fp16 their real untied rows (pad rows: their naive baseline is transformers-like noise).
    rows = {"transformers": real}
    for impl in ("jax_attn", "torch_attn"):
        rows[impl] = real if low else ~differ.get(impl, np.zeros_like(real))
    for impl in ("transformers", "jax_attn", "torch_attn"):
        selection = [_selection_check(impl, differ[impl], band, dtype)] if impl in differ else []
        record.agreements[f"{impl} vs reference"] = selection + [
            _judge(
                q,
                results[impl][q],
                ref[q],
                dtype,
                naive.get(q),
                rows[impl] if q in rows_q else None,
                magnitudes.get(q, 0.0),
            )
            for q in ref
            if q in results[impl]
        ]
    for impl in ("jax_attn", "torch_attn"):
        record.agreements[f"{impl} vs transformers"] = [
            _between(
                q,
                results[impl][q],
                hf["out" if q == "out_absorbed" else q],
                ref[q],
                naive.get(q),
                dtype,
                real if q in rows_q else None,
                magnitudes.get(q, 0.0),
            )
            for q in ref
            if q in results[impl] and ("out" if q == "out_absorbed" else q) in hf
        ]
    if print_table:
        from rich.console import Console

        Console().print(record.table())
        if tied.any():
            Console().print(
                f"{int(tied.sum())} query rows tie (or nearly) at the indexer's top-k boundary: compared "
                "with the reference (ties to the lower key index), not with transformers (torch.topk's order "
                "of ties is unspecified)"
            )
    return record


# ---------------------------------------------------------------------------------------------------------
# ``python -m compare port DIR`` for an MLA checkpoint.
# ---------------------------------------------------------------------------------------------------------


def is_mla_checkpoint(checkpoint_dir) -> bool:
    """Whether ``checkpoint_dir/config.json`` is of an MLA family."""
    import json
    from pathlib import Path

    path = Path(checkpoint_dir) / "config.json"
    try:
        return spec.is_mla_family(json.loads(path.read_text()))
    except (OSError, ValueError):
        return False


def load_hf_layer(checkpoint_dir, layer: int, dtype: str | None = None):
    """``(attention module, model)`` of layer ``layer`` of ``AutoModel.from_pretrained(checkpoint_dir)``
    (eager attention, eval mode, cast to ``dtype`` if given)."""
    import torch
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report and progress bars are not ours to print
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(str(checkpoint_dir), attn_implementation="eager")
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    base = getattr(model, "base_model", model)
    return base.layers[layer].self_attn, model.eval()


def markdown(record) -> str:
    """``port.md``: the verdict, then one row per (pair, quantity)."""
    lines = [
        f"# port check: {record.module} ({record.dtype})",
        "",
        f"**{record.verdict()}**",
        "",
        f"family `{record.kind.removeprefix('hf:')}`; weights round trip bit-exact: "
        f"{record.round_trip_bit_exact}; indexer rows tied at the top-k boundary (not compared with "
        f"transformers): {record.config.get('tied_rows', 0)}. Tolerances: `compare/tolerance.py`.",
        "",
        "| pair | quantity | max abs | tol | ok |",
        "|---|---|---|---|---|",
    ]
    for pair, rows in record.agreements.items():
        lines += [
            f"| {pair} | {a.quantity} | {a.max_abs:.2e} | {a.tol:.1e} | {'ok' if a.ok else 'FAIL'} |"
            for a in rows
        ]
    return "\n".join(lines) + "\n"


def cmd_port_mla(args) -> int:
    """``compare port DIR [--layer N]`` for an MLA checkpoint: transformers' layer from
    ``AutoModel.from_pretrained``, the JAX port from ``jax_attn.mla.load_layer`` (NumPy reads) when
    ``--dtype`` is the checkpoint's; prints the table, writes ``port.json`` and ``port.md``. One layer on
    random inputs (layer 0 unless ``--layer``). Exit status 0 all agree, 1 a disagreement, 2 bad arguments."""
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.markup import escape

    import jax_attn.mla as jmla
    from compare import report

    console = Console()
    folder = Path(args.dir)
    layer = getattr(args, "layer", None) or 0
    try:
        _, _, _, ck_dtype = spec.read_layer(folder, layer)
        module, _ = load_hf_layer(folder, layer, args.dtype)
        same = args.dtype in (None, ck_dtype)
        jax_port = jmla.load_layer(folder, layer) if same else None
        record = check_mla_port(module, seed=args.seed, jax_port=jax_port, print_table=False)
    except (ValueError, OSError, IndexError) as err:
        console.print(f"[red]compare port: {escape(str(err))}[/red]")
        return 2
    line = f"layer {layer} of {folder}: {record.verdict()}"
    style = "bold green" if record.ok else "bold red"
    console.print(f"[{style}]{escape(line)}[/{style}]", soft_wrap=True)
    console.print(record.table())
    out = Path(args.out) if args.out else report.new_report_dir()
    out.mkdir(parents=True, exist_ok=True)
    data = {"checkpoint": str(folder), "layer": layer, "jax_port": "load_layer" if same else "from_hf"}
    data.update(record.as_dict())
    data["verdict"] = record.verdict()
    report.write_atomic(out / "port.json", json.dumps(data, indent=1, default=str))
    report.write_atomic(out / "port.md", markdown(record))
    console.print(f"wrote {out / 'port.json'} and {out / 'port.md'}")
    console.print(f"[{style}]{escape(line)}[/{style}]", soft_wrap=True)
    return 0 if record.ok else 1


# ---------------------------------------------------------------------------------------------------------
# The docs table: each family's tiny module through check_mla_port, fp32 and bf16.
# ---------------------------------------------------------------------------------------------------------

TABLE_CASES = (
    ("deepseek_v2", 0, "interleaved (complex) rope, query latent", {}),
    (
        "deepseek_v2",
        0,
        "V2-Lite: no query latent, yarn mscale",
        {"q_lora_rank": None, "rope_parameters": YARN},
    ),
    ("deepseek_v3", 0, "rope_interleave, yarn mscale 1.0 / 0.8", {"rope_parameters": YARN}),
    (
        "deepseek_v3",
        0,
        "rope_interleave=False, attention_bias",
        {"rope_interleave": False, "attention_bias": True},
    ),
    ("glm4_moe_lite", 0, "GLM-4.7-Flash: interleaved rope", {}),
    ("deepseek_v32", 0, "DSA: indexer k = 3, half rope in the indexer", {}),
    ("glm_moe_dsa", 0, "GLM-5: indexer with interleaved rope", {}),
    (
        "glm_moe_dsa",
        1,
        "GLM-5 shared layer (indexer_types full, shared)",
        {"indexer_types": ["full", "shared"]},
    ),
)


def family_table(dtypes=("float32", "bfloat16"), seeds=(0,)) -> list[dict]:
    """One row per (case, dtype, seed): the worst error of both ports vs the float64 reference and vs
    transformers (forward, gradients, decode), absorbed vs plain, the tied rows and whether all agree."""
    from compare.port_hf import _worst

    rows = []
    ports = ("jax_attn vs reference", "torch_attn vs reference")
    vs_hf = ("jax_attn vs transformers", "torch_attn vs transformers")
    for family, layer, knobs, overrides in TABLE_CASES:
        for dtype in dtypes:
            for seed in seeds:
                module, _ = tiny_module(family, layer, dtype, seed=seed, **overrides)
                rec = check_mla_port(module, seed=seed, print_table=False)
                row = {"family": family, "layer": layer, "knobs": knobs, "dtype": dtype, "seed": seed}
                row.update(ok=rec.ok, tied_rows=rec.config["tied_rows"])
                row["policy_ratio"] = max(
                    a.max_abs / a.tol for p in ports + vs_hf for a in rec.agreements[p] if a.tol > 0
                )
                for kind in ("fwd", "grad", "decode"):
                    row[f"ref_{kind}"] = _worst(rec, ports, kind)
                    row[f"hf_{kind}"] = _worst(rec, vs_hf, kind)
                row["absorbed"] = max(
                    a.max_abs for p in vs_hf for a in rec.agreements[p] if a.quantity == "out_absorbed"
                )
                rows.append(row)
    return rows


def table_markdown(rows) -> str:
    def f(v):
        return "–" if v != v else f"{v:.1e}"

    out = [
        "| family | layer | knobs | dtype | port vs f64 fwd / grad / decode | port vs transformers "
        "fwd / grad / decode | absorbed vs transformers | tied rows | worst error / tolerance | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['family']} | {r['layer']} | {r['knobs']} | {r['dtype']} | {f(r['ref_fwd'])} / "
            f"{f(r['ref_grad'])} / {f(r['ref_decode'])} | {f(r['hf_fwd'])} / {f(r['hf_grad'])} / "
            f"{f(r['hf_decode'])} | {f(r['absorbed'])} | {r['tied_rows']} | {r['policy_ratio']:.2f} | "
            f"{'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(out) + "\n"
