"""The seed articles' usage patterns, in both frameworks, with the same numbers."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_attn
import torch_attn


def _close(a, b, atol=1e-5):
    a = a.detach().numpy() if hasattr(a, "detach") else np.asarray(a)
    b = b.detach().numpy() if hasattr(b, "detach") else np.asarray(b)
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def test_seed_000_cross_attention_shapes_and_values():
    embed_dim, num_heads = 16, 4
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(embed_dim, num_heads).eval()
    query, key, value = (
        torch.randn(10, 3, embed_dim),
        torch.randn(20, 3, embed_dim),
        torch.randn(20, 3, embed_dim),
    )
    output, attention_weights = mha(query, key, value)
    assert output.shape == (10, 3, embed_dim) and attention_weights.shape == (3, 10, 20)
    jm = jax_attn.MultiheadAttention.from_torch(mha)
    jo, jw = jm(*(jnp.asarray(t.numpy()) for t in (query, key, value)))
    to, tw = torch_attn.MultiheadAttention.from_torch(mha)(query, key, value)
    for got in (jo, to):
        _close(got, output)
    for got in (jw, tw):
        _close(got, attention_weights)


def test_seed_002_causal_mask_gives_lower_triangular_weights():
    torch.manual_seed(0)
    A = torch.randn(5, 2, 4)
    M = torch.nn.MultiheadAttention(embed_dim=4, num_heads=2).eval()
    attention_mask = ~torch.tril(torch.ones([A.shape[0], A.shape[0]])).bool()  # True = masked out
    _, w = M(A, A, A, attn_mask=attention_mask)
    jm = jax_attn.MultiheadAttention.from_torch(M)
    _, jw = jm(
        jnp.asarray(A.numpy()),
        jnp.asarray(A.numpy()),
        jnp.asarray(A.numpy()),
        attn_mask=jnp.asarray(attention_mask.numpy()),
    )
    _, tw = torch_attn.MultiheadAttention.from_torch(M)(A, A, A, attn_mask=attention_mask)
    for got in (jw, tw):
        _close(got, w)
        got = np.asarray(got.detach() if hasattr(got, "detach") else got)
        assert np.all(np.triu(got, k=1) == 0)  # exactly zero above the diagonal
        np.testing.assert_allclose(got[:, 0, 0], 1.0, rtol=1e-6)
    # the helper says the same thing in the library's keep polarity
    assert np.array_equal(
        np.asarray(jax_attn.keep_to_masked(jax_attn.causal_mask(5))), attention_mask.numpy()
    )


@pytest.mark.parametrize("valid_lens", [[3, 5], [1, 4]])
def test_seed_003_valid_lens_via_padding_mask(valid_lens):
    """d2l's masked_softmax(X, valid_lens): keys past each sequence's length are ignored."""
    N, S, E = 2, 5, 6
    torch.manual_seed(1)
    builtin = torch.nn.MultiheadAttention(E, 3, batch_first=True).eval()
    x = torch.randn(N, S, E)
    kpm = ~torch_attn.padding_mask(torch.tensor(valid_lens), S)  # keep -> torch polarity
    want, want_w = builtin(x, x, x, key_padding_mask=kpm)
    jkpm = jax_attn.keep_to_masked(jax_attn.padding_mask(jnp.asarray(valid_lens), S))
    jm = jax_attn.MultiheadAttention.from_torch(builtin)
    jo, jw = jm(jnp.asarray(x.numpy()), jnp.asarray(x.numpy()), jnp.asarray(x.numpy()), key_padding_mask=jkpm)
    _close(jo, want)
    _close(jw, want_w)
    for n, length in enumerate(valid_lens):
        assert np.all(np.asarray(jw)[n, :, length:] == 0)


class TorchCNNAttentionBlock(torch.nn.Module):
    """Seed 004: (N, C, L) -> (N, L, C) -> MHA(batch_first) -> residual + LayerNorm -> (N, C, L)."""

    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(embed_dim=embed_dim, num_heads=num_heads, batch_first=True)
        self.norm = torch.nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = x.permute(0, 2, 1)
        attn, _ = self.mha(x, x, x)
        return self.norm(x + attn).permute(0, 2, 1)


class JaxCNNAttentionBlock(nnx.Module):
    """The same block in Flax NNX, built from the torch one (LayerNorm eps is torch's 1e-5, not flax's
    1e-6 default: see docs/porting.md)."""

    def __init__(self, torch_block: TorchCNNAttentionBlock):
        self.mha = jax_attn.MultiheadAttention.from_torch(torch_block.mha)
        C = torch_block.norm.normalized_shape[0]
        self.norm = nnx.LayerNorm(C, epsilon=torch_block.norm.eps, rngs=nnx.Rngs(0))
        self.norm.scale.set_value(jnp.asarray(torch_block.norm.weight.detach().numpy()))
        self.norm.bias.set_value(jnp.asarray(torch_block.norm.bias.detach().numpy()))

    def __call__(self, x):
        x = jnp.transpose(x, (0, 2, 1))
        attn, _ = self.mha(x, x, x)
        return jnp.transpose(self.norm(x + attn), (0, 2, 1))


def test_seed_004_cnn_block_agrees():
    torch.manual_seed(2)
    block = TorchCNNAttentionBlock(embed_dim=16, num_heads=8).eval()
    with torch.no_grad():
        block.norm.weight.add_(torch.randn(16) * 0.1)
        block.norm.bias.add_(torch.randn(16) * 0.1)
    cnn_output = torch.randn(4, 16, 32)  # (N, C, L), smaller than the seed's (32, 64, 1024)
    want = block(cnn_output)
    got = JaxCNNAttentionBlock(block)(jnp.asarray(cnn_output.numpy()))
    assert got.shape == want.shape == cnn_output.shape
    _close(got, want, atol=2e-5)


class BlogSelfAttention(torch.nn.Module):
    """Seed 001's blog SelfAttention, verbatim in substance: one Linear(head_dim, head_dim) shared by all
    heads, logits scaled by sqrt(embed_size) instead of sqrt(head_dim), -1e20 mask fill."""

    def __init__(self, embed_size, heads):
        super().__init__()
        self.embed_size, self.heads, self.head_dim = embed_size, heads, embed_size // heads
        self.values = torch.nn.Linear(self.head_dim, self.head_dim, bias=False)
        self.keys = torch.nn.Linear(self.head_dim, self.head_dim, bias=False)
        self.queries = torch.nn.Linear(self.head_dim, self.head_dim, bias=False)
        self.fc_out = torch.nn.Linear(heads * self.head_dim, embed_size)

    def forward(self, values, keys, queries):
        N, L = queries.shape[0], queries.shape[1]
        split = lambda x: x.reshape(N, -1, self.heads, self.head_dim)  # noqa: E731
        v, k, q = self.values(split(values)), self.keys(split(keys)), self.queries(split(queries))
        energy = torch.einsum("nqhd,nkhd->nhqk", q, k)
        attention = torch.softmax(energy / (self.embed_size ** (1 / 2)), dim=3)
        out = torch.einsum("nhql,nlhd->nqhd", attention, v).reshape(N, L, self.heads * self.head_dim)
        return self.fc_out(out), attention


def test_seed_001_blog_self_attention_is_not_multihead_attention():
    """Given the blog's weights placed in a real MHA (its shared per-head projection repeated block-
    diagonally), MHA differs from the blog only by the scale: sqrt(E) vs sqrt(head_dim)."""
    E, H = 16, 4
    D = E // H
    torch.manual_seed(3)
    blog = BlogSelfAttention(E, H).eval()
    x = torch.randn(2, 5, E)
    blog_out, blog_w = blog(x, x, x)

    def block_diag(w):  # the one shared (D, D) projection, applied to every head
        return torch.block_diag(*[w] * H)

    sd = {
        "in_proj_weight": torch.cat([block_diag(m.weight) for m in (blog.queries, blog.keys, blog.values)]),
        "in_proj_bias": torch.zeros(3 * E),
        "out_proj.weight": blog.fc_out.weight,
        "out_proj.bias": blog.fc_out.bias,
    }
    mha = jax_attn.MultiheadAttention.from_state_dict(sd, E, H, batch_first=True)
    mha.eval()
    jx = jnp.asarray(x.numpy())
    out, w = mha(jx, jx, jx, average_attn_weights=False)
    # Multi-head attention's logits are scaled by 1/sqrt(D); the blog's by 1/sqrt(E), i.e. its softmax is
    # sqrt(E/D) = 2x too flat here. The outputs differ by O(0.1), not by rounding:
    assert float(np.abs(np.asarray(out) - blog_out.detach().numpy()).max()) > 1e-2
    # ... and the blog equals MHA run at temperature sqrt(E/D): rescale the query projection to show it.
    sd_scaled = dict(sd, in_proj_weight=sd["in_proj_weight"].clone())
    sd_scaled["in_proj_weight"][:E] *= np.sqrt(D / E)
    fixed = jax_attn.MultiheadAttention.from_state_dict(sd_scaled, E, H, batch_first=True)
    fixed_out, fixed_w = fixed(jx, jx, jx, average_attn_weights=False)
    _close(fixed_out, blog_out)
    _close(fixed_w, blog_w)
    # One Linear(D, D) for all heads is also fewer parameters than MHA's (3E, E) in-projection.
    blog_in = sum(p.numel() for m in (blog.queries, blog.keys, blog.values) for p in m.parameters())
    assert (blog_in, 3 * E * E) == (3 * D * D, 768)
