"""PyTorch attention, the readable twin of ``jax_attn``; imports no jax."""

from torch_attn.attention import Attention
from torch_attn.causal import CausalSelfAttention, KVCache
from torch_attn.flex import AuxOutput, AuxRequest, BlockMask, create_block_mask, flex_attention
from torch_attn.functional import (
    masked_softmax,
    scaled_dot_product_attention,
    scaled_dot_product_attention_with_weights,
    select_implementation,
)
from torch_attn.masks import (
    additive_to_keep,
    causal_mask,
    keep_to_additive,
    keep_to_masked,
    masked_to_keep,
    padding_mask,
)
from torch_attn.mha import MultiheadAttention, multi_head_attention_forward
from torch_attn.mla import MLACache, MultiHeadLatentAttention

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
