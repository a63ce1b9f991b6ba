"""``torch.nn.MultiheadAttention``, rewritten on this project's SDPA core (twin of ``jax_attn/mha.py``).

A functional core, :func:`multi_head_attention_forward` (torch's ``F.multi_head_attention_forward``
signature, without ``static_k``/``static_v``), and a thin module, :class:`MultiheadAttention`, whose
``state_dict`` is exactly the built-in's, so either loads the other's with ``strict=True``.

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

import numpy as np
import torch
from torch import nn

from attn_spec import check_implementation, check_sdpa
from attn_spec.dispatch import AUTO, ChoiceLog, describe
from attn_spec.mha import check_mha, check_mha_init
from torch_attn.functional import _fast_attention, _select, scaled_dot_product_attention_with_weights
from torch_attn.masks import keep_to_additive, masked_to_keep


def _spec(x) -> tuple[tuple[int, ...], str] | None:
    return None if x is None else (tuple(x.shape), str(x.dtype).removeprefix("torch."))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch's ``F.linear``: ``x @ weight.T + bias`` with ``weight (out, in)``."""
    y = torch.einsum("...i,oi->...o", x, weight)
    return y if bias is None else y + bias


def _check_sdpa_shapes(q, k, v, mask):
    """The SDPA core's shapes for the fast paths (the module's own checks already passed)."""
    spec = lambda x: None if x is None else (tuple(x.shape), str(x.dtype).removeprefix("torch."))  # noqa: E731
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
        masks = [torch.nn.functional.pad(m, (0, pad), value=bool(m.dtype == torch.bool)) for m in masks]
    if all(m.dtype == torch.bool for m in masks):
        merged = masks[0]
        for m in masks[1:]:
            merged = merged & m
        return merged
    merged = None
    for m in masks:
        m = keep_to_additive(m, dtype) if m.dtype == torch.bool else m.to(dtype)
        merged = m if merged is None else merged + m
    return merged


def multi_head_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: torch.Tensor | None,
    in_proj_bias: torch.Tensor | None,
    bias_k: torch.Tensor | None,
    bias_v: torch.Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    training: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: torch.Tensor | None = None,
    k_proj_weight: torch.Tensor | None = None,
    v_proj_weight: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    batch_first: bool = False,
    dropout_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    implementation: str | None = None,
    _choice_log: ChoiceLog | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch.nn.functional.multi_head_attention_forward``, written on this project's SDPA core.

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
      generator: ``torch.Generator`` for the draw (the JAX twin takes ``dropout_rng``).

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
        query, key, value = (torch.swapaxes(x, 0, 1) for x in (query, key, value))

    if use_separate_proj_weight:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        w_q, w_k, w_v = torch.chunk(in_proj_weight, 3, dim=0)
    b_q, b_k, b_v = (None,) * 3 if in_proj_bias is None else torch.chunk(in_proj_bias, 3)
    if not use_separate_proj_weight and query is key is value:
        # self-attention: one (N·L, E) @ (E, 3E) matmul instead of three narrower ones
        q_NLE, k_NSE, v_NSE = torch.chunk(_linear(query, in_proj_weight, in_proj_bias), 3, dim=-1)
    else:
        q_NLE = _linear(query, w_q, b_q)
        k_NSE = _linear(key, w_k, b_k)
        v_NSE = _linear(value, w_v, b_v)
    if bias_k is not None:
        k_NSE = torch.cat([k_NSE, bias_k.reshape(1, 1, E).expand(N, 1, E)], dim=1)
        v_NSE = torch.cat([v_NSE, bias_v.reshape(1, 1, E).expand(N, 1, E)], dim=1)

    # Split heads: E = Nh * D with head h owning features [h * D, (h + 1) * D), as torch's view does.
    q_NhLD = q_NLE.reshape(N, L, Nh, D).permute(0, 2, 1, 3)
    k_NhSD = k_NSE.reshape(N, -1, Nh, D).permute(0, 2, 1, 3)
    v_NhSD = v_NSE.reshape(N, -1, Nh, D).permute(0, 2, 1, 3)
    if add_zero_attn:
        zeros = torch.zeros((N, Nh, 1, D), dtype=k_NhSD.dtype, device=k_NhSD.device)
        k_NhSD = torch.cat([k_NhSD, zeros], dim=2)
        v_NhSD = torch.cat([v_NhSD, zeros], dim=2)

    # is_causal, torch's rule (F.multi_head_attention_forward): with no key_padding_mask and no weights
    # asked for, attn_mask (checked above to be present) is dropped and SDPA's top-left causal masking
    # over all S_total keys is applied, the appended bias_k / zero keys included; otherwise the mask is
    # applied as given and the hint dropped (merged with key_padding_mask it is no longer causal).
    causal = bool(is_causal) and key_padding_mask is None and not need_weights
    if causal:
        attn_mask = None
    mask = _merged_mask(
        attn_mask,
        key_padding_mask,
        N,
        Nh,
        L,
        S,
        shapes.S_total - S,
        torch.promote_types(q_NLE.dtype, torch.float32),
    )
    p = dropout_p if training else 0.0
    if implementation in AUTO:
        choice = _select(
            _check_sdpa_shapes(q_NhLD, k_NhSD, v_NhSD, mask),
            q_NhLD.device,
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
            generator=generator,
        )
    out_NLE = out_NhLD.permute(0, 2, 1, 3).reshape(N, L, E)
    out_NLE = _linear(out_NLE, out_proj_weight, out_proj_bias)

    if not shapes.batched:
        out = out_NLE[0]
    elif batch_first:
        out = out_NLE
    else:
        out = torch.swapaxes(out_NLE, 0, 1)
    if not need_weights:
        return out, None
    weights = torch.mean(weights_NhLS, dim=1) if average_attn_weights else weights_NhLS
    return out, weights if shapes.batched else weights[0]


