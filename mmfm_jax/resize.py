"""Bicubic resizes that reproduce torch's `F.interpolate(mode="bicubic")` exactly.

`jax.image.resize("bicubic")` is a different filter (Keys A = -0.5, antialiased on
downscale), so the RAE front end uses these instead:

* `resize_bicubic` (jittable, NHWC): torch's default path, A = -0.75, no antialias,
  align_corners=False, source coordinates and weights in float32, border-clamped taps.
  The filter is separable, so a resize is two small matmuls with weight matrices that
  are computed once on the host.
* `resize_bicubic_antialias_np` (numpy, (H, W, C)): torch's `antialias=True` path
  (A = -0.5, support 2 * scale, normalised weights), used once at conversion time to
  resize the DINOv2 position-embedding grid; `resize_bicubic_np` is the numpy twin of
  `resize_bicubic` for ViT-MAE's table, `resize_bilinear_antialias_np` SigLIP2's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_F32 = np.float32


def _fma(x, y, z) -> np.float32:
    """float32 fused multiply-add (one rounding), as torch's CPU kernels get from the
    compiler's FMA contraction on x86 (AVX2/AVX512 builds)."""
    return _F32(np.float64(x) * np.float64(y) + np.float64(z))


def _cubic_near(x: np.float32, a: np.float32) -> np.float32:
    """Keys kernel ((a+2)x - (a+3))x^2 + 1 for |x| <= 1, contracted as torch's is."""
    return _fma(_fma(a + _F32(2), x, -(a + _F32(3))) * x, x, _F32(1))


def _cubic_far(x: np.float32, a: np.float32) -> np.float32:
    """Keys kernel ((ax - 5a)x + 8a)x - 4a for 1 < |x| < 2, contracted as torch's is."""
    return _fma(_fma(_fma(a, x, -_F32(5) * a), x, _F32(8) * a), x, -_F32(4) * a)


@functools.lru_cache(maxsize=32)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of torch's non-antialiased bicubic resize.

    Mirrors torch's CPU kernel: scale = in/out in float32, src = scale * (i + 0.5) - 0.5
    in float32 (fused), taps floor(src) - 1 ... floor(src) + 2 clamped to the border
    (clamped taps accumulate onto the edge pixel), A = -0.75. Entries agree with torch's
    to about 1e-7; computing src in float64 instead would be off by up to 2.5e-5.
    """
    a = _F32(-0.75)
    scale = _F32(in_size) / _F32(out_size)
    weights = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        src = _fma(scale, _F32(i) + _F32(0.5), _F32(-0.5))
        index = min(int(np.floor(src)), in_size - 1)
        t = min(max(_F32(src - _F32(index)), _F32(0)), _F32(1))
        coeffs = (_cubic_far(_F32(t + _F32(1)), a), _cubic_near(t, a),
                  _cubic_near(_F32(_F32(1) - t), a),
                  _cubic_far(_F32(_F32(_F32(1) - t) + _F32(1)), a))
        for k, c in enumerate(coeffs):
            j = min(max(index - 1 + k, 0), in_size - 1)
            weights[i, j] += c
    weights.setflags(write=False)
    return weights


def resize_bicubic(images: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Resize (B, H, W, C) images like torch bicubic (A=-0.75, no antialias, no clamp).

    Runs in float32 whatever the input dtype; the output can leave the input range
    (bicubic overshoot), exactly as torch's does.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    _, in_h, in_w, _ = images.shape
    x = images.astype(jnp.float32)
    if (in_h, in_w) == (out_h, out_w):
        return x
    wy = jnp.asarray(bicubic_matrix(in_h, out_h))
    wx = jnp.asarray(bicubic_matrix(in_w, out_w))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("pw,bhwc->bhpc", wx, x, precision=hi)  # torch sums along W first
    return jnp.einsum("oh,bhpc->bopc", wy, x, precision=hi)


def bicubic_antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of torch's bicubic resize with antialias=True.

    For each output i: center = scale * (i + 0.5), support = 2 * max(scale, 1), taps
    [int(center - support + 0.5), int(center + support + 0.5)) clipped to the input,
    w_j = W((j - center + 0.5) / max(scale, 1)) with the A = -0.5 kernel, normalised to
    sum to one; float32 with torch's mixed float/double intermediate steps.
    """
    a = _F32(-0.5)
    scale = _F32(in_size) / _F32(out_size)
    support = _F32(2.0) * scale if scale >= 1.0 else _F32(2.0)
    invscale = _F32(1.0 / float(scale)) if scale >= 1.0 else _F32(1.0)
    weights = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        center = _F32(float(scale) * (i + 0.5))
        lo = max(int(float(_F32(center - support)) + 0.5), 0)
        hi = min(int(float(_F32(center + support)) + 0.5), in_size)
        w = []
        for j in range(lo, hi):
            x = abs(_F32((float(_F32(_F32(j) - center)) + 0.5) * float(invscale)))
            w.append(_cubic_near(x, a) if x < 1 else _cubic_far(x, a) if x < 2 else _F32(0))
        total = _F32(0)
        for v in w:
            total = _F32(total + v)
        weights[i, lo:hi] = [_F32(v / total) for v in w] if total != 0 else w
    weights.setflags(write=False)
    return weights


def _separable_np(grid: np.ndarray, size: tuple[int, int], matrix) -> np.ndarray:
    grid = np.asarray(grid, np.float32)
    in_h, in_w, _ = grid.shape
    out_h, out_w = size
    if (in_h, in_w) == (out_h, out_w):
        return grid.copy()
    x = np.einsum("pw,hwc->hpc", matrix(in_w, out_w), grid)  # torch resamples W first
    return np.einsum("oh,hpc->opc", matrix(in_h, out_h), x).astype(np.float32)


def resize_bicubic_antialias_np(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a (H, W, C) float array like torch bicubic with antialias=True (float32)."""
    return _separable_np(grid, size, bicubic_antialias_matrix)


def resize_bicubic_np(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a (H, W, C) float array like torch bicubic without antialias (float32)."""
    return _separable_np(grid, size, bicubic_matrix)


def bilinear_antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of bilinear resize with antialias=True, as
    Siglip2VisionEmbeddings computes them: center = (i + 0.5) * scale - 0.5,
    w_j = max(0, 1 - |j - center| / max(scale, 1)), normalised to sum to one."""
    scale = _F32(in_size) / _F32(out_size)
    support = max(scale, _F32(1))
    center = (np.arange(out_size, dtype=np.float32) + _F32(0.5)) * scale - _F32(0.5)
    source = np.arange(in_size, dtype=np.float32)
    w = np.maximum(_F32(1) - np.abs(source[None] - center[:, None]) / support, _F32(0))
    return (w / w.sum(-1, keepdims=True, dtype=np.float32)).astype(np.float32)


def resize_bilinear_antialias_np(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a (H, W, C) float array like SigLIP2's position-embedding resize."""
    grid = np.asarray(grid, np.float32)
    wy = bilinear_antialias_matrix(grid.shape[0], size[0])
    wx = bilinear_antialias_matrix(grid.shape[1], size[1])
    weights = (wy[:, None, :, None] * wx[None, :, None, :]).reshape(size[0] * size[1], -1)
    return (weights @ grid.reshape(-1, grid.shape[-1])).reshape(*size, -1)
