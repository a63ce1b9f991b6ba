"""Multi-head latent attention (MLA: DeepSeek V2/V3, Kimi K2, GLM-4.7-Flash, DeepSeek V3.2 / GLM-5 with the
sparse indexer): one frozen configuration, its checks and error texts, the Hugging Face mapping, written
once for both twins (``jax_attn.mla`` / ``torch_attn.mla``).

Dimension key (see ``attn_spec``): B batch, T tokens in this call, S keys attended, E model width
(``hidden_size``), N heads, Q query latent (``q_lora_rank``), L key/value latent (``kv_lora_rank``),
D per-head non-rotary query/key width (``qk_nope_head_dim``), R rotary width (``qk_rope_head_dim``, one
rotary key shared by all heads), H = D + R query/key head width, V value head width (``v_head_dim``),
C cache slots. Sparse indexer (DSA): M indexer heads (``index_n_heads``), J indexer head width
(``index_head_dim``), k selected keys per query (``index_topk``).

The layer (transformers' names, ``nn.Linear`` layout)::

    q        = q_b_proj(RMSNorm_q(q_a_proj(x)))        or q_proj(x) without a query latent   (B, T, N·H)
    c, k_rot = split(kv_a_proj_with_mqa(x), [L, R])                                       (B, T, L), (B, T, R)
    c        = RMSNorm_kv(c)                              the compressed latent: all a cache needs, with k_rot
    q_nope, q_rot = split(q per head, [D, R]);  rotary on q_rot and k_rot
    k_nope, v     = split(kv_b_proj(c) per head, [D, V])                                   plain computation
    logits   = scale · (q_nope·k_nope + q_rot·k_rot)
    y        = o_proj(softmax(logits masked) · v)

The *absorbed* computation (decoding) never decompresses keys and values: with ``kv_b_proj.weight`` read
as ``(N, D + V, L)`` = ``[W_uk; W_uv]`` per head, ``q_nope·k_nope = (W_ukᵀ q_nope)·c`` and
``Σ_s p_s v_s = W_uv (Σ_s p_s c_s)``: the key up-projection folds into the query, the value up-projection
into the output, and the attention runs over the L + R wide latent keys shared by all heads.

Rotary layouts per family (``RopeConfig.layout`` of the main rotary; transformers' code in brackets):

=============  ===============================================================================================
deepseek_v2    ``"interleaved"`` [complex multiplication of pairs (x[2i], x[2i+1]): ``apply_rotary_emb``]
deepseek_v3    ``"interleaved"`` with ``rope_interleave=True`` (default) [``apply_rotary_pos_emb_interleave``:
               pairs rotated, then de-interleaved, the same permutation on q and k, so the same logits],
               ``"half"`` with ``rope_interleave=False`` [``rotate_half``]; Kimi K2 is a deepseek_v3 config
glm4_moe_lite  as deepseek_v3 (GLM-4.7-Flash)
deepseek_v32   ``"interleaved"``; its indexer ``"half"`` (``index_rope_layout``) on the *first* R channels
glm_moe_dsa    ``"interleaved"``; its indexer ``"interleaved"``; layers with ``indexer_types[i] == "shared"``
               have no indexer and take the selection of an earlier layer (``index_shared``)
=============  ===============================================================================================

Softmax scale: ``H ** -0.5``, times ``mscale²`` with ``mscale = 0.1 · mscale_all_dim · ln(factor) + 1``
when the rotary is scaled (``rope_type != "default"``) and ``mscale_all_dim`` is set (DeepSeek's yarn:
transformers' ``yarn_apply_mscale``). Separately, yarn multiplies cos/sin by its attention factor
``get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)`` (``attn_spec.rope``). The latent
RMSNorms take eps 1e-6 in every family's module (transformers builds them without ``rms_norm_eps``).

Sparse attention (DSA): the indexer scores key s for query t as
``Σ_m w_tm · relu(J^-½ · q_tm·k_s)`` with ``q = indexer.wq_b(q latent)`` (M heads of J), ``k =
LayerNorm(indexer.wk(x))`` (one key of J per token, cached), rotary on their first R channels, and
``w = indexer.weights_proj(x) · M^-½``; masked keys score ``-inf``. Each query attends only to its
``min(index_topk, S)`` best-scoring keys. **Ties** (equal scores: frequent, since the ReLU makes every key
whose scores are all negative score exactly 0) **are broken by the lower key index, i.e. the earlier
token** (``jax.lax.top_k``'s rule; the torch twin sorts stably). transformers uses ``torch.topk``, whose
order among equal scores is unspecified (on CPU it changes with the row length), so rows tied at the
k-th place can select different keys there. The selection carries no gradient (transformers runs the
indexer under ``no_grad``; its parameters get none).

Conventions shared with ``attn_spec.attention``: causal; masking follows sequence indices;
``attention_mask (B, T)`` 1/0 marks this call's real tokens; ``position_ids`` only feed the rotary;
fully masked rows (left-pad queries) give zeros, never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from attn_spec.checks import fmt_shape
from attn_spec.dispatch import Choice, select
from attn_spec.rope import RopeConfig, check_head_dim

NAME = "MultiHeadLatentAttention"
IMPLEMENTATIONS = ("plain", "absorbed", "blocked")
LAYOUTS = ("half", "interleaved")
FAMILIES = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa")
SPARSE_FAMILIES = ("deepseek_v32", "glm_moe_dsa")
# The indexer's rotary layout per sparse family (the main rotary is interleaved in both).
INDEX_ROPE_LAYOUT = {"deepseek_v32": "half", "glm_moe_dsa": "interleaved"}
LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the RMSNorm default
INDEX_NORM_EPS = 1e-6  # the indexer's nn.LayerNorm(J, eps=1e-6)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """DeepSeek's yarn magnitude correction ``0.1 · mscale · ln(scale) + 1`` (1 for ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class MLAConfig:
    """One multi-head latent attention layer (validated on construction: bad values raise ``ValueError``).

    Attributes:
      hidden_size: E. num_heads: N (every head has its own decompressed key and value; transformers'
        ``num_key_value_heads`` is not read: its eager module runs only when it equals N).
      kv_lora_rank: L, the compressed key/value latent. q_lora_rank: Q, the query latent, or None for a
        direct ``q_proj`` (DeepSeek-V2-Lite).
      qk_nope_head_dim: D. qk_rope_head_dim: R (even; one rotary key shared by the heads). v_head_dim: V.
      attention_bias: biases on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` (transformers' flag;
        ``q_proj``, ``q_b_proj`` and ``kv_b_proj`` never have one).
      q_lora_eps, kv_lora_eps: the latent RMSNorms' epsilon.
      rope: the rotary of the R channels (``partial_rotary_factor`` 1: all R rotate); its ``layout`` is the
        family's (module docstring).
      scale: the softmax scale; None: :func:`softmax_scale` (``H ** -0.5`` with yarn's ``mscale²``).
      index_topk: k > 0 for sparse attention (DSA), None for dense.
      index_n_heads, index_head_dim: M and J of the indexer (J >= R); index_rope_layout: its rotary layout.
      index_norm_eps: the indexer key LayerNorm's epsilon.
      index_shared: a layer without its own indexer that takes the selection (``topk_indices``) of an
        earlier layer (GLM-5's ``"shared"`` layers).
    """

    hidden_size: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    attention_bias: bool = False
    q_lora_eps: float = LATENT_NORM_EPS
    kv_lora_eps: float = LATENT_NORM_EPS
    rope: RopeConfig = RopeConfig(layout="interleaved")
    scale: float | None = None
    index_topk: int | None = None
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_rope_layout: str = "half"
    index_norm_eps: float = INDEX_NORM_EPS
    index_shared: bool = False

    def __post_init__(self):
        check_config(self)

    @property
    def E(self) -> int:
        return self.hidden_size

    @property
    def N(self) -> int:
        return self.num_heads

    @property
    def L(self) -> int:
        return self.kv_lora_rank

    @property
    def D(self) -> int:
        return self.qk_nope_head_dim

    @property
    def R(self) -> int:
        return self.qk_rope_head_dim

    @property
    def H(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def V(self) -> int:
        return self.v_head_dim

    @property
    def sparse(self) -> bool:
        return self.index_topk is not None

    @property
    def has_indexer(self) -> bool:
        """Whether the layer owns indexer parameters (sparse and not shared)."""
        return self.sparse and not self.index_shared

    @property
    def logit_scale(self) -> float:
        return softmax_scale(self) if self.scale is None else float(self.scale)

    def index_rope(self) -> RopeConfig:
        """The indexer's rotary: the main one in ``index_rope_layout``."""
        return replace(self.rope, layout=self.index_rope_layout)


def yarn_factor(rope: RopeConfig) -> float:
    """The scaling factor of a rope (``max_position_embeddings / original`` when ``factor`` is None)."""
    if rope.factor is not None:
        return float(rope.factor)
    if rope.max_position_embeddings and rope.original_max_position_embeddings:
        return rope.max_position_embeddings / rope.original_max_position_embeddings
    return 1.0


def softmax_scale(config: MLAConfig) -> float:
    """``H ** -0.5``, times ``get_mscale(factor, mscale_all_dim) ** 2`` for a scaled rotary with
    ``mscale_all_dim`` (transformers' ``yarn_apply_mscale``)."""
    scale = config.H**-0.5
    rope = config.rope
    if rope.rope_type != "default" and rope.mscale_all_dim:
        m = yarn_get_mscale(yarn_factor(rope), rope.mscale_all_dim)
        scale = scale * m * m
    return scale


def check_config(c: MLAConfig, name: str = NAME) -> None:
    for arg in (
        "hidden_size",
        "num_heads",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
    ):
        val = getattr(c, arg)
        if not _is_int(val) or val < 1:
            raise ValueError(f"{name}: {arg} must be a positive int; got {arg}={val!r}")
    if c.q_lora_rank is not None and (not _is_int(c.q_lora_rank) or c.q_lora_rank < 1):
        raise ValueError(
            f"{name}: q_lora_rank must be a positive int or None (a direct q_proj); got q_lora_rank="
            f"{c.q_lora_rank!r}"
        )
    for arg in ("attention_bias", "index_shared"):
        if not isinstance(getattr(c, arg), bool):
            raise ValueError(f"{name}: {arg} must be a bool; got {arg}={getattr(c, arg)!r}")
    for arg in ("q_lora_eps", "kv_lora_eps", "index_norm_eps"):
        val = getattr(c, arg)
        if not _is_number(val) or val <= 0:
            raise ValueError(f"{name}: {arg} must be a number > 0; got {arg}={val!r}")
    if not isinstance(c.rope, RopeConfig):
        raise ValueError(f"{name}: rope must be a RopeConfig; got rope={c.rope!r}")
    if c.rope.partial_rotary_factor != 1.0:
        raise ValueError(
            f"{name}: the rope rotates all qk_rope_head_dim channels; got partial_rotary_factor="
            f"{c.rope.partial_rotary_factor}"
        )
    check_head_dim(c.rope, c.R, name)
    if c.scale is not None and (not _is_number(c.scale) or c.scale <= 0):
        raise ValueError(f"{name}: scale must be a number > 0 or None; got scale={c.scale!r}")
    if c.index_rope_layout not in LAYOUTS:
        raise ValueError(
            f"{name}: index_rope_layout must be one of {LAYOUTS}; got index_rope_layout="
            f"{c.index_rope_layout!r}"
        )
    if c.index_topk is None:
        unused = [a for a in ("index_n_heads", "index_head_dim") if getattr(c, a) is not None]
        if unused or c.index_shared:
            raise ValueError(
                f"{name}: {unused or ['index_shared']} set without index_topk (a dense layer has no indexer)"
            )
        return
    if not _is_int(c.index_topk) or c.index_topk < 1:
        raise ValueError(
            f"{name}: index_topk must be a positive int or None; got index_topk={c.index_topk!r}"
        )
    if c.index_shared:
        return
    if c.q_lora_rank is None:
        raise ValueError(f"{name}: the sparse indexer reads the query latent; it needs q_lora_rank")
    for arg in ("index_n_heads", "index_head_dim"):
        val = getattr(c, arg)
        if not _is_int(val) or val < 1:
            raise ValueError(f"{name}: {arg} must be a positive int with index_topk; got {arg}={val!r}")
    if c.index_head_dim < c.R:
        raise ValueError(
            f"{name}: index_head_dim must be >= qk_rope_head_dim (its first R channels rotate); got "
            f"index_head_dim={c.index_head_dim}, qk_rope_head_dim={c.R}"
        )


def check_implementation(implementation, name: str = NAME) -> str | None:
    """Validate the constructor's ``implementation`` (None or ``"auto"``: :func:`choose`)."""
    if implementation == "auto":
        implementation = None
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{name}: implementation must be None (auto) or one of {IMPLEMENTATIONS}; got "
            f"implementation={implementation!r}"
        )
    return implementation


