"""Hugging Face attention layers in JAX (twin of ``torch_attn/hf.py``; imports no torch, no transformers).

``from_hf(module)`` ports a transformers attention module (read duck-typed: ``module.config``,
``module.state_dict()``), ``load_layer(checkpoint_dir, layer)`` one layer of a local safetensors checkpoint
(NumPy only), ``to_hf_state_dict(attn, family)`` gives the weights back in the family's names and layout.
The families, their fused layouts and the knobs that raise are described in ``attn_spec.hf``.

The ported :class:`jax_attn.attention.Attention` is called as ``y = attn(x, attention_mask, position_ids)``
with ``x (B, T, E)`` the layer's input hidden states, ``attention_mask`` the ``(B, T)`` 1/0 padding mask
and ``position_ids`` defaulting to ``0..T-1`` (for left padding pass ``cumsum(mask) - 1``), and with
``cache=`` for decoding.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from attn_spec import hf as spec
from attn_spec.attention import check_state_dict
from jax_attn.attention import Attention
from jax_attn.causal import _to_numpy


def _from_bits(a: np.ndarray, dtype: str) -> np.ndarray:
    return a.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else a


def _build(c, ours: dict, implementation, training: bool) -> Attention:
    dtypes = {a.dtype for a in ours.values()}
    if len(dtypes) != 1:
        raise ValueError(
            f"{spec.NAME}: the attention's parameters have mixed dtypes {sorted(map(str, dtypes))}"
        )
    dtype = jnp.dtype(dtypes.pop())
    # Built abstractly (no random initialization to compile and run), then given the weights.
    attn = nnx.eval_shape(
        lambda: Attention(c, implementation=implementation, rngs=nnx.Rngs(0), param_dtype=dtype)
    )
    for key in check_state_dict({k: a.shape for k, a in ours.items()}, c):
        attn._param(key).set_value(jnp.asarray(ours[key], dtype))
    if c.dropout > 0.0:  # a concrete dropout stream, as the constructor forks it
        attn.rngs = nnx.Rngs(0)["dropout"].fork()
    attn.deterministic = not training
    return attn


def from_hf(module, *, post_norm_outside: bool = False, implementation: str | None = None) -> Attention:
    """A transformers attention module → :class:`Attention` with its configuration, weights (fp32, bf16 and
    fp16 kept as they are) and train/eval mode.

    Args:
      module: a decoder layer's ``self_attn`` (``attention`` for GPT-NeoX, ``attn`` for GPT-2), ViT's
        ``ViTAttention`` or BERT's ``BertAttention`` (see ``attn_spec.hf.describe_module``).
      post_norm_outside: BERT only: port up to ``output.dense``; the residual LayerNorm stays with the caller.
      implementation: the :class:`Attention` implementation (None: auto).

    Raises:
      ValueError: a config knob or module attribute this port cannot express, named.
    """
    family, c = spec.describe_module(module, post_norm_outside)
    sd = {k: _to_numpy(v) for k, v in module.state_dict().items()}
    return _build(c, spec.from_hf(sd, family, c), implementation, bool(getattr(module, "training", False)))


def load_layer(checkpoint_dir, layer: int = 0, *, implementation: str | None = None) -> Attention:
    """Layer ``layer``'s attention of a local checkpoint directory (``config.json`` and safetensors, sharded
    through ``model.safetensors.index.json`` or not), read with NumPy only; in eval mode, in the
    checkpoint's dtype."""
    _, c, ours, dtype = spec.read_layer(checkpoint_dir, layer)
    return _build(c, {k: _from_bits(a, dtype) for k, a in ours.items()}, implementation, training=False)


def to_hf_state_dict(attn: Attention, family: str) -> dict[str, np.ndarray]:
    """``attn``'s weights under ``family``'s names and layout (NumPy, bf16 as ``ml_dtypes.bfloat16``);
    ``from_hf`` followed by this is bit-exact."""
    spec.check_family(family, "to_hf_state_dict")
    return spec.to_hf(attn.torch_state_dict(), family, attn.config)
