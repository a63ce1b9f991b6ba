"""Rotary position embeddings (RoPE), framework-neutral: the parameters, their checks, the frequency table
(and its fixed-point turns) and the layout permutation, written once for ``jax_attn.rope`` and
``torch_attn.rope``.

Dimension key (see ``attn_spec``): B batch, T tokens, N heads, H head width, R rotary width (the first R
channels of each head rotate, ``R = int(H · partial_rotary_factor)``, even), F = R // 2 frequencies.

Parameters carry Hugging Face's names (``config.rope_parameters`` in transformers v5, ``rope_scaling``
before), so a config maps field by field: ``rope_type`` in :data:`ROPE_TYPES`, ``rope_theta``,
``partial_rotary_factor``, ``factor``, ``original_max_position_embeddings``, ``attention_factor``,
``beta_fast``/``beta_slow``/``mscale``/``mscale_all_dim``/``truncate`` (yarn), ``short_factor``/
``long_factor`` (longrope), ``low_freq_factor``/``high_freq_factor`` (llama3), ``proportional`` (Gemma 4:
a table as wide as the head whose frequencies past ``partial_rotary_factor · H / 2`` are zero), and the
model's ``max_position_embeddings`` (dynamic; longrope/yarn when ``factor`` is None).

Layouts (``layout=``):

- ``"half"``: channel ``i`` pairs with ``i + R/2`` (``rotate_half``; Hugging Face, GPT-NeoX); cos/sin are
  ``cat(freqs, freqs)``.
- ``"interleaved"``: channel ``2i`` pairs with ``2i + 1`` (Meta's original Llama code, DeepSeek's
  ``rope_interleave``); cos/sin repeat each frequency twice in place.

A model in one layout equals the model in the other once its q/k projection rows are permuted
(:func:`rotary_permutation`; Hugging Face's Llama conversion script does interleaved → half).

Precision: the twins do not compute ``p · inv_freq`` in float32 as transformers does (off by up to half an
ulp of the angle, 2.4e-4 rad at p · inv ≈ 4096, plus p times the float32 table's own rounding). Their angles
come from the float64 table (the oracle's formulas) as fixed-point turns (:func:`fixed_point_turns`),
reduced exactly in integer arithmetic to a quarter turn and a float32 rest in ``[-π/4, π/4]``; their cos/sin
are within ~1e-7 of the float64 oracle's at any position below 2^24, where transformers' float32 tables are
off by 1.5e-4 at 4096 (and 1.6e-5 already at ~300). dynamic past ``max_position_embeddings`` keeps
transformers' float32 table of the call's length (exactly reduced), since a traced length cannot reach a
float64 table in JAX.

Sequence-length dependence (``dynamic`` and ``longrope``), stated once for both twins: the table of a call
depends on ``seq_len = max(position_ids) + 1`` over the call's whole batch, as in transformers'
``dynamic_rope_update``: ``dynamic`` rescales the base when ``seq_len > max_position_embeddings`` (and is
the default table otherwise); ``longrope`` uses ``long_factor`` when
``seq_len > original_max_position_embeddings`` and ``short_factor`` otherwise. Keys stored in a KV cache
keep the rotation they were written with (as in
transformers, whose cache stores rotated keys). Unlike transformers' module we keep no state between calls:
transformers' ``dynamic`` keeps a grown table until a call's length drops below the original one; we
recompute from each call's positions, which is the same for monotonically growing positions (decoding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

NAME = "RopeConfig"
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "proportional")
LAYOUTS = ("half", "interleaved")
SEQ_DEPENDENT = ("dynamic", "longrope")

# Parameters each rope_type needs (beyond rope_theta, partial_rotary_factor) and those it may take.
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "proportional": (),
}
_OPTIONAL = {
    "default": (),
    "linear": (),
    "dynamic": (),
    "llama3": ("max_position_embeddings",),
    "proportional": ("factor", "max_position_embeddings"),
    "yarn": (
        "factor",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
        "max_position_embeddings",
    ),
    "longrope": ("factor", "attention_factor", "max_position_embeddings"),
}
_ALWAYS = ("rope_type", "rope_theta", "partial_rotary_factor", "layout", "mrope_section", "mrope_interleaved")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings under Hugging Face's names (see the module docstring); validated on
    construction (``ValueError``), so a config that exists is usable.

    Attributes:
      rope_type: one of :data:`ROPE_TYPES`.
      rope_theta: the base θ of the frequencies ``θ^(-2i/R)``.
      partial_rotary_factor: fraction of each head that rotates (GPT-NeoX ``rotary_pct``, Phi); R is
        ``int(H · factor)`` and must be even.
      layout: ``"half"`` or ``"interleaved"``.
      factor: the scaling factor (linear, dynamic, llama3, yarn, longrope).
      original_max_position_embeddings: pretraining context (llama3, yarn, longrope).
      max_position_embeddings: the model's context (dynamic; yarn/longrope derive ``factor`` from it
        when ``factor`` is None).
      low_freq_factor, high_freq_factor: llama3's band edges.
      attention_factor: yarn/longrope multiplier on cos and sin (None: the paper's default from factor).
      beta_fast, beta_slow, mscale, mscale_all_dim, truncate: yarn's ramp and attention-factor knobs.
      short_factor, long_factor: longrope's per-frequency divisors (F values each).
      mrope_section: multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): three counts of frequencies
        read from the three rows (temporal, height, width) of ``position_ids (3, B, T)``
        (:func:`mrope_rows`); None: one row.
      mrope_interleaved: the sections interleave (Qwen3-VL, Qwen3.5: frequency ``3i + 1`` reads row 1 for
        ``i < section[1]``, ``3i + 2`` row 2 for ``i < section[2]``, every other row 0) instead of lying
        one after another (Qwen2-VL: the first ``section[0]`` frequencies read row 0, the next
        ``section[1]`` row 1, the rest row 2).
    """

    rope_type: str = "default"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    layout: str = "half"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    short_factor: tuple[float, ...] | None = field(default=None)
    long_factor: tuple[float, ...] | None = field(default=None)
    mrope_section: tuple[int, ...] | None = field(default=None)
    mrope_interleaved: bool = False

    def __post_init__(self):
        for name in ("short_factor", "long_factor"):  # lists from a JSON config become hashable tuples
            val = getattr(self, name)
            if isinstance(val, (list, np.ndarray)):
                object.__setattr__(self, name, tuple(float(v) for v in val))
        if isinstance(self.mrope_section, (list, np.ndarray)):
            object.__setattr__(self, "mrope_section", tuple(int(v) for v in self.mrope_section))
        check_rope_config(self)

    @classmethod
    def from_hf(
        cls, rope_parameters: dict, max_position_embeddings: int | None = None, layout: str = "half"
    ) -> RopeConfig:
        """From a transformers ``rope_parameters`` (or legacy ``rope_scaling``) dict; ``type`` is read as
        ``rope_type``. Keys we do not know raise ``ValueError`` naming them."""
        params = dict(rope_parameters)
        if "type" in params:
            params.setdefault("rope_type", params.pop("type"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{NAME}: unsupported rope parameters {unknown}; known: {sorted(known)}")
        if max_position_embeddings is not None:
            params.setdefault("max_position_embeddings", max_position_embeddings)
        params.setdefault("layout", layout)
        rope_type = params.get("rope_type", "default")
        if rope_type in _REQUIRED:  # drop what this rope_type does not read, as transformers ignores it
            allowed = set(_ALWAYS) | set(_REQUIRED[rope_type]) | set(_OPTIONAL[rope_type])
            params = {k: v for k, v in params.items() if k in allowed or v is None}
        return cls(**params)

    def rotary_dim(self, head_dim: int) -> int:
        """R, the rotating channels of a head of width ``head_dim`` (transformers' ``int(H · factor)``);
        ``proportional`` (Gemma 4) always spans the head: its last frequencies are zero instead."""
        if self.rope_type == "proportional":
            return head_dim
        return int(head_dim * self.partial_rotary_factor)


def check_rope_config(c: RopeConfig) -> None:
    """Every field: types, ranges, the parameters its rope_type needs, none it does not read."""
    if c.rope_type not in ROPE_TYPES:
        raise ValueError(f"{NAME}: unknown rope_type={c.rope_type!r}; known rope types: {ROPE_TYPES}")
    if c.layout not in LAYOUTS:
        raise ValueError(f"{NAME}: layout must be one of {LAYOUTS}; got layout={c.layout!r}")
    if not _is_number(c.rope_theta) or c.rope_theta <= 1.0:
        raise ValueError(f"{NAME}: rope_theta must be a number > 1; got rope_theta={c.rope_theta!r}")
    prf = c.partial_rotary_factor
    if not _is_number(prf) or not 0.0 < prf <= 1.0:
        raise ValueError(
            f"{NAME}: partial_rotary_factor must be in (0, 1]; got partial_rotary_factor={prf!r}"
        )
    required, optional = _REQUIRED[c.rope_type], _OPTIONAL[c.rope_type]
    missing = [name for name in required if getattr(c, name) is None]
    if missing:
        raise ValueError(f"{NAME}: rope_type={c.rope_type!r} needs {list(required)}; missing {missing}")
    unread = [
        f.name
        for f in fields(c)
        if f.name not in _ALWAYS and f.name not in required and f.name not in optional
        if getattr(c, f.name) is not None
    ]
    if unread:
        raise ValueError(
            f"{NAME}: rope_type={c.rope_type!r} does not use {unread}; it reads {list(required + optional)}"
        )
    for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
        val = getattr(c, name)
        if val is not None and (not _is_number(val) or val <= 0):
            raise ValueError(f"{NAME}: {name} must be a positive number; got {name}={val!r}")
    if c.factor is not None and c.rope_type in ("linear", "dynamic", "llama3") and c.factor < 1.0:
        raise ValueError(
            f"{NAME}: factor must be >= 1 for rope_type={c.rope_type!r}; got factor={c.factor!r}"
        )
    for name in ("attention_factor", "mscale", "mscale_all_dim"):
        val = getattr(c, name)
        if val is not None and not _is_number(val):
            raise ValueError(f"{NAME}: {name} must be a number; got {name}={val!r}")
    if c.attention_factor is not None and c.attention_factor <= 0:
        raise ValueError(f"{NAME}: attention_factor must be > 0; got attention_factor={c.attention_factor!r}")
    for name in ("original_max_position_embeddings", "max_position_embeddings"):
        val = getattr(c, name)
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
            raise ValueError(f"{NAME}: {name} must be a positive int; got {name}={val!r}")
    if c.truncate is not None and not isinstance(c.truncate, bool):
        raise ValueError(f"{NAME}: truncate must be a bool; got truncate={c.truncate!r}")
    if c.rope_type == "llama3" and not c.high_freq_factor > c.low_freq_factor:
        raise ValueError(
            f"{NAME}: llama3 needs high_freq_factor > low_freq_factor; got low_freq_factor="
            f"{c.low_freq_factor}, high_freq_factor={c.high_freq_factor}"
        )
    if c.rope_type in ("yarn", "longrope") and c.factor is None and c.max_position_embeddings is None:
        raise ValueError(
            f"{NAME}: rope_type={c.rope_type!r} without factor needs max_position_embeddings "
            "(factor = max_position_embeddings / original_max_position_embeddings)"
        )
    if c.mrope_section is not None:
        sec = c.mrope_section
        if (
            not isinstance(sec, tuple)
            or len(sec) != 3
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in sec)
        ):
            raise ValueError(
                f"{NAME}: mrope_section must be three ints >= 0 (temporal, height, width); got "
                f"mrope_section={sec!r}"
            )
    if not isinstance(c.mrope_interleaved, bool):
        raise ValueError(f"{NAME}: mrope_interleaved must be a bool; got {c.mrope_interleaved!r}")
    if c.mrope_interleaved and c.mrope_section is None:
        raise ValueError(f"{NAME}: mrope_interleaved=True needs mrope_section")
    if c.rope_type == "longrope":
        for name in ("short_factor", "long_factor"):
            vals = getattr(c, name)
            if not vals or not all(_is_number(v) and v > 0 for v in vals):
                raise ValueError(
                    f"{NAME}: {name} must be a sequence of positive numbers; got {name}={vals!r}"
                )
        if len(c.short_factor) != len(c.long_factor):
            raise ValueError(
                f"{NAME}: short_factor and long_factor must have one value per frequency each; got "
                f"{len(c.short_factor)} and {len(c.long_factor)} values"
            )


def check_head_dim(c: RopeConfig, head_dim: int, name: str = NAME) -> int:
    """R for heads of width ``head_dim``: even and ≥ 2, and longrope's factors of length R/2."""
    R = c.rotary_dim(head_dim)
    if R < 2 or R % 2:
        raise ValueError(
            f"{name}: the rotary width must be even and >= 2; got rotary_dim=int(head_dim={head_dim} * "
            f"partial_rotary_factor={c.partial_rotary_factor})={R}"
        )
    if c.rope_type == "longrope" and len(c.short_factor) != R // 2:
        raise ValueError(
            f"{name}: longrope short_factor/long_factor need rotary_dim/2={R // 2} values; got "
            f"{len(c.short_factor)}"
        )
    if c.mrope_section is not None and not c.mrope_interleaved and sum(c.mrope_section) != R // 2:
        raise ValueError(
            f"{name}: mrope_section must add up to the rotary frequencies rotary_dim/2={R // 2}; got "
            f"mrope_section={list(c.mrope_section)} (sum {sum(c.mrope_section)})"
        )
    return R


def mrope_rows(c: RopeConfig, head_dim: int) -> np.ndarray | None:
    """int ``(F,)``: which row of ``position_ids (3, B, T)`` each rotary frequency reads (0 temporal,
    1 height, 2 width), or None without ``mrope_section``. Contiguous (Qwen2-VL): ``section[0]`` zeros,
    ``section[1]`` ones, ``section[2]`` twos. Interleaved (Qwen3-VL, Qwen3.5): frequency ``3i + 1`` reads
    row 1 for ``i < section[1]`` and ``3i + 2`` row 2 for ``i < section[2]``; the rest row 0."""
    if c.mrope_section is None:
        return None
    F = check_head_dim(c, head_dim) // 2
    if not c.mrope_interleaved:
        return np.repeat(np.arange(3), c.mrope_section).astype(np.int32)
    rows = np.zeros(F, np.int32)
    for row in (1, 2):
        rows[row : 3 * c.mrope_section[row] : 3] = row
    return rows


def check_mrope_position_ids(c: RopeConfig | None, shape: tuple[int, ...], B: int, T: int, name: str) -> bool:
    """Whether ``position_ids`` of ``shape`` has three rows ``(3, B, T)`` (multimodal RoPE); ``(B, T)`` is
    one row used for all three. Raises for three rows without ``mrope_section``."""
    if len(shape) == 3 and tuple(shape) == (3, B, T):
        if c is None or c.mrope_section is None:
            raise ValueError(
                f"{name}: position_ids of shape (3, B, T) = {tuple(shape)} need a multimodal RoPE "
                "(rope.mrope_section); this layer's takes (B, T)"
            )
        return True
    return False


def check_position_ids(shape: tuple[int, ...], dtype: str, B: int, T: int, name: str) -> None:
    from attn_spec.checks import INT_DTYPES, fmt_shape

    if tuple(shape) != (B, T):
        raise ValueError(
            f"{name}: position_ids must be (B, T) = ({B}, {T}); got position_ids.shape={fmt_shape(shape)}"
        )
    if dtype not in INT_DTYPES:
        raise ValueError(f"{name}: position_ids must be integers; got position_ids.dtype={dtype}")


# ---------------------------------------------------------------------------------------------------------
# The frequency table, in NumPy, in float32 as transformers computes it (``dtype=np.float64`` for the oracle).
# ---------------------------------------------------------------------------------------------------------


def _exponents(R: int, dt) -> np.ndarray:
    """``2i / R`` for i < F, computed as transformers does: ``arange(0, R, 2)`` cast, then divided."""
    return np.arange(0, R, 2, dtype=np.int64).astype(dt) / dt(R)


def default_inv_freq(theta: float, R: int, dtype=np.float32) -> np.ndarray:
    dt = np.dtype(dtype).type
    return (dt(1.0) / (dt(theta) ** _exponents(R, dt))).astype(dt)


def dynamic_base(c: RopeConfig, R: int, seq_len: float) -> float:
    """dynamic NTK: the rescaled base for ``seq_len`` (clamped below at max_position_embeddings)."""
    L0 = c.max_position_embeddings
    seq_len = max(seq_len, L0)
    return c.rope_theta * ((c.factor * seq_len / L0) - (c.factor - 1)) ** (R / (R - 2))


def _yarn(c: RopeConfig, R: int, dt) -> tuple[np.ndarray, float]:
    factor = (
        c.factor if c.factor is not None else c.max_position_embeddings / c.original_max_position_embeddings
    )

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = c.attention_factor
    if attention_factor is None:
        if c.mscale and c.mscale_all_dim:
            attention_factor = float(get_mscale(factor, c.mscale) / get_mscale(factor, c.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = c.beta_fast or 32, c.beta_slow or 1
    L0, base = c.original_max_position_embeddings, c.rope_theta

    def correction_dim(rotations):  # the dimension whose wavelength turns `rotations` times over L0
        return (R * math.log(L0 / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if c.truncate is None or c.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, R - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = dt(base) ** _exponents(R, dt)
    extrapolation = dt(1.0) / pos_freqs
    interpolation = dt(1.0) / (dt(factor) * pos_freqs)
    ramp = np.clip((np.arange(R // 2, dtype=dt) - dt(low)) / dt(high - low), 0, 1).astype(dt)
    extrapolation_factor = dt(1.0) - ramp
    inv = interpolation * (dt(1.0) - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv.astype(dt), float(attention_factor)


def _llama3(c: RopeConfig, R: int, dt) -> np.ndarray:
    inv = default_inv_freq(c.rope_theta, R, dt)
    L0, lo, hi, factor = c.original_max_position_embeddings, c.low_freq_factor, c.high_freq_factor, c.factor
    low_freq_wavelen, high_freq_wavelen = L0 / lo, L0 / hi
    wavelen = dt(2 * math.pi) / inv
    scaled = np.where(wavelen > low_freq_wavelen, inv / dt(factor), inv)  # long waves: divide by factor
    smooth = (dt(L0) / wavelen - dt(lo)) / dt(hi - lo)  # between the bands: interpolate
    smoothed = (dt(1) - smooth) * scaled / dt(factor) + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(dt)


def longrope_attention_factor(c: RopeConfig) -> float:
    factor = (
        c.factor if c.factor is not None else c.max_position_embeddings / c.original_max_position_embeddings
    )
    if c.attention_factor is not None:
        return float(c.attention_factor)
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(c.original_max_position_embeddings))


def longrope_inv_freq(c: RopeConfig, R: int, long: bool, dtype=np.float32) -> np.ndarray:
    dt = np.dtype(dtype).type
    ext = np.asarray(c.long_factor if long else c.short_factor, dtype=dt)
    return (dt(1.0) / (ext * dt(c.rope_theta) ** _exponents(R, dt))).astype(dt)


def inv_freq(
    c: RopeConfig, head_dim: int, seq_len: int | None = None, dtype=np.float32
) -> tuple[np.ndarray, float]:
    """``(inv_freq (F,), attention_factor)`` for heads of width ``head_dim``, as transformers'
    ``ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len)`` returns them (float32 arithmetic unless
    ``dtype=np.float64``). ``seq_len`` matters only for dynamic and longrope (see the module docstring);
    None means their initial table (dynamic: ``max_position_embeddings``; longrope: short factors)."""
    R = check_head_dim(c, head_dim)
    dt = np.dtype(dtype).type
    t = c.rope_type
    if t == "default":
        return default_inv_freq(c.rope_theta, R, dt), 1.0
    if t == "linear":
        return (default_inv_freq(c.rope_theta, R, dt) / dt(c.factor)).astype(dt), 1.0
    if t == "dynamic":
        base = dynamic_base(c, R, c.max_position_embeddings if seq_len is None else seq_len)
        return default_inv_freq(base, R, dt), 1.0
    if t == "llama3":
        return _llama3(c, R, dt), 1.0
    if t == "proportional":  # Gemma 4: θ^(-2i/H) for the first int(factor · H / 2) frequencies, then zeros
        angles = int(c.partial_rotary_factor * head_dim // 2)
        inv = np.zeros(R // 2, dt)
        inv[:angles] = dt(1.0) / (dt(c.rope_theta) ** (np.arange(0, 2 * angles, 2).astype(dt) / dt(head_dim)))
        return (inv / dt(c.factor if c.factor is not None else 1.0)).astype(dt), 1.0
    if t == "yarn":
        return _yarn(c, R, dt)
    long = seq_len is not None and seq_len > c.original_max_position_embeddings
    return longrope_inv_freq(c, R, long, dt), longrope_attention_factor(c)


# ---------------------------------------------------------------------------------------------------------
# Rotation angles as fixed-point turns: what the twins compute cos/sin from.
# ---------------------------------------------------------------------------------------------------------

TURN_BITS = 32  # the fixed-point turns' integer part: p · hi wraps modulo 2^TURN_BITS, i.e. whole turns


def fixed_point_turns(inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each frequency's turns per position ``c = inv / 2π`` (modulo 1) as ``hi`` uint32 and ``lo`` float32
    ``(F,)``, with ``c ≡ hi · 2^-32 + lo (mod 1)`` and ``0 ≤ lo < 2^-32``, from ``inv`` in float64.

    The angle of an integer position p is then ``2π · (p · hi mod 2^32) · 2^-32 + 2π · p · lo``: the first
    term is exact in 32-bit integer arithmetic (whole turns wrap away; negative positions too), the second
    is below 2^-8 turns for ``|p| < 2^24`` and rounds at ~2^-32 turns. So the angle reaches cos/sin reduced
    to ``[-π/4, π/4]`` with an error of about an ulp there, instead of ``p · inv`` rounded to float32 (an
    error of up to ``ulp(p · inv) / 2``: 2.4e-4 rad at p · inv ≈ 4096) and then reduced by the backend's
    sin/cos."""
    c = np.asarray(inv, np.float64) / (2.0 * np.pi)
    c = c - np.floor(c)  # whole turns per position do not move an integer position's angle
    scaled = c * 2.0**TURN_BITS  # exact (a power of two)
    hi = np.floor(scaled)
    lo = (scaled - hi) * 2.0**-TURN_BITS  # exact in float64, then rounded to float32
    return hi.astype(np.uint32), lo.astype(np.float32)


def _high_bits(x: np.ndarray, keep: int = 12) -> np.ndarray:
    """float32 x with only its first ``keep`` significant bits (the low mantissa bits cleared)."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    return (bits & np.uint32((0xFFFFFFFF << (24 - keep)) & 0xFFFFFFFF)).view(np.float32)


def _turns_per_radian_parts() -> tuple[np.float32, np.float32, np.float32]:
    """``2^32 / 2π`` as three float32 parts, the first two of 12 significant bits each: their products with
    a float32 split into two 12-bit halves are exact."""
    k = 2.0**TURN_BITS / (2.0 * np.pi)
    k1 = _high_bits(np.float32(k))
    k2 = _high_bits(np.float32(k - np.float64(k1)))
    k3 = np.float32(k - np.float64(k1) - np.float64(k2))
    return k1[()], k2[()], k3


# For the twins' float32 tables computed at run time (dynamic past its length): ``inv · 2^32 / 2π`` as a
# sum of exact products (``inv``'s 12-bit halves times these), floored into integer turns one by one.
TURNS_PER_RADIAN_PARTS = _turns_per_radian_parts()
HIGH_12_BITS_MASK = 0xFFFFF000  # the float32 bits of the first 12 significant bits (sign, exponent kept)


def rope_turns(c: RopeConfig, head_dim: int, long: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """``(hi, lo, attention_factor)``: :func:`fixed_point_turns` of the float64 frequency table of
    ``rope_type`` (the formulas the float64 oracle uses); ``long`` selects longrope's long factors. dynamic:
    its table at ``seq_len <= max_position_embeddings`` (the default one; longer calls rescale the base from
    the call's length, which the twins compute in float32 as transformers does)."""
    R = check_head_dim(c, head_dim)
    if c.rope_type == "longrope":
        return (*fixed_point_turns(longrope_inv_freq(c, R, long, np.float64)), longrope_attention_factor(c))
    inv, factor = inv_freq(c, head_dim, dtype=np.float64)
    return (*fixed_point_turns(inv), factor)


# ---------------------------------------------------------------------------------------------------------
# Layout permutation of q/k projection weights.
# ---------------------------------------------------------------------------------------------------------


def rotary_permutation(num_heads: int, head_dim: int, rotary_dim: int, src: str, dst: str) -> np.ndarray:
    """Row indices ``perm (num_heads·head_dim,)`` with ``w_dst = w_src[perm]`` for a q or k projection's
    weight ``(heads·H, E)`` or bias ``(heads·H,)``: a model whose q/k projections are permuted this way
    gives the same output in layout ``dst`` as the original in ``src``. Only the first ``rotary_dim``
    channels of each head move; the rest pass through."""
    for arg, val in (("src", src), ("dst", dst)):
        if val not in LAYOUTS:
            raise ValueError(f"rotary_permutation: {arg} must be one of {LAYOUTS}; got {arg}={val!r}")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(
            f"rotary_permutation: rotary_dim must be even, >= 2 and <= head_dim={head_dim}; got {rotary_dim}"
        )
    F = rotary_dim // 2
    # Channel j of the half layout is pair j's first element (j < F) or pair j-F's second.
    to_half = np.concatenate([np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2)])
    if src == dst:
        head = np.arange(rotary_dim)
    elif dst == "half":
        head = to_half
    else:
        head = np.argsort(to_half)
    head = np.concatenate([head, np.arange(rotary_dim, head_dim)])
    assert F * 2 == rotary_dim
    return (np.arange(num_heads)[:, None] * head_dim + head[None, :]).reshape(-1)
