"""DINOv2-with-registers encoder (frozen RAE stage-1 encoder), channels-last, NNX.

Matches Hugging Face `Dinov2WithRegistersModel` as RAE uses it: the position table is
precomputed for the input grid at conversion time (see `convert/rae.py`), registers
are inserted after the position add, and the final LayerNorm has no affine (RAE deletes
`layernorm.weight/bias`). Returns the full last hidden state
[CLS, registers, patches]; `mmfm_jax.rae` picks the tokens it needs.

The pre-LN ViT block here is shared with the RAE decoder (`rae_decoder.py`), which is
the same block without LayerScale.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


class Buffer(nnx.Variable):
    """A frozen array loaded from a checkpoint (position tables, latent statistics)."""


def partitioned(init, names):
    """Initializer carrying logical axis names (`parallel.LOGICAL_AXIS_RULES`); the
    arrays are placed on a mesh when loaded (`mmfm_jax.rae.load_rae`), not eagerly."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def _linear(d_in: int, d_out: int, names, *, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                      kernel_init=partitioned(nnx.initializers.lecun_normal(), names))


def layer_norm(d: int, eps: float, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """Affine LayerNorm in float32 with torch's two-pass variance."""
    return nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, dtype=jnp.float32,
                         param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with separate q/k/v projections (bias), scale hd^-1/2."""

    def __init__(self, d: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if d % num_heads:
            raise ValueError(f"width {d} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dtype = dtype
        self.query = _linear(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.key = _linear(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.value = _linear(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.out = _linear(d, d, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        o = jax.nn.dot_product_attention(q, k, v)
        return self.out(o.reshape(b, t, d))


class TransformerBlock(nnx.Module):
    """Pre-LN ViT block: h + ls1 * attn(LN1(h)), then h + ls2 * fc2(GELU(fc1(LN2(h)))).

    The residual stream stays float32; matmuls run in `dtype`. GELU is the exact erf
    form. LayerScale (`ls1`, `ls2`) is DINOv2's; the decoder has none.
    """

    def __init__(self, d: int, num_heads: int, mlp_dim: int, eps: float, *,
                 layer_scale: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm1 = layer_norm(d, eps, rngs=rngs)
        self.attn = Attention(d, num_heads, rngs=rngs, dtype=dtype)
        self.norm2 = layer_norm(d, eps, rngs=rngs)
        self.fc1 = _linear(d, mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = _linear(mlp_dim, d, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.ls1 = nnx.Param(jnp.ones((d,))) if layer_scale else None
        self.ls2 = nnx.Param(jnp.ones((d,))) if layer_scale else None

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.attn(self.norm1(x)).astype(jnp.float32)
        x = x + (a * self.ls1[...] if self.ls1 is not None else a)
        m = self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))
        m = m.astype(jnp.float32)
        return x + (m * self.ls2[...] if self.ls2 is not None else m)


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
            partitioned(nnx.initializers.lecun_normal(), (None, None, None, "embed"))(
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