def _to_numpy(x) -> np.ndarray:
    """Any array-like as NumPy (exact; bf16 through ml_dtypes)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.float().numpy().astype(ml_dtypes.bfloat16)  # exact: bf16 ⊂ fp32
        return x.numpy()
    return np.asarray(x)


def _to_tensor(x) -> torch.Tensor:
    """Any array-like as a tensor (exact; NumPy bf16 from ml_dtypes included)."""
    if isinstance(x, torch.Tensor):
        return x
    x = np.asarray(x)
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


class Linear(nn.Linear):
    """torch's ``nn.Linear`` (``out_proj``): ``weight (out, in)``, ``bias (out,)``."""


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` on this project's SDPA core, with the built-in's parameters.

    Parameters: ``in_proj_weight (3E, E)`` (or ``q_proj_weight (E, E)``, ``k_proj_weight (E, kdim)``,
    ``v_proj_weight (E, vdim)`` when kdim/vdim differ from E), ``in_proj_bias (3E,)``, ``bias_k``/``bias_v``
    ``(1, 1, E)``, ``out_proj.weight (E, E)``, ``out_proj.bias (E,)``.

    Starts in training mode like every torch module; ``.eval()`` / ``.train()`` switch. Dropout draws
    from torch's global generator.

    Args:
      implementation: SDPA path: None (default) / ``"auto"`` chooses per call (see
        :func:`multi_head_attention_forward`; the choice is noted in ``last_choice`` and the ``repr``), or
        ``"math"``, ``"blocked"``, ``"fused"``: the fast paths raise on ``need_weights=True`` (pass
        ``need_weights=False``) and on active dropout.
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
        device=None,
        dtype=None,
        *,
        implementation: str | None = None,
    ):
        super().__init__()
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
        factory = {"device": device, "dtype": dtype}

        E = embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * E, E), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((E, E), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((E, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((E, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * E, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(E, E, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, E), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, E), **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch's init: xavier_uniform in-projections, zero biases, xavier_normal bias_k/bias_v; out_proj
        # keeps Linear's default weight init.
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.normal_(self.bias_k, std=math.sqrt(1.0 / self.embed_dim))
            nn.init.normal_(self.bias_v, std=math.sqrt(1.0 / self.embed_dim))

    def _params(self) -> dict[str, nn.Parameter]:
        """The parameters under torch's ``state_dict`` names, in torch's order."""
        return dict(self.named_parameters())

    @property
    def last_choice(self):
        """The :class:`attn_spec.dispatch.Choice` of the last call when ``implementation`` is None /
        ``"auto"``; None before the first call or with an explicit path."""
        return self.dispatch.last

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}, implementation={describe(self.implementation, self.dispatch)}"
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        dropout_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """torch's ``MultiheadAttention.forward``; see :func:`multi_head_attention_forward`.

        ``dropout_mask`` (bool keep-mask ``(N, Nh, L, S_total)``) is used in training mode with
        ``dropout > 0`` instead of a random draw; otherwise ignored.
        """
        active = self.training and self.dropout > 0.0
        return multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            batch_first=self.batch_first,
            dropout_mask=dropout_mask if active else None,
            implementation=self.implementation,
            _choice_log=self.dispatch,
        )

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """The parameters as ``{name: numpy array}`` (the JAX twin's format), exact copies."""
        return {k: _to_numpy(p) for k, p in self._params().items()}

    def load_torch_state_dict(self, state_dict: Mapping) -> None:
        """Copy a ``torch.nn.MultiheadAttention`` ``state_dict`` in (strict); values may be NumPy arrays."""
        self.load_state_dict({k: _to_tensor(v) for k, v in state_dict.items()}, strict=True)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping, embed_dim: int, num_heads: int, *, device=None, dtype=None, **kwargs
    ) -> MultiheadAttention:
        """A module built from a torch ``state_dict`` and torch's constructor arguments (``kwargs``)."""
        new = cls(embed_dim, num_heads, **kwargs, device=device, dtype=dtype)
        new.load_torch_state_dict(state_dict)
        return new

    @classmethod
    def from_torch(cls, module: nn.Module, *, device=None, dtype=None) -> MultiheadAttention:
        """A ``MultiheadAttention`` configured like the torch ``module`` with its weights copied in.

        The training/eval mode is copied too.
        """
        weight = module.out_proj.weight
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
            device=weight.device if device is None else device,
            dtype=weight.dtype if dtype is None else dtype,
        )
        new.train(module.training)
        return new
