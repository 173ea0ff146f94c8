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


@struct.dataclass
class DiagTerms:
    """log w_k + log N(x; mu_k, diag var_k) rewritten as one matmul: with xc = x - centre,
    quad = [xc^2, xc] @ matrix + offset and log_joint = bias - quad / 2.

    The expanded Mahalanobis form sum xc^2/v - 2 xc.mu/v + sum mu^2/v cancels badly in
    float32 when |x| is large against the spread, so both sides are centred on the mean of
    the component means (a shift changes nothing in exact arithmetic). Stacking [xc^2, xc]
    makes the two N x D x K products one N x 2D x K product (one pass over x, one output),
    and EM's M-step reuses the same features for R^T [xc^2, xc].
    """

    matrix: jax.Array  # (2D, K): [1/var; -2 (mu - centre)/var]^T
    offset: jax.Array  # (K,): sum_d (mu - centre)^2 / var
    bias: jax.Array  # (K,): log w - (D log 2 pi + sum_d log var) / 2
    centre: jax.Array  # (D,)

    def features(self, x: jax.Array) -> jax.Array:
        """[xc^2, xc], (N, 2D)."""
        xc = x.astype(self.centre.dtype) - self.centre
        return jnp.concatenate([xc * xc, xc], axis=-1)

    def log_joint_from_features(self, feats: jax.Array) -> jax.Array:
        """(N, K); the quadratic form is clamped at zero (rounding can push it below)."""
        quad = jnp.dot(feats, self.matrix, precision=HIGHEST) + self.offset
        return self.bias - 0.5 * jnp.maximum(quad, 0.0)

    @classmethod
    def build(cls, weights, means, variances) -> DiagTerms:
        """Matmuls run at full precision whatever the global default (TPU/TF32 would lose
        ~1e-3 relative); float32 unless the parameters are float64."""
        dtype = jax.dtypes.canonicalize_dtype(
            jnp.result_type(means.dtype, variances.dtype, jnp.float32))
        means, variances = means.astype(dtype), variances.astype(dtype)
        centre = jnp.mean(means, axis=0)
        mc = means - centre
        precision = 1.0 / variances
        matrix = jnp.concatenate([precision, -2.0 * mc * precision], axis=1).T
        log_det = jnp.sum(jnp.log(variances), axis=1)
        bias = (jnp.log(weights.astype(dtype))
                - 0.5 * (means.shape[-1] * math.log(2.0 * math.pi) + log_det))
        return cls(matrix, jnp.sum(mc * mc * precision, axis=1), bias, centre)


def first_max_index(values: jax.Array, row_max: jax.Array) -> jax.Array:
    """Per row, the index (as a float) of the first entry equal to the row's max: a max-
    then-min pair, because XLA:CPU's variadic argmax reduce is ~10x slower than a max."""
    iota = jnp.arange(values.shape[1], dtype=values.dtype)[None, :]
    return jnp.min(jnp.where(values == row_max[:, None], iota, values.shape[1]), axis=1)


def _joint_dtype(x: jax.Array, means: jax.Array):
    return jax.dtypes.canonicalize_dtype(jnp.result_type(x.dtype, means.dtype, jnp.float32))


def log_gaussian_diag(x: jax.Array, means: jax.Array, variances: jax.Array) -> jax.Array:
    """log N(x_n; mu_k, diag var_k) for every pair, (N, D) x (K, D) -> (N, K), as one matmul
    (`DiagTerms` with unit weights), in the promoted dtype of x and the means."""
    dtype = _joint_dtype(x, means)
    terms = DiagTerms.build(jnp.ones(means.shape[:1], dtype), means.astype(dtype),
                            variances.astype(dtype))
    return terms.log_joint_from_features(terms.features(x))


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
        dtype = _joint_dtype(x, self.means)
        terms = DiagTerms.build(self.weights.astype(dtype), self.means.astype(dtype),
                                self.variances.astype(dtype))
        return terms.log_joint_from_features(terms.features(x))

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
