"""The FID Inception-v3 (TF graph `classify_image_graph_def.pb`, 2015-12-05) in Flax NNX.

Mirrors torch-fidelity's `inception-v3-compat` / pytorch-fid's FID Inception, which use the
same weights file and key names, but channels-last and with the TF graph's own front end:

* TF 1.x `ResizeBilinear` to 299x299 (align_corners False, no half-pixel centres: source
  coordinate = i * in / out in float32, taps floor and floor + 1 clamped to the edge,
  no antialias), then (x - 128) / 128. `jax.image.resize` uses half-pixel centres and
  moves pool3 by far more than 1e-4, hence the explicit gathers.
* BasicConv2d = conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU.
* Branch average pools are 3x3/1/pad 1 with count_include_pad=False; Mixed_7c pools
  with max (the FID variant).

A converted directory is a model directory of the common format (`model_dir.py`,
"mmfm_jax.fid_inception"; `load` reads it). The fc is the shared `layers.Linear`.

Outputs (a dict): `pool3` (B, 2048), `logits_unbiased` = pool3 @ W (used for the Inception
Score, as the ADM evaluator does), `logits` (+ bias, 1008 classes), and `spatial`, the sFID
features.

sFID assumption. The ADM evaluator reads `mixed_6/conv:0`[..., :7] and flattens it in
NHWC order (7 x 17 x 17 = 2023). The 2015 graph names its eleven mixed blocks `mixed`,
`mixed_1` ... `mixed_10` (= torch Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c), and
inside a block the un-towered `conv` is the first (1x1) branch; a conv node's own name is
its ReLU output. So `mixed_6/conv` = the ReLU output of Mixed_6d.branch1x1 (192 channels at
17x17), and `spatial` is its first 7 channels flattened as (17, 17, 7).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax.models import model_dir
from mmfm_jax.models.layers import Linear
from mmfm_jax.models.state_arrays import flat_variables

BN_EPS = 1e-3
INPUT_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
FORMAT = "mmfm_jax.fid_inception"
MODEL_DIR = model_dir.Format(
    FORMAT, convert_hint="convert the weights first with "
    "`python -m convert inception --weights FILE.pth --out DIR`",
    legacy=(model_dir.Layout("mmfm_jax.fid_inception.v1", "inception.safetensors", "."),))
CONFIG_FILE = model_dir.CONFIG_FILE


class BNStat(nnx.Variable):
    """BatchNorm running statistics: loaded, never trained."""


@functools.lru_cache(maxsize=16)
def tf1_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, frac) of TF1 ResizeBilinear (align_corners False, legacy coordinates)."""
    scale = np.float32(in_size / out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1).astype(np.int32)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, frac


def resize_tf1_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """(B, H, W, C) float32 -> (B, size, size, C), in torch-fidelity's evaluation order."""
    _, in_h, in_w, _ = images.shape
    y_lo, y_hi, dy = tf1_bilinear_taps(in_h, size)
    x_lo, x_hi, dx = tf1_bilinear_taps(in_w, size)
    rows_lo, rows_hi = images[:, y_lo], images[:, y_hi]
    dx = jnp.asarray(dx)[None, None, :, None]
    top = rows_lo[:, :, x_lo] + (rows_lo[:, :, x_hi] - rows_lo[:, :, x_lo]) * dx
    bottom = rows_hi[:, :, x_lo] + (rows_hi[:, :, x_hi] - rows_hi[:, :, x_lo]) * dx
    return top + (bottom - top) * jnp.asarray(dy)[None, :, None, None]


def max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    """3x3 max pool; padding counts as -inf (torch max_pool2d)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3/1/pad 1 average pool with count_include_pad=False."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    return total / jnp.asarray(_window_counts(x.shape[1], x.shape[2]), x.dtype)


@functools.lru_cache(maxsize=16)
def _window_counts(h: int, w: int) -> np.ndarray:
    """Number of real (unpadded) pixels under each 3x3/1/pad 1 window, (1, h, w, 1)."""
    def per_axis(n):
        idx = np.arange(n)
        return np.minimum(idx + 1, n - 1) - np.maximum(idx - 1, 0) + 1
    return (per_axis(h)[:, None] * per_axis(w)[None, :]).astype(np.float32)[None, :, :, None]


class BasicConv2d(nnx.Module):
    """conv (no bias, HWIO kernel) -> BatchNorm with running statistics -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int], *,
                 stride: int = 1, padding: tuple[int, int] = (0, 0), rngs: nnx.Rngs,
                 dtype=jnp.float32, precision: str | None = "highest"):
        kh, kw = kernel
        fan_in = in_ch * kh * kw
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (kh, kw, in_ch, out_ch),
                                                  jnp.float32) * np.sqrt(2.0 / fan_in))
        self.bn_weight = nnx.Param(jnp.ones((out_ch,), jnp.float32))
        self.bn_bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
        self.bn_mean = BNStat(jnp.zeros((out_ch,), jnp.float32))
        self.bn_var = BNStat(jnp.ones((out_ch,), jnp.float32))
        self.stride = stride
        self.padding = ((padding[0], padding[0]), (padding[1], padding[1]))
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype),
            (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision,
            preferred_element_type=jnp.float32)
        # torch's inference BatchNorm: x * (w / sqrt(var + eps)) + (b - mean * scale)
        scale = self.bn_weight[...] / jnp.sqrt(self.bn_var[...] + BN_EPS)
        shift = self.bn_bias[...] - self.bn_mean[...] * scale
        return jax.nn.relu(y * scale + shift).astype(self.dtype)


