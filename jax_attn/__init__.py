"""JAX/Flax attention with PyTorch's semantics. Twin of ``torch_attn``; imports no torch."""

from jax_attn.attention import Attention
from jax_attn.causal import CausalSelfAttention, KVCache
from jax_attn.flex import AuxOutput, AuxRequest, BlockMask, create_block_mask, flex_attention
from jax_attn.functional import (
    masked_softmax,
    scaled_dot_product_attention,
    scaled_dot_product_attention_with_weights,
    select_implementation,
)
from jax_attn.masks import (
    additive_to_keep,
    causal_mask,
    keep_to_additive,
    keep_to_masked,
    masked_to_keep,
    padding_mask,
)
from jax_attn.mha import MultiheadAttention, multi_head_attention_forward
from jax_attn.mla import MLACache, MultiHeadLatentAttention

__all__ = [
    "Attention",
    "AuxOutput",
    "AuxRequest",
    "BlockMask",
    "CausalSelfAttention",
    "KVCache",
    "additive_to_keep",
    "causal_mask",
    "create_block_mask",
    "flex_attention",
    "keep_to_additive",
    "keep_to_masked",
    "masked_softmax",
    "masked_to_keep",
    "multi_head_attention_forward",
    "MLACache",
    "MultiheadAttention",
    "MultiHeadLatentAttention",
    "padding_mask",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_with_weights",
    "select_implementation",
]
