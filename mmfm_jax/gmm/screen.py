"""The E-step screened in bfloat16, with a certificate: which rows need no float32 E-step.

The E-step is one (rows, 2D) x (2D, K) product (`mixture.DiagTerms`). In bfloat16 with
float32 accumulation it runs 1.75x faster on this CPU (AVX512-BF16) and several times faster
on GPUs and TPUs, but its error (2^-8 relative per operand) is nats, not rounding. So the
bf16 product only *screens*: per row it names a likely top mode t, whose log-joint is then
computed exactly (a float32 dot with t's column), and it bounds every other mode from above
by a rigorous error bound (below). A row is *certified* when the bounded mass of all other
modes relative to t, sum_k exp(ub_k - lj_t), is below `tol` (1e-7, the truncated M-step's
row bound): its responsibility is then 1 on t to within tol, its log-likelihood lj_t to
within tol nats, and the bounded mass per mode feeds the truncated M-step's per-mode
certificate. Every other row is recomputed by the exact float32 E-step
(`em._flush_pending`), so a screened fit is the exact one to float32 rounding and the
truncation bound, whatever the data: a bad screen only means more rows recomputed.

The modes with the largest error coefficient (tight modes: 1 / var is large, and so is the
bf16 error, while their true log-joint is far below the top) are not screened: the last
K / 16 columns in the screen's order run in float32 and count as exact, as in the dense
E-step. `ScreenTerms` holds the modes in that order (`order`).

The bound, for q = f . theta (f = [xc^2, xc], theta a column of the E-step matrix) and its
bf16 evaluation q~ = fl32(bf(f) . bf(theta) + offset): with f = bf(f) + df and
theta = bf(theta) + dt,

  |q - q~| <= |bf(f)| |dt| + |df| (|bf(theta)| + |dt|)    Cauchy-Schwarz on the rounding
             + gamma |bf(f)| |bf(theta)|                   float32 accumulation in any order
                                                           (gamma = 2 * 2D * 2^-24)
             + 2^-21 (|bf(f)| |bf(theta)| + |offset|)      the offset add

each coefficient inflated by 2^-8 for the rounding of the norms themselves; the clamp at
zero is 1-Lipschitz and the log-joint moves by half of it. Products of two bf16 numbers are
exact in float32, so no term is missing; the factor 2 in gamma also covers accumulators
that truncate instead of rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mmfm_jax.gmm.mixture import HIGHEST, DiagTerms, first_max_index

EXACT_SHARE = 16  # 1 / 16 of the modes (the largest error coefficients) run in float32


class ScreenTerms(NamedTuple):
    """The E-step in the screen's mode order: bf16 columns first, float32 columns last."""

    order: jax.Array  # (K,) int32: screen column j is mode order[j]
    low: jax.Array  # (2D, K - K_exact) bfloat16 columns
    exact: jax.Array  # (2D, K_exact) float32 columns
    rows: jax.Array  # (K, 2D) float32 columns as rows: the exact top mode, contiguous
    offset: jax.Array  # (K,)
    bias: jax.Array  # (K,)
    bias_up: jax.Array  # (K,) bias + the offset-add term of the bound (half of it)
    coef_f: jax.Array  # (K,) half the bound's coefficient of |bf(f)| (0 on exact columns)
    coef_df: jax.Array  # (K,) half the bound's coefficient of |df|


