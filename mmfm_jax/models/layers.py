"""Building blocks of the networks: one `Linear`, `Attention`, `Buffer` and `param` for all.

`Linear`, `Attention`, `Buffer`, `param` and `KeySeq` are shared by DiTDH, the RAE encoder
and decoder (`dinov2.py`, `rae_decoder.py`) and the FID Inception's fc (`inception.py`);
where the networks differ (upstream initialisers, the fused or separate q/k/v layout of
their checkpoints, RoPE), it is an option, so the variable paths stay the converted
names. RMSNorm, SwiGLU, RoPE, adaLN modulation and the time/label embedders are DiTDH's
(RAE's `stage_2`, REFERENCE.md c.2).

Parameters are float32 `nnx.Param`s, optionally carrying logical axis names (`out_sharding`
metadata, mapped to mesh axes by `mmfm_jax.parallel.LOGICAL_AXIS_RULES`; eager sharding is
off so the same module builds without a mesh).

Precision mirrors torch autocast, which upstream trains and samples under: `dtype` (float32
or bfloat16) is the dtype of matmul and attention *operands*; products accumulate in
float32 and are rounded once to `dtype`, as autocast's linear outputs are. Everything else
runs in the dtype of the stream the caller hands in: the Linears inside SwiGLU and
Attention return it (bias added there, no second rounding), and RMSNorm, RoPE, the SwiGLU
gate, adaLN modulation and softmax run in float32 when the residual stream is float32
(DiTDH's "bfloat16" policy, the RAE's encoder and decoder), in bfloat16 only when the
caller casts its stream to bfloat16 (DiTDH's "bfloat16_all"). With float32 operands every
step is the float32 computation, unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

KeyFn = Callable[[], jax.Array]  # a source of fresh PRNG keys: `rngs.params` or a KeySeq


class Frozen(nnx.Variable):
    """A loaded constant that is part of the checkpoint but never trained
    (DiTDH's sin-cos pos-embed and Gaussian-Fourier W)."""


class Buffer(nnx.Variable):
    """A non-parameter array stored in the checkpoint: DiTDH's RoPE cos/sin tables, the
    RAE's position tables and latent statistics."""


class KeySeq:
    """Distinct PRNG keys folded from one key with a Python counter.

    nnx.Rngs keeps a traced counter whose every update, inside `nnx.eval_shape`, costs
    time linear in the trace so far; building the full-size RAE abstractly (to load a
    checkpoint) would take tens of seconds. Folding in a Python int avoids that.
    """

    def __init__(self, key: jax.Array):
        self.key, self.count = key, 0

    def __call__(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def param(value: jax.Array, axes: Sequence[str | None] | None = None) -> nnx.Param:
    """A float32 parameter, optionally annotated with logical axis names (placed on a mesh
    at load time, not eagerly)."""
    if axes is None:
        return nnx.Param(jnp.asarray(value, jnp.float32))
    return nnx.Param(jnp.asarray(value, jnp.float32), out_sharding=tuple(axes),
                     eager_sharding=False)


def torch_linear_init(key: jax.Array, fan_in: int, shape) -> jax.Array:
    """PyTorch's default Linear init (kaiming-uniform a=sqrt(5)): U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _linear_init(init: str, keys: KeyFn, d_in: int, d_out: int) -> tuple[jax.Array, jax.Array]:
    """(kernel, bias) of upstream's initialisers; see `Linear`."""
    kshape, bshape = (d_in, d_out), (d_out,)
    if init == "zeros":
        return jnp.zeros(kshape), jnp.zeros(bshape)
    if init == "xavier":
        bound = math.sqrt(6.0 / (d_in + d_out))
        return jax.random.uniform(keys(), kshape, jnp.float32, -bound, bound), jnp.zeros(bshape)
    if init in ("torch", "normal"):
        kernel = (0.02 * jax.random.normal(keys(), kshape) if init == "normal"
                  else torch_linear_init(keys(), d_in, kshape))
        return kernel, torch_linear_init(keys(), d_in, bshape)
    if init == "lecun":
        return nnx.initializers.lecun_normal()(keys(), kshape), jnp.zeros(bshape)
    if init == "fan_in_normal":
        kernel = jax.random.normal(keys(), kshape, jnp.float32) * math.sqrt(1.0 / d_in)
        return kernel, jnp.zeros(bshape)
    raise ValueError(f"unknown init {init!r}")


class Linear(nnx.Module):
    """y = x W + b with W (in, out) float32 and the operands cast to `dtype`.

    The products accumulate in float32 on every backend (the MXU, cuBLAS, XLA:CPU). The dot
    returns them rounded once to `dtype`, as autocast's linear does, and the bias is added
    in float32; the result is `dtype`, or `out_dtype` (float32: a caller that computes on
    in float32 gets no second rounding). The dot's own output stays `dtype` so that the
    backward dots take `dtype` cotangents, as autocast's do. `accumulator=True` returns the
    unrounded float32 accumulator (`preferred_element_type`) instead, for layers that only
    run forward (the frozen RAE) or are tiny: their backward dots would be float32 x
    bfloat16, computed in float32 (measured ~1.5x slower train steps on CPU).

    `axes` are the logical names of W's (in, out) dims (b takes the second); None leaves
    both unannotated (replicated). `init` selects upstream's initialiser: "torch"
    (PyTorch's default Linear), "zeros" (DiTDH's adaLN and final layers), "xavier" (1x1
    patch convs, bias 0), "normal" (N(0, 0.02^2), bias torch), "lecun" (flax's
    lecun_normal, bias 0: the ViTs, whose weights are always loaded) or "fan_in_normal"
    (N(0, 1/in), bias 0: the Inception fc). `keys` yields the PRNG keys.
    """

    def __init__(self, in_features: int, out_features: int, *,
                 axes: tuple[str | None, str | None] | None, keys: KeyFn, init: str = "torch",
                 dtype=jnp.float32):
        kernel, bias = _linear_init(init, keys, in_features, out_features)
        self.kernel = param(kernel, axes)
        self.bias = param(bias, None if axes is None else axes[1:])
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, out_dtype=None, accumulator: bool = False
                 ) -> jax.Array:
        accumulate = jnp.promote_types(self.dtype, jnp.float32)
        y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                       preferred_element_type=accumulate if accumulator else None)
        y = y.astype(accumulate) + self.bias[...].astype(accumulate)
        return y.astype(out_dtype or (accumulate if accumulator else self.dtype))


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps), computed in float32 and cast back to x's dtype, then times
    the float32 weight in x's dtype (upstream's `out.type_as(x) * weight`: float32 for a
    float32 stream)."""

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
        self.w12 = Linear(dim, 2 * hidden, axes=("embed", "mlp"), keys=rngs.params, dtype=dtype)
        self.w3 = Linear(hidden, dim, axes=("mlp", "embed"), keys=rngs.params, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """In x's (the stream's) dtype: both Linears return it, the gate SiLU(a) * b runs
        in it and is rounded once, as w3's operand."""
        a, b = jnp.split(self.w12(x, out_dtype=x.dtype), 2, axis=-1)
        return self.w3(jax.nn.silu(a) * b, out_dtype=x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """EVA-style RoPE on interleaved pairs: x cos + rot(x) sin, rot(x)[2m] = -x[2m+1],
    rot(x)[2m+1] = x[2m]. x (B, N, H, hd); cos/sin (N, hd), loaded from the checkpoint."""
    pairs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    cos = cos[None, :, None, :].astype(x.dtype)
    sin = sin[None, :, None, :].astype(x.dtype)
    return x * cos + rot * sin


class Attention(nnx.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(hd)) v, then an output projection.

    Two parameter layouts, those of the upstream checkpoints, so the variable paths are
    the converted names: `fused_qkv=True` is DiTDH's one `qkv` projection (rows [q; k; v],
    head-major) and `proj`; False is the Hugging Face ViTs' `query`, `key`, `value` and
    `out` (the RAE encoder and decoder). `rope` = (cos, sin) tables, when given, rotate q
    and k (DiTDH's 2-D RoPE) in the dtype of the input stream x (float32 under autocast:
    upstream multiplies the bfloat16 q, k by float32 tables). q, k, v then enter
    `jax.nn.dot_product_attention` in `dtype` (float32 logits and softmax, bfloat16
    probabilities and output, as torch's bfloat16 SDPA); `implementation` is passed to it
    (None, "xla" or "cudnn"). The output projection returns x's dtype.
    """

    def __init__(self, dim: int, num_heads: int, *, keys: KeyFn, fused_qkv: bool,
                 init: str = "torch", dtype=jnp.float32, implementation: str | None = None):
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.fused_qkv = fused_qkv
        self.implementation = implementation
        kw = dict(keys=keys, init=init, dtype=dtype)
        if fused_qkv:
            self.qkv = Linear(dim, 3 * dim, axes=("embed", "qkv"), **kw)
            self.proj = Linear(dim, dim, axes=("heads", "embed"), **kw)
        else:
            self.query = Linear(dim, dim, axes=("embed", "heads"), **kw)
            self.key = Linear(dim, dim, axes=("embed", "heads"), **kw)
            self.value = Linear(dim, dim, axes=("embed", "heads"), **kw)
            self.out = Linear(dim, dim, axes=("heads", "embed"), **kw)

    @property
    def qkv_dtype(self):
        """The attention operands' dtype: the projections' `dtype`."""
        return (self.qkv if self.fused_qkv else self.query).dtype

    def _qkv(self, x: jax.Array, accumulator: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v as (B, N, H, hd) in x's dtype."""
        b, n, d = x.shape
        heads = (self.num_heads, d // self.num_heads)
        kw = dict(out_dtype=x.dtype, accumulator=accumulator)
        if self.fused_qkv:
            qkv = self.qkv(x, **kw).reshape(b, n, 3, *heads)
            return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return tuple(p(x, **kw).reshape(b, n, *heads)
                     for p in (self.query, self.key, self.value))

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None, *,
                 accumulator: bool = False) -> jax.Array:
        """Returns x's (the stream's) dtype; `accumulator` as `Linear`'s."""
        b, n, d = x.shape
        q, k, v = self._qkv(x, accumulator)
        if rope is not None:
            q, k = (apply_rope(a, *rope) for a in (q, k))
        q, k, v = (a.astype(self.qkv_dtype) for a in (q, k, v))
        o = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        return (self.proj if self.fused_qkv else self.out)(
            o.reshape(b, n, d), out_dtype=x.dtype, accumulator=accumulator)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x (1 + scale) + shift in x's dtype; shift/scale (B, 1, D) or
    (B, N, D), typically `Linear` outputs (bfloat16 under autocast), widened first so that
    1 + scale is not rounded to bfloat16."""
    return x * (1 + scale.astype(x.dtype)) + shift.astype(x.dtype)


class TimestepEmbedder(nnx.Module):
    """Gaussian-Fourier features of the raw (shifted) t with the checkpoint's frozen W,
    then Linear -> SiLU -> Linear. arg = ((t W) 2) pi in float32, features [sin | cos]; both
    Linears return their float32 accumulators (one row per sample: no cost)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, num_freqs: int = 256, dtype=jnp.float32):
        self.W = Frozen(jax.random.normal(rngs.params(), (num_freqs,), jnp.float32))
        self.mlp0 = Linear(2 * num_freqs, dim, axes=("features", "embed"), keys=rngs.params,
                           init="normal", dtype=dtype)
        self.mlp2 = Linear(dim, dim, axes=("mlp", "embed"), keys=rngs.params, init="normal",
                           dtype=dtype)

    def __call__(self, t: jax.Array) -> jax.Array:
        arg = ((t.astype(jnp.float32)[:, None] * self.W[...][None, :]) * 2) * jnp.float32(math.pi)
        feats = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)
        return self.mlp2(jax.nn.silu(self.mlp0(feats, accumulator=True)), accumulator=True)


class LabelEmbedder(nnx.Module):
    """Embedding table of `num_rows` labels (num_classes + 1 with a null row); no dropout
    here, labels are dropped outside the model (`flow.drop_labels`). Rows come out float32
    (a gather, not a matmul: autocast leaves it float32); the caller casts to its stream."""

    def __init__(self, num_rows: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embedding_table = param(0.02 * jax.random.normal(rngs.params(), (num_rows, dim)),
                                     ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, y: jax.Array) -> jax.Array:
        return jnp.take(self.embedding_table[...], y, axis=0).astype(
            jnp.promote_types(self.dtype, jnp.float32))
