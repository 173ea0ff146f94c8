"""Diagonal-covariance EM on the shared mesh, following scikit-learn's GaussianMixture.

The reference fits its CLS mixture with sklearn (diag, init 'k-means++', reg_covar 1e-6,
tol 1e-3 on the change of the mean log-likelihood; REFERENCE e.1). This module runs the same
iteration as jitted matmuls over data sharded across the mesh's batch axes:

* E-step: log w_k + log N(x; mu_k, var_k) as matmuls (`mixture.log_gaussian_diag`),
  logsumexp, responsibilities; M-step from the sufficient statistics (N_k, R^T x, R^T x^2),
  which are summed over devices by jit and over chunks on the host side, so streaming a
  host array (or a callable yielding chunks) in pieces gives the in-memory result.
* Numerics: the data is centred once on its global mean, so E[x^2] - E[x]^2 and the
  expanded Mahalanobis form cancel little in float32; variances are clamped at zero before
  reg_covar is added, so they are never negative.
* Init 'k-means++' replays sklearn's `_kmeans_plusplus` (same RandomState stream, same
  local trials, same candidate choice) and then sklearn's one-hot-at-the-centres M-step
  (weights (1 + 10 eps) / n, variances ~ reg_covar); the first E-step then assigns every
  point to its nearest centre, as sklearn does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from mmfm_jax import parallel
from mmfm_jax.gmm.mixture import HIGHEST, CLSMixture

Init = str | tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclasses.dataclass
class FitResult:
    """A fitted mixture and how EM got there (lower bounds are mean log-likelihoods)."""

    mixture: CLSMixture
    history: list[float]
    n_iter: int
    converged: bool
    lower_bound: float  # sklearn's lower_bound_: mean log-likelihood before the last M-step
    log_likelihood: float  # mean log-likelihood under the returned parameters
    bic: float
    n_samples: int
    iteration_seconds: list[float] = dataclasses.field(default_factory=list)

    @property
    def weights(self):
        return self.mixture.weights

    @property
    def means(self):
        return self.mixture.means

    @property
    def variances(self):
        return self.mixture.variances


class _Data:
    """The fit data as centred, padded, sharded device chunks of `chunk_size` rows (the
    E-step holds a chunk x K responsibility matrix): uploaded once and kept on the devices,
    or, when streaming, re-read from the host array or the callable on every pass."""

    def __init__(self, x, chunk_size: int, mesh: Mesh | None, stream: bool = False):
        self.mesh = mesh
        self.multiple = parallel.num_batch_shards(mesh) if mesh is not None else 1
        self.source = x if callable(x) else None
        self.array = None if callable(x) else x
        if self.array is not None and np.ndim(self.array) != 2:
            raise ValueError(f"fit data must be (N, D), got shape {np.shape(self.array)}")
        self.chunk_size = chunk_size
        total, n, first = None, 0, None
        for chunk in self._raw_chunks():
            first = chunk if first is None else first
            s = np.asarray(jnp.sum(jnp.asarray(chunk), axis=0), np.float64)
            total = s if total is None else total + s
            n += chunk.shape[0]
        if n == 0:
            raise ValueError("fit data is empty")
        self.n, self.dim = n, first.shape[1]
        self.dtype = jax.dtypes.canonicalize_dtype(
            first.dtype if jnp.issubdtype(first.dtype, jnp.floating) else jnp.float32)
        self.shift = (total / n).astype(self.dtype)
        if mesh is not None:
            self.x_sharding = parallel.batch_sharding(mesh, 2)
            self.m_sharding = parallel.batch_sharding(mesh, 1)
            self.replicated = parallel.replicated(mesh)
        else:
            self.x_sharding = self.m_sharding = self.replicated = SingleDeviceSharding(
                jax.devices()[0])
        self.resident = None
        if self.array is not None and not stream:
            self.resident = list(self._upload())

    def _raw_chunks(self) -> Iterator:
        if self.source is not None:
            for chunk in self.source():
                if np.ndim(chunk) != 2:
                    raise ValueError(f"streamed chunk must be (n, D), got {np.shape(chunk)}")
                yield chunk
            return
        n = self.array.shape[0]
        step = self.chunk_size
        for start in range(0, n, step):
            yield self.array[start:start + step]

    def _put(self, start: int, chunk):
        rows = chunk.shape[0]
        padded = -(-rows // self.multiple) * self.multiple
        x = jnp.asarray(chunk, self.dtype) - jnp.asarray(self.shift)
        x = jnp.pad(x, ((0, padded - rows), (0, 0)))
        mask = (jnp.arange(padded) < rows).astype(self.dtype)
        return (start, rows, jax.device_put(x, self.x_sharding),
                jax.device_put(mask, self.m_sharding))

    def __iter__(self) -> Iterator:
        if self.resident is not None:
            yield from self.resident
            return
        yield from self._upload()

    def _upload(self) -> Iterator:
        start = 0
        for chunk in self._raw_chunks():
            yield self._put(start, chunk)
            start += chunk.shape[0]

    def rows(self, ids: np.ndarray) -> jax.Array:
        """Centred rows by global index (k-means++ candidates)."""
        if self.array is None:
            raise ValueError("init='k-means++' needs random access to the rows: pass an array "
                             "(a memory map streams fine) or use init='random' or explicit "
                             "(weights, means, variances) with a chunk callable")
        if isinstance(self.array, jax.Array):
            picked = jnp.take(self.array, jnp.asarray(ids), axis=0)
        else:
            picked = np.asarray(self.array[np.asarray(ids)])
        return jnp.asarray(picked, self.dtype) - jnp.asarray(self.shift)


@jax.jit
def _chunk_stats(mixture: CLSMixture, x, mask):
    """Sufficient statistics of one chunk: (N_k, R^T x, R^T x^2, sum log p(x))."""
    log_joint = mixture.log_joint(x)
    log_norm = jax.nn.logsumexp(log_joint, axis=1)
    resp = jnp.exp(log_joint - log_norm[:, None]) * mask[:, None]
    return (jnp.sum(resp, axis=0), jnp.dot(resp.T, x, precision=HIGHEST),
            jnp.dot(resp.T, x * x, precision=HIGHEST), jnp.sum(log_norm * mask))


@jax.jit
def _chunk_log_prob(mixture: CLSMixture, x, mask):
    return jnp.sum(mixture.log_prob(x) * mask)


@jax.jit
def _random_resp_stats(key, row_ids, x, mask, n_components_array):
    """Statistics of sklearn's init 'random' (uniform responsibilities, row-normalised);
    each row's draw depends only on its global index, so chunking does not change it."""
    k = n_components_array.shape[0]
    resp = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (k,), x.dtype))(
        row_ids)
    resp = resp / jnp.sum(resp, axis=1, keepdims=True) * mask[:, None]
    return (jnp.sum(resp, axis=0), jnp.dot(resp.T, x, precision=HIGHEST),
            jnp.dot(resp.T, x * x, precision=HIGHEST), jnp.zeros((), x.dtype))


