"""A tiny GPT (PyTorch twin of ``jax_attn/gpt.py``) for training-step agreement.

Token embedding + learned positions + pre-LayerNorm blocks (``CausalSelfAttention`` + GELU MLP) + a tied
or untied output head. Dropout is off: training agreement across frameworks needs identical randomness,
which only an injected mask gives, so the model has none.

Dimension key: B batch, T sequence, E width (n_embd), V vocabulary.
State-dict keys (the same on both sides): ``wte.weight (V, E)``, ``wpe.weight (block_size, E)``,
``h.{i}.ln_1.weight``, ``h.{i}.ln_1.bias``, ``h.{i}.attn.*`` (``CausalSelfAttention``'s own keys),
``h.{i}.ln_2.*``, ``h.{i}.mlp.c_fc.weight (4E, E)``, ``h.{i}.mlp.c_fc.bias``, ``h.{i}.mlp.c_proj.weight
(E, 4E)``, ``h.{i}.mlp.c_proj.bias``, ``ln_f.weight``, ``ln_f.bias``, and ``lm_head.weight (V, E)`` when
untied. Linear weights are torch-layout (out, in).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attn_spec.gpt import GPTConfig, check_tokens
from torch_attn.causal import CausalSelfAttention


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        E = config.n_embd
        self.c_fc = nn.Linear(E, 4 * E, bias=config.bias)
        self.c_proj = nn.Linear(4 * E, E, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu_approximate else "none")

    def forward(self, x_BTE: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x_BTE)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        E = config.n_embd
        self.ln_1 = nn.LayerNorm(E, eps=config.ln_eps, bias=config.bias)
        self.attn = CausalSelfAttention(E, config.n_head, config.kv_heads, bias=config.bias)
        self.ln_2 = nn.LayerNorm(E, eps=config.ln_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x_BTE: torch.Tensor) -> torch.Tensor:
        x_BTE = x_BTE + self.attn(self.ln_1(x_BTE))
        return x_BTE + self.mlp(self.ln_2(x_BTE))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, seed: int | None = None):
        super().__init__()
        self.config = config
        if seed is not None:
            torch.manual_seed(seed)
        E = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, E)
        self.wpe = nn.Embedding(config.block_size, E)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(E, eps=config.ln_eps, bias=config.bias)
        self.lm_head = None if config.tie_weights else nn.Linear(E, config.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 / nanoGPT: N(0, 0.02) for matrices and embeddings, zero biases, and residual projections
        # scaled by 1/sqrt(2·n_layer).
        residual = ("mlp.c_proj.weight", "attn.out_proj.weight")
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith(residual) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias") and "ln_" not in name:
                nn.init.zeros_(p)

    def forward(self, idx_BT: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` → logits ``(B, T, V)``."""
        check_tokens(tuple(idx_BT.shape), str(idx_BT.dtype).removeprefix("torch."), self.config)
        T = idx_BT.shape[1]
        x_BTE = self.wte(idx_BT) + self.wpe(torch.arange(T, device=idx_BT.device))
        for block in self.h:
            x_BTE = block(x_BTE)
        x_BTE = self.ln_f(x_BTE)
        if self.lm_head is None:
            return x_BTE @ self.wte.weight.T
        return self.lm_head(x_BTE)

    def loss(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy."""
        logits_BTV = self(idx_BT)
        return F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1))

    def torch_state_dict(self) -> dict:
        """The state dict as NumPy arrays (the JAX twin's method of the same name returns the same keys)."""
        return {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}

    def load_torch_state_dict(self, state_dict) -> None:
        self.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()}, strict=True)
