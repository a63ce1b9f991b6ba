"""Bring your own module: port a torch attention module to JAX and get the agreement record for it.

This is what a porting user calls::

    import torch
    from compare.port import check_port

    mha = torch.nn.MultiheadAttention(64, 8, batch_first=True)   # or your trained one
    record = check_port(mha)                                     # random inputs, printed table
    record = check_port(mha, query, key, value, attn_mask=mask)  # or your own inputs (torch or NumPy)
    assert record.ok

It accepts ``torch.nn.MultiheadAttention``, ``torch_attn.MultiheadAttention`` and
``torch_attn.CausalSelfAttention``, and transformers' attention modules of the families in ``attn_spec.hf``
(``compare.port_hf`` says what is compared for those). The module's weights and configuration are read
(``from_torch`` / ``load_torch_state_dict``), the same inputs go through the torch module, through the ported
``jax_attn`` module under ``jax.jit`` and through the float64 oracle, and the output, the attention
weights and the gradients (w.r.t. inputs and every parameter, of ``sum(out * dout)`` for a random
``dout``) are compared with the project's tolerance policy. Dropout is off (the module is compared in
eval mode and its mode restored afterwards).

transformers' multi-head latent attention modules (DeepSeek V2/V3/V3.2, GLM-4.7-Flash, GLM-5) go to
``compare.port_mla.check_mla_port``.
"""

from __future__ import annotations

import numpy as np

from compare import agree, registry
from compare.kinds.base import NP_DTYPES, Vector
from compare.kinds.causal import CausalCase
from compare.kinds.mha import PARAM_PREFIX, MhaCase
from compare.port_record import PortRecord


def _numpy(x) -> np.ndarray | None:
    """torch tensor (bf16 included) or array-like as NumPy; floats widened to float32 for transport."""
    if x is None or not hasattr(x, "detach"):
        return None if x is None else np.asarray(x)
    x = x.detach().cpu()
    return x.float().numpy() if x.is_floating_point() else x.numpy()


def _dtype_name(module) -> str:
    return str(next(module.parameters()).dtype).removeprefix("torch.")


def _mha_vector(module, inputs, masks, need_weights, average_attn_weights, is_causal, seed) -> Vector:
    import torch

    dtype = _dtype_name(module)
    E, kdim, vdim = module.embed_dim, module.kdim, module.vdim
    rng = np.random.default_rng(seed)
    if inputs:
        query, key, value = (_numpy(x) for x in inputs)
    else:
        N, L, S = 2, 5, 7
        lay = (lambda n, w: (N, n, w)) if module.batch_first else (lambda n, w: (n, N, w))
        query, key, value = (rng.standard_normal(lay(n, w)) for n, w in ((L, E), (S, kdim), (S, vdim)))
    batched = query.ndim == 3
    if batched:
        N, L = (query.shape[0], query.shape[1]) if module.batch_first else (query.shape[1], query.shape[0])
        S = key.shape[1] if module.batch_first else key.shape[0]
    else:
        N, (L, S) = None, (query.shape[0], key.shape[0])
    np_dtype = NP_DTYPES[dtype]
    arrays = {
        n: np.asarray(x, np.float64).astype(np_dtype)
        for n, x in zip(("query", "key", "value"), (query, key, value))
    }
    arrays["dout"] = rng.standard_normal(arrays["query"].shape).astype(np_dtype)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            arrays[PARAM_PREFIX + name] = p.detach().cpu().float().numpy().astype(np_dtype)
    for name, m in masks.items():
        if m is not None:
            m = _numpy(m)
            arrays[name] = m if m.dtype == bool else m.astype(np_dtype)
    case = MhaCase(
        name="byo_mha",
        E=E,
        num_heads=module.num_heads,
        L=L,
        S=S,
        N=N,
        kdim=None if kdim == E else kdim,
        vdim=None if vdim == E else vdim,
        bias=module.in_proj_bias is not None,
        add_bias_kv=module.bias_k is not None,
        add_zero_attn=module.add_zero_attn,
        batch_first=module.batch_first,
        attn_mask="given" if masks.get("attn_mask") is not None else None,
        key_padding_mask="given" if masks.get("key_padding_mask") is not None else None,
        is_causal=is_causal,
        need_weights=need_weights,
        average_attn_weights=average_attn_weights,
        dtype=dtype,
    )
    return Vector("mha", case, arrays)


def _causal_vector(module, inputs, seed) -> Vector:
    dtype = _dtype_name(module)
    np_dtype = NP_DTYPES[dtype]
    rng = np.random.default_rng(seed)
    x = _numpy(inputs[0]) if inputs else rng.standard_normal((2, 7, module.embed_dim))
    arrays = {
        "x": np.asarray(x, np.float64).astype(np_dtype),
        "dy": rng.standard_normal(x.shape).astype(np_dtype),
    }
    for name, p in module.state_dict().items():
        arrays[name] = p.detach().cpu().float().numpy().astype(np_dtype)
    case = CausalCase(
        name="byo_causal",
        B=x.shape[0],
        T=x.shape[1],
        E=module.embed_dim,
        N=module.num_heads,
        K=module.num_kv_heads,
        bias=module.q_proj.bias is not None,
        dtype=dtype,
    )
    return Vector("causal", case, arrays)


