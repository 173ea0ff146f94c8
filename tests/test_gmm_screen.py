"""The bf16 screen's certificate against float64 truth: a row it certifies really has less
than tol of its mass outside its top mode, and the check can fail: with the error bound
removed, the same data yields falsely certified rows."""

import jax.numpy as jnp
import numpy as np
import pytest

from mmfm_jax.gmm import fit_diag_gmm, screen
from mmfm_jax.gmm.mixture import DiagTerms

TOL = 1e-7


def _near_threshold(seed=0, d=32, rows=4000):
    """Two unit-variance modes whose log-joint gap over the rows spans ~0-60 nats around
    the certificate's ln(1/tol) = 16, two far modes that pull the centre away (so |xc| and
    with it the bf16 error are large), one tight mode (var 1e-4: a large bf16 error that is
    not screened) and one broad mode."""
    rng = np.random.default_rng(seed)
    means = np.zeros((6, d))
    means[1, 0] = 8.0
    means[2, 1] = means[3, 1] = 60.0
    means[3, 2] = 5.0
    means[4] = means[0] + 3.0
    means[5, 3] = -20.0
    variances = np.ones((6, d))
    variances[4] = 1e-4
    variances[5] = 25.0
    t = rng.uniform(0.0, 1.0, rows)
    x = t[:, None] * means[1] + rng.normal(0, 1.0, (rows, d))
    weights = np.full(6, 1 / 6)
    return x.astype(np.float32), weights, means, variances


def _log_joint64(x, weights, means, variances):
    """float64 log w_k + log N(x; mu_k, var_k) in the direct (x - mu)^2 form."""
    x, means, variances = (np.asarray(a, np.float64) for a in (x, means, variances))
    maha = (((x[:, None, :] - means[None]) ** 2) / variances[None]).sum(-1)
    log_det = np.log(variances).sum(-1)
    return np.log(weights)[None] - 0.5 * (maha + log_det + x.shape[1] * np.log(2 * np.pi))


def _screen_rows(x, weights, means, variances, drop_bound=False, look=screen.screened_posterior):
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    terms = DiagTerms.build(f32(weights), f32(means), f32(variances))
    s = screen.build(terms)
    if drop_bound:
        s = s._replace(coef_f=jnp.zeros_like(s.coef_f), coef_df=jnp.zeros_like(s.coef_df),
                       bias_up=s.bias)
    _, top, _, certified, lj_top = look(terms, s, jnp.asarray(x), TOL)
    return np.asarray(s.order)[np.asarray(top)], np.asarray(certified), np.asarray(lj_top)


def _false_certificates(x, top, certified, truth):
    rel = np.exp(truth - truth[np.arange(len(x)), top][:, None])
    rel[np.arange(len(x)), top] = 0.0
    outside = rel.sum(1)
    return np.flatnonzero(certified & (outside >= TOL)), outside


@pytest.mark.parametrize("look", [screen.screened_posterior, screen.second_look],
                         ids=["screen", "second_look"])
def test_certified_rows_are_certified_in_float64(look):
    """Also `second_look` (the top's runner-up computed exactly): it certifies more rows,
    and none falsely."""
    x, w, m, v = _near_threshold()
    top, certified, lj_top = _screen_rows(x, w, m, v, look=look)
    truth = _log_joint64(x, w, np.asarray(m, np.float32), np.asarray(v, np.float32))
    bad, outside = _false_certificates(x, top, certified, truth)
    print(f"certified {certified.mean():.3f}; rows with >= tol outside the top "
          f"{(outside >= TOL).mean():.3f}")
    assert bad.size == 0, bad[:10]
    assert 0.05 < certified.mean() < 0.95  # the data straddles the threshold
    top_truth = truth[np.arange(len(x)), top]
    np.testing.assert_allclose(lj_top[certified], top_truth[certified], rtol=1e-5, atol=1e-2)


def test_without_the_bound_the_check_catches_false_certificates():
    x, w, m, v = _near_threshold()
    top, certified, _ = _screen_rows(x, w, m, v, drop_bound=True)
    truth = _log_joint64(x, w, np.asarray(m, np.float32), np.asarray(v, np.float32))
    bad, _ = _false_certificates(x, top, certified, truth)
    print(f"{bad.size} rows falsely certified without the bound")
    assert bad.size > 0


def test_screen_needs_float32():
    x, w, m, v = _near_threshold(rows=64)
    with pytest.raises(ValueError, match="screen=True needs float32"):
        fit_diag_gmm(x.astype(np.float16), 6, init=(w, m, v), screen=True, max_iter=1)
