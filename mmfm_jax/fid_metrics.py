"""The ADM evaluation metrics on Inception features: FID / sFID, Inception Score, precision
and recall, and the streamed float64 moments they are computed from.

Pure functions of feature arrays (no files, no network), so the demo and the tests use them
without an Inception; `mmfm_jax.evaluate` is the job that produces the features. They follow
guided-diffusion's `evaluations/evaluator.py`:

* Fréchet distance in float64, Tr sqrt(S1 S2) from the eigenvalues of L^T S2 L (S1 = L L^T,
  pivoted Cholesky) or, as ADM, from scipy's sqrtm; eps * I retried when not finite;
* IS from softmax(logits without bias), mean over splits of 5000;
* precision/recall: k = 3 nearest-neighbour manifolds. ADM computes those distances in
  float16 when finite; here they are float32 (jitted, blockwise), so borderline
  neighbours can differ.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- moments, FID, IS


class MomentAccumulator:
    """Streamed float64 mean and covariance, equal to np.mean / np.cov(rowvar=False).

    Rows are shifted by the first batch's mean (against cancellation) and buffered so the
    sum of outer products is one large float64 GEMM per `flush_rows` rows.
    """

    def __init__(self, flush_rows: int = 2048):
        self.n = 0
        self.shift = self.total = self.outer = None
        self.flush_rows = flush_rows
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def update(self, rows) -> None:
        rows = np.asarray(rows, np.float64)
        rows = rows.reshape(len(rows), -1)
        if self.shift is None:
            self.shift = rows.mean(axis=0)
            self.total = np.zeros_like(self.shift)
            self.outer = np.zeros((rows.shape[1],) * 2)
        self._buffer.append(rows - self.shift)
        self._buffered += len(rows)
        self.n += len(rows)
        if self._buffered >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            x = np.concatenate(self._buffer)
            self.total += x.sum(axis=0)
            self.outer += x.T @ x
            self._buffer, self._buffered = [], 0

    def mean(self) -> np.ndarray:
        self._flush()
        return self.shift + self.total / self.n

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 rows, got {self.n}")
        self._flush()
        centred = self.outer - np.outer(self.total, self.total) / self.n
        return centred / (self.n - 1)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str) -> float:
    """Tr sqrt(sigma1 @ sigma2)."""
    if method == "sqrtm":  # ADM's reference computation
        import scipy.linalg

        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
            covmean = covmean.real
        return float(np.trace(covmean))
    if method != "eigh":
        raise ValueError(f"method {method!r}, expected 'eigh' or 'sqrtm'")
    try:
        factor, other = _factor(sigma1, sigma2)
        m = factor.T @ other @ factor
        w = np.linalg.eigvalsh((m + m.T) / 2)
    except np.linalg.LinAlgError:
        return float("nan")
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _factor(sigma1: np.ndarray, sigma2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L, S) with L L^T one covariance and S the other: the eigenvalues of S1 S2 are those
    of the symmetric PSD L^T S L. L comes from LAPACK's pivoted Cholesky (dpstrf, default
    rank tolerance d * eps * max diag) of the lower-rank covariance, so a few samples
    (rank r) cost O(d^2 r) and leave an r x r eigenproblem; full-rank covariances get a
    plain Cholesky factor."""
    from scipy.linalg import lapack

    factors = []
    for sigma in (sigma1, sigma2):
        c, piv, rank, info = lapack.dpstrf(sigma, lower=1)
        if info < 0:
            raise np.linalg.LinAlgError(f"dpstrf failed (info {info})")
        lower = np.tril(c)[:, :rank]
        factor = np.empty_like(lower)
        factor[piv - 1] = lower  # sigma[piv][:, piv] = lower @ lower.T
        factors.append(factor)
    if factors[0].shape[1] <= factors[1].shape[1]:
        return factors[0], sigma2
    return factors[1], sigma1


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6,
                     method: str = "eigh") -> float:
    """||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 Tr sqrt(S1 S2), in float64, not clamped.

    `method="eigh"` takes the trace from the eigenvalues of L^T S2 L with S1 = L L^T
    (pivoted Cholesky of the lower-rank one), clipped at 0; `"sqrtm"` is
    ADM's scipy.linalg.sqrtm. As in ADM, a non-finite trace is retried with eps * I added
    to both covariances.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(mu, np.float64)) for mu in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 "
                         f"{mu2.shape}, sigma2 {sigma2.shape}; expected ({d},) and ({d}, {d})")
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product(sigma1, sigma2, method)
    if not np.isfinite(tr_covmean):
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal "
                      "of cov estimates", stacklevel=2)
        offset = np.eye(d) * eps
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset, method)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits_unbiased, split_size: int = 5000) -> float:
    """ADM's IS: mean over consecutive splits of exp(E_x KL(p(y|x) || p(y))), float64."""
    x = np.asarray(logits_unbiased, np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for start in range(0, len(p), split_size):
        part, log_part = p[start:start + split_size], log_p[start:start + split_size]
        kl = part * (log_part - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- precision/recall


@jax.jit
def _sq_distances(rows, cols):
    """max(|u|^2 - 2 u.v + |v|^2, 0), ADM's pairwise form, float32."""
    hi = jax.lax.Precision.HIGHEST
    norm_r = jnp.sum(rows * rows, axis=1)[:, None]
    norm_c = jnp.sum(cols * cols, axis=1)[None, :]
    return jnp.maximum(norm_r - 2.0 * jnp.matmul(rows, cols.T, precision=hi) + norm_c, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _knn_merge(best, rows, cols, col_valid, k):
    d = jnp.where(col_valid[None, :], _sq_distances(rows, cols), jnp.inf)
    both = jnp.concatenate([best, d], axis=1)
    return -jax.lax.top_k(-both, k + 1)[0]


@jax.jit
def _inside(rows, row_radii, cols, col_radii):
    """For a block: which rows lie in some col ball, which cols lie in some row ball."""
    d = _sq_distances(rows, cols)
    return (jnp.any(d <= col_radii[None, :], axis=1), jnp.any(d <= row_radii[:, None], axis=0))


def _blocks(x: np.ndarray, block: int):
    """(padded block, number of valid rows) pairs of a fixed block shape."""
    for start in range(0, len(x), block):
        part = x[start:start + block]
        n = len(part)
        if n < block:
            part = np.concatenate([part, np.zeros((block - n, x.shape[1]), x.dtype)])
        yield start, jnp.asarray(part), n


def manifold_radii(features, k: int = 3, block: int = 10000) -> np.ndarray:
    """Squared distance of each row to its k-th nearest neighbour (itself excluded), as
    ADM's ManifoldEstimator (partition index k over rows that include the point itself)."""
    x = np.asarray(features, np.float32)
    if len(x) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} points, got {len(x)}")
    block = min(block, len(x))
    radii = np.empty(len(x), np.float32)
    for start, rows, n in _blocks(x, block):
        best = jnp.full((block, k + 1), jnp.inf, jnp.float32)
        for _, cols, cn in _blocks(x, block):
            valid = jnp.arange(block) < cn
            best = _knn_merge(best, rows, cols, valid, k=k)
        radii[start:start + n] = np.asarray(best[:n, k])
    return radii


def precision_recall(ref_features, sample_features, k: int = 3,
                     block: int = 10000) -> tuple[float, float]:
    """(precision, recall): the fraction of samples inside the reference manifold and of
    reference points inside the sample manifold (k-NN balls, ADM's definition)."""
    ref = np.asarray(ref_features, np.float32)
    sam = np.asarray(sample_features, np.float32)
    ref_radii, sam_radii = manifold_radii(ref, k, block), manifold_radii(sam, k, block)
    ref_block, sam_block = min(block, len(ref)), min(block, len(sam))
    sam_in = np.zeros(len(sam), bool)
    ref_in = np.zeros(len(ref), bool)
    pad = lambda r, size: np.concatenate([r, np.full(size - len(r), -1.0, np.float32)])
    for s0, s_rows, sn in _blocks(sam, sam_block):
        s_radii = jnp.asarray(pad(sam_radii[s0:s0 + sn], sam_block))
        for r0, r_rows, rn in _blocks(ref, ref_block):
            r_radii = jnp.asarray(pad(ref_radii[r0:r0 + rn], ref_block))
            s_hit, r_hit = _inside(s_rows, s_radii, r_rows, r_radii)
            sam_in[s0:s0 + sn] |= np.asarray(s_hit[:sn])
            ref_in[r0:r0 + rn] |= np.asarray(r_hit[:rn])
    return float(sam_in.mean()), float(ref_in.mean())
