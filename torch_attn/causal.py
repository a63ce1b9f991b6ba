"""GPT-style causal self-attention with grouped-query heads and a KV cache (PyTorch twin of
``jax_attn/causal.py``).

Dimension key (see ``attn_spec``):

    B  batch                     E  model width (embed_dim)
    T  tokens in this call       N  query heads
    S  keys attended: T without a cache, L with one
    L  the cache's max_length    K  key/value heads (K == N multi-head, K == 1 multi-query)
    H  head width, E // N        G  query heads per key/value head, N // K

The module is thin: four ``nn.Linear`` projections around the SDPA core of ``torch_attn.functional``
(``implementation="math"`` or ``"blocked"``) or ``F.scaled_dot_product_attention``
(``implementation="fused"``). The default, None (``"auto"``), chooses per call by the rule of
``attn_spec.dispatch`` (``select_implementation``); the constructor's value and the last automatic choice
are shown in ``repr`` and ``last_choice``.

KV cache: ``cache = attn.init_cache(B, L)`` preallocates ``k, v (B, K, L, H)`` and ``index = 0``;
``y, cache = attn(x_chunk, cache=cache)`` writes the chunk's keys/values at ``index`` and attends over the
whole buffer with a bottom-right-aligned causal mask, ``causal_mask(T, L, offset=index)``: query t (at
absolute position ``index + t``) sees keys ``s <= index + t``, so slots not yet filled are masked. Calls
never modify a given cache (``slice_scatter`` makes the updated buffers), as in the JAX twin: gradients
flow through several chunks and a cache can be branched; the price is one buffer copy per call, the same
order of work as reading the buffer for attention.

Overflow (``index + T > L``) raises ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attn_spec.causal import (
    PROJECTIONS,
    check_cache,
    check_config,
    check_dropout_mask,
    check_init_cache,
    check_input,
    check_layout,
    check_state_dict,
)
from attn_spec.dispatch import AUTO, ChoiceLog, describe
from torch_attn.functional import scaled_dot_product_attention, select_implementation
from torch_attn.masks import causal_mask


def _spec(x) -> tuple[tuple[int, ...], str]:
    return tuple(x.shape), str(x.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVCache:
    """Preallocated keys and values.

    Attributes:
      k, v: ``(B, K, L, H)``; slots ``>= index`` are not filled yet.
      index: int, the number of tokens cached so far.
    """

    k: torch.Tensor
    v: torch.Tensor
    index: int

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


class CausalSelfAttention(nn.Module):
    """Causal self-attention as in GPT-2 / nanoGPT, with grouped-query heads and a KV cache.

    Args:
      embed_dim: E, the model width; must be divisible by ``num_heads``.
      num_heads: N, query heads; head width ``H = E // N``.
      num_kv_heads: K, key/value heads, dividing N (``None``: K = N; 1: multi-query attention).
      bias: biases on the four projections.
      dropout: attention-weight dropout, applied in training mode only (``train()``/``eval()``).
      implementation: None (default) / ``"auto"``: chosen per call by ``select_implementation`` (math
        with dropout in training mode, otherwise the core's fused path on CPU and CUDA); or ``"math"``
        (the readable SDPA core, supports dropout), ``"fused"`` (``F.scaled_dot_product_attention``) or
        ``"blocked"`` (the core's blocked online softmax).
      device, dtype: of the parameters.

    Parameters (``state_dict()`` keys, the ``"torch_attn"`` layout): ``q_proj.weight (N·H, E)``,
    ``k_proj.weight (K·H, E)``, ``v_proj.weight (K·H, E)``, ``out_proj.weight (E, N·H)``, and a ``.bias``
    for each when ``bias=True``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        *,
        implementation: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        c = self.config = check_config(embed_dim, num_heads, num_kv_heads, bias, dropout, implementation)
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = c.E, c.N, c.K, c.H
        self.dropout, self.implementation = c.dropout, c.implementation
        self.dispatch = ChoiceLog()  # the last automatic choice (implementation=None), shown in repr
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(c.E, c.N * c.H, **kw)
        self.k_proj = nn.Linear(c.E, c.K * c.H, **kw)
        self.v_proj = nn.Linear(c.E, c.K * c.H, **kw)
        self.out_proj = nn.Linear(c.N * c.H, c.E, **kw)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"embed_dim={c.E}, num_heads={c.N}, num_kv_heads={c.K}, bias={c.bias}, dropout={c.dropout}, "
            f"implementation={describe(c.implementation, self.dispatch)}"
        )

    @property
    def last_choice(self):
        """The :class:`attn_spec.dispatch.Choice` of the last call (traced call under ``jit``) when
        ``implementation`` is None / ``"auto"``; None before the first call or with an explicit path."""
        return self.dispatch.last

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_length`` tokens: zeros
        ``(B, K, L, H)`` on the parameters' device and dtype, and ``index = 0``."""
        check_init_cache(batch_size, max_length)
        c = self.config
        w = self.k_proj.weight
        shape = (batch_size, c.K, max_length, c.H)
        return KVCache(
            k=torch.zeros(shape, device=w.device, dtype=w.dtype),
            v=torch.zeros(shape, device=w.device, dtype=w.dtype),
            index=0,
        )

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        *,
        dropout_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Attend causally within ``x`` and, with a cache, to every token cached before it.

        Args:
          x: ``(B, T, E)``.
          cache: a :class:`KVCache` from :meth:`init_cache` (or a previous call), or None for a full pass.
          dropout_mask: bool keep-mask of the attention weights, broadcastable to ``(B, N, T, S)``, to
            inject the same dropout in both frameworks (training mode, ``dropout > 0`` only).
          generator: ``torch.Generator`` for the dropout draw; default: the global one.

        Returns:
          ``y (B, T, E)`` without a cache; ``(y, new_cache)`` with one.
        """
        c = self.config
        B, T = check_input(_spec(x), c)
        check_dropout_mask(dropout_mask is not None, self.training, c)
        x_BTE = x  # torch's Linear does not promote: x must have the parameters' dtype
        q_BNTH = self.q_proj(x_BTE).view(B, T, c.N, c.H).transpose(1, 2)
        k_BKTH = self.k_proj(x_BTE).view(B, T, c.K, c.H).transpose(1, 2)
        v_BKTH = self.v_proj(x_BTE).view(B, T, c.K, c.H).transpose(1, 2)

        if cache is None:
            y_BNTH = self._attend(q_BNTH, k_BKTH, v_BKTH, None, dropout_mask, generator)
        else:
            index = int(cache.index)
            L = check_cache(tuple(cache.k.shape), tuple(cache.v.shape), index, B, T, c)
            end = index + T
            k_BKLH = cache.k.slice_scatter(k_BKTH.to(cache.k.dtype), dim=2, start=index, end=end)
            v_BKLH = cache.v.slice_scatter(v_BKTH.to(cache.v.dtype), dim=2, start=index, end=end)
            # Bottom-right alignment: query t is token index + t and sees every key up to it.
            keep_TL = causal_mask(T, L, offset=index, device=x.device)
            dt = q_BNTH.dtype
            y_BNTH = self._attend(q_BNTH, k_BKLH.to(dt), v_BKLH.to(dt), keep_TL, dropout_mask, generator)
            cache = KVCache(k=k_BKLH, v=v_BKLH, index=end)

        y_BTE = self.out_proj(y_BNTH.transpose(1, 2).reshape(B, T, c.N * c.H))
        if cache is None:
            return y_BTE
        return y_BTE, cache

    def _attend(self, q_BNTH, k_BKSH, v_BKSH, keep_TS, dropout_mask, generator) -> torch.Tensor:
        """Attention of N query heads over K key/value heads; ``keep_TS`` None means top-left causal
        (T == S, no cache)."""
        dropout_p = self.dropout if self.training else 0.0
        implementation = self.implementation
        if implementation in AUTO:  # chosen from this call's shapes
            choice = select_implementation(
                q_BNTH,
                k_BKSH,
                v_BKSH,
                keep_TS,
                dropout_p,
                keep_TS is None,
                enable_gqa=True,
                dropout_mask=dropout_mask,
            )
            self.dispatch.last = choice
            implementation = choice.implementation
        if self.implementation == "fused":
            return F.scaled_dot_product_attention(
                q_BNTH,
                k_BKSH,
                v_BKSH,
                attn_mask=keep_TS,
                is_causal=keep_TS is None,
                enable_gqa=self.config.G > 1,
            )
        return scaled_dot_product_attention(
            q_BNTH,
            k_BKSH,
            v_BKSH,
            attn_mask=keep_TS,
            dropout_p=dropout_p,
            is_causal=keep_TS is None,
            enable_gqa=True,
            dropout_mask=dropout_mask,
            generator=generator,
            implementation=implementation,
        )

    def torch_state_dict(self, layout: str = "torch_attn") -> dict[str, torch.Tensor]:
        """The parameters as a state dict in ``layout`` (see ``attn_spec.causal``): detached copies in the
        parameter dtype; ``"torch_attn"`` equals ``state_dict()``."""
        check_layout(layout, self.config)
        params = {}
        for proj in PROJECTIONS:
            linear = getattr(self, proj)
            params[f"{proj}.weight"] = linear.weight.detach().clone()
            if linear.bias is not None:
                params[f"{proj}.bias"] = linear.bias.detach().clone()
        return _to_layout(params, layout)

    def load_torch_state_dict(self, state_dict, layout: str = "torch_attn") -> None:
        """Load a state dict in ``layout`` (values: torch tensors or NumPy arrays, e.g. from
        ``jax_attn``'s ``torch_state_dict``), casting to the parameter dtype; bit-exact when the dtypes
        agree. Unknown or missing keys and wrong shapes raise ``ValueError``; GPT checkpoints'
        causal-mask buffers (``bias``, ``masked_bias``) are skipped."""
        tensors = {key: _to_tensor(value) for key, value in state_dict.items()}
        keys = check_state_dict({key: t.shape for key, t in tensors.items()}, layout, self.config)
        with torch.no_grad():
            for key, t in _from_layout({key: tensors[key] for key in keys}, layout).items():
                proj, name = key.split(".")
                getattr(getattr(self, proj), name).copy_(t)


def _to_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    value = np.asarray(value)
    if value.dtype.name == "bfloat16":  # ml_dtypes' bf16, which torch.from_numpy does not know
        return torch.from_numpy(np.ascontiguousarray(value).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(value))


def _to_layout(params: dict, layout: str) -> dict:
    """Our ``torch_attn`` keys to ``layout``'s (q, k, v packed at full width for the GPT layouts)."""
    if layout == "torch_attn":
        return params
    qkv = ("q_proj", "k_proj", "v_proj")
    w_attn = torch.cat([params[f"{p}.weight"] for p in qkv], dim=0)  # (3E, E), nn.Linear
    w_proj = params["out_proj.weight"]
    if layout == "hf_gpt2":  # Conv1D stores (in, out)
        w_attn, w_proj = w_attn.T, w_proj.T
    out = {"c_attn.weight": w_attn.contiguous()}
    if "q_proj.bias" in params:
        out["c_attn.bias"] = torch.cat([params[f"{p}.bias"] for p in qkv])
    out["c_proj.weight"] = w_proj.contiguous()
    if "out_proj.bias" in params:
        out["c_proj.bias"] = params["out_proj.bias"]
    return out


def _from_layout(state_dict: dict, layout: str) -> dict:
    """``layout``'s keys to ours: the inverse of :func:`_to_layout`."""
    if layout == "torch_attn":
        return state_dict
    w_attn, w_proj = state_dict["c_attn.weight"], state_dict["c_proj.weight"]
    if layout == "hf_gpt2":
        w_attn, w_proj = w_attn.T, w_proj.T
    params = {}
    for p, w in zip(("q_proj", "k_proj", "v_proj"), torch.chunk(w_attn, 3, dim=0)):
        params[f"{p}.weight"] = w
    if "c_attn.bias" in state_dict:
        for p, b in zip(("q_proj", "k_proj", "v_proj"), torch.chunk(state_dict["c_attn.bias"], 3)):
            params[f"{p}.bias"] = b
    params["out_proj.weight"] = w_proj
    if "c_proj.bias" in state_dict:
        params["out_proj.bias"] = state_dict["c_proj.bias"]
    return params