def choose(config: MLAConfig, *, B: int, T: int, S: int, cached: bool) -> Choice:
    """The automatic computation of a call (``implementation=None``), as a :class:`attn_spec.dispatch.Choice`:

    - ``"absorbed"`` when decoding: a cache and one new token (the key and value up-projections fold into
      the query and the output; the step attends over the L + R wide latent keys without decompressing
      the cache);
    - otherwise :func:`attn_spec.dispatch.select`, the one rule of every layer, on this call's facts:
      ``B·N·T·S`` logits, no weights returned, no dropout, no float mask, no fused kernel; its ``"math"``
      is MLA's ``"plain"`` (decompressed keys and values, dense softmax) and its ``"blocked"`` the
      decompressed keys and values on FlexAttention (memory bounded by a block, not by ``T·S``).
    """
    if cached and T == 1:
        return Choice(
            "absorbed",
            f"decoding one token with a cache of {S - 1} slots: attention over the L + R = "
            f"{config.L + config.R} wide latent keys, the cache never decompressed",
        )
    choice = select(
        logits=B * config.N * T * S, need_weights=False, dropout=False, float_mask=False, fused=None
    )
    return replace(choice, implementation=_FROM_DISPATCH[choice.implementation])


# attn_spec.dispatch's paths → MLA's computations (select never answers "fused" with fused=None).
_FROM_DISPATCH = {"math": "plain", "blocked": "blocked"}


