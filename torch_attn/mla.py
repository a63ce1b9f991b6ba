"""Multi-head latent attention (PyTorch twin of ``jax_attn/mla.py``): DeepSeek V2/V3, Kimi K2,
GLM-4.7-Flash, and DeepSeek V3.2 / GLM-5's sparse attention, configured by one ``attn_spec.mla.MLAConfig``.

Dimension key (see ``attn_spec.mla``):

    B  batch                     E  model width          N  heads
    T  tokens in this call       Q  query latent         L  key/value latent
    S  keys attended             D  non-rotary q/k width R  rotary width, H = D + R
    C  cache slots               V  value head width     M, J  indexer heads and width; k selected keys

Three computations (``implementation=``): ``"plain"`` decompresses every key and value per head
(``kv_b_proj``) and takes a dense softmax over the ``(B, N, T, S)`` logits, as transformers does;
``"blocked"`` runs the same decompressed keys and values on FlexAttention (``torch_attn.flex``: online
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
its own T tokens (S = C + T), then writes its T tokens (``index_copy``: calls never modify the given cache,
as in the JAX twin). Overflow (more than ``max_length`` tokens in all) raises ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attn_spec.attention import check_attention_mask, check_input, check_position_ids
from attn_spec.dispatch import ChoiceLog, describe
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
from torch_attn.attention import RMSNorm, _to_tensor, project
from torch_attn.flex import create_block_mask, flex_attention
from torch_attn.rope import apply_rope, rope_cos_sin


def _spec(x) -> tuple[tuple[int, ...], str]:
    return tuple(x.shape), str(x.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class MLACache:
    """The compressed cache.

    Attributes:
      ckv: ``(B, C, L)``, the normalized key/value latent of each token.
      k_rot: ``(B, C, R)``, the rotated key shared by all heads.
      index_k: ``(B, C, J)``, the indexer's rotated key (sparse layers with an indexer), else None.
      pos: int64 ``(C,)``, the sequence index in each slot, -1 for an empty slot.
      valid: bool ``(B, C)``, whether each slot holds a real (non-padding) token.
      index: int, the number of tokens seen so far.
      max_length: the most tokens the cache accepts.
    """

    ckv: torch.Tensor
    k_rot: torch.Tensor
    index_k: torch.Tensor | None
    pos: torch.Tensor
    valid: torch.Tensor
    index: int
    max_length: int


def cache_bytes_per_token(cache: MLACache) -> float:
    """Bytes of cached values per token and batch row (``ckv``, ``k_rot`` and ``index_k``; the slot
    bookkeeping ``pos``/``valid`` not counted): ``(L + R) × dtype size`` for a dense layer."""
    arrays = [a for a in (cache.ckv, cache.k_rot, cache.index_k) if a is not None]
    B, C = cache.ckv.shape[:2]
    return sum(a.nelement() * a.element_size() for a in arrays) / (B * C)


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm(size, eps)`` with weight and bias, computed in float32 and cast back."""

    def __init__(self, size: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        mean = torch.mean(x32, dim=-1, keepdim=True)
        var = torch.mean(torch.square(x32 - mean), dim=-1, keepdim=True)
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight.to(torch.float32) + self.bias.to(torch.float32)).to(x.dtype)


def keep_mask(q_pos_T: torch.Tensor, k_pos_S: torch.Tensor, k_valid_BS: torch.Tensor) -> torch.Tensor:
    """bool ``(B, T, S)``, True = may attend: a filled, valid key slot at or before the query."""
    q, k = q_pos_T[:, None], k_pos_S[None, :]
    keep_TS = (k >= 0) & (k <= q)
    return keep_TS[None] & k_valid_BS[:, None, :]


def masked_softmax(logits_BNTS: torch.Tensor, keep_BTS: torch.Tensor) -> torch.Tensor:
    """Softmax over S of the kept logits; a fully masked row gives zeros."""
    keep = keep_BTS[:, None]
    logits = logits_BNTS.masked_fill(~keep, -torch.inf)
    m = torch.amax(logits, dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0).detach()
    e = torch.where(keep, torch.exp(logits - m), 0.0)
    denom = torch.sum(e, dim=-1, keepdim=True)
    return e / torch.where(denom > 0, denom, 1.0)


