"""GPT-style causal self-attention with grouped-query heads and a KV cache (JAX/Flax nnx twin of
``torch_attn/causal.py``).

Dimension key (see ``attn_spec``):

    B  batch                     E  model width (embed_dim)
    T  tokens in this call       N  query heads
    S  keys attended: T without a cache, L with one
    L  the cache's max_length    K  key/value heads (K == N multi-head, K == 1 multi-query)
    H  head width, E // N        G  query heads per key/value head, N // K

The module is thin: four ``torch.nn.Linear``-layout projections around the SDPA core of
``jax_attn.functional`` (``implementation="math"`` or ``"blocked"``) or ``jax.nn.dot_product_attention``
(``implementation="fused"``, XLA). The default, None (``"auto"``), chooses per call by the rule of
``attn_spec.dispatch`` (``select_implementation``); the constructor's value and the last automatic choice
are shown in ``repr`` (``dispatch``) and ``last_choice``.

KV cache: ``cache = attn.init_cache(B, L)`` preallocates ``k, v (B, K, L, H)`` and ``index = 0``;
``y, cache = attn(x_chunk, cache=cache)`` writes the chunk's keys/values at ``index`` and attends over the
whole buffer with a bottom-right-aligned causal mask, ``causal_mask(T, L, offset=index)``: query t (at
absolute position ``index + t``) sees keys ``s <= index + t``, so slots not yet filled are masked. Shapes
never change with ``index``, so a jitted decode step compiles once. Calls never modify a given cache
(functional update; under ``jax.jit`` with donation XLA updates in place).

Overflow (``index + T > L``): raises ``ValueError`` when ``index`` is concrete (eager calls). Under
``jax.jit`` the index is traced and nothing can raise, so an overflowing call returns an output that is
NaN everywhere, and the returned cache's ``index`` stays past ``max_length``, so every later call on it
returns NaN too: never silent garbage.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx, struct

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
from attn_spec.dispatch import AUTO, ChoiceLog
from jax_attn.functional import scaled_dot_product_attention, select_implementation
from jax_attn.masks import causal_mask


def _spec(x) -> tuple[tuple[int, ...], str]:
    return tuple(x.shape), jnp.dtype(x.dtype).name


@struct.dataclass
class KVCache:
    """Preallocated keys and values (a pytree).

    Attributes:
      k, v: ``(B, K, L, H)``; slots ``>= index`` are not filled yet.
      index: int32 scalar array, the number of tokens cached so far.
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