@jax.jit
def _m_step(nk, s1, s2, reg_covar):
    """sklearn's M-step (diag): N_k + 10 eps, means, E[x^2] - mu^2 + reg, weights sum to 1."""
    nk = nk + 10 * jnp.finfo(nk.dtype).eps
    means = s1 / nk[:, None]
    variances = jnp.maximum(s2 / nk[:, None] - means * means, 0.0) + reg_covar
    return CLSMixture(weights=nk / jnp.sum(nk), means=means, variances=variances)


@jax.jit
def _candidate_distances(candidates, x, mask, closest):
    """sklearn's squared distances |c|^2 - 2 c.x + |x|^2 (clipped at 0), min with `closest`,
    and the potential of each candidate; padded rows get distance 0."""
    d = (-2.0 * jnp.dot(candidates, x.T, precision=HIGHEST)
         + jnp.sum(candidates * candidates, axis=1)[:, None] + jnp.sum(x * x, axis=1)[None, :])
    d = jnp.minimum(closest[None, :], jnp.maximum(d, 0.0) * mask[None, :])
    return d, jnp.sum(d, axis=1)


@jax.jit
def _cumsum(v):
    cs = jnp.cumsum(v)
    return cs, cs[-1]


@jax.jit
def _searchsorted(cs, values):
    return jnp.searchsorted(cs, values.astype(cs.dtype))


