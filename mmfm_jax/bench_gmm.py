"""EM benchmark: seconds per iteration of `fit_diag_gmm` against scikit-learn on the same data.

Both run the same number of EM iterations from the same initial parameters (tol 0), so the
per-iteration times compare like for like and the log-likelihoods reached must agree.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from mmfm_jax.gmm.em import fit_diag_gmm


def _data(n: int, k: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (k, d)).astype(np.float32)
    labels = rng.integers(0, k, n)
    x = centres[labels] + rng.normal(0, 1, (n, d)).astype(np.float32)
    init_idx = rng.choice(n, k, replace=False)
    init = (np.full(k, 1.0 / k), x[init_idx].astype(np.float64), np.ones((k, d)))
    return x, init


def bench_gmm(n: int = 100_000, k: int = 1024, d: int = 768, iters: int = 5,
              vs_sklearn: bool = True, print_fn=print) -> dict:
    """Seconds per EM iteration (ours: median after the first, compiling, iteration; sklearn:
    total / iterations) with the mean log-likelihood each reached after iters + 1 iterations;
    `ratio_vs_reference` = sklearn time / ours."""
    x, init = _data(n, k, d)
    ours = fit_diag_gmm(x, k, max_iter=iters + 1, tol=0.0, init=init)
    per_iter = float(np.median(ours.iteration_seconds[1:]))  # the first one compiles
    result = {"n": n, "k": k, "d": d, "iters": iters, "device": jax.devices()[0].device_kind,
              "backend": jax.default_backend(), "seconds_per_iteration": per_iter,
              "log_likelihood": ours.lower_bound}
    print_fn(f"ours    ({result['backend']}): {per_iter:.3f} s/iteration, "
             f"log-likelihood {ours.lower_bound:.6f} after {iters + 1} iterations")
    if vs_sklearn:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture

        w0, m0, v0 = init
        xs = x.astype(np.float64)  # MM-FM fits in float64 (REFERENCE e.1)

        def sk_fit(max_iter):
            gm = GaussianMixture(k, covariance_type="diag", max_iter=max_iter, tol=0.0,
                                 init_params="random_from_data", weights_init=w0,
                                 means_init=m0, precisions_init=1.0 / v0)
            t0 = time.perf_counter()
            gm.fit(xs)
            return gm, time.perf_counter() - t0

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            _, t_first = sk_fit(1)  # init + one iteration + the final E-step
            gm, t_all = sk_fit(iters + 1)
        t_sk = (t_all - t_first) / iters
        result.update(sklearn_seconds_per_iteration=t_sk,
                      sklearn_log_likelihood=float(gm.lower_bound_),
                      ratio_vs_reference=t_sk / per_iter,
                      log_likelihood_rel_diff=abs(ours.lower_bound / gm.lower_bound_ - 1))
        print_fn(f"sklearn (cpu float64): {t_sk:.3f} s/iteration, log-likelihood "
                 f"{gm.lower_bound_:.6f}; ratio {t_sk / per_iter:.1f}x, log-likelihood rel "
                 f"diff {result['log_likelihood_rel_diff']:.1e}")
    return result


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-sklearn", action="store_true")
    a = p.parse_args()
    bench_gmm(a.n, a.k, a.d, a.iters, not a.no_sklearn)