class Linear(nnx.Module):
    """``torch.nn.Linear``'s parameters, layout and initialization: ``weight (out, in)``, ``bias (out,)``,
    ``y = x @ weight.T + bias``; both drawn from ``U(-1/sqrt(in), 1/sqrt(in))``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, rngs: nnx.Rngs, param_dtype):
        bound = 1.0 / math.sqrt(in_features)
        init = lambda shape: jax.random.uniform(rngs.params(), shape, param_dtype, -bound, bound)
        self.weight = nnx.Param(init((out_features, in_features)))
        self.bias = nnx.Param(init((out_features,))) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.weight[...].astype(x.dtype).T
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class CausalSelfAttention(nnx.Module):
    """Causal self-attention as in GPT-2 / nanoGPT, with grouped-query heads and a KV cache.

    Args:
      embed_dim: E, the model width; must be divisible by ``num_heads``.
      num_heads: N, query heads; head width ``H = E // N``.
      num_kv_heads: K, key/value heads, dividing N (``None``: K = N; 1: multi-query attention).
      bias: biases on the four projections.
      dropout: attention-weight dropout, applied in training mode only (``train()``/``eval()``).
      implementation: None (default) / ``"auto"``: chosen per call by ``select_implementation`` (math
        with dropout in training mode or for short inputs, blocked for long ones, the core's cuDNN path on
        a GPU for fp16/bf16); or ``"math"`` (the readable SDPA core, supports dropout), ``"fused"``
        (``jax.nn.dot_product_attention``, XLA) or ``"blocked"`` (the core's blocked online softmax).
      rngs: ``nnx.Rngs`` for the initialization (``params``) and dropout (``dropout``) streams.
      dtype: computation dtype; None promotes the input's with the parameters'.
      param_dtype: parameter dtype.

    Parameters, named and shaped like torch (``torch_state_dict()`` yields these keys):
    ``q_proj.weight (N·H, E)``, ``k_proj.weight (K·H, E)``, ``v_proj.weight (K·H, E)``,
    ``out_proj.weight (E, N·H)``, and a ``.bias`` for each when ``bias=True``.
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
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        c = self.config = check_config(embed_dim, num_heads, num_kv_heads, bias, dropout, implementation)
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = c.E, c.N, c.K, c.H
        self.dropout, self.implementation = c.dropout, c.implementation
        self.dispatch = ChoiceLog()  # the last automatic choice (implementation=None), shown in repr
        self.dtype, self.param_dtype = dtype, param_dtype
        self.q_proj = Linear(c.E, c.N * c.H, bias, rngs=rngs, param_dtype=param_dtype)
        self.k_proj = Linear(c.E, c.K * c.H, bias, rngs=rngs, param_dtype=param_dtype)
        self.v_proj = Linear(c.E, c.K * c.H, bias, rngs=rngs, param_dtype=param_dtype)
        self.out_proj = Linear(c.N * c.H, c.E, bias, rngs=rngs, param_dtype=param_dtype)
        self.deterministic = False  # training mode, as a fresh torch module; eval() sets True
        self.rngs = rngs["dropout"].fork() if c.dropout > 0.0 else None
        self.sharding = None  # an AttentionSharding, set by jax_attn.sharding.shard_module

    @property
    def last_choice(self):
        """The :class:`attn_spec.dispatch.Choice` of the last call (traced call under ``jit``) when
        ``implementation`` is None / ``"auto"``; None before the first call or with an explicit path."""
        return self.dispatch.last

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_length`` tokens: zeros
        ``(B, K, L, H)`` in the computation dtype and ``index = 0``."""
        check_init_cache(batch_size, max_length)
        c = self.config
        dtype = self.dtype or self.param_dtype
        zeros = jnp.zeros((batch_size, c.K, max_length, c.H), dtype)
        cache = KVCache(k=zeros, v=zeros, index=jnp.zeros((), jnp.int32))
        if self.sharding is not None:  # on a mesh: split like the key/value heads (jax_attn.sharding)
            cache = self.sharding.shard_cache(cache, self)
        return cache

    def __call__(
        self,
        x: jax.Array,
        cache: KVCache | None = None,
        *,
        dropout_mask: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Attend causally within ``x`` and, with a cache, to every token cached before it.

        Args:
          x: ``(B, T, E)``.
          cache: a :class:`KVCache` from :meth:`init_cache` (or a previous call), or None for a full pass.
          dropout_mask: bool keep-mask of the attention weights, broadcastable to ``(B, N, T, S)``, to
            inject the same dropout in both frameworks (training mode, ``dropout > 0`` only).
          dropout_rng: key for the dropout draw; default: the module's ``dropout`` stream.

        Returns:
          ``y (B, T, E)`` without a cache; ``(y, new_cache)`` with one.
        """
        x = jnp.asarray(x)
        c = self.config
        B, T = check_input(_spec(x), c)
        check_dropout_mask(dropout_mask is not None, not self.deterministic, c)
        x_BTE = x.astype(self.dtype or jnp.result_type(x.dtype, self.param_dtype))
        if self.sharding is not None:
            x_BTE = self.sharding.causal_constrain(self, "x", x_BTE)
        q_BNTH = self.q_proj(x_BTE).reshape(B, T, c.N, c.H).transpose(0, 2, 1, 3)
        k_BKTH = self.k_proj(x_BTE).reshape(B, T, c.K, c.H).transpose(0, 2, 1, 3)
        v_BKTH = self.v_proj(x_BTE).reshape(B, T, c.K, c.H).transpose(0, 2, 1, 3)
        if self.sharding is not None:  # on a mesh: batch on data, heads on model (jax_attn.sharding)
            shard = self.sharding.causal_constrain
            q_BNTH = shard(self, "q", q_BNTH)
            k_BKTH, v_BKTH = shard(self, "kv", k_BKTH), shard(self, "kv", v_BKTH)

        if cache is None:
            y_BNTH = self._attend(q_BNTH, k_BKTH, v_BKTH, None, dropout_mask, dropout_rng)
        else:
            index = _concrete_index(cache.index)
            L = check_cache(cache.k.shape, cache.v.shape, index, B, T, c)
            # one index dtype for every axis: Python 0s would be int64 under jax_enable_x64 (TypeError)
            zero = jnp.zeros_like(cache.index)
            start = (zero, zero, cache.index, zero)
            k_BKLH = jax.lax.dynamic_update_slice(cache.k, k_BKTH.astype(cache.k.dtype), start)
            v_BKLH = jax.lax.dynamic_update_slice(cache.v, v_BKTH.astype(cache.v.dtype), start)
            # Bottom-right alignment: query t is token index + t and sees every key up to it.
            keep_TL = causal_mask(T, L, offset=cache.index)
            dt = q_BNTH.dtype
            y_BNTH = self._attend(
                q_BNTH, k_BKLH.astype(dt), v_BKLH.astype(dt), keep_TL, dropout_mask, dropout_rng
            )
            cache = KVCache(k=k_BKLH, v=v_BKLH, index=cache.index + T)

        y_BTE = self.out_proj(y_BNTH.transpose(0, 2, 1, 3).reshape(B, T, c.N * c.H))
        if cache is None:
            return y_BTE
        # A traced index cannot raise: an overflowing call yields NaN (and so does every later call,
        # since the index only grows), instead of dynamic_update_slice's silently clamped write.
        y_BTE = jnp.where(cache.index <= cache.max_length, y_BTE, jnp.nan)
        return y_BTE, cache

    def _attend(self, q_BNTH, k_BKSH, v_BKSH, keep_TS, dropout_mask, dropout_rng) -> jax.Array:
        """Attention of N query heads over K key/value heads; ``keep_TS`` None means top-left causal
        (T == S, no cache)."""
        dropout_p = 0.0 if self.deterministic else self.dropout
        implementation = self.implementation
        if implementation in AUTO:  # chosen from this call's shapes (static under jit: at trace time)
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
            out_BTNH = jax.nn.dot_product_attention(
                q_BNTH.transpose(0, 2, 1, 3),
                k_BKSH.transpose(0, 2, 1, 3),
                v_BKSH.transpose(0, 2, 1, 3),
                mask=None if keep_TS is None else keep_TS[None, None],
                is_causal=keep_TS is None,
                implementation="xla",
            )
            return out_BTNH.transpose(0, 2, 1, 3)
        if dropout_p > 0.0 and dropout_mask is None and dropout_rng is None:
            dropout_rng = self.rngs()
        return scaled_dot_product_attention(
            q_BNTH,
            k_BKSH,
            v_BKSH,
            attn_mask=keep_TS,
            dropout_p=dropout_p,
            is_causal=keep_TS is None,
            enable_gqa=True,
            dropout_mask=dropout_mask,
            dropout_rng=dropout_rng,
            implementation=implementation,
        )

    def torch_state_dict(self, layout: str = "torch_attn") -> dict[str, np.ndarray]:
        """The parameters as a state dict in ``layout`` (see ``attn_spec.causal``): NumPy arrays in the
        parameter dtype (``ml_dtypes.bfloat16`` for bf16); ``torch_attn``'s ``load_torch_state_dict`` takes
        them as they are, ``torch.from_numpy`` the others."""
        check_layout(layout, self.config)
        params = {}
        for proj in PROJECTIONS:
            linear = getattr(self, proj)
            params[f"{proj}.weight"] = np.array(linear.weight[...])
            if linear.bias is not None:
                params[f"{proj}.bias"] = np.array(linear.bias[...])
        return _to_layout(params, layout)

    def load_torch_state_dict(self, state_dict, layout: str = "torch_attn") -> None:
        """Load a state dict in ``layout`` (values: torch tensors or NumPy arrays), casting to the
        parameter dtype; bit-exact when the dtypes agree. Unknown or missing keys and wrong shapes raise
        ``ValueError``; GPT checkpoints' causal-mask buffers (``bias``, ``masked_bias``) are skipped."""
        arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
        keys = check_state_dict({key: a.shape for key, a in arrays.items()}, layout, self.config)
        for key, a in _from_layout({key: arrays[key] for key in keys}, layout).items():
            proj, name = key.split(".")
            param = getattr(getattr(self, proj), name)
            _assign(param, jnp.asarray(a, dtype=param.dtype))


def _concrete_index(index) -> int | None:
    """The cache index as a Python int when it is known here (eager), None when traced (under jit)."""
    try:
        return int(index)
    except jax.errors.ConcretizationTypeError:
        return None


def _assign(param: nnx.Variable, value: jax.Array) -> None:
    """``param[...] = value``; on a module built abstractly (``nnx.eval_shape(lambda: Module(...))``: no
    random initialization, which costs one XLA compile per parameter shape) the value replaces the
    shape placeholder."""
    if isinstance(param.get_value(), jax.ShapeDtypeStruct):
        param.set_value(value)
    else:
        param[...] = value


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; jax_attn imports no torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no bf16: through fp32, exactly
            return value.float().numpy().astype(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def _to_layout(params: dict, layout: str) -> dict:
    """Our ``torch_attn`` keys to ``layout``'s (q, k, v packed at full width for the GPT layouts)."""
    if layout == "torch_attn":
        return params
    qkv = ("q_proj", "k_proj", "v_proj")
    w_attn = np.concatenate([params[f"{p}.weight"] for p in qkv], axis=0)  # (3E, E), nn.Linear
    w_proj = params["out_proj.weight"]
    if layout == "hf_gpt2":  # Conv1D stores (in, out)
        w_attn, w_proj = w_attn.T, w_proj.T
    out = {"c_attn.weight": np.ascontiguousarray(w_attn)}
    if "q_proj.bias" in params:
        out["c_attn.bias"] = np.concatenate([params[f"{p}.bias"] for p in qkv])
    out["c_proj.weight"] = np.ascontiguousarray(w_proj)
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
    for p, w in zip(("q_proj", "k_proj", "v_proj"), np.split(w_attn, 3, axis=0)):
        params[f"{p}.weight"] = w
    if "c_attn.bias" in state_dict:
        for p, b in zip(("q_proj", "k_proj", "v_proj"), np.split(state_dict["c_attn.bias"], 3)):
            params[f"{p}.bias"] = b
    params["out_proj.weight"] = w_proj
    if "c_proj.bias" in state_dict:
        params["out_proj.bias"] = state_dict["c_proj.bias"]
    return params