class InceptionA(nnx.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int, **kw):
        self.branch1x1 = BasicConv2d(cin, 64, (1, 1), **kw)
        self.branch5x5_1 = BasicConv2d(cin, 48, (1, 1), **kw)
        self.branch5x5_2 = BasicConv2d(48, 64, (5, 5), padding=(2, 2), **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, (1, 1), **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, (3, 3), padding=(1, 1), **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, (3, 3), padding=(1, 1), **kw)
        self.branch_pool = BasicConv2d(cin, pool_features, (1, 1), **kw)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int, **kw):
        self.branch3x3 = BasicConv2d(cin, 384, (3, 3), stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, (1, 1), **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, (3, 3), padding=(1, 1), **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, (3, 3), stride=2, **kw)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b-6e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, cin: int, c7: int, **kw):
        self.branch1x1 = BasicConv2d(cin, 192, (1, 1), **kw)
        self.branch7x7_1 = BasicConv2d(cin, c7, (1, 1), **kw)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, (1, 1), **kw)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv2d(cin, 192, (1, 1), **kw)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nnx.Module):
    """Mixed_7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int, **kw):
        self.branch3x3_1 = BasicConv2d(cin, 192, (1, 1), **kw)
        self.branch3x3_2 = BasicConv2d(192, 320, (3, 3), stride=2, **kw)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, (1, 1), **kw)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv2d(192, 192, (3, 3), stride=2, **kw)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b (avg pool) / Mixed_7c (max pool, the FID variant)."""

    def __init__(self, cin: int, *, max_pool_branch: bool, **kw):
        self.branch1x1 = BasicConv2d(cin, 320, (1, 1), **kw)
        self.branch3x3_1 = BasicConv2d(cin, 384, (1, 1), **kw)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, (1, 1), **kw)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, (3, 3), padding=(1, 1), **kw)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv2d(cin, 192, (1, 1), **kw)
        self.max_pool_branch = max_pool_branch

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = max_pool(x, 1, pad=1) if self.max_pool_branch else avg_pool_exclude_pad(x)
        return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """FID Inception-v3. `__call__(images)` takes (B, H, W, 3) uint8 (or float in [0, 255]).

    `dtype` is the compute dtype of the convolutions (float32 for FID parity); `precision`
    is their matmul precision ("highest" keeps float32 convs out of TF32/bf16 passes).
    Constructed weights are random (He-normal) and only meant for benchmarks; FID needs
    the converted weights (`load`).
    """

    def __init__(self, *, rngs: nnx.Rngs, dtype=jnp.float32, precision: str | None = "highest"):
        kw = dict(rngs=rngs, dtype=dtype, precision=precision)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, (3, 3), stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, (3, 3), **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, (3, 3), padding=(1, 1), **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, (1, 1), **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, (3, 3), **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False, **kw)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True, **kw)
        # fc: kernel (2048, 1008) = torch weight transposed; applied in __call__, which
        # needs the logits with and without the bias.
        self.fc = Linear(2048, NUM_CLASSES, axes=None, keys=rngs.params, init="fan_in_normal")
        self.precision = precision

    def __call__(self, images: jax.Array, *, intermediates: bool = False) -> dict:
        """Features of (B, H, W, 3) images in [0, 255]; `intermediates` adds the global
        averages f64, f192 and f768 (after the two stem max pools and Mixed_6e)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects (B, H, W, 3) images, got {images.shape}")
        x = resize_tf1_bilinear(images.astype(jnp.float32))
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, 2)
        out = {}
        if intermediates:
            out["f64"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
        if intermediates:
            out["f192"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x, _ = self.Mixed_6b(x)
        x, _ = self.Mixed_6c(x)
        x, mixed_6_conv = self.Mixed_6d(x)
        x, _ = self.Mixed_6e(x)
        if intermediates:
            out["f768"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        unbiased = jnp.matmul(pool3, self.fc.kernel[...], precision=self.precision)
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].astype(jnp.float32)
        out.update(pool3=pool3, logits_unbiased=unbiased, logits=unbiased + self.fc.bias[...],
                   spatial=spatial.reshape(spatial.shape[0], -1))
        return out


def abstract_model(dtype=jnp.float32, precision: str | None = "highest") -> InceptionV3:
    """The network with shape-only variables (nothing allocated)."""
    return nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), dtype=dtype,
                                              precision=precision))


def param_shapes() -> dict[str, tuple[int, ...]]:
    """Variable paths ("Mixed_5b/branch1x1/kernel") -> shapes: the converted layout."""
    return {name: tuple(var.shape)
            for name, var in flat_variables(nnx.state(abstract_model())).items()}


def load(inception_dir: str, *, dtype=jnp.float32,
         precision: str | None = "highest") -> InceptionV3:
    """The FID Inception of a directory written by `python -m convert inception` (or by
    earlier code, "."-joined names in inception.safetensors). Any reason it cannot be
    loaded (a missing file, a wrong format, missing or mis-shaped arrays) is a ValueError
    with a one-line message naming the file."""
    return model_dir.load(inception_dir, MODEL_DIR, lambda _: abstract_model(dtype, precision))