def check_port(
    module,
    *inputs,
    attn_mask=None,
    key_padding_mask=None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    seed: int = 0,
    print_table: bool = True,
    **hf_options,
) -> PortRecord:
    """Port ``module`` to ``jax_attn`` and compare torch, JAX and the float64 oracle on the same inputs.

    Args:
      module: ``torch.nn.MultiheadAttention``, ``torch_attn.MultiheadAttention`` or
        ``torch_attn.CausalSelfAttention`` (fp32, bf16 or fp16 parameters).
      inputs: ``query, key, value`` for MHA (in the module's layout), ``x (B, T, E)`` for causal; torch
        tensors or NumPy arrays. Omitted: random inputs of a small size (seeded by ``seed``).
      attn_mask, key_padding_mask, need_weights, average_attn_weights, is_causal: MHA forward arguments,
        with torch's semantics (bool True = masked out, float additive). For a transformers module,
        ``key_padding_mask`` is the ``(B, T)`` 1/0 padding mask (1 = token).
      hf_options: for a transformers attention module (``LlamaAttention``, ``GPT2Attention``, ...):
        ``post_norm_outside``, ``decode``, ``jax_port`` of :func:`compare.port_hf.check_hf_port`.

    Returns:
      A :class:`PortRecord`; ``record.ok`` is True when everything agrees within the tolerance policy and
      the weights round-trip bit-exactly.
    """
    import torch
    from flax import nnx

    import jax_attn
    import torch_attn
    from compare import env

    env.pin_precision()
    from compare.port_mla import is_mla_module

    if is_mla_module(module):  # DeepSeek V2/V3/V3.2, GLM-4.7-Flash, GLM-5: multi-head latent attention
        from compare.port_mla import check_mla_port

        return check_mla_port(
            module, *inputs, attention_mask=key_padding_mask, seed=seed, print_table=print_table, **hf_options
        )
    if type(module).__module__.startswith("transformers."):  # a Hugging Face attention layer
        from compare.port_hf import check_hf_port

        if attn_mask is not None or len(inputs) > 1:
            raise ValueError(
                "check_port: a transformers attention takes x (B, T, E) and key_padding_mask= as its (B, T) "
                "1/0 padding mask (1 = token)"
            )
        return check_hf_port(
            module, *inputs, attention_mask=key_padding_mask, seed=seed, print_table=print_table, **hf_options
        )
    if isinstance(module, (torch.nn.MultiheadAttention, torch_attn.MultiheadAttention)):
        if len(inputs) not in (0, 3):
            raise ValueError(
                f"check_port: MultiheadAttention takes query, key, value; got {len(inputs)} inputs"
            )
        masks = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask}
        vec = _mha_vector(module, inputs, masks, need_weights, average_attn_weights, is_causal, seed)
        ported = jax_attn.MultiheadAttention.from_torch(module)
        torch_impl = "torch_builtin" if type(module) is torch.nn.MultiheadAttention else "torch_attn"
    elif isinstance(module, torch_attn.CausalSelfAttention):
        if len(inputs) not in (0, 1):
            raise ValueError(
                f"check_port: CausalSelfAttention takes one input x (B, T, E); got {len(inputs)}"
            )
        if attn_mask is not None or key_padding_mask is not None:
            raise ValueError("check_port: CausalSelfAttention takes no masks (it is causal by construction)")
        vec = _causal_vector(module, inputs, seed)
        ported = jax_attn.CausalSelfAttention(
            module.embed_dim, module.num_heads, module.num_kv_heads, bias=vec.case.bias, rngs=nnx.Rngs(0)
        )
        ported.load_torch_state_dict(module.state_dict())
        torch_impl = "torch_attn"
    else:
        raise ValueError(
            "check_port: expected torch.nn.MultiheadAttention, torch_attn.MultiheadAttention or "
            f"torch_attn.CausalSelfAttention; got {type(module).__name__}"
        )
    kind = registry.KINDS[vec.kind]
    vec.arrays.update(kind.expectations(vec.case, vec.arrays))
    # The runners rebuild each side from the module's configuration and weights (eval mode, no dropout),
    # exactly as the shared vectors are run; the module itself is left untouched.
    results = {"jax_attn": kind.implementations["jax_attn"](vec)}
    results[torch_impl] = kind.implementations[torch_impl](vec)
    sd = module.state_dict()
    back = ported.torch_state_dict()
    round_trip = set(back) >= {k for k in sd if not k.endswith(("masked_bias",))} and all(
        np.array_equal(np.asarray(back[k], np.float64), sd[k].detach().cpu().double().numpy()) for k in back
    )
    record = PortRecord(
        module=type(module).__module__ + "." + type(module).__name__,
        kind=vec.kind,
        dtype=vec.case.dtype,
        config={k: v for k, v in vec.case.params().items() if k not in ("name", "seed", "note")},
        round_trip_bit_exact=bool(round_trip),
    )
    for impl, res in results.items():
        record.agreements[f"{impl} vs oracle"] = agree.against_oracle(vec, res)
    record.agreements[f"jax_attn vs {torch_impl}"] = agree.between(
        vec, results["jax_attn"], results[torch_impl]
    )
    if print_table:
        from rich.console import Console

        Console().print(record.table())
    return record