def check_topk_indices(shape, dtype: str, given: bool, B: int, T: int, config: MLAConfig, name: str = NAME):
    """``topk_indices (B, T, k)``: required by a shared layer (``index_shared``), refused elsewhere."""
    from attn_spec.checks import INT_DTYPES

    if config.index_shared and not given:
        raise ValueError(
            f"{name}: this layer shares an earlier layer's selection (index_shared=True); pass topk_indices="
            "(B, T, k), the indices an indexer layer returned with return_topk=True"
        )
    if not given:
        return
    if not config.index_shared:
        raise ValueError(
            f"{name}: topk_indices is taken only by a shared sparse layer (index_shared=True); this layer "
            f"{'selects its own' if config.sparse else 'is dense'}"
        )
    if len(shape) != 3 or tuple(shape[:2]) != (B, T) or shape[2] < 1:
        raise ValueError(
            f"{name}: topk_indices must be (B, T, k) = ({B}, {T}, k); got topk_indices.shape="
            f"{fmt_shape(shape)}"
        )
    if dtype not in INT_DTYPES:
        raise ValueError(f"{name}: topk_indices must be integers; got topk_indices.dtype={dtype}")


def check_init_cache(batch_size, max_length, name: str = NAME) -> None:
    for arg, val in (("batch_size", batch_size), ("max_length", max_length)):
        if not _is_int(val) or val < 1:
            raise ValueError(f"{name}.init_cache: {arg} must be a positive int; got {arg}={val!r}")


