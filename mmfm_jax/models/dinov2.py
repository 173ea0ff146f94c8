"""DINOv2-with-registers encoder (frozen RAE stage-1 encoder), channels-last, NNX.

Matches Hugging Face `Dinov2WithRegistersModel` as RAE uses it: the position table is
precomputed for the input grid at conversion time (see `convert/rae.py`), registers
are inserted after the position add, and the final LayerNorm has no affine (RAE deletes
`layernorm.weight/bias`). Returns the full last hidden state
[CLS, registers, patches]; `mmfm_jax.rae` picks the tokens it needs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm_jax.models.vit import Buffer, TransformerBlock, partitioned, zeros


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    num_registers: int
    grid_size: tuple[int, int]  # patch tokens per (row, column) at the encoder input size
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]


class Dinov2Encoder(nnx.Module):
    """(B, H, W, C) ImageNet-normalised pixels at `input_size` -> (B, 1 + R + N, D)."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, p = cfg.hidden_size, cfg.patch_size
        self.cfg = cfg
        self.dtype = dtype
        self.patch_kernel = nnx.Param(
            partitioned(zeros, (None, None, None, "embed"))(
                rngs.params(), (p, p, cfg.num_channels, d)))
        self.patch_bias = nnx.Param(jnp.zeros((d,)))
        self.cls_token = nnx.Param(jnp.zeros((d,)))
        self.register_tokens = nnx.Param(jnp.zeros((cfg.num_registers, d)))
        self.pos_embed = Buffer(jnp.zeros((1 + cfg.num_patches, d)))
        self.layers = nnx.List([
            TransformerBlock(d, cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_eps,
                             layer_scale=True, rngs=rngs, dtype=dtype)
            for _ in range(cfg.num_layers)])
        # Final LayerNorm without affine (RAE drops the checkpoint's weight and bias).
        self.norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, use_scale=False,
                                  use_bias=False, use_fast_variance=False,
                                  dtype=jnp.float32, rngs=rngs)

    def embed(self, pixels: jax.Array) -> jax.Array:
        """Patch conv (as a matmul over non-overlapping patches) + CLS/pos + registers."""
        cfg = self.cfg
        b, h, w, c = pixels.shape
        p = cfg.patch_size
        if (h, w) != cfg.input_size or c != cfg.num_channels:
            raise ValueError(f"DINOv2 input must be (B, {cfg.input_size[0]}, "
                             f"{cfg.input_size[1]}, {cfg.num_channels}), got {pixels.shape}")
        gh, gw = cfg.grid_size
        patches = pixels.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, gh * gw, p * p * c).astype(self.dtype)
        kernel = self.patch_kernel[...].reshape(p * p * c, -1).astype(self.dtype)
        x = jnp.einsum("bnk,kd->bnd", patches, kernel).astype(jnp.float32)
        x = x + self.patch_bias[...]
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        regs = jnp.broadcast_to(self.register_tokens[...],
                                (b, cfg.num_registers, cfg.hidden_size))
        return jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.embed(pixels)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
