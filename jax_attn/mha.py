"""``torch.nn.MultiheadAttention`` in JAX/Flax NNX (twin of ``torch_attn/mha.py``).

A functional core, :func:`multi_head_attention_forward` (torch's ``F.multi_head_attention_forward``
signature, without ``static_k``/``static_v``), and a thin module, :class:`MultiheadAttention`, holding
parameters under torch's names and shapes so that a ``state_dict`` moves across unchanged.

Dimension key (see ``attn_spec``): N batch, L query length, S key/value length, E embed_dim,
Nh heads, D head width ``E // Nh``, ``S_total`` keys after ``add_bias_kv``/``add_zero_attn``.

Semantics, identical in both twins and equal to torch's built-in wherever that is finite:
- Layouts: ``(L, N, E)`` by default, ``(N, L, E)`` with ``batch_first=True``, unbatched ``(L, E)``.
- Masks in torch-MHA polarity at the boundary: bool True = masked out, float = added to the logits.
  ``attn_mask`` is ``(L, S)`` or ``(N * Nh, L, S)`` (row ``n * Nh + h``); ``key_padding_mask`` ``(N, S)``.
  Inside, one convention: bool True = may attend (``masked_to_keep`` at the boundary); a float mask stays
  additive, and a bool mask meeting a float one becomes additive (0 / -inf) like torch's merge.
- ``is_causal`` is torch's hint and follows ``F.multi_head_attention_forward``: it requires ``attn_mask``;
  with no ``key_padding_mask`` and ``need_weights=False`` the mask is dropped and top-left causal
  masking over all ``S_total`` keys is applied (the keys appended by ``add_bias_kv``/``add_zero_attn``
  included, as torch's SDPA call does); otherwise the mask given is applied and the hint dropped.
- Weights (``need_weights=True``, the default) are the post-dropout weights, averaged over heads
  ``(N, L, S_total)`` or per head ``(N, Nh, L, S_total)`` with ``average_attn_weights=False``.
- A fully-masked row gives zeros and finite gradients; torch's built-in gives NaN there on some paths
  (measured in ``tests/test_mha_nan_paths.py``, tabled in ``docs/porting.md``).
- Dropout on the attention weights in training mode only. ``dropout_mask=`` (bool keep-mask of the
  per-head weights, ``(N, Nh, L, S_total)``) replaces the random draw so two frameworks can agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from attn_spec import check_implementation, check_sdpa
from attn_spec.dispatch import AUTO, ChoiceLog
from attn_spec.mha import check_mha, check_mha_init
from jax_attn.functional import _fast_attention, _select, scaled_dot_product_attention_with_weights
from jax_attn.masks import keep_to_additive, masked_to_keep


def _spec(x) -> tuple[tuple[int, ...], str] | None:
    return None if x is None else (tuple(x.shape), jnp.dtype(x.dtype).name)


def _linear(x: jnp.ndarray, weight: jnp.ndarray, bias: jnp.ndarray | None) -> jnp.ndarray:
    """torch's ``F.linear``: ``x @ weight.T + bias`` with ``weight (out, in)``."""
    y = jnp.einsum("...i,oi->...o", x, weight)
    return y if bias is None else y + bias


def _check_sdpa_shapes(q, k, v, mask):
    """The SDPA core's shapes for the fast paths (the module's own checks already passed)."""
    spec = lambda x: None if x is None else (tuple(x.shape), jnp.dtype(x.dtype).name)  # noqa: E731
    return check_sdpa(
        query=spec(q),
        key=spec(k),
        value=spec(v),
        attn_mask=spec(mask),
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
        dropout_mask=None,
    )


