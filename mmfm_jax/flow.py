"""The flow-matching path of RAE/MM-FM (REFERENCE.md d.1-d.3).

Conventions follow upstream: t = 1 is the source (noise), t = 0 the data;
x_t = (1 - t) x1 + t x0, target velocity x0 - x1. The model always sees shifted time, and
training and sampling take the shift from the same `time_shift`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

T_MAX = 0.999  # upper end of training time (1 - 1/1000, hard-coded upstream)


def default_shift(height: int, width: int, channels: int) -> float:
    """s = sqrt(H*W*C / 4096): sqrt(48) for 16x16x768 latents."""
    return math.sqrt(height * width * channels / 4096.0)


def time_shift(configured: float, latent_shape: tuple[int, int, int]) -> float:
    """The run's shift: `configured` (config.train.time_shift) when > 0, else the default
    for latents of shape (H, W, C)."""
    if configured > 0:
        return float(configured)
    return default_shift(*latent_shape)


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """t <- s t / (1 + (s - 1) t), in float32 with float32 s as torch evaluates it."""
    t = jnp.asarray(t, jnp.float32)
    s = jnp.float32(shift)
    return s * t / (1.0 + (s - 1.0) * t)


def sample_time(key: jax.Array, batch: int, *, dist: str = "logit-normal",
                mu: float = 0.0, sigma: float = 1.0) -> jax.Array:
    """Raw (unshifted) training times on [0, 0.999].

    logit-normal: truncated inverse-CDF sampling as upstream (U rescaled into
    [Phi(alpha), Phi(beta)] with alpha = -inf, beta = (logit(0.999) - mu) / sigma).
    """
    u = jax.random.uniform(key, (batch,), jnp.float32)
    if dist == "uniform":
        return u * T_MAX
    if dist != "logit-normal":
        raise ValueError(f"unknown time distribution {dist!r}; use 'logit-normal' or 'uniform'")
    beta = (math.log(T_MAX / (1.0 - T_MAX)) - mu) / sigma
    u = ndtr(jnp.float32(beta)) * u  # Phi(alpha) = 0
    t = jax.nn.sigmoid(mu + sigma * ndtri(u))
    return jnp.clip(t, 0.0, T_MAX)


def interpolate(t: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x_t = (1 - t) x1 + t x0 and the target u_t = x0 - x1 (t broadcast over non-batch axes)."""
    tb = jnp.reshape(t, (-1,) + (1,) * (x1.ndim - 1)).astype(x1.dtype)
    return (1 - tb) * x1 + tb * x0, x0 - x1


def drop_labels(key: jax.Array, y: jax.Array, prob: float, null_label: int) -> jax.Array:
    """Replace each label by the null label with probability `prob` (training only)."""
    if prob <= 0:
        return y
    drop = jax.random.uniform(key, y.shape) < prob
    return jnp.where(drop, jnp.asarray(null_label, y.dtype), y)


def per_sample_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over all non-batch axes of the squared velocity error, in float32."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))