def cache_shapes(config: MLAConfig, B: int, C: int) -> dict[str, tuple[int, ...]]:
    """The cache's per-token arrays: ``ckv (B, C, L)``, ``k_rot (B, C, R)`` and, for a layer with an indexer,
    ``index_k (B, C, J)``."""
    shapes = {"ckv": (B, C, config.L), "k_rot": (B, C, config.R)}
    if config.has_indexer:
        shapes["index_k"] = (B, C, config.index_head_dim)
    return shapes


def cache_values_per_token(config: MLAConfig) -> int:
    """Cached values per token: ``L + R`` (plus J for a layer with its own indexer)."""
    return sum(s[-1] for s in cache_shapes(config, 1, 1).values())


def check_cache(
    shapes: dict, index: int | None, max_length: int, B: int, T: int, config: MLAConfig, name=NAME
):
    """Validate a cache's arrays against a chunk of ``T`` tokens of batch ``B`` (``index`` None: traced)."""
    want = cache_shapes(config, B, max_length)
    got = {k: tuple(v) for k, v in shapes.items() if v is not None}
    if got != want:
        raise ValueError(
            f"{name}: the cache's arrays must be {want} for batch {B} and max_length={max_length}; got {got}"
        )
    if index is not None and (index < 0 or index + T > max_length):
        raise ValueError(
            f"{name}: KV cache overflow: {index} cached + {T} new tokens > max_length={max_length}; "
            "allocate a longer cache with init_cache(batch_size, max_length)"
        )