@jax.jit
def build(terms: DiagTerms) -> ScreenTerms:
    matrix = terms.matrix
    two_d, k = matrix.shape
    gamma = 2.0 * two_d * 2.0 ** -24
    up = 1.0 + 2.0 ** -8
    wide = matrix.astype(jnp.bfloat16).astype(matrix.dtype)
    norm = jnp.linalg.norm(wide, axis=0)
    err = jnp.linalg.norm(matrix - wide, axis=0)
    coef_f = 0.5 * up * (err + (gamma + 2.0 ** -21) * norm)
    coef_df = 0.5 * up * (norm + err)
    n_exact = min(k - 1, max(1, k // EXACT_SHARE))
    order = jnp.argsort(coef_f + 2.0 ** -8 * coef_df).astype(jnp.int32)  # largest last
    is_exact = jnp.arange(k) >= k - n_exact
    m = matrix[:, order]
    return ScreenTerms(
        order=order, low=m[:, :k - n_exact].astype(jnp.bfloat16), exact=m[:, k - n_exact:],
        rows=m.T, offset=terms.offset[order], bias=terms.bias[order],
        bias_up=terms.bias[order] + 0.5 * up * 2.0 ** -21 * jnp.abs(terms.offset[order]),
        coef_f=jnp.where(is_exact, 0.0, coef_f[order]),
        coef_df=jnp.where(is_exact, 0.0, coef_df[order]))


def _exact_log_joint(screen: ScreenTerms, feats, column):
    """Log-joint of each row under one screen column per row, by a float32 dot."""
    rows = jnp.take(screen.rows, column, axis=0, mode="clip")
    quad = jnp.sum(feats * rows, axis=1) + screen.offset[column]
    return screen.bias[column] - 0.5 * jnp.maximum(quad, 0.0)


def second_look(terms: DiagTerms, screen: ScreenTerms, x, tol: float):
    """`screened_posterior` for rows it left uncertain, with the mode of largest bounded
    mass ("second") computed exactly as well: usually that one mode is all that kept the
    row uncertain. The row is certified when second's exact mass relative to top plus the
    bounded mass of the others (their sum, inflated by its float32 rounding, (K + 1) 2^-24)
    is below tol, and top beats second. The returned `upper` holds second's exact relative
    mass in its column."""
    feats, top, upper, _, lj_top = screened_posterior(terms, screen, x, tol)
    k = upper.shape[1]
    second = first_max_index(upper, jnp.max(upper, axis=1)).astype(jnp.int32)
    exact = jnp.exp(jnp.minimum(_exact_log_joint(screen, feats, second) - lj_top, 0.0))
    is_second = jnp.arange(k)[None, :] == second[:, None]
    upper = jnp.where(is_second, exact[:, None], upper)
    rest = jnp.sum(jnp.where(is_second, 0.0, upper), axis=1) * (1.0 + (k + 1) * 2.0 ** -24)
    certified = (exact < 1.0) & (rest + exact < tol)
    return feats, top, upper, certified, lj_top


def screened_posterior(terms: DiagTerms, screen: ScreenTerms, x, tol: float):
    """One block screened in bf16. Returns feats [xc^2, xc], top (the screen's top mode,
    a screen column), upper (exp(ub_j - lj_top) for screen columns j != top, clamped at 1,
    0 on top: the bounded relative mass of each other mode), certified (sum of upper <
    tol) and lj_top (top's exact log-joint)."""
    feats = terms.features(x)
    feats_bf = feats.astype(jnp.bfloat16)
    wide = feats_bf.astype(feats.dtype)
    quad = jnp.concatenate([
        jnp.dot(feats_bf, screen.low, preferred_element_type=feats.dtype),
        jnp.dot(feats, screen.exact, precision=HIGHEST)], axis=1) + screen.offset
    half = 0.5 * jnp.maximum(quad, 0.0)
    lj = screen.bias - half
    top_f = first_max_index(lj, jnp.max(lj, axis=1))
    top = top_f.astype(jnp.int32)
    lj_top = _exact_log_joint(screen, feats, top)
    iota = jnp.arange(lj.shape[1], dtype=lj.dtype)[None, :]
    nf = jnp.linalg.norm(wide, axis=1)[:, None]
    ndf = jnp.linalg.norm(feats - wide, axis=1)[:, None]
    ub = screen.bias_up - half + nf * screen.coef_f + ndf * screen.coef_df
    # clamped at 1 (the row is uncertain anyway): no inf, so 0 * upper stays 0
    upper = jnp.exp(jnp.where(iota == top_f[:, None], -jnp.inf,
                              jnp.minimum(ub - lj_top[:, None], 0.0)))
    return feats, top, upper, jnp.sum(upper, axis=1) < tol, lj_top