def _sum_stats(a, b):
    return b if a is None else jax.tree.map(jnp.add, a, b)


def _pass(data: _Data, fn, *args):
    """Sum a per-chunk statistics function over every chunk; the log-likelihood sum (last
    entry) is accumulated on the host in float64."""
    acc, ll = None, 0.0
    for _, _, x, mask in data:
        out = fn(*args, x, mask)
        ll += float(out[-1])
        acc = _sum_stats(acc, out[:-1])
    return acc, ll


def kmeans_plusplus_indices(data: _Data, n_clusters: int, seed: int) -> np.ndarray:
    """Row indices chosen by sklearn's `_kmeans_plusplus` (unit sample weights, 2 + ln K local
    trials) with `np.random.RandomState(seed)`, over the chunks of `data`."""
    rs = np.random.RandomState(seed)
    n_trials = 2 + int(np.log(n_clusters))
    ones = np.ones(data.n, dtype=data.dtype)
    first = rs.choice(data.n, p=ones / ones.sum())
    indices = np.full(n_clusters, -1, dtype=np.int64)
    indices[0] = first
    chunks = list(data) if data.resident is not None else None

    def each_chunk():
        return chunks if chunks is not None else data

    centre = data.rows(np.array([first]))
    closest, cums, pot = [], [], 0.0
    for _, _, x, mask in each_chunk():
        init = jnp.where(mask > 0, jnp.inf, 0.0).astype(data.dtype)
        d, p = _candidate_distances(centre, x, mask, init)
        closest.append(d[0])
        cums.append(_cumsum(d[0]))
        pot += float(p[0])
    for c in range(1, n_clusters):
        rand_vals = rs.uniform(size=n_trials) * pot
        totals = np.asarray(jax.device_get([total for _, total in cums]), np.float64)
        ends = np.cumsum(totals)
        which = np.minimum(np.searchsorted(ends, rand_vals), len(cums) - 1)
        candidate_ids = np.empty(n_trials, dtype=np.int64)
        offset = 0.0
        headers = each_chunk() if chunks is not None else _chunk_headers(data)
        for j, (start, rows, _, _) in enumerate(headers):
            sel = which == j
            if sel.any():
                local = np.asarray(_searchsorted(cums[j][0], jnp.asarray(rand_vals - offset)))
                candidate_ids[sel] = start + np.minimum(local[sel], rows - 1)
            offset += totals[j]
        candidates = data.rows(candidate_ids)
        dists, pots = [], np.zeros(n_trials)
        for j, (_, _, x, mask) in enumerate(each_chunk()):
            d, p = _candidate_distances(candidates, x, mask, closest[j])
            dists.append(d)
            pots += np.asarray(p, np.float64)
        best = int(np.argmin(pots))
        pot = pots[best]
        closest = [d[best] for d in dists]
        cums = [_cumsum(v) for v in closest]
        indices[c] = candidate_ids[best]
    return indices


def _chunk_headers(data: _Data) -> Iterator[tuple[int, int, None, None]]:
    """(start, rows) of each streamed chunk without uploading it."""
    start = 0
    for chunk in data._raw_chunks():
        yield start, chunk.shape[0], None, None
        start += chunk.shape[0]


