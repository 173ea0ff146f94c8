"""Diagonal-covariance EM on the shared mesh, following scikit-learn's GaussianMixture.

The reference fits its CLS mixture with sklearn (diag, init 'k-means++', reg_covar 1e-6,
tol 1e-3 on the change of the mean log-likelihood; REFERENCE e.1). This module runs the same
iteration, built to run at the speed of a plain matmul:

* E-step: log w_k + log N(x; mu_k, var_k) as ONE block x 2D x K product of the features
  [xc^2, xc] (`mixture.DiagTerms`), then the row max, exp and sums over the block x K
  matrix, normalised around each row's top mode (`_posterior`). By default (float32 data)
  that product runs in bfloat16 as a certified screen (`mmfm_jax.gmm.screen`): rows whose
  bounded mass outside their exactly computed top mode is below the truncation bound need
  nothing more, the rest get a second look or the float32 E-step above.
* M-step statistics R^T [xc^2, xc] and N_k: the top mode's share by a scatter-add, the rest
  either densely (one more product) or truncated (`_block_update`): mass outside the top
  mode is dropped where it is below 1e-7 of the row (float32; 1e-16 in float64), a bound
  that is checked per row and per mode, with exact fallbacks (flat rows the sparse path
  cannot take are recomputed densely at the end of their chunk, modes that fail get a
  repair pass, and an iteration after one with most rows flat runs dense), so a truncated
  fit equals the dense one to float32 rounding while skipping most of the M-step's flops.
* Layout: a chunk (the unit of upload or streaming) is scanned in blocks of a few thousand
  rows inside one jitted program (`lax.scan`; the block x K responsibilities stay in
  cache); on a mesh each device scans its own rows (`shard_map`) and the statistics are
  summed across devices once per chunk. No host round trip happens between chunks: the
  log-likelihood is fetched once per pass, so streaming a host array, a memory map or a
  callable of chunks gives the in-memory result with memory bounded by the chunk.
* Numerics: the data is centred once on its global mean, and each E-step on the mean of
  the component means, so E[x^2] - E[x]^2 and the expanded Mahalanobis form cancel little
  in float32; variances are clamped at zero before reg_covar is added.
* Init 'k-means++' replays sklearn's `_kmeans_plusplus` (same RandomState stream, same
  local trials, same candidate choice) and then sklearn's one-hot-at-the-centres M-step
  (weights (1 + 10 eps) / n, variances ~ reg_covar); the first E-step then assigns every
  point to its nearest centre, as sklearn does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from mmfm_jax import parallel
from mmfm_jax.gmm import screen as screen_lib
from mmfm_jax.gmm.mixture import HIGHEST, CLSMixture, DiagTerms, first_max_index

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
    # per iteration: rows whose mass outside the top mode reached the bound ("flat"),
    # blocks whose flat rows did not fit the sparse pairs and were recomputed densely at
    # the end of their chunk ("pending"), modes whose statistics the repair pass
    # recomputed, total responsibility mass the truncated M-step left out, and the M-step
    # the iteration ran ("truncated", or "dense" after an iteration with most rows flat)
    truncation: list[dict] = dataclasses.field(default_factory=list)

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
    """The fit data as centred, padded, sharded device chunks of `chunk_size` rows: uploaded
    once and kept on the devices, or, when streaming, re-read from the host array or the
    callable on every pass (then memory is bounded by the chunk, not N). Each chunk is
    padded to whole E-step blocks: `block` rows per device (the E-step holds a block x K
    responsibility matrix per device), `self.block` = that times the batch shards."""

    def __init__(self, x, chunk_size: int, mesh: Mesh | None, stream: bool = False,
                 block: int | None = None):
        self.mesh = mesh
        shards = parallel.num_batch_shards(mesh) if mesh is not None else 1
        per_device = parallel.round_up(chunk_size, shards) // shards
        self.block_local = max(1, per_device if block is None else min(block, per_device))
        self.block = self.block_local * shards
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
        padded = parallel.round_up(rows, self.block)
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


def _rt_dot(r, feats):
    """R^T F, (K, F): contracts the rows of both operands (no transposed copy)."""
    return jax.lax.dot_general(r, feats, (((0,), (0,)), ((), ())), precision=HIGHEST)


def _posterior(terms: DiagTerms, x, mask):
    """One block's E-step, normalised around each row's top mode.

    `others` = exp(lj - max) with the top mode's entry set to 0, so the row's mass outside
    its top mode, rest = sum(others), is a sum of small numbers (no 1 + tiny rounding):
    log p = max + log1p(rest) and the fraction rest / (1 + rest) are both accurate, and that
    fraction is what the truncated M-step's certificate reads. The responsibilities are
    scale * others off the top mode and `scale` = 1 / (1 + rest) on it; they are never
    materialised: R^T F = scatter(scale F into the top modes) + others^T (scale F).
    Returns feats [xc^2, xc], top, others, rest, scale (0 on padded rows), log p.
    """
    feats = terms.features(x)
    lj = terms.log_joint_from_features(feats)
    lmax = jnp.max(lj, axis=1)
    top_f = first_max_index(lj, lmax)
    is_top = jnp.arange(lj.shape[1], dtype=lj.dtype)[None, :] == top_f[:, None]
    top = top_f.astype(jnp.int32)
    others = jnp.exp(jnp.where(is_top, -jnp.inf, lj - lmax[:, None]))
    rest = jnp.sum(others, axis=1)
    return feats, top, others, rest, mask / (1.0 + rest), lmax + jnp.log1p(rest)


_FLAT_SHARE = 64  # the sparse path takes up to block / 64 flat rows per block ...
_FLAT_KEPT = 4  # ... and on average up to 4 other modes for each of them


def _flat_rows_update(others, weighted, scale, rest, flat, tol):
    """The flat rows' statistics with, per row, the other modes below tol (1 + rest) / K
    dropped (so at most tol of the row by construction; the dropped sum is still computed
    and checked): a scatter-add of the kept (row, mode) pairs, at most cap * 4 of them
    (small on purpose: the pairs' gathered rows are built every block, used or not).
    Returns (scatter modes, scatter rows, mass dropped per mode, whether every flat row
    passed the < tol bound and everything fitted). Thresholds, not `lax.top_k`: XLA:CPU
    lowers a top_k whose values feed elementwise ops to a full sort of the row."""
    block, k = others.shape
    cap = max(1, block // _FLAT_SHARE)
    budget = cap * _FLAT_KEPT
    idx = jnp.nonzero(flat, size=cap, fill_value=block)[0]
    take = functools.partial(jnp.take, indices=idx, axis=0, mode="fill", fill_value=0)
    sub, rest_sub, scale_sub = take(others), take(rest), take(scale)
    bound = tol * (1.0 + rest_sub)
    keep = (sub >= (bound / k)[:, None]) & (sub > 0)
    left = jnp.where(keep, 0.0, sub)
    ok = jnp.all((idx == block) | (jnp.sum(left, axis=1) < bound))
    ok &= (jnp.sum(flat.astype(sub.dtype)) <= cap) & (jnp.sum(keep.astype(sub.dtype)) <= budget)
    pos = jnp.nonzero(keep.reshape(-1), size=budget, fill_value=cap * k)[0]
    vals = jnp.take(sub.reshape(-1), pos, mode="fill", fill_value=0)
    rows = vals[:, None] * jnp.take(take(weighted), pos // k, axis=0, mode="fill", fill_value=0)
    dropped = jnp.sum(left * scale_sub[:, None], axis=0)
    return pos % k, rows, dropped, ok


def _block_update(carry, post, mask, start, mode: str, tol: float):
    """Add one block's M-step statistics to the carry.

    Every row's top-mode share goes in by a scatter-add (negligible flops), and N_k is
    always exact (a column sum of all responsibilities). The rest of R^T F: "dense" adds
    others^T (scale F), a block x K x 2D product; "truncated" drops it on every "peaked"
    row (mass outside the top mode < tol of the row) and takes the "flat" rows exactly by
    the cheaper of two paths: the sparse pairs of `_flat_rows_update` when they fit, else
    the indices of the block's flat rows are set aside, and `_flush_pending` recomputes
    just those rows densely at the end of the chunk (so a flat row costs one more E-step
    row, and a chunk at most 1.5x the dense pass). Nothing per block is a `cond`: XLA:CPU
    copies a conditional's updated operands on every evaluation, and the K x 2D statistics
    are 50 MB at K 8192, a third of a block's E-step time. The mass dropped from each mode
    is summed for the per-mode check. Both modes count the flat rows."""
    feats, top, others, rest, scale, _ = post
    block, k = others.shape
    weighted = feats * scale[:, None]
    stats = carry["stats"].at[top].add(weighted)
    top_mass = jax.ops.segment_sum(scale, top, num_segments=k)
    flat = (rest >= tol * (1.0 + rest)) & (mask > 0)
    n_flat = jnp.sum(flat, dtype=jnp.int32)
    if mode == "dense":
        nk_others = jnp.dot(scale, others, precision=HIGHEST)
        return dict(carry, stats=stats + _rt_dot(others, weighted),
                    nk=carry["nk"] + top_mass + nk_others,
                    flat_rows=carry["flat_rows"] + n_flat)
    sums = _rt_dot(jnp.stack([scale, jnp.where(flat, 0.0, scale)], axis=1), others)
    cols, rows, pair_dropped, ok = _flat_rows_update(others, weighted, scale, rest, flat, tol)
    nk = carry["nk"] + top_mass + sums[0]
    dropped = carry["dropped"] + sums[1] + jnp.where(ok, pair_dropped, 0.0)
    if mode == "recomputed":  # a few steps at the end of a chunk: a `cond` is cheap there
        def flat_dense(s):
            return s + _rt_dot(jnp.where(flat[:, None], others, 0.0), weighted)

        stats = jax.lax.cond(ok, lambda s: s.at[cols].add(rows), flat_dense, stats)
        return dict(carry, stats=stats, nk=nk, dropped=dropped,
                    flat_rows=carry["flat_rows"] + n_flat)
    ids = start + jnp.nonzero(flat, size=block, fill_value=block)[0]
    at = carry["pending_rows"]  # written every block, kept (advanced) only when pending
    return dict(
        carry, stats=stats.at[cols].add(jnp.where(ok, rows, 0.0)), nk=nk, dropped=dropped,
        pending_ids=jax.lax.dynamic_update_slice(carry["pending_ids"], ids.astype(jnp.int32),
                                                 (at,)),
        pending_rows=at + jnp.where(ok, 0, n_flat), flat_rows=carry["flat_rows"] + n_flat,
        pending_blocks=carry["pending_blocks"] + (~ok).astype(jnp.int32))


def _screened_update(carry, post, mask, row_ids, order):
    """Add one screened block (`screen.screened_posterior`): each certified row puts its
    whole responsibility on its top mode (a scatter-add) and the bounded mass of its other
    modes goes to the per-mode dropped sums; every other row's index is set aside (for
    `_second_look`, then the exact E-step of `_flush_pending`). Returns the carry and the
    block's log-likelihoods (certified rows; the rest are filled in later). `order` maps
    the screen's columns to modes."""
    feats, top, upper, certified, lj_top = post
    top = order[top]
    block, k = upper.shape
    kept = jnp.where(certified, mask, 0.0)
    uncertain = ~certified & (mask > 0)
    n_uncertain = jnp.sum(uncertain, dtype=jnp.int32)
    ids = jnp.take(row_ids, jnp.nonzero(uncertain, size=block, fill_value=block)[0],
                   mode="fill", fill_value=0)
    at = carry["pending_rows"]
    return dict(
        carry, stats=carry["stats"].at[top].add(feats * kept[:, None]),
        nk=carry["nk"] + jax.ops.segment_sum(kept, top, num_segments=k),
        dropped=carry["dropped"].at[order].add(jnp.dot(kept, upper, precision=HIGHEST)),
        pending_ids=jax.lax.dynamic_update_slice(carry["pending_ids"], ids.astype(jnp.int32),
                                                 (at,)),
        pending_rows=at + n_uncertain), jnp.where(certified, lj_top, 0.0)


