"""DINOv2-with-registers encoder (frozen RAE stage-1 encoder), channels-last, NNX.

Matches Hugging Face `Dinov2WithRegistersModel` as RAE uses it: the position table is
precomputed for the input grid at conversion time (see `convert/rae.py`), registers
are inserted after the position add, and the final LayerNorm has no affine (RAE deletes
`layernorm.weight/bias`). Returns the full last hidden state
[CLS, registers, patches]; `mmfm_jax.rae` picks the tokens it needs.

With `layer_scale=False`, no registers and LN eps 1e-12 the same module is the MAE-B
encoder (Hugging Face `ViTMAEModel` without masking, tokens in image order); with no
CLS token either and tanh-GELU it is the SigLIP2 vision tower (`Siglip2VisionModel` at
one fixed resolution, without its pooling head).

The pre-LN ViT block here is shared with the RAE decoder (`rae_decoder.py`), which is
the same block without LayerScale; its `Linear` and `Attention` (the HF layout: separate
query/key/value/out) are the ones every network shares (`layers.py`).

Precision (`dtype` bfloat16) mirrors torch autocast, as upstream encodes its GMM data:
bfloat16 matmul and attention operands with float32 accumulation; the residual stream,
LayerNorms, LayerScale and GELU stay float32. The frozen encoder and decoder only run
forward, so their Linears hand back the float32 accumulator (`accumulator`); only
the operands of the next matmul (and q, k, v) are bfloat16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm_jax.models.layers import Attention, Buffer, KeySeq, Linear, param


class LayerNorm(nnx.Module):
    """LayerNorm in float32 with torch's two-pass (biased) variance; optional affine."""

    def __init__(self, d: int, eps: float, *, affine: bool = True):
        self.eps = eps
        self.scale = param(jnp.ones((d,))) if affine else None
        self.bias = param(jnp.zeros((d,))) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + jnp.float32(self.eps))
        return y if self.scale is None else y * self.scale[...] + self.bias[...]


class TransformerBlock(nnx.Module):
    """Pre-LN ViT block: h + ls1 * attn(LN1(h)), then h + ls2 * fc2(GELU(fc1(LN2(h)))).

    The residual stream stays float32; matmuls run in `dtype`. GELU is the exact erf
    form. LayerScale (`ls1`, `ls2`) is DINOv2's; the decoder has none.
    """

    def __init__(self, d: int, num_heads: int, mlp_dim: int, eps: float, *,
                 layer_scale: bool, keys: KeySeq, dtype=jnp.float32,
                 gelu_approximate: bool = False):
        self.gelu_approximate = gelu_approximate
        self.norm1 = LayerNorm(d, eps)
        self.attn = Attention(d, num_heads, keys=keys, fused_qkv=False, init="lecun",
                              dtype=dtype)
        self.norm2 = LayerNorm(d, eps)
        self.fc1 = Linear(d, mlp_dim, axes=("embed", "mlp"), keys=keys, init="lecun",
                          dtype=dtype)
        self.fc2 = Linear(mlp_dim, d, axes=("mlp", "embed"), keys=keys, init="lecun",
                          dtype=dtype)
        self.ls1 = param(jnp.ones((d,)), ("embed",)) if layer_scale else None
        self.ls2 = param(jnp.ones((d,)), ("embed",)) if layer_scale else None

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.attn(self.norm1(x), accumulator=True)
        x = x + (a * self.ls1[...] if self.ls1 is not None else a)
        hidden = self.fc1(self.norm2(x), accumulator=True)
        m = self.fc2(jax.nn.gelu(hidden, approximate=self.gelu_approximate), accumulator=True)
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
    layer_scale: bool = True  # DINOv2's LayerScale; MAE and SigLIP2 have none
    cls_token: bool = True  # SigLIP2 has none
    gelu_approximate: bool = False  # SigLIP2's gelu_pytorch_tanh

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in the output: CLS and registers."""
        return int(self.cls_token) + self.num_registers

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]


class Dinov2Encoder(nnx.Module):
    """(B, H, W, C) normalised pixels at `input_size` -> (B, [CLS] + R + N, D)."""

    def __init__(self, cfg: Dinov2Config, *, keys: KeySeq, dtype=jnp.float32):
        d, p = cfg.hidden_size, cfg.patch_size
        self.cfg = cfg
        self.dtype = dtype
        self.patch_kernel = param(nnx.initializers.lecun_normal()(
            keys(), (p, p, cfg.num_channels, d)), (None, None, None, "embed"))
        self.patch_bias = param(jnp.zeros((d,)), ("embed",))
        self.cls_token = (param(0.02 * jax.random.normal(keys(), (d,)), ("embed",))
                          if cfg.cls_token else None)
        self.register_tokens = (
            param(0.02 * jax.random.normal(keys(), (cfg.num_registers, d)), (None, "embed"))
            if cfg.num_registers else None)
        self.pos_embed = Buffer(0.02 * jax.random.normal(
            keys(), (int(cfg.cls_token) + cfg.num_patches, d)))
        self.layers = nnx.List([
            TransformerBlock(d, cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_eps,
                             layer_scale=cfg.layer_scale, keys=keys, dtype=dtype,
                             gelu_approximate=cfg.gelu_approximate)
            for _ in range(cfg.num_layers)])
        # Final LayerNorm without affine (RAE drops the checkpoint's weight and bias).
        self.norm = LayerNorm(d, cfg.layer_norm_eps, affine=False)

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
        x = jnp.einsum("bnk,kd->bnd", patches, kernel, preferred_element_type=jnp.float32)
        x = x + self.patch_bias[...]
        if self.cls_token is None:
            return x + self.pos_embed[...]
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        if self.register_tokens is None:
            return x
        regs = jnp.broadcast_to(self.register_tokens[...],
                                (b, cfg.num_registers, cfg.hidden_size))
        return jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.embed(pixels)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
