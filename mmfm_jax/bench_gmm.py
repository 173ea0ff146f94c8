"""EM benchmark: seconds per iteration of `fit_diag_gmm` against scikit-learn and against
the plain matmuls of the same shapes, all measured in the same run.

Every fit runs the same number of EM iterations from the same initial parameters (tol 0),
so the per-iteration times compare like for like and the log-likelihoods reached must
agree. The figures (also written to the JSON under "definitions"):

* seconds_per_iteration: ours as shipped (bf16-screened E-step, truncated M-step,
  `fit_diag_gmm`'s defaults),
  the median over the iterations after the first (which compiles); the dense M-step
  (`truncate=False`) is timed the same way as seconds_per_iteration_dense.
* roofline_seconds: the plain `jnp.dot` products one dense iteration performs, on the same
  device in the same run: (N, 2D) @ (2D, K) for the E-step and (N, K)^T @ (N, 2D) for the
  M-step statistics, 8 N K D flops in all (median of 3 each; above 2^29 elements of N x K
  they run on a row sample and are scaled by N / rows, stated as roofline_rows).
* roofline_fraction = roofline_seconds / seconds_per_iteration_dense: how close the whole
  dense iteration (exp, sums, scatter, host work included) comes to its own matmuls.
  roofline_fraction_truncated = the E-step dot alone / seconds_per_iteration.
* blocked_estep_seconds: the stricter roofline: only the E-step product, scanned in EM's
  own row blocks (on CPU faster than one plain dot over N rows); blocked_estep_fraction =
  that / seconds_per_iteration, the share of the iteration that is the one product an
  exact float32 E-step cannot skip.
* seconds_per_iteration_unscreened: the same fit with the float32 E-step (`screen=False`;
  the default is the bf16-screened E-step of mmfm_jax/gmm/screen.py).
* tflops: 8 N K D / seconds_per_iteration_dense; effective_tflops: the same dense-iteration
  count over the truncated time (the work it replaces); matmul_tflops: over
  roofline_seconds.
* ratio_vs_reference = sklearn seconds per iteration / ours (truncated);
  ratio_vs_reference_dense the same against the dense M-step.

scikit-learn runs in float64: REFERENCE e.1 says upstream's EM runs on float32 CLS tokens,
but sklearn's float32 EM fails on this data ("ill-defined empirical covariance": its
uncentred E[x^2] - mu^2 goes negative) and was measured no faster than float64 here.
`bench_gmm_stream` is the out-of-memory case: a memory-mapped array read by a chunk
callable, seconds per iteration and peak host RSS.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmfm_jax.gmm.em import default_block_rows, fit_diag_gmm

IMAGENET_ROWS = 1_281_167  # ImageNet-1k train images: MM-FM's CLS fit set
DEFINITIONS = {
    "seconds_per_iteration": "ours as shipped (bf16-screened E-step, truncated M-step), "
                             "median after the first",
    "seconds_per_iteration_unscreened": "the same with the float32 E-step (screen=False)",
    "roofline_seconds": "plain jnp.dot of a dense iteration's shapes, (N,2D)@(2D,K) + "
                        "(N,K)^T@(N,2D), same device, same run",
    "roofline_fraction": "roofline_seconds / seconds_per_iteration_dense",
    "roofline_fraction_truncated": "E-step jnp.dot seconds / seconds_per_iteration",
    "blocked_estep_fraction": "the E-step product alone, scanned in EM's blocks (faster than "
                              "one plain dot on CPU) / seconds_per_iteration",
    "tflops": "8 N K D / seconds_per_iteration_dense",
    "effective_tflops": "8 N K D / seconds_per_iteration (dense-equivalent work)",
    "ratio_vs_reference": "sklearn float64 seconds per iteration / seconds_per_iteration",
}


def _data(n: int, k: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (k, d)).astype(np.float32)
    labels = rng.integers(0, k, n)
    x = centres[labels] + rng.normal(0, 1, (n, d)).astype(np.float32)
    init_idx = rng.choice(n, k, replace=False)
    init = (np.full(k, 1.0 / k), x[init_idx].astype(np.float64), np.ones((k, d)))
    return x, init


def _median_seconds(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_roofline(n: int, k: int, d: int, max_elements: int = 2 ** 29) -> dict:
    """Seconds of the plain dots one dense EM iteration performs (module docstring)."""
    rows = min(n, max(1, max_elements // k))
    rng = np.random.default_rng(1)
    feats = jnp.asarray(rng.random((rows, 2 * d), np.float32))
    matrix = jnp.asarray(rng.random((2 * d, k), np.float32))
    resp = jnp.asarray(rng.random((rows, k), np.float32))
    hi = jax.lax.Precision.HIGHEST
    e_dot = jax.jit(lambda a, b: jnp.dot(a, b, precision=hi))
    m_dot = jax.jit(lambda r, a: jnp.dot(r.T, a, precision=hi))
    scale = n / rows
    e_s = _median_seconds(e_dot, feats, matrix) * scale
    m_s = _median_seconds(m_dot, resp, feats) * scale
    block = min(default_block_rows(k), rows)
    blocks = rows // block

    def blocked(a, b):  # the E-step product in EM's own blocks: the stricter roofline
        body = lambda c, x: (c + jnp.dot(x, b, precision=hi)[:, 0].sum(), None)
        return jax.lax.scan(body, 0.0, a[:blocks * block].reshape(blocks, block, -1))[0]

    b_s = _median_seconds(jax.jit(blocked), feats, matrix) * n / (blocks * block)
    del feats, matrix, resp
    return {"roofline_seconds": e_s + m_s, "roofline_estep_seconds": e_s,
            "roofline_mstep_seconds": m_s, "roofline_rows": rows,
            "blocked_estep_seconds": b_s}


def _ours(x, k: int, iters: int, init, truncate: bool, screen: bool | None = None):
    fit = fit_diag_gmm(x, k, max_iter=iters + 1, tol=0.0, init=init, truncate=truncate,
                       screen=screen)
    return fit, float(np.median(fit.iteration_seconds[1:]))  # the first one compiles


def _sklearn(x, k: int, iters: int, init) -> tuple[float, float]:
    """sklearn's seconds per iteration (two fits' difference: init and the final E-step
    cancel) and its lower bound after iters + 1 iterations."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    w0, m0, v0 = init
    xs = x.astype(np.float64)

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
    return (t_all - t_first) / iters, float(gm.lower_bound_)


