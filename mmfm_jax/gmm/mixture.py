"""The two mixtures MM-FM shares one mode index between (REFERENCE e.3, e.4, e.6; j.24-27).

* `CLSMixture` (diagonal, on the encoder's CLS token) only assigns modes: its posterior
  picks k for each training image (soft: a draw from the posterior; hard: its argmax).
* `SpatialMixture` (one scalar variance per mode, means channels-last (K, H, W, C)) supplies
  the source x0 = mu_k + sigma_k * eps and the sampling prior over modes.

Both are JAX pytrees, so a jitted train step can take them as (sharded) arguments.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

HIGHEST = jax.lax.Precision.HIGHEST


def log_gaussian_diag(x: jax.Array, means: jax.Array, variances: jax.Array) -> jax.Array:
    """log N(x_n; mu_k, diag var_k) for every pair, (N, D) x (K, D) -> (N, K), as matmuls.

    The expanded Mahalanobis form sum x^2/v - 2 x.mu/v + sum mu^2/v cancels badly in float32
    when |x| is large against the spread, so both sides are first centred on the mean of the
    component means (a shift changes nothing in exact arithmetic), and the matmuls run at
    full precision whatever the global default (TPU/TF32 would lose ~1e-3 relative).
    """
    dtype = jax.dtypes.canonicalize_dtype(jnp.result_type(x.dtype, means.dtype, jnp.float32))
    x, means, variances = x.astype(dtype), means.astype(dtype), variances.astype(dtype)
    centre = jnp.mean(means, axis=0)
    xc, mc = x - centre, means - centre
    precision = 1.0 / variances
    quad = (jnp.dot(xc * xc, precision.T, precision=HIGHEST)
            - 2.0 * jnp.dot(xc, (mc * precision).T, precision=HIGHEST)
            + jnp.sum(mc * mc * precision, axis=1)[None, :])
    quad = jnp.maximum(quad, 0.0)
    log_det = jnp.sum(jnp.log(variances), axis=1)
    return -0.5 * (x.shape[-1] * math.log(2.0 * math.pi) + log_det[None, :] + quad)


@struct.dataclass
class CLSMixture:
    """Diagonal Gaussian mixture: weights (K,), means (K, D), variances (K, D) (reg added)."""

    weights: jax.Array
    means: jax.Array
    variances: jax.Array

    @property
    def n_components(self) -> int:
        return self.weights.shape[0]

    def log_joint(self, x: jax.Array) -> jax.Array:
        """log w_k + log N(x; mu_k, var_k), (N, K)."""
        return log_gaussian_diag(x, self.means, self.variances) + jnp.log(self.weights)

    def log_prob(self, x: jax.Array) -> jax.Array:
        """Per-sample log-likelihood log sum_k w_k N(x; mu_k, var_k) (sklearn score_samples)."""
        return jax.nn.logsumexp(self.log_joint(x), axis=-1)

    def predict_proba(self, x: jax.Array) -> jax.Array:
        """Posterior r_k(x), (N, K), normalised in log space."""
        return jax.nn.softmax(self.log_joint(x), axis=-1)

    def predict(self, x: jax.Array) -> jax.Array:
        """Hard assignment argmax_k r_k(x), int32 (N,)."""
        return jnp.argmax(self.log_joint(x), axis=-1).astype(jnp.int32)

    def assign(self, key: jax.Array, x: jax.Array, mode: str = "soft") -> jax.Array:
        """Mode per sample: "soft" draws k ~ Categorical(r(x)) (MM-FM training default),
        "hard" takes the argmax (as the spatial fit did). int32 (N,)."""
        if mode == "hard":
            return self.predict(x)
        if mode != "soft":
            raise ValueError(f"assignment mode {mode!r} is unknown; use 'soft' or 'hard'")
        return jax.random.categorical(key, self.log_joint(x), axis=-1).astype(jnp.int32)


@struct.dataclass
class SpatialMixture:
    """Spherical mixture in latent space: weights (K,) (the CLS EM weights), means
    (K, H, W, C) channels-last, variances (K,) (one scalar per mode)."""

    weights: jax.Array
    means: jax.Array
    variances: jax.Array

    @property
    def n_components(self) -> int:
        return self.weights.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.means.shape[1:])

    def sample_modes(self, key: jax.Array, n: int) -> jax.Array:
        """n modes drawn independently from the mixture weights (not empirical counts)."""
        return jax.random.categorical(key, jnp.log(self.weights), shape=(n,)).astype(jnp.int32)

    def sample(self, key: jax.Array, modes: jax.Array, dtype=jnp.float32) -> jax.Array:
        """x0 = mu_k + sigma_k * eps, (B, H, W, C); a null label (== K) gives N(0, I)."""
        modes = jnp.asarray(modes, jnp.int32)
        valid = modes < self.n_components
        index = jnp.where(valid, modes, 0)
        mean = jnp.take(self.means, index, axis=0).astype(dtype)
        mean = jnp.where(valid[:, None, None, None], mean, 0.0)
        sigma = jnp.where(valid, jnp.sqrt(jnp.take(self.variances, index).astype(dtype)), 1.0)
        eps = jax.random.normal(key, (modes.shape[0], *self.latent_shape), dtype)
        return mean + sigma[:, None, None, None] * eps
