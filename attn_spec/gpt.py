"""Configuration of the tiny GPT used for training-step agreement, shared by both twins.

The fields that silently differ between the frameworks' defaults are explicit here and set the same on
both sides: LayerNorm epsilon (torch 1e-5, flax 1e-6) and the GELU flavour (torch exact erf, jax tanh).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 64  # V: tokens in the vocabulary
    block_size: int = 32  # longest sequence; the number of learned positions
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # N: query heads
    n_kv_head: int | None = None  # K: key/value heads (GQA); None means n_head
    n_embd: int = 64  # E: model width
    bias: bool = True  # biases in Linear and LayerNorm layers
    tie_weights: bool = True  # output head reuses the token embedding
    ln_eps: float = 1e-5  # LayerNorm epsilon, identical on both sides (torch's default)
    gelu_approximate: bool = (
        True  # tanh GELU on both sides (torch: approximate="tanh"; jax: approximate=True)
    )

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int; got {name}={val!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        kv = self.kv_heads
        if kv < 1 or self.n_head % kv:
            raise ValueError(f"GPTConfig: n_kv_head={kv} must divide n_head={self.n_head}")
        if not self.ln_eps > 0:
            raise ValueError(f"GPTConfig: ln_eps must be positive; got {self.ln_eps!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    def as_dict(self) -> dict:
        return asdict(self)


def check_tokens(shape: tuple[int, ...], dtype: str, config: GPTConfig, name: str = "GPT") -> None:
    """Token ids must be integer ``(B, T)`` with ``T <= block_size``."""
    if not dtype.startswith(("int", "uint")):
        raise ValueError(f"{name}: token ids must be integers; got idx.dtype={dtype}")
    if len(shape) != 2:
        raise ValueError(f"{name}: token ids must be (B, T); got idx.shape={tuple(shape)}")
    if shape[1] > config.block_size:
        raise ValueError(
            f"{name}: sequence length T={shape[1]} exceeds block_size={config.block_size} "
            f"(idx.shape={tuple(shape)})"
        )
