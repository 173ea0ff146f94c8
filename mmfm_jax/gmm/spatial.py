"""The spatial mixture from one streaming pass over (latents, CLS) batches (REFERENCE e.2).

Each image is hard-assigned by the CLS mixture; it and its W-flip go to that mode. Per mode
the pass accumulates the count, the sum of latents (K, H, W, C) and the scalar sum of
squared norms: the reference's variance, the mean over dims of the per-dim variance (ddof
0), equals (E|x|^2 - |mu|^2) / D, so no K x H x W x C sum of squares is needed. The sums are
sharded over the mesh's "modes" axis (for K = 8192 at 16x16x768 they are 6.4 GB float32) and
taken relative to the first batch's mean, which keeps E|x|^2 - |mu|^2 from cancelling.
Empty modes get the unweighted mean of the non-empty modes' means and the mean of their
variances, as upstream does; the weights are the CLS weights (j.27).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from mmfm_jax import parallel
from mmfm_jax.gmm.mixture import CLSMixture, SpatialMixture


def _accumulate(acc, shift, cls_mixture, latents, cls_or_labels, mask, *, flip, by_label):
    sums, sumsq, counts = acc
    labels = cls_or_labels if by_label else cls_mixture.predict(cls_or_labels)
    x = latents.astype(jnp.float32)
    w = mask.astype(jnp.float32)
    copies = [x - shift] + ([x[:, :, ::-1, :] - shift] if flip else [])  # flip along W
    total = sum(copies) * w[:, None, None, None]
    norms = sum(jnp.sum(c * c, axis=(1, 2, 3)) for c in copies) * w
    n_copies = len(copies)
    return (sums.at[labels].add(total), sumsq.at[labels].add(norms),
            counts.at[labels].add(mask.astype(jnp.int32) * n_copies))


_accumulate_jit = jax.jit(_accumulate, static_argnames=("flip", "by_label"),
                          donate_argnums=(0,))


@jax.jit
def _finalize(sums, sumsq, counts, shift):
    """Per-mode means and scalar variances; a mode that received no image gets what
    MM-FM's `spatial_gmm_imagenet.py` gives it (REFERENCE e.2): the unweighted mean of the
    non-empty modes' means and the mean of their variances (not the count-weighted data
    mean, nor the total variance about it, which would add the spread between modes)."""
    n = counts.astype(jnp.float32)
    dim = sums[0].size
    safe = jnp.maximum(n, 1.0)
    means = sums / safe[:, None, None, None]
    variances = jnp.maximum(
        (sumsq / safe - jnp.sum(means * means, axis=(1, 2, 3))) / dim, 0.0)
    filled = (counts > 0).astype(jnp.float32)
    n_filled = jnp.maximum(jnp.sum(filled), 1.0)
    fill_mean = jnp.sum(means * filled[:, None, None, None], axis=0) / n_filled  # exact sum
    fill_var = jnp.sum(filled * variances) / n_filled
    empty = counts == 0
    means = jnp.where(empty[:, None, None, None], fill_mean[None], means) + shift
    variances = jnp.where(empty, fill_var, variances)
    return means, variances


def spatial_pass(batches: Iterable[tuple[np.ndarray, np.ndarray]], cls_mixture: CLSMixture,
                 *, mesh: Mesh | None = None, flip: bool = True
                 ) -> tuple[SpatialMixture, np.ndarray]:
    """Spatial mixture and per-mode counts (flip copies included) from one pass.

    batches: (latents_nhwc (B, H, W, C), cls (B, D) float or labels (B,) int) host arrays;
    with labels the CLS mixture only provides the weights. Returns means (K, H, W, C)
    float32, variances (K,), weights = cls_mixture.weights.
    """
    k = cls_mixture.n_components
    multiple = parallel.num_batch_shards(mesh) if mesh is not None else 1
    if mesh is not None:
        rep = parallel.replicated(mesh)
    else:
        rep = SingleDeviceSharding(jax.devices()[0])
    cls_dev = jax.device_put(cls_mixture, rep)
    acc = shift = None
    for latents, second in batches:
        latents, second = np.asarray(latents), np.asarray(second)
        if latents.ndim != 4 or second.shape[0] != latents.shape[0]:
            raise ValueError(f"spatial pass batch: latents {latents.shape} must be (B, H, W, C)"
                             f" with {latents.shape[0]} CLS tokens or labels, got "
                             f"{second.shape}")
        by_label = np.issubdtype(second.dtype, np.integer)
        if by_label and (second.min() < 0 or second.max() >= k):
            raise ValueError(f"spatial pass labels must lie in [0, {k}), got "
                             f"[{second.min()}, {second.max()}]")
        if acc is None:
            shape = (k, *latents.shape[1:])
            sums_sharding = (parallel.logical_sharding(mesh, ("modes", None, None, None), shape)
                             if mesh is not None else rep)
            acc = (jax.device_put(jnp.zeros(shape, jnp.float32), sums_sharding),
                   jax.device_put(jnp.zeros((k,), jnp.float32), rep),
                   jax.device_put(jnp.zeros((k,), jnp.int32), rep))
            shift = jax.device_put(jnp.asarray(latents.astype(np.float32).mean(axis=0)), rep)
        rows = latents.shape[0]
        padded = parallel.round_up(rows, multiple)
        pad = [(0, padded - rows)]
        batch = (np.pad(latents, pad + [(0, 0)] * 3), np.pad(second, pad + [(0, 0)] * (
            second.ndim - 1)), np.arange(padded) < rows)
        if mesh is not None:
            batch = tuple(jax.device_put(b, parallel.batch_sharding(mesh, b.ndim)) for b in batch)
        acc = _accumulate_jit(acc, shift, cls_dev, *batch, flip=flip, by_label=by_label)
    if acc is None:
        raise ValueError("spatial pass got no batches")
    means, variances = _finalize(*acc, shift)
    counts = np.asarray(acc[2]).astype(np.int64)
    return SpatialMixture(weights=cls_mixture.weights, means=means, variances=variances), counts
