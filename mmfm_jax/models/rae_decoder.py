"""RAE stage-1 decoder (`GeneralDecoder`, ViT-MAE-decoder style), channels-last, NNX.

Encoder tokens -> Linear -> [trainable CLS; tokens] + fixed sin-cos table (loaded from
the checkpoint) -> pre-LN blocks (LN eps 1e-12, exact GELU, no LayerScale) -> LN ->
per-token pixel patch; the CLS position is dropped and patches are laid out (p, q, c)
with the channel fastest. The output is still ImageNet-normalised; `mmfm_jax.rae`
undoes that. Precision as the encoder's (`dinov2.py`): bfloat16 operands, float32 stream;
the pixel prediction is the float32 accumulator, not rounded to bfloat16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm_jax.models.dinov2 import LayerNorm, TransformerBlock
from mmfm_jax.models.layers import Buffer, KeySeq, Linear, param


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    in_dim: int  # encoder width (latent channels)
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    grid_size: tuple[int, int]  # latent (rows, columns)
    num_channels: int = 3
    layer_norm_eps: float = 1e-12

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)


class RAEDecoder(nnx.Module):
    """(B, h, w, in_dim) de-normalised latents -> (B, h*p, w*p, C) normalised pixels."""

    def __init__(self, cfg: DecoderConfig, *, keys: KeySeq, dtype=jnp.float32):
        d, p = cfg.hidden_size, cfg.patch_size
        self.cfg = cfg
        self.embed = Linear(cfg.in_dim, d, axes=("channels", "embed"), keys=keys, init="lecun",
                            dtype=dtype)
        self.cls_token = param(0.02 * jax.random.normal(keys(), (d,)), ("embed",))
        self.pos_embed = Buffer(jnp.zeros((1 + cfg.num_patches, d)))
        self.layers = nnx.List([
            TransformerBlock(d, cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_eps,
                             layer_scale=False, keys=keys, dtype=dtype)
            for _ in range(cfg.num_layers)])
        self.norm = LayerNorm(d, cfg.layer_norm_eps)
        self.pred = Linear(d, p * p * cfg.num_channels, axes=("embed", "channels"), keys=keys,
                           init="lecun", dtype=dtype)

    def __call__(self, latents: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, h, w, c = latents.shape
        if (h, w) != cfg.grid_size or c != cfg.in_dim:
            raise ValueError(f"decoder input must be (B, {cfg.grid_size[0]}, "
                             f"{cfg.grid_size[1]}, {cfg.in_dim}), got {latents.shape}")
        x = self.embed(latents.reshape(b, h * w, c), accumulator=True)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        for layer in self.layers:
            x = layer(x)
        x = self.pred(self.norm(x), accumulator=True)[:, 1:]
        p, ch = cfg.patch_size, cfg.num_channels
        x = x.reshape(b, h, w, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h * p, w * p, ch)