def _pending_step(ids, n, i, block: int, x, mask):
    """Step i of a loop over the first n of the set-aside row ids: (ids, rows of x, mask),
    `block` of them, past n pointing out of range (zero rows, mask 0, dropped writes)."""
    sel = jax.lax.dynamic_slice(ids, (i * block,), (block,))
    sel = jnp.where(i * block + jnp.arange(block) < n, sel, x.shape[0])
    take = functools.partial(jnp.take, indices=sel, axis=0, mode="fill", fill_value=0)
    return sel, take(x), take(mask)


def _second_look(terms: DiagTerms, screen, x, mask, carry, lse, block: int, tol: float):
    """The rows the screen left uncertain get `screen.second_look`, `block` at a time:
    those it certifies are added as certified rows are, the rest are set aside again for
    the exact E-step (`_flush_pending`). Returns the carry, lse and the certified rows'
    log-likelihood sum."""
    ids, n = carry["pending_ids"], carry["pending_rows"]
    again = dict(stats=carry["stats"], nk=carry["nk"], dropped=carry["dropped"],
                 pending_ids=jnp.zeros_like(ids), pending_rows=jnp.zeros_like(n))

    def step(i, state):
        c, lse, ll = state
        sel, sub_x, sub_mask = _pending_step(ids, n, i, block, x, mask)
        post = screen_lib.second_look(terms, screen, sub_x, tol)
        c, lse_b = _screened_update(c, post, sub_mask, sel, screen.order)
        lse = lse.at[jnp.where(post[3], sel, x.shape[0])].set(lse_b, mode="drop")
        return c, lse, ll + jnp.sum(lse_b * sub_mask)

    again, lse, ll = jax.lax.fori_loop(0, (n + block - 1) // block, step,
                                       (again, lse, jnp.zeros((), x.dtype)))
    carry = dict(carry, stats=again["stats"], nk=again["nk"], dropped=again["dropped"],
                 pending_ids=again["pending_ids"], pending_rows=again["pending_rows"],
                 second_looks=n, recomputed_rows=again["pending_rows"])
    return carry, lse, ll