def select_topk(scores_BTS: torch.Tensor, keep_BTS: torch.Tensor, k: int) -> torch.Tensor:
    """int32 ``(B, T, min(k, S))``: the indices of each query's best-scoring keys, masked keys scoring
    ``-inf``; equal scores rank the lower index (the earlier token) first (a stable descending sort, the
    rule of ``jax.lax.top_k``; ``torch.topk`` leaves the order of ties unspecified)."""
    scores = scores_BTS.masked_fill(~keep_BTS, -torch.inf)
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : min(k, scores.shape[-1])]
    return idx.to(torch.int32)


def selected_mask(topk_BTk: torch.Tensor, S: int) -> torch.Tensor:
    """bool ``(B, T, S)``: True at the selected key indices."""
    B, T, _ = topk_BTk.shape
    zeros = torch.zeros((B, T, S), dtype=torch.bool, device=topk_BTk.device)
    return zeros.scatter(-1, topk_BTk.long(), True)


class Indexer(nn.Module):
    """DeepSeek V3.2's lightning indexer (transformers' ``indexer.*`` parameters): scores every key for
    every query; the layer keeps each query's ``index_topk`` best. No gradient flows through it."""

    def __init__(self, config: MLAConfig, *, device=None, dtype=None):
        super().__init__()
        c = config
        M, J = c.index_n_heads, c.index_head_dim
        kw = {"device": device, "dtype": dtype}
        self.wq_b = nn.Linear(c.q_lora_rank, M * J, bias=False, **kw)
        self.wk = nn.Linear(c.E, J, bias=False, **kw)
        self.k_norm = LayerNorm(J, c.index_norm_eps, **kw)
        self.weights_proj = nn.Linear(c.E, M, bias=False, **kw)

    def keys(self, x_BTE: torch.Tensor, cos_BTR, sin_BTR, layout: str) -> torch.Tensor:
        """``(B, T, J)``: LayerNorm(wk(x)), its first R channels rotated."""
        with torch.no_grad():
            k_BTJ = self.k_norm(project(self.wk, x_BTE))
            return apply_rope(k_BTJ[:, None], cos_BTR, sin_BTR, layout)[:, 0]

    def scores(self, x_BTE, q_resid_BTQ, cos_BTR, sin_BTR, layout: str, index_k_BSJ) -> torch.Tensor:
        """float32 ``(B, T, S)``: ``Σ_m w_tm · relu(J^-½ q_tm·k_s)``, without gradient."""
        B, T, _ = x_BTE.shape
        M, J = self.weights_proj.weight.shape[0], self.wk.weight.shape[0]
        with torch.no_grad():
            q_BMTJ = project(self.wq_b, q_resid_BTQ).reshape(B, T, M, J).transpose(1, 2)
            q_BMTJ = apply_rope(q_BMTJ, cos_BTR, sin_BTR, layout)
            acc = torch.promote_types(q_BMTJ.dtype, torch.float32)
            s = torch.einsum("bmtj,bsj->bmts", q_BMTJ.to(acc), index_k_BSJ.to(acc)) * J**-0.5
            w_BTM = project(self.weights_proj, x_BTE).to(acc) * M**-0.5
            scores = torch.einsum("btm,bmts->bts", w_BTM, F.relu(s))
        return scores


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention configured by :class:`attn_spec.mla.MLAConfig`.

    Args:
      config: the layer.
      implementation: None (auto, ``attn_spec.mla.choose``: absorbed when decoding one token with a
        cache, otherwise the one dispatch rule of ``attn_spec.dispatch`` on the call's ``B·N·T·S`` logits,
        plain when small and blocked above; the choice and its reason in ``last_choice`` and ``repr``),
        ``"plain"`` (dense softmax over decompressed keys and values), ``"blocked"`` (the same on
        FlexAttention, memory bounded by a block) or ``"absorbed"`` (attention over the latent keys).
      device, dtype: of the parameters.

    Parameters (``state_dict()`` keys, transformers' names and layout): ``q_proj.weight (N·H, E)`` or
    ``q_a_proj.weight (Q, E)``, ``q_a_layernorm.weight (Q,)``, ``q_b_proj.weight (N·H, Q)``;
    ``kv_a_proj_with_mqa.weight (L + R, E)``, ``kv_a_layernorm.weight (L,)``, ``kv_b_proj.weight
    (N·(D + V), L)``, ``o_proj.weight (E, N·V)``; ``q_a_proj``/``kv_a_proj_with_mqa``/``o_proj.bias`` with
    ``attention_bias``; ``indexer.{wq_b, wk, k_norm, weights_proj}`` for a sparse layer with an indexer.
    """

    def __init__(
        self,
        config: MLAConfig,
        *,
        implementation: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        c = self.config = config
        self.implementation = check_implementation(implementation)
        self.dispatch = ChoiceLog()  # the last automatic choice (implementation=None), shown in repr
        kw = {"device": device, "dtype": dtype}
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.E, c.N * c.H, bias=False, **kw)
        else:
            self.q_a_proj = nn.Linear(c.E, c.q_lora_rank, bias=c.attention_bias, **kw)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.q_lora_eps, 0.0, **kw)
            self.q_b_proj = nn.Linear(c.q_lora_rank, c.N * c.H, bias=False, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(c.E, c.L + c.R, bias=c.attention_bias, **kw)
        self.kv_a_layernorm = RMSNorm(c.L, c.kv_lora_eps, 0.0, **kw)
        self.kv_b_proj = nn.Linear(c.L, c.N * (c.D + c.V), bias=False, **kw)
        self.o_proj = nn.Linear(c.N * c.V, c.E, bias=c.attention_bias, **kw)
        self.indexer = Indexer(c, **kw) if c.has_indexer else None

    def extra_repr(self) -> str:
        return f"implementation={describe(self.implementation, self.dispatch)}, config={self.config}"

    @property
    def last_choice(self):
        """The :class:`attn_spec.dispatch.Choice` of the last call (eager) when ``implementation`` is None;
        None before the first call or with an explicit computation."""
        return self.dispatch.last

    def init_cache(self, batch_size: int, max_length: int) -> MLACache:
        """An empty cache of ``max_length`` slots: zeros on the parameters' device and dtype."""
        check_init_cache(batch_size, max_length)
        w = self.kv_a_proj_with_mqa.weight
        shapes = cache_shapes(self.config, batch_size, max_length)
        return MLACache(
            ckv=torch.zeros(shapes["ckv"], device=w.device, dtype=w.dtype),
            k_rot=torch.zeros(shapes["k_rot"], device=w.device, dtype=w.dtype),
            index_k=torch.zeros(shapes["index_k"], device=w.device, dtype=w.dtype)
            if "index_k" in shapes
            else None,
            pos=torch.full((max_length,), -1, device=w.device, dtype=torch.int64),
            valid=torch.zeros((batch_size, max_length), device=w.device, dtype=torch.bool),
            index=0,
            max_length=max_length,
        )

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: MLACache | None = None,
        *,
        topk_indices: torch.Tensor | None = None,
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
        c = self.config
        B, T = check_input(_spec(x), c, NAME)
        device = x.device
        if attention_mask is not None:
            check_attention_mask(*_spec(attention_mask), B, T, NAME)
            valid_BT = attention_mask.to(torch.bool)
        else:
            valid_BT = torch.ones((B, T), device=device, dtype=torch.bool)
        check_topk_indices(
            () if topk_indices is None else tuple(topk_indices.shape),
            "" if topk_indices is None else _spec(topk_indices)[1],
            topk_indices is not None,
            B,
            T,
            c,
        )
        start = 0 if cache is None else int(cache.index)
        if cache is not None:
            shapes = {"ckv": cache.ckv.shape, "k_rot": cache.k_rot.shape, "index_k": None}
            if cache.index_k is not None:
                shapes["index_k"] = cache.index_k.shape
            check_cache(shapes, start, cache.max_length, B, T, c)
        q_pos_T = start + torch.arange(T, device=device)
        if position_ids is None:
            position_ids = q_pos_T.expand(B, T)
        else:
            check_position_ids(*_spec(position_ids), B, T, NAME)

        x_BTE = x  # torch's Linear does not promote: x must have the parameters' dtype
        q_resid_BTQ = None
        if c.q_lora_rank is None:
            q = project(self.q_proj, x_BTE)
        else:
            q_resid_BTQ = self.q_a_layernorm(project(self.q_a_proj, x_BTE))
            q = project(self.q_b_proj, q_resid_BTQ)
        q_BNTH = q.view(B, T, c.N, c.H).transpose(1, 2)
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
            ckv_BSL = torch.cat([cache.ckv.to(dt), ckv_BTL], dim=1)
            k_rot_BSR = torch.cat([cache.k_rot.to(dt), k_rot_BTR], dim=1)
            index_k_BSJ = None
            if index_k_BTJ is not None:
                index_k_BSJ = torch.cat([cache.index_k.to(dt), index_k_BTJ], dim=1)
            k_pos_S = torch.cat([cache.pos, q_pos_T])
            k_valid_BS = torch.cat([cache.valid, valid_BT], dim=1)
        S = ckv_BSL.shape[1]
        path = self.implementation
        if path is None:  # chosen from this call's shapes
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
                topk_BTk = topk_indices.to(device=device, dtype=torch.int32)
            keep_BTS = keep_BTS & selected_mask(topk_BTk, S)

        if path == "plain":
            y_BNTV = self._plain(q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR, keep_BTS)
        elif path == "blocked":
            keep = (q_pos_T, k_pos_S, k_valid_BS) if keep_BTS is None else keep_BTS
            y_BNTV = self._blocked(q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR, keep)
        else:
            y_BNTV = self._absorbed(q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR, keep_BTS)
        y_BTE = project(self.o_proj, y_BNTV.transpose(1, 2).reshape(B, T, c.N * c.V))
        extra = (topk_BTk,) if return_topk else ()
        if cache is None:
            return (y_BTE, *extra) if extra else y_BTE

        slots = start + torch.arange(T, device=device)
        new_cache = MLACache(
            ckv=cache.ckv.index_copy(1, slots, ckv_BTL.to(cache.ckv.dtype)),
            k_rot=cache.k_rot.index_copy(1, slots, k_rot_BTR.to(cache.k_rot.dtype)),
            index_k=None
            if cache.index_k is None
            else cache.index_k.index_copy(1, slots, index_k_BTJ.to(cache.index_k.dtype)),
            pos=cache.pos.index_copy(0, slots, q_pos_T),
            valid=cache.valid.index_copy(1, slots, valid_BT),
            index=start + T,
            max_length=cache.max_length,
        )
        return (y_BTE, new_cache, *extra)

    def _decompress(self, q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR):
        """``q (B, N, T, H)``, ``k (B, N, S, H)``, ``v (B, N, S, V)``: the keys and values decompressed per
        head (``kv_b_proj``), the shared rotary key broadcast over the heads, ``H = D + R``."""
        c = self.config
        B, S, _ = ckv_BSL.shape
        kv_BNSX = project(self.kv_b_proj, ckv_BSL).view(B, S, c.N, c.D + c.V).transpose(1, 2)
        k_nope_BNSD, v_BNSV = kv_BNSX[..., : c.D], kv_BNSX[..., c.D :]
        k_rot_BNSR = k_rot_BSR[:, None].expand(B, c.N, S, c.R).to(k_nope_BNSD.dtype)
        k_BNSH = torch.cat([k_nope_BNSD, k_rot_BNSR], -1)
        q_BNTH = torch.cat([q_nope_BNTD, q_rot_BNTR], -1)
        return q_BNTH, k_BNSH, v_BNSV

    def _plain(self, q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR, keep_BTS) -> torch.Tensor:
        """Keys and values decompressed per head: ``softmax(scale · q·[k_nope; k_rot]) · v``."""
        c = self.config
        q_BNTH, k_BNSH, v_BNSV = self._decompress(q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR)
        acc = torch.promote_types(q_BNTH.dtype, torch.float32)
        logits = torch.einsum("bnth,bnsh->bnts", q_BNTH.to(acc), k_BNSH.to(acc)) * c.logit_scale
        p = masked_softmax(logits, keep_BTS)
        out = torch.einsum("bnts,bnsv->bntv", p, v_BNSV.to(acc))
        return out.to(q_nope_BNTD.dtype)

    def _blocked(self, q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR, keep) -> torch.Tensor:
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

        block_mask = create_block_mask(mask_mod, B, None, T, S, device=q_BNTH.device)
        return flex_attention(q_BNTH, k_BNSH, v_BNSV, None, block_mask, c.logit_scale)

    def _absorbed(self, q_nope_BNTD, q_rot_BNTR, ckv_BSL, k_rot_BSR, keep_BTS) -> torch.Tensor:
        """The up-projections folded into the query and the output: attention over the latent keys."""
        c = self.config
        acc = torch.promote_types(q_nope_BNTD.dtype, torch.float32)
        W_NXL = self.kv_b_proj.weight.to(acc).reshape(c.N, c.D + c.V, c.L)
        W_uk_NDL, W_uv_NVL = W_NXL[:, : c.D], W_NXL[:, c.D :]
        q_lat_BNTL = torch.einsum("bntd,ndl->bntl", q_nope_BNTD.to(acc), W_uk_NDL)
        logits = torch.einsum("bntl,bsl->bnts", q_lat_BNTL, ckv_BSL.to(acc))
        logits = logits + torch.einsum("bntr,bsr->bnts", q_rot_BNTR.to(acc), k_rot_BSR.to(acc))
        p = masked_softmax(logits * c.logit_scale, keep_BTS)
        o_lat_BNTL = torch.einsum("bnts,bsl->bntl", p, ckv_BSL.to(acc))
        out = torch.einsum("bntl,nvl->bntv", o_lat_BNTL, W_uv_NVL)
        return out.to(q_nope_BNTD.dtype)

    def torch_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters under transformers' names (the same keys as ``state_dict()``), detached."""
        params = dict(self.named_parameters())
        return {key: params[key].detach().clone() for key in state_dict_shapes(self.config)}

    def load_torch_state_dict(self, state_dict) -> None:
        """Load a state dict (torch tensors or NumPy arrays, e.g. ``jax_attn``'s export) with exactly the
        config's keys and shapes, casting to the parameter dtype; bit-exact when the dtypes agree."""
        tensors = {key: _to_tensor(value) for key, value in state_dict.items()}
        keys = check_state_dict({key: tuple(t.shape) for key, t in tensors.items()}, self.config)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for key in keys:
                params[key].copy_(tensors[key].to(params[key].dtype))


def _build(c: MLAConfig, sd: dict, implementation) -> MultiHeadLatentAttention:
    tensors = {k: _to_tensor(v) for k, v in sd.items()}
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"{NAME}: the attention's parameters have mixed dtypes {sorted(map(str, dtypes))}")
    attn = MultiHeadLatentAttention(c, implementation=implementation, dtype=dtypes.pop())
    attn.load_torch_state_dict(tensors)
    return attn


