"""Multi-head latent attention (JAX/Flax nnx twin of ``torch_attn/mla.py``): DeepSeek V2/V3, Kimi K2,
GLM-4.7-Flash, and DeepSeek V3.2 / GLM-5's sparse attention, configured by one ``attn_spec.mla.MLAConfig``.

Dimension key (see ``attn_spec.mla``):

    B  batch                     E  model width          N  heads
    T  tokens in this call       Q  query latent         L  key/value latent
    S  keys attended             D  non-rotary q/k width R  rotary width, H = D + R
    C  cache slots               V  value head width     M, J  indexer heads and width; k selected keys

Three computations (``implementation=``): ``"plain"`` decompresses every key and value per head
(``kv_b_proj``) and takes a dense softmax over the ``(B, N, T, S)`` logits, as transformers does;
``"blocked"`` runs the same decompressed keys and values on FlexAttention (``jax_attn.flex``: online
softmax over blocks, key blocks above the causal diagonal or fully padded skipped, memory bounded by a block
instead of ``T·S``); ``"absorbed"`` folds the key up-projection into the query and the value up-projection
into the output and attends over the L + R wide latent keys. None (auto, ``attn_spec.mla.choose``) takes
the absorbed one for decoding (a cache and one token) and otherwise asks the one dispatch rule of
``attn_spec.dispatch`` on the call's ``B·N·T·S`` logits: plain (its "math") when small, blocked above; the
choice and its reason in ``last_choice`` and ``repr``. All three give the same output within the float32
tolerance.

Cache (:class:`MLACache`): the compressed latent ``ckv (B, C, L)`` (after ``kv_a_layernorm``) and the
rotated shared key ``k_rot (B, C, R)`` per token, nothing per head (plus the indexer's key ``index_k (B, C,
J)`` for a sparse layer with its own indexer). Slot = sequence index; each slot records its sequence index
(``pos``, -1 when empty) and validity, so left padding stays masked. A call attends over the C slots and
its own T tokens (S = C + T, static: a jitted call compiles once per chunk length), then writes its T
tokens; calls never modify the given cache. Overflow raises when the index is concrete; under ``jax.jit``
that call's output and every later one's is NaN, as the ``Attention`` cache does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from attn_spec.attention import check_attention_mask, check_input, check_position_ids
from attn_spec.dispatch import ChoiceLog
from attn_spec.mla import (
    NAME,
    MLAConfig,
    cache_shapes,
    check_cache,
    check_implementation,
    check_init_cache,
    check_state_dict,
    check_topk_indices,
    choose,
    describe_module,
    read_layer,
    state_dict_shapes,
)
from jax_attn.attention import RMSNorm, project
from jax_attn.causal import Linear, _assign, _concrete_index, _to_numpy
from jax_attn.flex import create_block_mask, flex_attention
from jax_attn.rope import apply_rope, rope_cos_sin


def _spec(x) -> tuple[tuple[int, ...], str]:
    return tuple(x.shape), jnp.dtype(x.dtype).name


@struct.dataclass
class MLACache:
    """The compressed cache (a pytree).

    Attributes:
      ckv: ``(B, C, L)``, the normalized key/value latent of each token.
      k_rot: ``(B, C, R)``, the rotated key shared by all heads.
      index_k: ``(B, C, J)``, the indexer's rotated key (sparse layers with an indexer), else None.
      pos: int32 ``(C,)``, the sequence index in each slot, -1 for an empty slot.
      valid: bool ``(B, C)``, whether each slot holds a real (non-padding) token.
      index: int32 scalar, the number of tokens seen so far.
      max_length: the most tokens the cache accepts (static).
    """

    ckv: jax.Array
    k_rot: jax.Array
    index_k: jax.Array | None
    pos: jax.Array
    valid: jax.Array
    index: jax.Array
    max_length: int = struct.field(pytree_node=False)


def cache_bytes_per_token(cache: MLACache) -> float:
    """Bytes of cached values per token and batch row (``ckv``, ``k_rot`` and ``index_k``; the slot
    bookkeeping ``pos``/``valid`` not counted): ``(L + R) × dtype size`` for a dense layer."""
    arrays = [a for a in (cache.ckv, cache.k_rot, cache.index_k) if a is not None]
    B, C = cache.ckv.shape[:2]
    return sum(a.nbytes for a in arrays) / (B * C)


class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm(size, eps)`` with weight and bias, computed in float32 and cast back."""

    def __init__(self, size: int, eps: float, *, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((size,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((size,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def keep_mask(q_pos_T: jax.Array, k_pos_S: jax.Array, k_valid_BS: jax.Array) -> jax.Array:
    """bool ``(B, T, S)``, True = may attend: a filled, valid key slot at or before the query."""
    q, k = q_pos_T[:, None], k_pos_S[None, :]
    keep_TS = (k >= 0) & (k <= q)
    return keep_TS[None] & k_valid_BS[:, None, :]


def masked_softmax(logits_BNTS: jax.Array, keep_BTS: jax.Array) -> jax.Array:
    """Softmax over S of the kept logits; a fully masked row gives zeros."""
    keep = keep_BTS[:, None]
    logits = jnp.where(keep, logits_BNTS, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.where(keep, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(denom > 0, denom, 1.0)


def select_topk(scores_BTS: jax.Array, keep_BTS: jax.Array, k: int) -> jax.Array:
    """int32 ``(B, T, min(k, S))``: the indices of each query's best-scoring keys, masked keys scoring
    ``-inf``; equal scores rank the lower index (the earlier token) first (``jax.lax.top_k``'s rule)."""
    scores = jnp.where(keep_BTS, scores_BTS, -jnp.inf)
    _, idx = jax.lax.top_k(scores, min(k, scores.shape[-1]))
    return idx.astype(jnp.int32)


def selected_mask(topk_BTk: jax.Array, S: int) -> jax.Array:
    """bool ``(B, T, S)``: True at the selected key indices."""
    B, T, _ = topk_BTk.shape
    return jnp.put_along_axis(jnp.zeros((B, T, S), bool), topk_BTk, True, axis=-1, inplace=False)


class Indexer(nnx.Module):
    """DeepSeek V3.2's lightning indexer (transformers' ``indexer.*`` parameters): scores every key for
    every query; the layer keeps each query's ``index_topk`` best. No gradient flows through it."""

    def __init__(self, config: MLAConfig, *, rngs: nnx.Rngs, param_dtype):
        c = config
        M, J = c.index_n_heads, c.index_head_dim
        kw = {"rngs": rngs, "param_dtype": param_dtype}
        self.wq_b = Linear(c.q_lora_rank, M * J, False, **kw)
        self.wk = Linear(c.E, J, False, **kw)
        self.k_norm = LayerNorm(J, c.index_norm_eps, param_dtype=param_dtype)
        self.weights_proj = Linear(c.E, M, False, **kw)

    def keys(self, x_BTE: jax.Array, cos_BTR, sin_BTR, layout: str) -> jax.Array:
        """``(B, T, J)``: LayerNorm(wk(x)), its first R channels rotated."""
        k_BTJ = self.k_norm(project(self.wk, x_BTE))
        return apply_rope(k_BTJ[:, None], cos_BTR, sin_BTR, layout)[:, 0]

    def scores(self, x_BTE, q_resid_BTQ, cos_BTR, sin_BTR, layout: str, index_k_BSJ) -> jax.Array:
        """float32 ``(B, T, S)``: ``Σ_m w_tm · relu(J^-½ q_tm·k_s)``, without gradient."""
        B, T, _ = x_BTE.shape
        M, J = self.weights_proj.weight.shape[0], self.wk.weight.shape[0]
        q_BMTJ = project(self.wq_b, q_resid_BTQ).reshape(B, T, M, J).transpose(0, 2, 1, 3)
        q_BMTJ = apply_rope(q_BMTJ, cos_BTR, sin_BTR, layout)
        acc = jnp.result_type(q_BMTJ.dtype, jnp.float32)
        s = jnp.einsum("bmtj,bsj->bmts", q_BMTJ.astype(acc), index_k_BSJ.astype(acc)) * J**-0.5
        w_BTM = project(self.weights_proj, x_BTE).astype(acc) * M**-0.5
        scores = jnp.einsum("btm,bmts->bts", w_BTM, jax.nn.relu(s))
        return jax.lax.stop_gradient(scores)


class MultiHeadLatentAttention(nnx.Module):
    """Multi-head latent attention configured by :class:`attn_spec.mla.MLAConfig`.

    Args:
      config: the layer.
      implementation: None (auto, ``attn_spec.mla.choose``: absorbed when decoding one token with a
        cache, otherwise the one dispatch rule of ``attn_spec.dispatch`` on the call's ``B·N·T·S`` logits,
        plain when small and blocked above; the choice and its reason in ``last_choice`` and ``repr``),
        ``"plain"`` (dense softmax over decompressed keys and values), ``"blocked"`` (the same on
        FlexAttention, memory bounded by a block) or ``"absorbed"`` (attention over the latent keys).
      rngs: ``nnx.Rngs`` for the initialization.
      dtype: computation dtype; None promotes the input's with the parameters'.
      param_dtype: parameter dtype.

    Parameters (``torch_state_dict()`` keys, transformers' names and layout): ``q_proj.weight (N·H, E)``
    or ``q_a_proj.weight (Q, E)``, ``q_a_layernorm.weight (Q,)``, ``q_b_proj.weight (N·H, Q)``;
    ``kv_a_proj_with_mqa.weight (L + R, E)``, ``kv_a_layernorm.weight (L,)``, ``kv_b_proj.weight
    (N·(D + V), L)``, ``o_proj.weight (E, N·V)``; ``q_a_proj``/``kv_a_proj_with_mqa``/``o_proj.bias`` with
    ``attention_bias``; ``indexer.{wq_b, wk, k_norm, weights_proj}`` for a sparse layer with an indexer.
    """

    def __init__(
        self,
        config: MLAConfig,
        *,
        implementation: str | None = None,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        c = self.config = config
        self.implementation = check_implementation(implementation)
        self.dispatch = ChoiceLog()  # the last automatic choice (implementation=None), shown in repr
        self.dtype, self.param_dtype = dtype, param_dtype
        kw = {"rngs": rngs, "param_dtype": param_dtype}
        q_proj = q_a_proj = q_a_layernorm = q_b_proj = None
        if c.q_lora_rank is None:
            q_proj = Linear(c.E, c.N * c.H, False, **kw)
        else:
            q_a_proj = Linear(c.E, c.q_lora_rank, c.attention_bias, **kw)
            q_a_layernorm = RMSNorm(c.q_lora_rank, c.q_lora_eps, 0.0, param_dtype=param_dtype)
            q_b_proj = Linear(c.q_lora_rank, c.N * c.H, False, **kw)
        self.q_proj, self.q_a_proj = nnx.data(q_proj), nnx.data(q_a_proj)
        self.q_a_layernorm, self.q_b_proj = nnx.data(q_a_layernorm), nnx.data(q_b_proj)
        self.kv_a_proj_with_mqa = Linear(c.E, c.L + c.R, c.attention_bias, **kw)
        self.kv_a_layernorm = RMSNorm(c.L, c.kv_lora_eps, 0.0, param_dtype=param_dtype)
        self.kv_b_proj = Linear(c.L, c.N * (c.D + c.V), False, **kw)
        self.o_proj = Linear(c.N * c.V, c.E, c.attention_bias, **kw)
        self.indexer = nnx.data(Indexer(c, **kw) if c.has_indexer else None)

    @property
    def last_choice(self):
        """The :class:`attn_spec.dispatch.Choice` of the last call (the traced call under ``jit``) when
        ``implementation`` is None; None before the first call or with an explicit computation."""
        return self.dispatch.last

    def init_cache(self, batch_size: int, max_length: int) -> MLACache:
        """An empty cache of ``max_length`` slots: zeros in the computation dtype."""
        check_init_cache(batch_size, max_length)
        dt = self.dtype or self.param_dtype
        shapes = cache_shapes(self.config, batch_size, max_length)
        return MLACache(
            ckv=jnp.zeros(shapes["ckv"], dt),
            k_rot=jnp.zeros(shapes["k_rot"], dt),
            index_k=jnp.zeros(shapes["index_k"], dt) if "index_k" in shapes else None,
            pos=jnp.full((max_length,), -1, jnp.int32),
            valid=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((), jnp.int32),
            max_length=max_length,
        )

    def __call__(
        self,
        x: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: MLACache | None = None,
        *,
        topk_indices: jax.Array | None = None,
        return_topk: bool = False,
    ):
        """Attend within ``x`` and, with a cache, to the tokens cached before it.

        Args:
          x: ``(B, T, E)``.
          attention_mask: ``(B, T)`` 1/0 (or bool) padding mask of these tokens; None: all real.
          position_ids: ``(B, T)`` positions for the rotary; None: ``index + 0..T-1`` (left padding: pass
            ``cumsum(mask) - 1``).
          cache: an :class:`MLACache` from :meth:`init_cache` or a previous call; None for a full pass.
          topk_indices: ``(B, T, k)`` key indices (into this call's S keys) for a shared sparse layer.
          return_topk: also return the selected key indices ``(B, T, k)`` (sparse layers).

        Returns:
          ``y (B, T, E)``, ``(y, new_cache)`` with a cache; with ``return_topk`` a tuple ending in the
          indices.
        """
        x = jnp.asarray(x)
        c = self.config
        B, T = check_input(_spec(x), c, NAME)
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            check_attention_mask(*_spec(attention_mask), B, T, NAME)
            valid_BT = attention_mask.astype(bool)
        else:
            valid_BT = jnp.ones((B, T), bool)
        check_topk_indices(
            () if topk_indices is None else topk_indices.shape,
            "" if topk_indices is None else jnp.dtype(topk_indices.dtype).name,
            topk_indices is not None,
            B,
            T,
            c,
        )
        start = 0 if cache is None else cache.index
        if cache is not None:
            shapes = {"ckv": cache.ckv.shape, "k_rot": cache.k_rot.shape, "index_k": None}
            if cache.index_k is not None:
                shapes["index_k"] = cache.index_k.shape
            check_cache(shapes, _concrete_index(cache.index), cache.max_length, B, T, c)
        q_pos_T = start + jnp.arange(T, dtype=jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(q_pos_T, (B, T))
        else:
            position_ids = jnp.asarray(position_ids)
            check_position_ids(*_spec(position_ids), B, T, NAME)

        x_BTE = x.astype(self.dtype or jnp.result_type(x.dtype, self.param_dtype))
        q_resid_BTQ = None
        if c.q_lora_rank is None:
            q = project(self.q_proj, x_BTE)
        else:
            q_resid_BTQ = self.q_a_layernorm(project(self.q_a_proj, x_BTE))
            q = project(self.q_b_proj, q_resid_BTQ)
        q_BNTH = q.reshape(B, T, c.N, c.H).transpose(0, 2, 1, 3)
        q_nope_BNTD, q_rot_BNTR = q_BNTH[..., : c.D], q_BNTH[..., c.D :]
        ckv = project(self.kv_a_proj_with_mqa, x_BTE)
        ckv_BTL = self.kv_a_layernorm(ckv[..., : c.L])
        cos_BTR, sin_BTR = rope_cos_sin(c.rope, c.R, position_ids)
        q_rot_BNTR = apply_rope(q_rot_BNTR, cos_BTR, sin_BTR, c.rope.layout)
        k_rot_BTR = apply_rope(ckv[:, None, :, c.L :], cos_BTR, sin_BTR, c.rope.layout)[:, 0]
        index_k_BTJ = None
        if self.indexer is not None:
            icos_BTR, isin_BTR = rope_cos_sin(c.index_rope(), c.R, position_ids)
            index_k_BTJ = self.indexer.keys(x_BTE, icos_BTR, isin_BTR, c.index_rope_layout)

        if cache is None:
            ckv_BSL, k_rot_BSR, index_k_BSJ, k_pos_S, k_valid_BS = (
                ckv_BTL,
                k_rot_BTR,
                index_k_BTJ,
                q_pos_T,
                valid_BT,
            )
        else:
            dt = ckv_BTL.dtype
            ckv_BSL = jnp.concatenate([cache.ckv.astype(dt), ckv_BTL], axis=1)
            k_rot_BSR = jnp.concatenate([cache.k_rot.astype(dt), k_rot_BTR], axis=1)
            index_k_BSJ = None
            if index_k_BTJ is not None:
                index_k_BSJ = jnp.concatenate([cache.index_k.astype(dt), index_k_BTJ], axis=1)
            k_pos_S = jnp.concatenate([cache.pos, q_pos_T])
            k_valid_BS = jnp.concatenate([cache.valid, valid_BT], axis=1)
        S = ckv_BSL.shape[1]
        path = self.implementation
        if path is None:  # chosen from this call's shapes (static under jit: at trace time)
            choice = choose(c, B=B, T=T, S=S, cached=cache is not None)
            self.dispatch.last = choice
            path = choice.implementation
        # The dense (B, T, S) keep mask: the plain and absorbed computations and the sparse selection read
        # it; a dense layer's blocked computation evaluates the keep rule per block from the positions.
        keep_BTS = None
        if path != "blocked" or c.sparse:
            keep_BTS = keep_mask(q_pos_T, k_pos_S, k_valid_BS)
        topk_BTk = None
        if c.sparse:
            if self.indexer is not None:
                scores_BTS = self.indexer.scores(
                    x_BTE, q_resid_BTQ, icos_BTR, isin_BTR, c.index_rope_layout, index_k_BSJ
                )
                topk_BTk = select_topk(scores_BTS, keep_BTS, c.index_topk)
            else:
                topk_BTk = jnp.asarray(topk_indices).astype(jnp.int32)
            keep_BTS = keep_BTS & selected_mask(topk_BTk, S)

        if path == "plain":
            y_BNTV = self._plain(q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR, keep_BTS)
        elif path == "blocked":
            keep = (q_pos_T, k_pos_S, k_valid_BS) if keep_BTS is None else keep_BTS
            y_BNTV = self._blocked(q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR, keep)
        else:
            y_BNTV = self._absorbed(q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR, keep_BTS)
        y_BTE = project(self.o_proj, y_BNTV.transpose(0, 2, 1, 3).reshape(B, T, c.N * c.V))
        extra = (topk_BTk,) if return_topk else ()
        if cache is None:
            return (y_BTE, *extra) if extra else y_BTE

        slots = start + jnp.arange(T, dtype=jnp.int32)
        new_cache = MLACache(
            ckv=cache.ckv.at[:, slots].set(ckv_BTL.astype(cache.ckv.dtype)),
            k_rot=cache.k_rot.at[:, slots].set(k_rot_BTR.astype(cache.k_rot.dtype)),
            index_k=None
            if cache.index_k is None
            else cache.index_k.at[:, slots].set(index_k_BTJ.astype(cache.index_k.dtype)),
            pos=cache.pos.at[slots].set(q_pos_T),
            valid=cache.valid.at[:, slots].set(valid_BT),
            index=cache.index + T,
            max_length=cache.max_length,
        )
        # A traced index cannot raise: an overflowing call yields NaN, and so does every later call.
        y_BTE = jnp.where(new_cache.index <= cache.max_length, y_BTE, jnp.nan)
        return (y_BTE, new_cache, *extra)

    def _decompress(self, q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR):
        """``q (B, N, T, H)``, ``k (B, N, S, H)``, ``v (B, N, S, V)``: the keys and values decompressed per
        head (``kv_b_proj``), the shared rotary key broadcast over the heads, ``H = D + R``."""
        c = self.config
        B, S, _ = ckv_BSL.shape
        kv_BNSX = project(self.kv_b_proj, ckv_BSL).reshape(B, S, c.N, c.D + c.V).transpose(0, 2, 1, 3)
        k_nope_BNSD, v_BNSV = kv_BNSX[..., : c.D], kv_BNSX[..., c.D :]
        k_rot_BNSR = jnp.broadcast_to(k_rot_BSR[:, None], (B, c.N, S, c.R)).astype(k_nope_BNSD.dtype)
        k_BNSH = jnp.concatenate([k_nope_BNSD, k_rot_BNSR], -1)
        q_BNTH = jnp.concatenate([q_nope_BNTD, q_rot_BNTR], -1)
        return q_BNTH, k_BNSH, v_BNSV

    def _plain(self, q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR, keep_BTS) -> jax.Array:
        """Keys and values decompressed per head: ``softmax(scale · q·[k_nope; k_rot]) · v``."""
        c = self.config
        q_BNTH, k_BNSH, v_BNSV = self._decompress(q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR)
        acc = jnp.result_type(q_BNTH.dtype, jnp.float32)
        logits = jnp.einsum("bnth,bnsh->bnts", q_BNTH.astype(acc), k_BNSH.astype(acc)) * c.logit_scale
        p = masked_softmax(logits, keep_BTS)
        out = jnp.einsum("bnts,bnsv->bntv", p, v_BNSV.astype(acc))
        return out.astype(q_nope_BNTD.dtype)

    def _blocked(self, q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR, keep) -> jax.Array:
        """The plain computation on FlexAttention: the decompressed ``q (H wide)``, ``k (H)``, ``v (V)`` per
        head over a ``BlockMask`` of the keep rule (key blocks above the causal diagonal or fully padded
        skipped; memory bounded by a block, never ``(T, S)`` logits). ``keep``: ``(q_pos_T, k_pos_S,
        k_valid_BS)`` for :func:`keep_mask` evaluated per block, or the dense ``keep_BTS`` of a sparse layer
        (its top-k selection). Fully masked rows give zeros."""
        c = self.config
        q_BNTH, k_BNSH, v_BNSV = self._decompress(q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR)
        B, _, T, _ = q_BNTH.shape
        S = k_BNSH.shape[2]
        if isinstance(keep, tuple):
            q_pos_T, k_pos_S, k_valid_BS = keep

            def mask_mod(b, h, q_idx, kv_idx):  # keep_mask: a filled, valid key slot at or before the query
                k = k_pos_S[kv_idx]
                return (k >= 0) & (k <= q_pos_T[q_idx]) & k_valid_BS[b, kv_idx]

        else:
            keep_BTS = keep

            def mask_mod(b, h, q_idx, kv_idx):
                return keep_BTS[b, q_idx, kv_idx]

        block_mask = create_block_mask(mask_mod, B, None, T, S)
        return flex_attention(q_BNTH, k_BNSH, v_BNSV, None, block_mask, c.logit_scale)

    def _absorbed(self, q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR, keep_BTS) -> jax.Array:
        """The up-projections folded into the query and the output: attention over the latent keys."""
        c = self.config
        acc = jnp.result_type(q_nope_BNTD.dtype, jnp.float32)
        W_NXL = self.kv_b_proj.weight[...].astype(acc).reshape(c.N, c.D + c.V, c.L)
        W_uk_NDL, W_uv_NVL = W_NXL[:, : c.D], W_NXL[:, c.D :]
        q_lat_BNTL = jnp.einsum("bntd,ndl->bntl", q_nope_BNTD.astype(acc), W_uk_NDL)
        logits = jnp.einsum("bntl,bsl->bnts", q_lat_BNTL, ckv_BSL.astype(acc))
        logits = logits + jnp.einsum("bntr,bsr->bnts", q_rot_BNTR.astype(acc), k_rot_BSR.astype(acc))
        p = masked_softmax(logits * c.logit_scale, keep_BTS)
        o_lat_BNTL = jnp.einsum("bnts,bsl->bntl", p, ckv_BSL.astype(acc))
        out = jnp.einsum("bntl,nvl->bntv", o_lat_BNTL, W_uv_NVL)
        return out.astype(q_nope_BNTD.dtype)

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """The parameters under transformers' names, as NumPy arrays in the parameter dtype."""
        return {key: np.array(self._param(key)[...]) for key in state_dict_shapes(self.config)}

    def load_torch_state_dict(self, state_dict) -> None:
        """Load a state dict (torch tensors or NumPy arrays) with exactly the config's keys and shapes,
        casting to the parameter dtype; bit-exact when the dtypes agree."""
        arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
        for key in check_state_dict({key: a.shape for key, a in arrays.items()}, self.config):
            param = self._param(key)
            _assign(param, jnp.asarray(arrays[key], dtype=param.dtype))

    def _param(self, key: str) -> nnx.Param:
        obj = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj


def _build(c: MLAConfig, sd: dict, implementation) -> MultiHeadLatentAttention:
    dtypes = {a.dtype for a in sd.values()}
    if len(dtypes) != 1:
        raise ValueError(f"{NAME}: the attention's parameters have mixed dtypes {sorted(map(str, dtypes))}")
    dtype = jnp.dtype(dtypes.pop())
    attn = nnx.eval_shape(
        lambda: MultiHeadLatentAttention(
            c, implementation=implementation, rngs=nnx.Rngs(0), param_dtype=dtype
        )
    )
    for key in check_state_dict({k: a.shape for k, a in sd.items()}, c):
        attn._param(key).set_value(jnp.asarray(sd[key], dtype))
    return attn


def from_hf(module, *, implementation: str | None = None) -> MultiHeadLatentAttention:
    """A transformers MLA module (``DeepseekV2Attention``, ``DeepseekV3Attention``, ``Glm4MoeLiteAttention``,
    ``DeepseekV32Attention``, ``GlmMoeDsaAttention``; read duck-typed) → :class:`MultiHeadLatentAttention`
    with its configuration and weights (the names are transformers' own; dtypes kept)."""
    _, c = describe_module(module)
    sd = {k: _to_numpy(v) for k, v in module.state_dict().items()}
    return _build(c, sd, implementation)


def load_layer(
    checkpoint_dir, layer: int = 0, *, implementation: str | None = None
) -> MultiHeadLatentAttention:
    """Layer ``layer``'s MLA of a local checkpoint (``config.json`` + safetensors), read with NumPy only."""
    import ml_dtypes

    _, c, sd, dtype = read_layer(checkpoint_dir, layer)
    if dtype == "bfloat16":
        sd = {k: a.view(ml_dtypes.bfloat16) for k, a in sd.items()}
    return _build(c, sd, implementation)


def to_hf_state_dict(attn: MultiHeadLatentAttention) -> dict[str, np.ndarray]:
    """The weights under transformers' names (NumPy; ``from_hf`` followed by this is bit-exact)."""
    return attn.torch_state_dict()