def _flush_pending(terms: DiagTerms, x, mask, carry, lse, block: int, tol: float,
                   whole: bool):
    """The set-aside rows, recomputed from their rows of x by the exact `_posterior`,
    `block` of them at a time (a loop of ceil(rows / block) steps). Truncated mode
    (`whole` False) set aside flat rows whose top-mode share and N_k are already in: add
    their others^T (scale F). Screened mode set aside uncertain rows that added nothing
    yet: add their statistics as the truncated M-step does (a dense product for their
    flat rows where the sparse pairs do not fit) and write their log-likelihoods into
    `lse`.
    Returns the carry, lse and the recomputed rows' log-likelihood sum."""
    ids, n = carry.pop("pending_ids"), carry.pop("pending_rows")

    def step(i, state):
        c, lse, ll = state
        sel, sub_x, sub_mask = _pending_step(ids, n, i, block, x, mask)
        post = _posterior(terms, sub_x, sub_mask)
        if not whole:
            feats, _, others, _, scale, _ = post
            return dict(c, stats=c["stats"] + _rt_dot(others, feats * scale[:, None])), lse, ll
        c = _block_update(c, post, sub_mask, 0, "recomputed", tol)
        return c, lse.at[sel].set(post[5], mode="drop"), ll + jnp.sum(post[5] * sub_mask)

    init = (carry, lse, jnp.zeros((), x.dtype))
    return jax.lax.fori_loop(0, (n + block - 1) // block, step, init)


def _scan_blocks(terms_screen, x, mask, block: int, mode: str, tol: float):
    """Scan a device's rows in blocks of `block` rows inside one program (the block x K
    responsibilities stay cache-sized; no host round trip between blocks), then recompute
    the rows the blocks set aside. `terms_screen` = (DiagTerms, ScreenTerms or None)."""
    terms, screen = terms_screen
    rows, dim = x.shape
    k = terms.bias.shape[0]
    count = functools.partial(jnp.zeros, (), jnp.int32)
    carry = {} if mode == "loglik" else dict(
        stats=jnp.zeros((k, 2 * dim), x.dtype), nk=jnp.zeros((k,), x.dtype),
        dropped=jnp.zeros((k,), x.dtype), flat_rows=count(), pending_blocks=count(),
        second_looks=count(), recomputed_rows=count())
    if mode in ("truncated", "screened"):
        carry.update(pending_ids=jnp.zeros((rows,), jnp.int32), pending_rows=count())

    def body(c, xms):
        xb, mb, start = xms
        if mode == "screened":
            c, lse_b = _screened_update(
                c, screen_lib.screened_posterior(terms, screen, xb, tol), mb,
                start + jnp.arange(block, dtype=jnp.int32), screen.order)
            return c, (jnp.sum(lse_b * mb), lse_b)
        post = _posterior(terms, xb, mb)
        if mode != "loglik":
            c = _block_update(c, post, mb, start, mode, tol)
        return c, (jnp.sum(post[5] * mb), post[5])

    xs = (x.reshape(rows // block, block, dim), mask.reshape(rows // block, block),
          jnp.arange(0, rows, block, dtype=jnp.int32))
    carry, (ll, lse) = jax.lax.scan(body, carry, xs)
    lse = lse.reshape(rows)
    if mode == "screened":
        carry, lse, ll_second = _second_look(terms, screen, x, mask, carry, lse, block, tol)
        ll = jnp.concatenate([ll, ll_second[None]])
    if mode in ("truncated", "screened"):
        carry, lse, ll_flush = _flush_pending(terms, x, mask, carry, lse, block, tol,
                                              whole=mode == "screened")
        ll = jnp.concatenate([ll, ll_flush[None]])
    return (carry, ll), lse


def _local_repair(terms: DiagTerms, x, mask, lse, *, block: int):
    """Exact R^T [xc^2, xc, 1] for a subset of modes (`terms` restricted to them), from
    the per-row log-likelihoods of the truncated pass: an E-step over F << K columns. The
    last column is N_k (exact already in truncated mode, short of the dropped mass in
    screened mode)."""
    rows, dim = x.shape

    def body(acc, xml):
        xb, mb, lb = xml
        feats = terms.features(xb)
        r = jnp.exp(terms.log_joint_from_features(feats) - lb[:, None]) * mb[:, None]
        ones = jnp.ones((feats.shape[0], 1), feats.dtype)
        return acc + _rt_dot(r, jnp.concatenate([feats, ones], axis=1)), None

    xs = (x.reshape(-1, block, dim), mask.reshape(-1, block), lse.reshape(-1, block))
    acc, _ = jax.lax.scan(body, jnp.zeros((terms.bias.shape[0], 2 * dim + 1), x.dtype), xs)
    return acc, None


def _distribute(local, mesh: Mesh | None, n_row_args: int):
    """jit `local(terms, *row_arrays) -> (summed, per_row)`; on a mesh every device runs it
    over its own rows and `summed` is reduced across devices once per call (not per block).
    Replication checks are off: the scan's zero carries start device-invariant and become
    per-device sums, which `psum` then makes identical again."""
    if mesh is None:
        return jax.jit(local)
    axes = parallel.BATCH_AXES

    def body(terms, *rows):
        summed, per_row = local(terms, *rows)
        return jax.lax.psum(summed, axes), per_row

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(),) + (P(axes),) * n_row_args,
                                 out_specs=(P(), P(axes)), check_vma=False))


