"""Hugging Face attention layers in PyTorch (twin of ``jax_attn/hf.py``; imports no jax, and transformers only
through the module it is given).

``from_hf(module)`` ports a transformers attention module (``module.config``, ``module.state_dict()``),
``load_layer(checkpoint_dir, layer)`` one layer of a local safetensors checkpoint, ``to_hf_state_dict(attn,
family)`` gives the weights back in the family's names and layout (``attn_spec.hf`` describes the families).
Weights travel through NumPy as raw bits (bf16 as int16), so every conversion is bit-exact.
"""

from __future__ import annotations

import numpy as np
import torch

from attn_spec import hf as spec
from torch_attn.attention import Attention


def _to_bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _from_bits(a: np.ndarray, dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _build(c, ours: dict, dtype, implementation, training: bool, device=None) -> Attention:
    attn = Attention(c, implementation=implementation, dtype=dtype, device=device)
    attn.load_torch_state_dict({k: _from_bits(a, dtype).to(device) for k, a in ours.items()})
    return attn.train(training)


def from_hf(module, *, post_norm_outside: bool = False, implementation: str | None = None) -> Attention:
    """A transformers attention module → :class:`Attention` with its configuration, weights (fp32, bf16 and
    fp16 kept as they are), device and train/eval mode.

    Args:
      module: a decoder layer's ``self_attn`` (``attention`` for GPT-NeoX, ``attn`` for GPT-2), ViT's
        ``ViTAttention`` or BERT's ``BertAttention`` (see ``attn_spec.hf.describe_module``).
      post_norm_outside: BERT only: port up to ``output.dense``; the residual LayerNorm stays with the caller.
      implementation: the :class:`Attention` implementation (None: auto).

    Raises:
      ValueError: a config knob or module attribute this port cannot express, named.
    """
    family, c = spec.describe_module(module, post_norm_outside)
    sd = module.state_dict()
    dtypes = {t.dtype for t in sd.values()}
    if len(dtypes) != 1:
        raise ValueError(
            f"{spec.NAME}: the attention's parameters have mixed dtypes {sorted(map(str, dtypes))}"
        )
    dtype = dtypes.pop()
    device = next(iter(sd.values())).device
    ours = spec.from_hf({k: _to_bits(v) for k, v in sd.items()}, family, c)
    return _build(c, ours, dtype, implementation, bool(getattr(module, "training", False)), device)


def load_layer(checkpoint_dir, layer: int = 0, *, implementation: str | None = None) -> Attention:
    """Layer ``layer``'s attention of a local checkpoint directory (``config.json`` and safetensors, sharded
    through ``model.safetensors.index.json`` or not); in eval mode, in the checkpoint's dtype."""
    _, c, ours, dtype = spec.read_layer(checkpoint_dir, layer)
    dt = getattr(torch, dtype)
    if dt == torch.bfloat16:
        ours = {k: a.view(np.int16) for k, a in ours.items()}
    return _build(c, ours, dt, implementation, training=False)


def to_hf_state_dict(attn: Attention, family: str) -> dict[str, torch.Tensor]:
    """``attn``'s weights under ``family``'s names and layout; ``from_hf`` followed by this is bit-exact."""
    spec.check_family(family, "to_hf_state_dict")
    sd = attn.torch_state_dict()
    dtype = next(iter(sd.values())).dtype
    hf = spec.to_hf({k: _to_bits(v) for k, v in sd.items()}, family, attn.config)
    return {k: _from_bits(a, dtype) for k, a in hf.items()}