def _merged_mask(attn_mask, key_padding_mask, N: int, num_heads: int, L: int, S: int, pad: int, dtype):
    """One mask broadcastable to the logits ``(N, Nh, L, S_total)``: bool keep-mask when both masks are
    bool, otherwise additive float (torch adds them after turning bool into 0 / -inf).

    Keys appended by ``add_bias_kv``/``add_zero_attn`` (``pad`` of them) are never masked, as in torch.
    """
    masks = []
    if attn_mask is not None:
        keep = masked_to_keep(attn_mask)
        masks.append(keep.reshape(N, num_heads, L, S) if keep.ndim == 3 else keep)
    if key_padding_mask is not None:
        masks.append(masked_to_keep(key_padding_mask).reshape(N, 1, 1, S))
    if not masks:
        return None
    if pad:
        # bool pads with True (keep), float with 0.0 (nothing added).
        masks = [
            jnp.pad(m, [(0, 0)] * (m.ndim - 1) + [(0, pad)], constant_values=bool(m.dtype == jnp.bool_))
            for m in masks
        ]
    if all(m.dtype == jnp.bool_ for m in masks):
        merged = masks[0]
        for m in masks[1:]:
            merged = merged & m
        return merged
    merged = None
    for m in masks:
        m = keep_to_additive(m, dtype) if m.dtype == jnp.bool_ else m.astype(dtype)
        merged = m if merged is None else merged + m
    return merged