def state_dict_shapes(config: MLAConfig) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the state dict: transformers' names, ``nn.Linear`` layout (out, in)."""
    c = config
    E, N, H, L, R, V = c.E, c.N, c.H, c.L, c.R, c.V
    shapes: dict[str, tuple[int, ...]] = {}
    if c.q_lora_rank is None:
        shapes["q_proj.weight"] = (N * H, E)
    else:
        shapes["q_a_proj.weight"] = (c.q_lora_rank, E)
        if c.attention_bias:
            shapes["q_a_proj.bias"] = (c.q_lora_rank,)
        shapes["q_a_layernorm.weight"] = (c.q_lora_rank,)
        shapes["q_b_proj.weight"] = (N * H, c.q_lora_rank)
    shapes["kv_a_proj_with_mqa.weight"] = (L + R, E)
    if c.attention_bias:
        shapes["kv_a_proj_with_mqa.bias"] = (L + R,)
    shapes["kv_a_layernorm.weight"] = (L,)
    shapes["kv_b_proj.weight"] = (N * (c.D + V), L)
    shapes["o_proj.weight"] = (E, N * V)
    if c.attention_bias:
        shapes["o_proj.bias"] = (E,)
    if c.has_indexer:
        M, J = c.index_n_heads, c.index_head_dim
        shapes["indexer.wq_b.weight"] = (M * J, c.q_lora_rank)
        shapes["indexer.wk.weight"] = (J, E)
        shapes["indexer.k_norm.weight"] = (J,)
        shapes["indexer.k_norm.bias"] = (J,)
        shapes["indexer.weights_proj.weight"] = (M, E)
    return shapes


INDEXER_KEYS = (
    "indexer.wq_b.weight",
    "indexer.wk.weight",
    "indexer.k_norm.weight",
    "indexer.k_norm.bias",
    "indexer.weights_proj.weight",
)


def check_state_dict(shapes: dict[str, tuple[int, ...]], config: MLAConfig, name: str = NAME) -> list[str]:
    want = state_dict_shapes(config)
    missing = [k for k in want if k not in shapes]
    unexpected = [k for k in shapes if k not in want]
    if missing or unexpected:
        raise ValueError(
            f"{name}: state dict does not match the config: missing keys {missing}, unexpected keys "
            f"{unexpected}; expected {list(want)}"
        )
    for key, shape in want.items():
        if tuple(shapes[key]) != shape:
            raise ValueError(
                f"{name}: state dict key {key!r} has shape {fmt_shape(shapes[key])}; needs {fmt_shape(shape)}"
            )
    return list(want)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face: config → MLAConfig (duck-typed: a transformers config object or a config.json dict).
# ---------------------------------------------------------------------------------------------------------

HF_NAME = "mla.from_hf"


def is_mla_family(config) -> bool:
    from attn_spec.hf import _Cfg, text_config

    return _Cfg(text_config(config)).get("model_type") in FAMILIES