@functools.lru_cache(maxsize=64)
def _estep_fn(mesh: Mesh | None, block: int, mode: str, tol: float):
    return _distribute(functools.partial(_scan_blocks, block=block, mode=mode, tol=tol),
                       mesh, 2)


@functools.lru_cache(maxsize=64)
def _repair_fn(mesh: Mesh | None, block: int):
    return _distribute(functools.partial(_local_repair, block=block), mesh, 3)


_terms = jax.jit(DiagTerms.build)


@jax.jit
def _random_resp_stats(key, row_ids, x, mask, n_components_array):
    """Statistics of sklearn's init 'random' (uniform responsibilities, row-normalised);
    each row's draw depends only on its global index, so chunking does not change it."""
    k = n_components_array.shape[0]
    resp = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (k,), x.dtype))(
        row_ids)
    resp = resp / jnp.sum(resp, axis=1, keepdims=True) * mask[:, None]
    return jnp.sum(resp, axis=0), _rt_dot(resp, jnp.concatenate([x * x, x], axis=1))


@jax.jit
def _m_step(nk, stats, centre, reg_covar):
    """sklearn's M-step (diag): N_k + 10 eps, means, E[x^2] - mu^2 + reg, weights sum to 1.
    `stats` = R^T [xc^2, xc] about `centre` (the E-step's mean of the component means): the
    variance is shift-invariant and cancels least about a point close to the means."""
    dim = centre.shape[0]
    nk = nk + 10 * jnp.finfo(nk.dtype).eps
    means_c = stats[:, dim:] / nk[:, None]
    variances = jnp.maximum(stats[:, :dim] / nk[:, None] - means_c * means_c, 0.0) + reg_covar
    return CLSMixture(weights=nk / jnp.sum(nk), means=means_c + centre, variances=variances)


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
        nk = stats = 0.0
        for start, _, x, mask in data:
            ids = start + jnp.arange(x.shape[0])
            nk_c, stats_c = _random_resp_stats(key, ids, x, mask, ref)
            nk, stats = nk + nk_c, stats + stats_c
        mix = _m_step(nk, stats, jnp.zeros((data.dim,), dtype), jnp.asarray(reg_covar, dtype))
        nk = nk + 10 * jnp.finfo(dtype).eps
        return mix.replace(weights=nk / data.n)
    raise ValueError(f"init={init!r} is unknown; use 'k-means++', 'random' or "
                     "(weights, means, variances)")


