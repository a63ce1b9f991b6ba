"""The table's entries for modules that land later (MultiheadAttention, CausalSelfAttention) work against
their announced contract: minimal stand-ins with that signature are patched in and each entry is built
and stepped once per mode. Once the real modules exist, the same entries measure them."""

import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx

import jax_attn
import torch_attn
from compare.bench import impls
from compare.bench.flops import FORWARD, FORWARD_BACKWARD
from compare.bench.presets import Case


class JaxMHA(nnx.Module):
    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, batch_first=False, *, rngs):
        self.num_heads, self.batch_first = num_heads, batch_first
        self.in_proj = nnx.Linear(embed_dim, 3 * embed_dim, rngs=rngs)
        self.out_proj = nnx.Linear(embed_dim, embed_dim, rngs=rngs)

    def __call__(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        assert self.batch_first and query.ndim == 3
        B, T, E = query.shape
        q, k, v = jnp.split(self.in_proj(query), 3, axis=-1)
        heads = lambda x: x.reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)
        keep = None if attn_mask is None else ~attn_mask  # MHA polarity in, SDPA polarity inside
        out, w = jax_attn.scaled_dot_product_attention_with_weights(heads(q), heads(k), heads(v), keep)
        out = self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, T, E))
        return out, (w.mean(1) if need_weights else None)


class JaxCSA(nnx.Module):
    def __init__(
        self, embed_dim, num_heads, num_kv_heads=None, bias=True, dropout=0.0, *, implementation="math", rngs
    ):
        self.implementation = implementation
        self.mha = JaxMHA(embed_dim, num_heads, batch_first=True, rngs=rngs)

    def __call__(self, x):
        T = x.shape[1]
        return self.mha(x, x, x, attn_mask=jnp.triu(jnp.ones((T, T), bool), 1), need_weights=False)[0]


class TorchMHA(torch.nn.MultiheadAttention):
    """The contract is torch.nn.MultiheadAttention's own."""


class TorchCSA(torch.nn.Module):
    def __init__(
        self, embed_dim, num_heads, num_kv_heads=None, bias=True, dropout=0.0, *, implementation="math"
    ):
        super().__init__()
        self.implementation = implementation
        self.mha = torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)

    def forward(self, x):
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        return self.mha(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)[0]


@pytest.fixture
def contract(monkeypatch):
    monkeypatch.setattr(jax_attn, "MultiheadAttention", JaxMHA, raising=False)
    monkeypatch.setattr(jax_attn, "CausalSelfAttention", JaxCSA, raising=False)
    monkeypatch.setattr(torch_attn, "MultiheadAttention", TorchMHA, raising=False)
    monkeypatch.setattr(torch_attn, "CausalSelfAttention", TorchCSA, raising=False)


ENTRIES = [
    "jax_attn.MHA[jit]",
    "jax_attn.MHA[jit,weights]",
    "jax_attn.CSA[jit]",
    "torch_attn.MHA[eager]",
    "torch_attn.MHA[eager,weights]",
    "torch_attn.CSA[eager]",
    "flax.nnx.MHA[jit]",
    "torch.nn.MHA[eager]",
]


@pytest.mark.parametrize(
    "name,mode",
    [(n, FORWARD_BACKWARD) for n in ENTRIES]
    + [(n, FORWARD) for n in ENTRIES if "weights" in n or "torch" in n],
)
def test_module_entries_build_and_step(contract, name, mode):
    impl = impls.by_name()[name]
    assert impls.availability(impl) is None
    case = Case(B=2, N=2, T=6, H=4, causal=True, dtype="float32", mode=mode)
    prepared = impl.build(case, impls.Context("cpu"))
    out = prepared.step()
    prepared.sync(out)
    leaves = (
        jax.tree_util.tree_leaves(out)
        if impl.framework == "jax"
        else list(out if isinstance(out, tuple) else [out])
    )
    assert leaves and all(
        bool(jnp.all(jnp.isfinite(jnp.asarray(x.detach().numpy() if hasattr(x, "detach") else x))))
        for x in leaves
    )
    if mode == FORWARD_BACKWARD and impl.framework == "torch":
        assert len(leaves) > 1, "gradients w.r.t. the input and the parameters"