def bench_gmm(n: int = 100_000, k: int = 1024, d: int = 768, iters: int = 5,
              vs_sklearn: bool = True, print_fn=print, dense: bool = True) -> dict:
    """The in-memory benchmark (module docstring for every figure)."""
    load_before = os.getloadavg()
    x, init = _data(n, k, d)
    flops = 8.0 * n * k * d
    fit, per_iter = _ours(x, k, iters, init, truncate=True)
    r = {"n": n, "k": k, "d": d, "iters": iters, "device": jax.devices()[0].device_kind,
         "backend": jax.default_backend(), "seconds_per_iteration": per_iter,
         "log_likelihood": fit.lower_bound, "effective_tflops": flops / per_iter / 1e12,
         "truncation_last_iteration": fit.truncation[-1], "definitions": DEFINITIONS}
    r.update(matmul_roofline(n, k, d))
    r["matmul_tflops"] = flops / r["roofline_seconds"] / 1e12
    r["roofline_fraction_truncated"] = r["roofline_estep_seconds"] / per_iter
    r["blocked_estep_fraction"] = r["blocked_estep_seconds"] / per_iter
    print_fn(f"ours    ({r['backend']}, {fit.truncation[-1]['m_step']}): {per_iter:.3f} "
             f"s/iteration, log-likelihood {fit.lower_bound:.6f} after {iters + 1} iterations;"
             f" truncation {fit.truncation[-1]}")
    ufit, unscreened = _ours(x, k, iters, init, truncate=True, screen=False)
    r.update(seconds_per_iteration_unscreened=unscreened,
             unscreened_vs_default_rel_diff=abs(ufit.lower_bound / fit.lower_bound - 1))
    print_fn(f"ours    (float32 E-step, screen=False): {unscreened:.3f} s/iteration, "
             f"log-likelihood rel diff {r['unscreened_vs_default_rel_diff']:.1e}")
    print_fn(f"plain jnp.dot of a dense iteration's shapes: {r['roofline_seconds']:.3f} s "
             f"({r['matmul_tflops']:.3f} TFLOP/s); E-step dot / truncated iteration "
             f"{r['roofline_fraction_truncated']:.2f}; the E-step product alone in EM's "
             f"blocks: {r['blocked_estep_seconds']:.3f} s "
             f"({4 * n * k * d / r['blocked_estep_seconds'] / 1e12:.3f} TFLOP/s), "
             f"/ truncated iteration {r['blocked_estep_fraction']:.2f}")
    if dense:
        dfit, dense_s = _ours(x, k, iters, init, truncate=False)
        r.update(seconds_per_iteration_dense=dense_s, tflops=flops / dense_s / 1e12,
                 roofline_fraction=r["roofline_seconds"] / dense_s,
                 log_likelihood_dense=dfit.lower_bound,
                 truncated_vs_dense_rel_diff=abs(fit.lower_bound / dfit.lower_bound - 1))
        print_fn(f"ours    (dense M-step): {dense_s:.3f} s/iteration ({r['tflops']:.3f} "
                 f"TFLOP/s), roofline fraction {r['roofline_fraction']:.2f}, log-likelihood "
                 f"rel diff to truncated {r['truncated_vs_dense_rel_diff']:.1e}")
    if vs_sklearn:
        t_sk, ll_sk = _sklearn(x, k, iters, init)
        r.update(sklearn_seconds_per_iteration=t_sk, sklearn_log_likelihood=ll_sk,
                 ratio_vs_reference=t_sk / per_iter,
                 log_likelihood_rel_diff=abs(fit.lower_bound / ll_sk - 1))
        if dense:
            r["ratio_vs_reference_dense"] = t_sk / r["seconds_per_iteration_dense"]
        print_fn(f"sklearn (cpu float64): {t_sk:.3f} s/iteration, log-likelihood {ll_sk:.6f};"
                 f" ratio {r['ratio_vs_reference']:.1f}x, log-likelihood rel diff "
                 f"{r['log_likelihood_rel_diff']:.1e}")
    r["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    print_fn(f"load average (1, 5, 15 min): before {load_before}, after {os.getloadavg()}")
    return r


def _status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmHWM: peak RSS; RssAnon: anonymous RSS now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class _AnonPeak:
    """Peak anonymous RSS while the block runs, sampled every 50 ms. VmHWM also counts the
    memory map's file-backed pages (every row a pass touched, reclaimable page cache), so
    the anonymous peak is the figure that the chunk, not N, must bound."""

    def __enter__(self):
        self.peak, self._stop = _status_bytes("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _status_bytes("RssAnon"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("RssAnon"))


def _memmap_data(path: str, n: int, k: int, d: int, chunk: int, seed: int = 0):
    """The `_data` model written chunk by chunk into a float32 memory map (never all of it
    in memory); init = the first k rows, unit variances."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (k, d)).astype(np.float32)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        labels = rng.integers(0, k, rows)
        mm[start:start + rows] = centres[labels] + rng.normal(0, 1, (rows, d)).astype(
            np.float32)
    mm.flush()
    del mm
    mm = np.load(path, mmap_mode="r")
    return mm, (np.full(k, 1.0 / k), np.asarray(mm[:k], np.float64), np.ones((k, d)))


def projection_from_gpu(gpu_json: str | None, k: int, d: int) -> dict:
    """Seconds per iteration for ImageNet's 1,281,167 rows on the accelerator that wrote
    `gpu_json` (a `bench gmm --json` file from launch/bench_gpu.sh), scaled from its
    measured rate by rows x K x D (the cost is linear in each); pending without one."""
    if not gpu_json or not os.path.exists(gpu_json):
        return {"projection": "pending: needs launch/bench_gpu.sh's gmm JSON from a GPU run"}
    with open(gpu_json) as f:
        g = json.load(f)
    st, row = g["settings"], g["rows"][0]
    scale = IMAGENET_ROWS * k * d / (st["n"] * st["k"] * st["d"])
    return {"projection": f"from {gpu_json} ({g['environment']['device_kind']})",
            "projected_imagenet_seconds_per_iteration": row["seconds"] * scale}


def bench_gmm_stream(n: int = 200_000, k: int = 8192, d: int = 768, iters: int = 2,
                     chunk_rows: int = 16_384, path: str | None = None, gpu_json=None,
                     print_fn=print) -> dict:
    """EM over a memory-mapped (N, D) float32 file read through a chunk callable: nothing
    holds N rows at once, so peak RSS should follow the chunk (and the K x 2D statistics),
    not N. Reports seconds per iteration (median after the first), peak RSS (VmHWM, which
    includes the map's file pages) and peak anonymous RSS (`_AnonPeak`) with their values
    before the fit, and the ImageNet projection (`projection_from_gpu`)."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path) if path else None) as tmp:
        file = path or os.path.join(tmp, "cls.npy")
        t0 = time.perf_counter()
        mm, init = _memmap_data(file, n, k, d, chunk_rows)
        write_s = time.perf_counter() - t0
        rss_before, anon_before = _status_bytes("VmHWM"), _status_bytes("RssAnon")
        chunks = lambda: (mm[i:i + chunk_rows] for i in range(0, n, chunk_rows))
        with _AnonPeak() as anon:
            fit = fit_diag_gmm(chunks, k, max_iter=iters + 1, tol=0.0, init=init,
                               chunk_size=chunk_rows)
        per_iter = float(np.median(fit.iteration_seconds[1:]))
        peak = _status_bytes("VmHWM")
    r = {"n": n, "k": k, "d": d, "iters": iters, "chunk_rows": chunk_rows,
         "backend": jax.default_backend(), "seconds_per_iteration": per_iter,
         "iteration_seconds": fit.iteration_seconds, "log_likelihood": fit.lower_bound,
         "effective_tflops": 8.0 * n * k * d / per_iter / 1e12,
         "data_bytes": n * d * 4, "peak_rss_bytes_before_fit": rss_before,
         "peak_rss_bytes": peak, "anon_rss_bytes_before_fit": anon_before,
         "peak_anon_rss_bytes": anon.peak, "memmap_write_seconds": write_s,
         "truncation_last_iteration": fit.truncation[-1],
         "load_average": {"before": list(load_before), "after": list(os.getloadavg())}}
    r.update(projection_from_gpu(gpu_json, k, d))
    projected = r.get("projected_imagenet_seconds_per_iteration", r["projection"])
    print_fn(f"streamed memmap N {n} K {k} D {d}, chunks of {chunk_rows}: {per_iter:.2f} "
             f"s/iteration ({r['effective_tflops']:.3f} effective TFLOP/s); peak RSS "
             f"{peak / 2**20:.0f} MiB incl. mapped file pages ({rss_before / 2**20:.0f} before "
             f"the fit), peak anonymous RSS {anon.peak / 2**20:.0f} MiB ({anon_before / 2**20:.0f}"
             f" before); the data is {r['data_bytes'] / 2**20:.0f} MiB; truncation "
             f"{fit.truncation[-1]}; "
             f"ImageNet projection: {projected}")
    return r


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-sklearn", action="store_true")
    p.add_argument("--stream", action="store_true", help="bench_gmm_stream instead")
    a = p.parse_args()
    if a.stream:
        bench_gmm_stream(a.n, a.k, a.d, a.iters)
    else:
        bench_gmm(a.n, a.k, a.d, a.iters, not a.no_sklearn)