def from_hf(module, *, implementation: str | None = None) -> MultiHeadLatentAttention:
    """A transformers MLA module (``DeepseekV2Attention``, ``DeepseekV3Attention``, ``Glm4MoeLiteAttention``,
    ``DeepseekV32Attention``, ``GlmMoeDsaAttention``) → :class:`MultiHeadLatentAttention` with its
    configuration and weights (the names are transformers' own; dtypes kept), on the module's device."""
    _, c = describe_module(module)
    sd = {k: v.detach() for k, v in module.state_dict().items()}
    device = next(iter(sd.values())).device
    return _build(c, {k: v.cpu() for k, v in sd.items()}, implementation).to(device)


def load_layer(
    checkpoint_dir, layer: int = 0, *, implementation: str | None = None
) -> MultiHeadLatentAttention:
    """Layer ``layer``'s MLA of a local checkpoint (``config.json`` + safetensors)."""
    _, c, sd, dtype = read_layer(checkpoint_dir, layer)
    if dtype == "bfloat16":
        sd = {k: torch.from_numpy(np.ascontiguousarray(a)).view(torch.bfloat16) for k, a in sd.items()}
    return _build(c, sd, implementation)


def to_hf_state_dict(attn: MultiHeadLatentAttention) -> dict[str, torch.Tensor]:
    """The weights under transformers' names (``from_hf`` followed by this is bit-exact)."""
    return attn.torch_state_dict()