def _init_mixture(data: _Data, k: int, init: Init, seed: int, reg_covar: float) -> CLSMixture:
    dtype = data.dtype
    if isinstance(init, tuple | list):
        weights, means, variances = (np.asarray(a, dtype) for a in init)
        if weights.shape != (k,) or means.shape != (k, data.dim) or variances.shape != means.shape:
            raise ValueError(f"explicit init shapes weights {weights.shape}, means {means.shape},"
                             f" variances {variances.shape}; expected ({k},), ({k}, {data.dim}),"
                             f" ({k}, {data.dim})")
        return CLSMixture(jnp.asarray(weights), jnp.asarray(means) - data.shift,
                          jnp.asarray(variances))
    if init == "k-means++":
        idx = kmeans_plusplus_indices(data, k, seed)
        raw = np.asarray(data.rows(idx), dtype) + data.shift  # sklearn works on raw rows
        nk = np.asarray(1 + 10 * np.finfo(dtype).eps, dtype)
        means = raw / nk
        variances = raw * raw / nk - means * means + np.asarray(reg_covar, dtype)
        weights = np.full(k, nk / data.n, dtype)
        return CLSMixture(jnp.asarray(weights), jnp.asarray(means - data.shift),
                          jnp.asarray(variances))
    if init == "random":
        key = jax.random.key(seed)
        ref = jnp.zeros((k,), dtype)
        acc = None
        for start, _, x, mask in data:
            ids = start + jnp.arange(x.shape[0])
            acc = _sum_stats(acc, _random_resp_stats(key, ids, x, mask, ref)[:-1])
        nk, s1, s2 = acc
        mix = _m_step(nk, s1, s2, jnp.asarray(reg_covar, dtype))
        nk = nk + 10 * jnp.finfo(dtype).eps
        return mix.replace(weights=nk / data.n)
    raise ValueError(f"init={init!r} is unknown; use 'k-means++', 'random' or "
                     "(weights, means, variances)")


def fit_diag_gmm(x: np.ndarray | jax.Array | Callable[[], Iterable[np.ndarray]],
                 n_components: int, *, max_iter: int = 100, tol: float = 1e-3,
                 reg_covar: float = 1e-6, init: Init = "k-means++", seed: int = 0,
                 mesh: Mesh | None = None, chunk_size: int | None = None,
                 stream: bool = False, log_fn: Callable[[str], None] | None = None
                 ) -> FitResult:
    """EM for a diagonal Gaussian mixture, sklearn semantics (see the module docstring).

    x: (N, D) array (host or device), or a callable returning a fresh iterable of (n, D)
    chunks on every call (always streamed). The E-step runs over chunks of `chunk_size` rows
    (default: about 2^26 / K, so the responsibilities stay small); an array is uploaded once
    and kept on the devices, unless `stream=True` re-reads it from the host on every pass
    (data larger than device memory; a memory map works). With `mesh`, rows are split over
    the mesh's batch axes and statistics reduced across devices by jit. Computation runs in
    the data's dtype (float64 only under jax x64). `log_fn` gets one line per iteration.
    """
    if chunk_size is None:
        chunk_size = max(256, 2 ** 26 // n_components)
    data = _Data(x, chunk_size, mesh, stream)
    if data.n < n_components:
        raise ValueError(f"n_components={n_components} exceeds the {data.n} samples")
    mixture = jax.device_put(_init_mixture(data, n_components, init, seed, reg_covar),
                             data.replicated)
    reg = jnp.asarray(reg_covar, data.dtype)
    history: list[float] = []
    seconds: list[float] = []
    lower_bound, converged, n_iter = -np.inf, False, 0
    for n_iter in range(1, max_iter + 1):
        t0 = time.perf_counter()
        (nk, s1, s2), ll = _pass(data, _chunk_stats, mixture)
        mixture = _m_step(nk, s1, s2, reg)
        previous, lower_bound = lower_bound, ll / data.n
        history.append(lower_bound)
        seconds.append(time.perf_counter() - t0)
        change = lower_bound - previous
        if log_fn is not None:
            log_fn(f"EM iteration {n_iter}: log-likelihood {lower_bound:.6f} "
                   f"(change {change:.3e}), {seconds[-1]:.3f} s/iteration")
        if abs(change) < tol:
            converged = True
            break
    _, total = _pass(data, lambda m, xx, mm: (_chunk_log_prob(m, xx, mm),), mixture)
    k, d = n_components, data.dim
    n_params = 2 * k * d + k - 1
    bic = -2.0 * total + n_params * math.log(data.n)
    shift = jnp.asarray(data.shift)
    mixture = mixture.replace(means=mixture.means + shift)
    return FitResult(mixture=mixture, history=history, n_iter=n_iter, converged=converged,
                     lower_bound=float(lower_bound), log_likelihood=total / data.n, bic=bic,
                     n_samples=data.n, iteration_seconds=seconds)
