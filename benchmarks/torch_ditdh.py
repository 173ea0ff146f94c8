"""A plain PyTorch DiTDH, written the way RAE runs it (same key names, NCHW, SDPA).

The side-by-side reference for benchmarks (`python -m mmfm_jax.bench train --vs-torch`) and a
second witness of the fixtures (tests/test_ditdh.py proves it equal to fixtures/ditdh).
Kept out of mmfm_jax/ because it imports torch and is a reference, not part of the library:
`mmfm_jax.bench_torch` loads this file by path from a repository checkout. Build it from
RAE's `stage_2.params`; load an upstream state dict (or
`mmfm_jax.models.export_torch_state_dict(model)`) with `load_state_dict(..., strict=True)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(2 / 3 * mlp_ratio * dim)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class VisionRotaryEmbeddingFast(nn.Module):
    """EVA 2-D RoPE with interleaved pairs; tables (N, hd): first half row, second column."""

    def __init__(self, head_dim: int, size: int):
        super().__init__()
        half = head_dim // 2
        freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
        pos = torch.arange(size).float() / size * size
        per_axis = torch.repeat_interleave(pos[:, None] * freqs[None, :], 2, dim=-1)
        theta = torch.cat([per_axis[:, None, :].expand(size, size, half),
                           per_axis[None, :, :].expand(size, size, half)], dim=-1)
        theta = theta.reshape(size * size, head_dim)
        self.register_buffer("freqs_cos", theta.cos())
        self.register_buffer("freqs_sin", theta.sin())

    def forward(self, t):  # t (B, H, N, hd)
        pairs = t.unflatten(-1, (-1, 2))
        rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return t * self.freqs_cos + rot * self.freqs_sin


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(rope(q), rope(k), v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class LightningDDTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.norm2 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):
        sm, cm, gm, sf, cf, gf = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gm * self.attn(modulate(self.norm1(x), sm, cm), rope)
        return x + gf * self.mlp(modulate(self.norm2(x), sf, cf))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1)

    def forward(self, x):  # (B, C, S, S) -> (B, N, D), token n = i*S + j
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, num_freqs: int = 256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(num_freqs), requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        arg = t[:, None].float() * self.W[None, :] * 2 * math.pi
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=-1))


class LabelEmbedder(nn.Module):
    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(rows, dim)

    def forward(self, y):
        return self.embedding_table(y)


def _sincos_pos_embed(dim: int, size: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    i, j = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64),
                       indexing="ij")
    col, row = np.outer(j.reshape(-1), omega), np.outer(i.reshape(-1), omega)
    table = np.concatenate([np.sin(col), np.cos(col), np.sin(row), np.cos(row)], axis=1)
    return torch.from_numpy(table[None].astype(np.float32))


class TorchDiTDH(nn.Module):
    """`DiTwDDTHead` from RAE's `stage_2.params`; forward(x (B,C,S,S), t, y) -> (B,C,S,S)."""

    def __init__(self, params: Mapping):
        super().__init__()
        size, c = int(params["input_size"]), int(params["in_channels"])
        (de, dh), (le, lh), (he, hh) = (_pair(params[k]) for k in
                                        ("hidden_size", "depth", "num_heads"))
        ratio = float(params.get("mlp_ratio", 4.0))
        rows = int(params["num_classes"]) + int(float(params.get("class_dropout_prob", 0.1)) > 0)
        self.num_encoder_blocks = le
        self.pos_embed = nn.Parameter(_sincos_pos_embed(de, size), requires_grad=False)
        self.x_embedder = PatchEmbed(c, dh)
        self.s_embedder = PatchEmbed(c, de)
        self.s_projector = nn.Linear(de, dh) if de != dh else nn.Identity()
        self.t_embedder = TimestepEmbedder(de)
        self.y_embedder = LabelEmbedder(rows, de)
        self.final_layer = FinalLayer(dh, c)
        self.enc_feat_rope = VisionRotaryEmbeddingFast(de // he, size)
        self.dec_feat_rope = VisionRotaryEmbeddingFast(dh // hh, size)
        self.blocks = nn.ModuleList(
            [LightningDDTBlock(de, he, ratio) for _ in range(le)]
            + [LightningDDTBlock(dh, hh, ratio) for _ in range(lh)])

    def forward(self, x, t, y):
        b, c, hgt, wdt = x.shape
        temb = self.t_embedder(t)
        cond = F.silu(temb + self.y_embedder(y))[:, None, :]
        s = self.s_embedder(x) + self.pos_embed
        for block in self.blocks[: self.num_encoder_blocks]:
            s = block(s, cond, self.enc_feat_rope)
        s = self.s_projector(F.silu(temb[:, None, :] + s))
        h = self.x_embedder(x)
        for block in self.blocks[self.num_encoder_blocks:]:
            h = block(h, s, self.dec_feat_rope)
        out = self.final_layer(h, s)
        return out.transpose(1, 2).reshape(b, c, hgt, wdt)