def mla_config(config, layer: int = 0) -> tuple[str, MLAConfig]:
    """``(family, MLAConfig)`` of layer ``layer``'s attention. Knobs that change the attention and that
    :class:`MLAConfig` cannot express raise ``ValueError`` naming them."""
    from attn_spec.hf import _Cfg, _rope_parameters, text_config

    cfg = _Cfg(text_config(config))
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{HF_NAME}: unsupported model_type={family!r}; supported: {FAMILIES}")
    # num_key_value_heads is not read: MLA decompresses one key and one value per head (kv_b_proj), and
    # transformers' eager module runs only when it equals num_attention_heads.
    N = cfg.get("num_attention_heads")
    rp = _rope_parameters(cfg, family, None)
    if family == "deepseek_v2":
        layout = "interleaved"
    elif family in ("deepseek_v3", "glm4_moe_lite"):
        layout = "interleaved" if cfg.get("rope_interleave", True) else "half"
    else:
        layout = "interleaved"
    try:
        rope = RopeConfig.from_hf(rp, cfg.get("max_position_embeddings"), layout=layout)
    except ValueError as err:
        raise ValueError(f"{HF_NAME}: {family} rope_parameters: {err}") from None
    kw = dict(
        hidden_size=cfg.get("hidden_size"),
        num_heads=N,
        kv_lora_rank=cfg.get("kv_lora_rank"),
        qk_nope_head_dim=cfg.get("qk_nope_head_dim"),
        qk_rope_head_dim=cfg.get("qk_rope_head_dim"),
        v_head_dim=cfg.get("v_head_dim"),
        q_lora_rank=cfg.get("q_lora_rank"),
        attention_bias=bool(cfg.get("attention_bias", False)),
        rope=rope,
    )
    if family in SPARSE_FAMILIES:
        shared = False
        if family == "glm_moe_dsa":
            types = cfg.get("indexer_types")
            shared = types is not None and types[layer] == "shared"
        kw.update(index_topk=cfg.get("index_topk"), index_shared=shared)
        if not shared:
            kw.update(
                index_n_heads=cfg.get("index_n_heads"),
                index_head_dim=cfg.get("index_head_dim"),
                index_rope_layout=INDEX_ROPE_LAYOUT[family],
            )
        if kw["q_lora_rank"] is None:
            raise ValueError(f"{HF_NAME}: {family} needs q_lora_rank (its modules always have q_a_proj)")
    return family, MLAConfig(**kw)


def describe_module(module) -> tuple[str, MLAConfig]:
    """``(family, MLAConfig)`` of a transformers MLA module (its ``config`` and ``layer_idx``)."""
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(
            f"{HF_NAME}: expected a transformers MLA module with a .config; got {type(module).__name__}"
        )
    layer = getattr(module, "layer_idx", 0) or 0
    family, c = mla_config(config, int(layer))
    from attn_spec.hf import _Cfg

    if getattr(module, "training", False) and _Cfg(config).get("attention_dropout", 0.0):
        raise ValueError(
            f"{HF_NAME}: {family} config knob attention_dropout={_Cfg(config).get('attention_dropout')!r} "
            "is not supported in training mode (no dropout in MultiHeadLatentAttention); call .eval()"
        )
    return family, c


def read_layer(checkpoint_dir, layer: int) -> tuple[str, MLAConfig, dict, str]:
    """``(family, config, state dict, dtype name)`` of layer ``layer``'s attention of a local checkpoint
    (``config.json`` + safetensors), NumPy only; bf16 arrays come back as their uint16 bit patterns. The
    names are transformers' own, so the state dict needs no conversion."""
    import json
    import os

    from attn_spec.hf import _read_safetensors, _safetensors_names, layer_prefix

    with open(os.path.join(checkpoint_dir, "config.json")) as f:
        config = json.load(f)
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        single = os.path.join(checkpoint_dir, "model.safetensors")
        if not os.path.exists(single):
            raise ValueError(f"load_layer: no model.safetensors(.index.json) in {checkpoint_dir}")
        weight_map = {k: "model.safetensors" for k in _safetensors_names(single)}
    family, c = mla_config(config, layer)
    prefix = layer_prefix(weight_map, layer)
    names = [k for k in weight_map if k.startswith(prefix)]
    by_file: dict[str, list[str]] = {}
    for k in names:
        by_file.setdefault(weight_map[k], []).append(k)
    tensors = {}
    for fname, ks in by_file.items():
        tensors.update(_read_safetensors(os.path.join(checkpoint_dir, fname), ks))
    dtypes = {d for _, d in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"load_layer: layer {layer}'s attention weights have mixed dtypes {sorted(dtypes)}")
    sd = {k[len(prefix) :]: a for k, (a, _) in tensors.items()}
    check_state_dict({k: a.shape for k, a in sd.items()}, c, name="load_layer")
    return family, c, sd, dtypes.pop()


def config_dict(c: MLAConfig) -> dict:
    """JSON-ready fields (the rope's unset ones dropped)."""
    out = {f.name: getattr(c, f.name) for f in fields(c) if f.name != "rope"}
    out["rope"] = {
        f.name: getattr(c.rope, f.name) for f in fields(c.rope) if getattr(c.rope, f.name) is not None
    }
    out["softmax_scale"] = c.logit_scale
    return out
