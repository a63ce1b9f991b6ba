"""A tiny GPT (JAX/Flax twin of ``torch_attn/gpt.py``) for training-step agreement.

Token embedding + learned positions + pre-LayerNorm blocks (``CausalSelfAttention`` + GELU MLP) + a tied
or untied output head. Dropout is off: training agreement across frameworks needs identical randomness,
which only an injected mask gives, so the model has none.

Dimension key: B batch, T sequence, E width (n_embd), V vocabulary.
State-dict keys (the same on both sides): ``wte.weight (V, E)``, ``wpe.weight (block_size, E)``,
``h.{i}.ln_1.weight``, ``h.{i}.ln_1.bias``, ``h.{i}.attn.*`` (``CausalSelfAttention``'s own keys),
``h.{i}.ln_2.*``, ``h.{i}.mlp.c_fc.weight (4E, E)``, ``h.{i}.mlp.c_fc.bias``, ``h.{i}.mlp.c_proj.weight
(E, 4E)``, ``h.{i}.mlp.c_proj.bias``, ``ln_f.weight``, ``ln_f.bias``, and ``lm_head.weight (V, E)`` when
untied. Linear weights are torch-layout (out, in); flax kernels are their transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attn_spec.gpt import GPTConfig, check_tokens
from jax_attn.causal import CausalSelfAttention


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        E = config.n_embd
        self.c_fc = nnx.Linear(E, 4 * E, use_bias=config.bias, rngs=rngs)
        self.c_proj = nnx.Linear(4 * E, E, use_bias=config.bias, rngs=rngs)
        self.gelu_approximate = config.gelu_approximate

    def __call__(self, x_BTE: jnp.ndarray) -> jnp.ndarray:
        return self.c_proj(jax.nn.gelu(self.c_fc(x_BTE), approximate=self.gelu_approximate))


class Block(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        E = config.n_embd
        self.ln_1 = nnx.LayerNorm(E, epsilon=config.ln_eps, use_bias=config.bias, rngs=rngs)
        self.attn = CausalSelfAttention(E, config.n_head, config.kv_heads, bias=config.bias, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(E, epsilon=config.ln_eps, use_bias=config.bias, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x_BTE: jnp.ndarray) -> jnp.ndarray:
        x_BTE = x_BTE + self.attn(self.ln_1(x_BTE))
        return x_BTE + self.mlp(self.ln_2(x_BTE))


class GPT(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        E = config.n_embd
        init = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(config.vocab_size, E, embedding_init=init, rngs=rngs)
        self.wpe = nnx.Embed(config.block_size, E, embedding_init=init, rngs=rngs)
        self.h = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layer)])
        self.ln_f = nnx.LayerNorm(E, epsilon=config.ln_eps, use_bias=config.bias, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_weights
            else nnx.Linear(E, config.vocab_size, use_bias=False, kernel_init=init, rngs=rngs)
        )

    def __call__(self, idx_BT: jnp.ndarray) -> jnp.ndarray:
        """Token ids ``(B, T)`` → logits ``(B, T, V)``."""
        check_tokens(tuple(idx_BT.shape), jnp.dtype(idx_BT.dtype).name, self.config)
        T = idx_BT.shape[1]
        x_BTE = self.wte(idx_BT) + self.wpe(jnp.arange(T))
        for block in self.h:
            x_BTE = block(x_BTE)
        x_BTE = self.ln_f(x_BTE)
        if self.lm_head is None:
            return self.wte.attend(x_BTE)
        return self.lm_head(x_BTE)

    def loss(self, idx_BT: jnp.ndarray, targets_BT: jnp.ndarray) -> jnp.ndarray:
        """Mean next-token cross entropy."""
        logits_BTV = self(idx_BT)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()

    def _torch_keyed_params(self) -> dict[str, tuple[nnx.Param, bool]]:
        """``{torch key: (flax Param, transposed?)}`` for every parameter but the attention's own."""
        out = {"wte.weight": (self.wte.embedding, False), "wpe.weight": (self.wpe.embedding, False)}

        def linear(prefix, layer):
            out[f"{prefix}.weight"] = (layer.kernel, True)
            if layer.bias is not None:
                out[f"{prefix}.bias"] = (layer.bias, False)

        def norm(prefix, layer):
            out[f"{prefix}.weight"] = (layer.scale, False)
            if layer.bias is not None:
                out[f"{prefix}.bias"] = (layer.bias, False)

        for i, block in enumerate(self.h):
            norm(f"h.{i}.ln_1", block.ln_1)
            norm(f"h.{i}.ln_2", block.ln_2)
            linear(f"h.{i}.mlp.c_fc", block.mlp.c_fc)
            linear(f"h.{i}.mlp.c_proj", block.mlp.c_proj)
        norm("ln_f", self.ln_f)
        if self.lm_head is not None:
            linear("lm_head", self.lm_head)
        return out

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """Parameters under the torch twin's state-dict keys, torch layout, as NumPy arrays."""
        sd = {}
        for key, (param, transposed) in self._torch_keyed_params().items():
            value = np.asarray(param[...])
            sd[key] = value.T if transposed else value
        for i, block in enumerate(self.h):
            sd.update({f"h.{i}.attn.{k}": v for k, v in block.attn.torch_state_dict().items()})
        return sd

    def load_torch_state_dict(self, state_dict) -> None:
        """Load torch-layout arrays (NumPy, torch tensors, anything ``np.asarray`` takes); strict."""
        state_dict = {
            k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for k, v in state_dict.items()
        }
        params = self._torch_keyed_params()
        attn_keys = {k for k in state_dict if ".attn." in k}
        missing = set(params) - set(state_dict)
        unexpected = set(state_dict) - set(params) - attn_keys
        if missing or unexpected:
            raise ValueError(
                f"GPT.load_torch_state_dict: missing keys {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        for key, (param, transposed) in params.items():
            value = state_dict[key].T if transposed else state_dict[key]
            if value.shape != param.shape:
                raise ValueError(
                    f"GPT.load_torch_state_dict: {key} has shape {state_dict[key].shape}; expected "
                    f"{param.shape[::-1] if transposed else param.shape}"
                )
            param[...] = jnp.asarray(value, dtype=param.dtype)
        for i, block in enumerate(self.h):
            prefix = f"h.{i}.attn."
            block.attn.load_torch_state_dict(
                {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            )
