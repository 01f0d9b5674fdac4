"""gpt-fast-style tiny models: their own attention over static KV buffers written at input_pos, no transformers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

class Attention(nn.Module):
    """SDPA with the causal mask of input_pos, or the same as eager math (matmul, masked_fill, softmax, matmul)."""

    def __init__(self, dim, heads, kv_heads, max_len, eager):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eager = heads, kv_heads, dim // heads, eager
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, kv_heads, max_len, self.head_dim))
        self.register_buffer("v_cache", torch.zeros(1, kv_heads, max_len, self.head_dim))
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril())

    def forward(self, x, input_pos):
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(b, n, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        keys = self.k_cache.repeat_interleave(self.heads // self.kv_heads, dim=1)
        values = self.v_cache.repeat_interleave(self.heads // self.kv_heads, dim=1)
        mask = self.causal[None, None, input_pos]
        if self.eager:
            w = (q @ keys.transpose(-2, -1)) / math.sqrt(self.head_dim)
            w = torch.softmax(w.masked_fill(~mask, float("-inf")), dim=-1)
            out = w @ values
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))

class TinyGPT(nn.Module):
    """Learned positions instead of RoPE keep it short; the cache discipline is gpt-fast's."""

    def __init__(self, vocab=97, dim=64, layers=3, heads=4, kv_heads=2, max_len=256, eager=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(Attention(dim, heads, kv_heads, max_len, eager) for _ in range(layers))
        self.out = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx, input_pos):
        x = self.emb(idx) + self.pos(input_pos)[None]
        for layer in self.layers:
            x = x + layer(x, input_pos)
        return self.out(x)
