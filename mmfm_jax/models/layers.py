"""Building blocks of DiTDH, written to match RAE's PyTorch modules (REFERENCE.md c.2).

Parameters are float32 `nnx.Param`s carrying logical axis names (`out_sharding` metadata,
mapped to mesh axes by `mmfm_jax.parallel.LOGICAL_AXIS_RULES`; eager sharding is off so
the same module builds without a mesh). Computation runs in `dtype` (float32 or bfloat16);
numerically sensitive pieces (RMSNorm statistics, the Fourier time features) stay float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Frozen(nnx.Variable):
    """A loaded constant that is part of the checkpoint but never trained
    (the sin-cos pos-embed and the Gaussian-Fourier W)."""


class Buffer(nnx.Variable):
    """A non-parameter table stored in the checkpoint (the RoPE cos/sin tables)."""


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    """A trainable float32 parameter annotated with logical axis names."""
    return nnx.Param(jnp.asarray(value, jnp.float32), out_sharding=tuple(axes),
                     eager_sharding=False)


def torch_linear_init(key: jax.Array, fan_in: int, shape) -> jax.Array:
    """PyTorch's default Linear init (kaiming-uniform a=sqrt(5)): U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class Linear(nnx.Module):
    """y = x W + b with W (in, out) float32, evaluated in `dtype`.

    `init` selects upstream's initialiser: "torch" (default Linear), "zeros" (adaLN and
    final layers), "xavier" (1x1 patch convs, bias 0) or "normal" (N(0, 0.02^2), bias torch).
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str],
                 rngs: nnx.Rngs, init: str = "torch", dtype=jnp.float32):
        kshape, bshape = (in_features, out_features), (out_features,)
        if init == "zeros":
            kernel, bias = jnp.zeros(kshape), jnp.zeros(bshape)
        elif init == "xavier":
            bound = math.sqrt(6.0 / (in_features + out_features))
            kernel = jax.random.uniform(rngs.params(), kshape, jnp.float32, -bound, bound)
            bias = jnp.zeros(bshape)
        elif init in ("torch", "normal"):
            kernel = (0.02 * jax.random.normal(rngs.params(), kshape) if init == "normal"
                      else torch_linear_init(rngs.params(), in_features, kshape))
            bias = torch_linear_init(rngs.params(), in_features, bshape)
        else:
            raise ValueError(f"unknown init {init!r}")
        self.kernel = param(kernel, axes)
        self.bias = param(bias, axes[1:])
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        return x @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps), computed in float32 and cast back, then times the weight."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "embed"):
        self.scale = param(jnp.ones((dim,)), (axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
                                     + self.eps)
        normed = normed.astype(x.dtype)
        return normed * self.scale[...].astype(x.dtype)


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Upstream's SwiGLU width: int(2/3 * mlp_ratio * dim), truncated."""
    return int(2 / 3 * mlp_ratio * dim)


class SwiGLU(nnx.Module):
    """(SiLU(a) * b) W3 + b3 with [a | b] = x W12 + b12; `a` is the first half."""

    def __init__(self, dim: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        hidden = swiglu_hidden(dim, mlp_ratio)
        self.w12 = Linear(dim, 2 * hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.w3 = Linear(hidden, dim, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(a) * b)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """EVA-style RoPE on interleaved pairs: x cos + rot(x) sin, rot(x)[2m] = -x[2m+1],
    rot(x)[2m+1] = x[2m]. x (B, N, H, hd); cos/sin (N, hd), loaded from the checkpoint."""
    pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    cos = cos[None, :, None, :].astype(x.dtype)
    sin = sin[None, :, None, :].astype(x.dtype)
    return x * cos + rot * sin


class Attention(nnx.Module):
    """Multi-head self-attention with fused qkv (rows [q; k; v], head-major) and RoPE on q, k.

    `implementation` is passed to `jax.nn.dot_product_attention` (None, "xla" or "cudnn").
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 implementation: str | None = None):
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, axes=("embed", "qkv"), rngs=rngs, dtype=dtype)
        self.proj = Linear(dim, dim, axes=("heads", "embed"), rngs=rngs, dtype=dtype)
        self.implementation = implementation

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        return self.proj(o.reshape(b, n, d))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x (1 + scale) + shift; shift/scale (B, 1, D) or (B, N, D)."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nnx.Module):
    """Gaussian-Fourier features of the raw (shifted) t with the checkpoint's frozen W,
    then Linear -> SiLU -> Linear. arg = ((t W) 2) pi in float32, features [sin | cos]."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, num_freqs: int = 256, dtype=jnp.float32):
        self.W = Frozen(jax.random.normal(rngs.params(), (num_freqs,), jnp.float32))
        self.mlp0 = Linear(2 * num_freqs, dim, axes=("features", "embed"), rngs=rngs,
                           init="normal", dtype=dtype)
        self.mlp2 = Linear(dim, dim, axes=("mlp", "embed"), rngs=rngs, init="normal",
                           dtype=dtype)

    def __call__(self, t: jax.Array) -> jax.Array:
        arg = ((t.astype(jnp.float32)[:, None] * self.W[...][None, :]) * 2) * jnp.float32(math.pi)
        feats = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)
        return self.mlp2(jax.nn.silu(self.mlp0(feats)))


class LabelEmbedder(nnx.Module):
    """Embedding table of `num_rows` labels (num_classes + 1 with a null row); no dropout
    here, labels are dropped outside the model (`flow.drop_labels`)."""

    def __init__(self, num_rows: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embedding_table = param(0.02 * jax.random.normal(rngs.params(), (num_rows, dim)),
                                     ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, y: jax.Array) -> jax.Array:
        return jnp.take(self.embedding_table[...], y, axis=0).astype(self.dtype)