def multi_head_attention_forward(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: jnp.ndarray | None,
    in_proj_bias: jnp.ndarray | None,
    bias_k: jnp.ndarray | None,
    bias_v: jnp.ndarray | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: jnp.ndarray,
    out_proj_bias: jnp.ndarray | None,
    training: bool = True,
    key_padding_mask: jnp.ndarray | None = None,
    need_weights: bool = True,
    attn_mask: jnp.ndarray | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: jnp.ndarray | None = None,
    k_proj_weight: jnp.ndarray | None = None,
    v_proj_weight: jnp.ndarray | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    batch_first: bool = False,
    dropout_mask: jnp.ndarray | None = None,
    dropout_rng: jax.Array | None = None,
    implementation: str | None = None,
    _choice_log: ChoiceLog | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """``torch.nn.functional.multi_head_attention_forward`` in JAX.

    Args:
      query ``(L, N, E)``, key ``(S, N, kdim)``, value ``(S, N, vdim)`` (``(N, ·, ·)`` with
        ``batch_first=True``; unbatched ``(L, E)``, ``(S, kdim)``, ``(S, vdim)``).
      in_proj_weight ``(3E, E)`` / in_proj_bias ``(3E,)``: packed q, k, v projections; with
        ``use_separate_proj_weight`` the weights are q_proj_weight ``(E, E)``, k_proj_weight ``(E, kdim)``,
        v_proj_weight ``(E, vdim)`` (in_proj_bias still packed).
      bias_k, bias_v: ``(1, 1, E)`` key/value appended to the sequence, or None.
      add_zero_attn: append a zero key/value (per head) to the sequence.
      dropout_p, training: dropout on the attention weights, only when ``training``.
      key_padding_mask ``(N, S)``, attn_mask ``(L, S)`` or ``(N * Nh, L, S)``: torch-MHA polarity.
      is_causal: torch's hint; requires attn_mask. Without key_padding_mask and with
        ``need_weights=False`` attn_mask is dropped and causal masking (top-left, over all ``S_total``
        keys) applied instead, as torch does; otherwise attn_mask is applied and the hint dropped.
      dropout_mask: bool keep-mask ``(N, Nh, L, S_total)``; replaces the random draw.
      dropout_rng: ``jax.random`` key for the draw (the torch twin uses torch's global generator).

      implementation: the SDPA core's path: None (default) / ``"auto"`` chooses per call by
        ``select_implementation``'s rule (math whenever ``need_weights=True``, torch's default, or dropout
        is active; otherwise by size, dtype and device). Explicit ``"math"``, ``"blocked"``, ``"fused"``:
        see ``scaled_dot_product_attention``. Only ``"math"`` returns weights or applies dropout: the others
        raise ``ValueError`` when ``need_weights=True`` or dropout is active, never falling back silently.
        When the hint is kept (above) the blocked path skips the key blocks above the diagonal.

    Returns:
      ``(attn_output, attn_weights)``: output in query's layout with width E; weights ``(N, L, S_total)``
      averaged or ``(N, Nh, L, S_total)`` per head (no N when unbatched), None if not ``need_weights``.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    key_padding_mask = None if key_padding_mask is None else jnp.asarray(key_padding_mask)
    attn_mask = None if attn_mask is None else jnp.asarray(attn_mask)
    dropout_mask = None if dropout_mask is None else jnp.asarray(dropout_mask)
    E = embed_dim_to_check
    kdim = k_proj_weight.shape[-1] if use_separate_proj_weight else E
    vdim = v_proj_weight.shape[-1] if use_separate_proj_weight else E
    D, _, _ = check_mha_init(E, num_heads, dropout_p, kdim, vdim)
    shapes = check_mha(
        query=_spec(query),
        key=_spec(key),
        value=_spec(value),
        key_padding_mask=_spec(key_padding_mask),
        attn_mask=_spec(attn_mask),
        dropout_mask=_spec(dropout_mask),
        embed_dim=E,
        num_heads=num_heads,
        kdim=kdim,
        vdim=vdim,
        batch_first=batch_first,
        is_causal=is_causal,
        add_bias_kv=bias_k is not None,
        add_zero_attn=add_zero_attn,
    )
    N, L, S, Nh = shapes.N, shapes.L, shapes.S, num_heads

    # One internal layout, batch first: (N, L, E).
    if not shapes.batched:
        query, key, value = query[None], key[None], value[None]
        key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        dropout_mask = None if dropout_mask is None else dropout_mask[None]
    elif not batch_first:
        query, key, value = (jnp.swapaxes(x, 0, 1) for x in (query, key, value))

    if use_separate_proj_weight:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        w_q, w_k, w_v = jnp.split(in_proj_weight, 3, axis=0)
    b_q, b_k, b_v = (None,) * 3 if in_proj_bias is None else jnp.split(in_proj_bias, 3)
    if not use_separate_proj_weight and query is key is value:
        # self-attention: one (N·L, E) @ (E, 3E) matmul instead of three narrower ones
        q_NLE, k_NSE, v_NSE = jnp.split(_linear(query, in_proj_weight, in_proj_bias), 3, axis=-1)
    else:
        q_NLE = _linear(query, w_q, b_q)
        k_NSE = _linear(key, w_k, b_k)
        v_NSE = _linear(value, w_v, b_v)
    if bias_k is not None:
        k_NSE = jnp.concatenate([k_NSE, jnp.broadcast_to(bias_k.reshape(1, 1, E), (N, 1, E))], axis=1)
        v_NSE = jnp.concatenate([v_NSE, jnp.broadcast_to(bias_v.reshape(1, 1, E), (N, 1, E))], axis=1)

    # Split heads: E = Nh * D with head h owning features [h * D, (h + 1) * D), as torch's view does.
    q_NhLD = q_NLE.reshape(N, L, Nh, D).transpose(0, 2, 1, 3)
    k_NhSD = k_NSE.reshape(N, -1, Nh, D).transpose(0, 2, 1, 3)
    v_NhSD = v_NSE.reshape(N, -1, Nh, D).transpose(0, 2, 1, 3)
    if add_zero_attn:
        zeros = jnp.zeros((N, Nh, 1, D), k_NhSD.dtype)
        k_NhSD = jnp.concatenate([k_NhSD, zeros], axis=2)
        v_NhSD = jnp.concatenate([v_NhSD, zeros], axis=2)

    # is_causal, torch's rule (F.multi_head_attention_forward): with no key_padding_mask and no weights
    # asked for, attn_mask (checked above to be present) is dropped and SDPA's top-left causal masking
    # over all S_total keys is applied, the appended bias_k / zero keys included; otherwise the mask is
    # applied as given and the hint dropped (merged with key_padding_mask it is no longer causal).
    causal = bool(is_causal) and key_padding_mask is None and not need_weights
    if causal:
        attn_mask = None
    mask = _merged_mask(
        attn_mask, key_padding_mask, N, Nh, L, S, shapes.S_total - S, jnp.promote_types(q_NLE.dtype, "f4")
    )
    p = dropout_p if training else 0.0
    if implementation in AUTO:
        choice = _select(
            _check_sdpa_shapes(q_NhLD, k_NhSD, v_NhSD, mask),
            q_NhLD.dtype,
            mask,
            p,
            need_weights,
            name="multi_head_attention_forward",
        )
        if _choice_log is not None:  # the module's record, for its repr
            _choice_log.last = choice
        implementation = choice.implementation
    if implementation != "math":
        check_implementation(
            implementation, dropout_p=p, need_weights=need_weights, name="multi_head_attention_forward"
        )
        shapes_sdpa = _check_sdpa_shapes(q_NhLD, k_NhSD, v_NhSD, mask)
        out_NhLD = _fast_attention(q_NhLD, k_NhSD, v_NhSD, mask, causal, None, shapes_sdpa, implementation)
        weights_NhLS = None
    else:
        out_NhLD, weights_NhLS = scaled_dot_product_attention_with_weights(
            q_NhLD,
            k_NhSD,
            v_NhSD,
            mask,
            p,
            causal,
            dropout_mask=dropout_mask if p > 0.0 else None,
            dropout_rng=dropout_rng,
        )
    out_NLE = out_NhLD.transpose(0, 2, 1, 3).reshape(N, L, E)
    out_NLE = _linear(out_NLE, out_proj_weight, out_proj_bias)

    if not shapes.batched:
        out = out_NLE[0]
    elif batch_first:
        out = out_NLE
    else:
        out = jnp.swapaxes(out_NLE, 0, 1)
    if not need_weights:
        return out, None
    weights = jnp.mean(weights_NhLS, axis=1) if average_attn_weights else weights_NhLS
    return out, weights if shapes.batched else weights[0]


def _to_numpy(x) -> np.ndarray:
    """Any array-like as NumPy; a torch tensor is read through its own methods (no torch import)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            return x.float().numpy().astype(ml_dtypes.bfloat16)  # exact: bf16 ⊂ fp32
        return x.numpy()
    return np.asarray(x)


# torch's initialisers, compiled once per shape (eager jax.random compiles every primitive separately,
# which made constructing a module take seconds on CPU).
_xavier_uniform = jax.jit(jax.nn.initializers.xavier_uniform(in_axis=-1, out_axis=-2), static_argnums=(1, 2))
_normal = jax.jit(
    lambda key, shape, dtype, std: std * jax.random.normal(key, shape, dtype), static_argnums=(1, 2)
)
_uniform = jax.jit(
    lambda key, shape, dtype, bound: jax.random.uniform(key, shape, dtype, -bound, bound),
    static_argnums=(1, 2),
)


def _initializer(rngs, param_dtype):
    """``init(fn, shape) -> Param``: ``fn(key, shape, dtype)`` with a key from ``rngs.params()``; zeros when
    ``rngs`` is None (the parameters are about to be overwritten by a loaded ``state_dict``)."""

    def init(fn, shape):
        if rngs is None:
            return nnx.Param(jnp.zeros(shape, param_dtype))
        return nnx.Param(fn(rngs.params(), shape, param_dtype))

    return init


class Linear(nnx.Module):
    """torch's ``nn.Linear`` parameter layout: ``weight (out, in)``, ``bias (out,)`` (``out_proj``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, param_dtype, rngs):
        # torch's default Linear init: U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a=sqrt(5)).
        bound = 1.0 / math.sqrt(in_features)
        init = _initializer(rngs, param_dtype)
        self.weight = init(lambda k, s, dt: _uniform(k, s, dt, bound), (out_features, in_features))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if bias else None


class MultiheadAttention(nnx.Module):
    """``torch.nn.MultiheadAttention`` as a Flax NNX module, with torch's parameter names and shapes.

    Parameters: ``in_proj_weight (3E, E)`` (or ``q_proj_weight (E, E)``, ``k_proj_weight (E, kdim)``,
    ``v_proj_weight (E, vdim)`` when kdim/vdim differ from E), ``in_proj_bias (3E,)``, ``bias_k``/``bias_v``
    ``(1, 1, E)``, ``out_proj.weight (E, E)``, ``out_proj.bias (E,)``.

    Starts in training mode like torch (``deterministic=False``); ``.eval()`` / ``.train()`` switch.
    Dropout keys come from the ``rngs`` stream ``'dropout'`` (falling back to ``'default'``).

    Args:
      implementation: SDPA path: None (default) / ``"auto"`` chooses per call (see
        :func:`multi_head_attention_forward`; the choice is noted in ``last_choice`` and the ``repr``), or
        ``"math"``, ``"blocked"``, ``"fused"``: the fast paths raise on ``need_weights=True`` (pass
        ``need_weights=False``) and on active dropout.
      dtype: computation dtype; None promotes the query's dtype with ``param_dtype`` (flax's rule).
      param_dtype: dtype the parameters are stored in (float32 default).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        *,
        implementation: str | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
        _init_weights: bool = True,
    ):
        self.head_dim, self.kdim, self.vdim = check_mha_init(embed_dim, num_heads, dropout, kdim, vdim)
        if implementation not in AUTO:
            check_implementation(implementation, dropout_p=0.0, need_weights=False, name="MultiheadAttention")
        self.implementation = implementation
        self.dispatch = ChoiceLog()  # the last automatic choice (implementation=None), shown in repr
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.deterministic = False
        self.sharding = None  # an AttentionSharding, set by jax_attn.sharding.shard_module

        init = _initializer(rngs if _init_weights else None, param_dtype)
        E = embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = init(_xavier_uniform, (3 * E, E))
            self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
        else:
            self.in_proj_weight = None
            self.q_proj_weight = init(_xavier_uniform, (E, E))
            self.k_proj_weight = init(_xavier_uniform, (E, self.kdim))
            self.v_proj_weight = init(_xavier_uniform, (E, self.vdim))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * E,), param_dtype)) if bias else None
        self.out_proj = Linear(E, E, bias, param_dtype=param_dtype, rngs=rngs if _init_weights else None)
        if add_bias_kv:
            # torch: xavier_normal_ on (1, 1, E): fan_in = fan_out = E, std = sqrt(1 / E).
            std = math.sqrt(1.0 / E)
            normal = lambda k, s, dt: _normal(k, s, dt, std)  # noqa: E731
            self.bias_k, self.bias_v = init(normal, (1, 1, E)), init(normal, (1, 1, E))
        else:
            self.bias_k = self.bias_v = None
        self.rngs = rngs["dropout"].fork()

    @property
    def last_choice(self):
        """The :class:`attn_spec.dispatch.Choice` of the last call (traced call under ``jit``) when
        ``implementation`` is None / ``"auto"``; None before the first call or with an explicit path."""
        return self.dispatch.last

    @property
    def training(self) -> bool:
        """torch's flag: True unless ``.eval()`` was called."""
        return not self.deterministic

    def _params(self) -> dict[str, nnx.Param]:
        """The parameters under torch's ``state_dict`` names, in torch's order."""
        named = {
            "in_proj_weight": self.in_proj_weight,
            "q_proj_weight": self.q_proj_weight,
            "k_proj_weight": self.k_proj_weight,
            "v_proj_weight": self.v_proj_weight,
            "in_proj_bias": self.in_proj_bias,
            "bias_k": self.bias_k,
            "bias_v": self.bias_v,
            "out_proj.weight": self.out_proj.weight,
            "out_proj.bias": self.out_proj.bias,
        }
        return {k: p for k, p in named.items() if p is not None}

    def __call__(
        self,
        query: jnp.ndarray,
        key: jnp.ndarray,
        value: jnp.ndarray,
        key_padding_mask: jnp.ndarray | None = None,
        need_weights: bool = True,
        attn_mask: jnp.ndarray | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        dropout_mask: jnp.ndarray | None = None,
    ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """torch's ``MultiheadAttention.forward``; see :func:`multi_head_attention_forward`.

        ``dropout_mask`` (bool keep-mask ``(N, Nh, L, S_total)``) is used in training mode with
        ``dropout > 0`` instead of a random draw; otherwise ignored.
        """
        query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
        dtype = self.dtype or jnp.promote_types(query.dtype, self.param_dtype)
        if query.dtype == key.dtype == value.dtype and jnp.issubdtype(query.dtype, jnp.floating):
            query, key, value = query.astype(dtype), key.astype(dtype), value.astype(dtype)
        # else: bad dtypes are left for the shared check, which names them
        params = {k: p[...].astype(dtype) for k, p in self._params().items()}
        separate = not self._qkv_same_embed_dim
        if self.sharding is not None:  # on a mesh: an AttentionSharding (see jax_attn.sharding)
            query, key, value, params = self.sharding.mha_hook(
                self, query, key, value, params, self.batch_first
            )
            separate = "q_proj_weight" in params
        active = self.training and self.dropout > 0.0
        rng = self.rngs() if active and dropout_mask is None else None
        return multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            params.get("in_proj_weight"),
            params.get("in_proj_bias"),
            params.get("bias_k"),
            params.get("bias_v"),
            self.add_zero_attn,
            self.dropout,
            params["out_proj.weight"],
            params.get("out_proj.bias"),
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=params.get("q_proj_weight"),
            k_proj_weight=params.get("k_proj_weight"),
            v_proj_weight=params.get("v_proj_weight"),
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            batch_first=self.batch_first,
            dropout_mask=dropout_mask if active else None,
            dropout_rng=rng,
            implementation=self.implementation,
            _choice_log=self.dispatch,
        )

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """The parameters as torch's ``state_dict`` would hold them: ``{name: numpy array}``, exact copies."""
        # reshape: a sharded module holds the packed q/k/v as (3, E, E) / (3, E) (jax_attn.sharding).
        shapes = {
            "in_proj_weight": (3 * self.embed_dim, self.embed_dim),
            "in_proj_bias": (3 * self.embed_dim,),
        }
        return {k: np.array(p[...]).reshape(shapes.get(k, p.shape)) for k, p in self._params().items()}

    def load_torch_state_dict(self, state_dict: Mapping) -> None:
        """Copy a ``torch.nn.MultiheadAttention`` ``state_dict`` in (strict: same names and shapes).

        Values may be torch tensors, NumPy or JAX arrays; torch is not imported. They are stored in
        ``param_dtype`` (bit-exact when that is the tensor's dtype).
        """
        params = self._params()
        missing = sorted(set(params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"load_torch_state_dict: state_dict does not match this module's parameters; "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
        for k, p in params.items():
            if tuple(arrays[k].shape) != tuple(p.shape):
                raise ValueError(
                    f"load_torch_state_dict: {k} has shape {tuple(arrays[k].shape)}, "
                    f"this module expects {tuple(p.shape)}"
                )
        for k, p in params.items():
            p.set_value(jnp.asarray(arrays[k], dtype=self.param_dtype))

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping,
        embed_dim: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        **kwargs,
    ) -> MultiheadAttention:
        """A module built from a torch ``state_dict`` and torch's constructor arguments (``kwargs``),
        skipping the random initialisation, which would be overwritten anyway."""
        rngs = nnx.Rngs(0) if rngs is None else rngs
        new = cls(
            embed_dim,
            num_heads,
            **kwargs,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            _init_weights=False,
        )
        new.load_torch_state_dict(state_dict)
        return new

    @classmethod
    def from_torch(
        cls, module, *, rngs: nnx.Rngs | None = None, dtype=None, param_dtype=None
    ) -> MultiheadAttention:
        """A ``MultiheadAttention`` configured like the torch ``module`` with its weights copied in.

        The training/eval mode is copied too. ``param_dtype`` defaults to the torch weights' dtype.
        """
        weight = module.out_proj.weight
        if param_dtype is None:
            param_dtype = jnp.dtype(str(weight.dtype).removeprefix("torch."))
        new = cls.from_state_dict(
            module.state_dict(),
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        if not module.training:
            new.eval()
        return new