def _estep_pass(data: _Data, terms: DiagTerms, mode: str, tol: float):
    """One pass over every chunk: summed statistics (device arrays), the log-likelihood sum
    (per-block float sums added on the host in float64 after the pass: one device-to-host
    transfer per pass, not per chunk) and the per-row log-likelihoods of every chunk.
    Streamed chunks are kept at most two in flight (dispatch is asynchronous, so without
    the wait the host would read and upload the whole array ahead of the device)."""
    fn = _estep_fn(data.mesh, data.block_local, mode, tol)
    terms_screen = (terms, screen_lib.build(terms) if mode == "screened" else None)
    totals, lls, lses = None, [], []
    for _, _, x, mask in data:
        if data.resident is None and lls:
            lls[-1].block_until_ready()
        (carry, ll), lse = fn(terms_screen, x, mask)
        totals = carry if totals is None else jax.tree.map(jnp.add, totals, carry)
        lls.append(ll)
        lses.append(lse if mode in ("truncated", "screened") else None)
    ll = float(sum(np.sum(np.asarray(v, np.float64)) for v in jax.device_get(lls)))
    return totals, ll, lses


def _repair(data: _Data, terms: DiagTerms, modes: np.ndarray, lses, stats, nk):
    """Replace the truncated statistics and N_k of `modes` by exact ones (padded to a power
    of two of modes, so few shapes compile; duplicates recompute the same mode)."""
    k = terms.bias.shape[0]
    size = min(k, max(8, 1 << int(np.ceil(np.log2(modes.size)))))
    idx = np.concatenate([modes, np.full(max(size - modes.size, 0), modes[0])])[:size]
    sub = DiagTerms(terms.matrix[:, idx], terms.offset[idx], terms.bias[idx], terms.centre)
    fn = _repair_fn(data.mesh, data.block_local)
    acc = None
    for (_, _, x, mask), lse in zip(data, lses, strict=True):
        if data.resident is None and acc is not None:
            acc.block_until_ready()  # as in `_estep_pass`: bounded host memory
        part = fn(sub, x, mask, lse)[0]
        acc = part if acc is None else acc + part
    idx = jnp.asarray(idx)
    return stats.at[idx].set(acc[:, :-1]), nk.at[idx].set(acc[:, -1])


def _em_iteration(data: _Data, mixture: CLSMixture, reg, mode: str, tol: float):
    """E-step and M-step; mode "screened", "truncated" or "dense". Screened and truncated:
    the per-row bound is applied in the pass; the per-mode certificate (mass dropped from
    mode k <= tol * N_k) is checked here, and the modes that fail it get exact statistics
    from a repair pass."""
    terms = _terms(mixture.weights, mixture.means, mixture.variances)
    c, ll, lses = _estep_pass(data, terms, mode, tol)
    info = {k: int(c[k]) for k in ("flat_rows", "pending_blocks", "second_looks",
                                   "recomputed_rows")}
    info.update(m_step=mode, repaired_modes=0)
    stats, nk = c["stats"], c["nk"]
    if mode != "dense":
        dropped, nk_host = jax.device_get((c["dropped"], nk))
        bad = np.flatnonzero(dropped > tol * nk_host)
        info["dropped_mass"] = float(np.sum(dropped, dtype=np.float64))
        if bad.size:
            stats, nk = _repair(data, terms, bad, lses, stats, nk)
            info["repaired_modes"] = int(bad.size)
    return _m_step(nk, stats, terms.centre, reg), ll, info


def default_block_rows(k: int) -> int:
    """E-step rows per block: on CPU a block x K float32 responsibility matrix of about 4 MB
    and at least 256 rows (measured on 2 Zen cores, one pass of n 98304, D 768: K 1024 ran
    0.76 s at 1024 rows, 0.81 at 2048, 0.91 at 4096; K 8192 ran 2.4 s at 256 or 512 rows,
    2.85 at 128), on accelerators 2^25 elements (bigger products fill the chip; memory is
    no concern at that size)."""
    if jax.default_backend() == "cpu":
        return int(np.clip(2 ** 20 // k, 256, 65536))
    return int(np.clip(2 ** 25 // k, 64, 65536))


def fit_diag_gmm(x: np.ndarray | jax.Array | Callable[[], Iterable[np.ndarray]],
                 n_components: int, *, max_iter: int = 100, tol: float = 1e-3,
                 reg_covar: float = 1e-6, init: Init = "k-means++", seed: int = 0,
                 mesh: Mesh | None = None, chunk_size: int | None = None,
                 stream: bool = False, log_fn: Callable[[str], None] | None = None,
                 truncate: bool = True, truncate_tol: float | None = None,
                 screen: bool | None = None, block_rows: int | None = None) -> FitResult:
    """EM for a diagonal Gaussian mixture, sklearn semantics (see the module docstring).

    x: (N, D) array (host or device), or a callable returning a fresh iterable of (n, D)
    chunks on every call (always streamed). Chunks of `chunk_size` rows (default 2^28 / K:
    100 MB of float32 rows at K 8192, D 768) are the unit of upload and streaming; inside
    one jitted call each device scans its share of a chunk in E-step blocks of `block_rows`
    rows (default `default_block_rows`). An array is uploaded once and kept on the devices, unless
    `stream=True` re-reads it from the host on every pass (data larger than device memory;
    a memory map works). With `mesh`, rows are split over the mesh's batch axes and the
    statistics reduced across devices once per chunk. Computation runs in the data's dtype
    (float64 only under jax x64).

    truncate: the M-step drops responsibilities outside each row's top mode where their
    mass is below `truncate_tol` of the row (default 1e-7 in float32, 1e-16 in float64),
    certified per row and per mode, with exact fallbacks (see `_block_update`,
    `_em_iteration`); False runs the dense M-step. screen (default: with truncate, on
    float32 data): the E-step's product runs in bfloat16 and only the rows its certificate
    cannot clear get a second look or the float32 E-step (`mmfm_jax.gmm.screen`); the fit
    is the exact one to float32 rounding and `truncate_tol`. An iteration after one with
    most rows flat runs dense, and the screen backs off after passes where it recomputed
    over a quarter of the rows (`_next_mode`). `FitResult.truncation` records what each
    iteration did. `log_fn` gets one line per iteration.
    """
    block = default_block_rows(n_components) if block_rows is None else block_rows
    if chunk_size is None:
        chunk_size = max(block, 2 ** 28 // n_components)
    data = _Data(x, chunk_size, mesh, stream, block)
    if data.n < n_components:
        raise ValueError(f"n_components={n_components} exceeds the {data.n} samples")
    truncate_tol, screen = _truncation_defaults(data.dtype, truncate, truncate_tol, screen)
    mixture = jax.device_put(_init_mixture(data, n_components, init, seed, reg_covar),
                             data.replicated)
    reg = jnp.asarray(reg_covar, data.dtype)
    history, seconds, truncation = [], [], []
    lower_bound, converged, n_iter = -np.inf, False, 0
    for n_iter in range(1, max_iter + 1):
        t0 = time.perf_counter()
        mode = _next_mode(truncate, screen, truncation, data.n)
        mixture, ll, info = _em_iteration(data, mixture, reg, mode, truncate_tol)
        previous, lower_bound = lower_bound, ll / data.n
        history.append(lower_bound)
        truncation.append(info)
        seconds.append(time.perf_counter() - t0)
        change = lower_bound - previous
        if log_fn is not None:
            log_fn(f"EM iteration {n_iter}: log-likelihood {lower_bound:.6f} "
                   f"(change {change:.3e}), {seconds[-1]:.3f} s/iteration")
        if abs(change) < tol:
            converged = True
            break
    return _result(data, mixture, history, n_iter, converged, lower_bound, seconds, truncation)


def _truncation_defaults(dtype, truncate: bool, truncate_tol, screen):
    """truncate_tol (1e-7 in float32, 1e-16 in float64) and screen (float32 with truncate)
    when not given; screen=True on other data is refused in one line."""
    if truncate_tol is None:
        truncate_tol = 1e-7 if dtype == np.float32 else 1e-16
    if screen is None:
        screen = truncate and dtype == np.float32
    if screen and dtype != np.float32:
        raise ValueError(f"screen=True needs float32 data (the bf16 bound is far above "
                         f"{dtype} rounding), got {dtype}")
    return float(truncate_tol), screen


def _next_mode(truncate: bool, screen: bool, history: list[dict], n: int) -> str:
    """The cheapest exact E/M mode for the next iteration, from what the earlier ones saw.
    A pass with most rows flat would redo most of them: dense is cheaper then. A screened
    pass that recomputed over a quarter of its rows cost more than the float32 one (tight
    modes, e.g. k-means++'s variances of reg_covar, defeat the bf16 bound), so the screen
    backs off: after its f-th such pass in a row it waits min(2^f, 16) iterations before
    trying again."""
    last = history[-1] if history else None
    if not truncate or (last is not None and last["flat_rows"] > n // 2):
        return "dense"
    if not screen:
        return "truncated"
    screened = [i for i, h in enumerate(history) if h["m_step"] == "screened"]
    failed = 0
    for i in reversed(screened):
        if history[i]["recomputed_rows"] <= n // 4:
            break
        failed += 1
    if failed and len(history) - 1 - screened[-1] < min(2 ** failed, 16):
        return "truncated"
    return "screened"


def _result(data: _Data, mixture, history, n_iter, converged, lower_bound, seconds,
            truncation) -> FitResult:
    """The final log-likelihood pass (under the returned parameters), BIC, raw coordinates."""
    terms = _terms(mixture.weights, mixture.means, mixture.variances)
    _, total, _ = _estep_pass(data, terms, "loglik", 0.0)
    k, d = mixture.n_components, data.dim
    n_params = 2 * k * d + k - 1
    bic = -2.0 * total + n_params * math.log(data.n)
    mixture = mixture.replace(means=mixture.means + jnp.asarray(data.shift))
    return FitResult(mixture=mixture, history=history, n_iter=n_iter, converged=converged,
                     lower_bound=float(lower_bound), log_likelihood=total / data.n, bic=bic,
                     n_samples=data.n, iteration_seconds=seconds, truncation=truncation)
