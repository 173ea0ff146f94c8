"""The FID evaluation job: FID, sFID, Inception Score, precision and recall (ADM suite).

`python -m mmfm_jax.evaluate --samples FILE.npz --ref FILE.npz --inception DIR
[--out FILE.json] [--batch-size N]` reads an ADM sample file (arr_0 uint8 NHWC) and a
reference batch (`mu`/`sigma` [+ `mu_s`/`sigma_s`] and/or `arr_0` images), runs the Flax
FID Inception sharded over the mesh, reduces the moments in float64 on the host and prints
and writes the figures. It follows guided-diffusion's `evaluations/evaluator.py`:

* FID on pool3, sFID on `mixed_6/conv`[..., :7] (2023 dims), reference moments from the
  npz when present (else from the reference images);
* IS from softmax(pool3 @ W) (no bias), splits of 5000;
* precision/recall: k = 3 nearest-neighbour manifolds of pool3, the reference images as
  the reference set. ADM computes those distances in float16 when finite; here they are
  float32, so borderline neighbours can differ.

Numbers from this job are those of this port of the TF graph; report them as such.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import warnings
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.files import write_json
from mmfm_jax.metrics import Progress
from mmfm_jax.models import inception as inception_lib

EVALUATOR = "mmfm_jax Flax FID Inception (TF1 graph port, pool3 / mixed_6/conv)"
SAMPLE_LAYOUT = "arr_0: uint8 (N, H, W, 3), NHWC RGB (ADM sample format)"


class EvalInputError(ValueError):
    """A sample or reference file that cannot be evaluated; the message names the file."""


# ----------------------------------------------------------------------------- Inception


@functools.partial(jax.jit, static_argnames=("graphdef", "intermediates"))
def _apply(graphdef, state, images, intermediates=False):
    return nnx.merge(graphdef, state)(images, intermediates=intermediates)


class InceptionNet:
    """A FID Inception bound to a mesh: `net(images)` (jitted, any device placement) and
    `net.features(host_batch)` (pads, shards the batch over every device, gathers).

    `net.model` is the Flax NNX `InceptionV3`.
    """

    def __init__(self, model: inception_lib.InceptionV3, mesh=None):
        self.model = model
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        self.graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, parallel.replicated(self.mesh))
        self.shards = parallel.num_batch_shards(self.mesh)

    def __call__(self, images, *, intermediates: bool = False) -> dict:
        return _apply(self.graphdef, self.state, images, intermediates=intermediates)

    def round_batch(self, batch_size: int) -> int:
        """The smallest multiple of the number of batch shards >= batch_size."""
        return max(1, math.ceil(batch_size / self.shards)) * self.shards

    def features(self, images: np.ndarray, *, pad_to: int | None = None,
                 intermediates: bool = False) -> dict[str, np.ndarray]:
        """Host (B, H, W, 3) batch (the same on every process) -> host float32 features.

        Rows are zero-padded to `pad_to` (rounded to the shard count) so that every batch
        of a run has one shape and compiles once; padded rows are dropped.
        """
        n = len(images)
        total = self.round_batch(max(n, pad_to or 0))
        if total > n:
            pad = np.zeros((total - n,) + images.shape[1:], images.dtype)
            images = np.concatenate([images, pad])
        local = images[parallel.process_batch_slice(total)]
        out = self(parallel.host_to_global(local, self.mesh), intermediates=intermediates)
        return {k: v[:n] for k, v in parallel.global_to_host(out, gather=True).items()}


def load_inception(inception_dir: str, *, mesh=None, dtype=jnp.float32,
                   precision: str | None = "highest") -> InceptionNet:
    """The FID Inception from a directory written by `python -m convert inception`.

    `net(images_uint8_nhwc)` returns a dict with pool3 (B, 2048), logits_unbiased and
    logits (B, 1008) and spatial (B, 2023); images are resized to 299 as the TF graph does.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config_path = os.path.join(inception_dir, inception_lib.CONFIG_FILE)
    weights_path = os.path.join(inception_dir, inception_lib.WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise EvalInputError(f"{path}: missing; convert the weights first with "
                                 "`python -m convert inception --weights FILE.pth --out DIR`")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("format") != inception_lib.FORMAT:
        raise EvalInputError(f"{config_path}: format {config.get('format')!r}, expected "
                             f"{inception_lib.FORMAT!r}")
    try:
        arrays = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise EvalInputError(f"{weights_path}: cannot be read: {e}") from e
    model = inception_lib.from_arrays(arrays, source=weights_path, dtype=dtype,
                                      precision=precision)
    return InceptionNet(model, mesh)


# ----------------------------------------------------------------------------- files


class NpzImages:
    """An image array inside an npz, validated from its header and read batch by batch
    (a 50k x 256 x 256 x 3 file is 9.8 GB; it is never loaded whole)."""

    def __init__(self, path: str, key: str = "arr_0"):
        self.path, self.key = path, key
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                if key not in names:
                    raise EvalInputError(f"{path}: no '{key}' array (holds {names}); "
                                         f"expected {SAMPLE_LAYOUT}")
                info = zf.getinfo(key + ".npy")
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(f)
                    self.offset = f.tell()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            if isinstance(e, EvalInputError):
                raise
            raise EvalInputError(f"{path}: cannot be read as an npz file ({e}): truncated "
                                 f"or corrupted? expected {SAMPLE_LAYOUT}") from e
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            hint = " (looks channel-first: NCHW)" if len(shape) == 4 and shape[1] == 3 else ""
            raise EvalInputError(f"{path}: '{key}' is {dtype} {tuple(shape)}"
                                 f"{' Fortran-ordered' if fortran else ''}{hint}; "
                                 f"expected {SAMPLE_LAYOUT}")
        if shape[0] < 1:
            raise EvalInputError(f"{path}: '{key}' holds no images {tuple(shape)}")
        self.shape = tuple(int(s) for s in shape)
        expected = self.offset + math.prod(self.shape)
        if info.file_size != expected:
            raise EvalInputError(f"{path}: '{key}' holds {info.file_size - self.offset} bytes "
                                 f"of data, but its header declares {self.shape} uint8 = "
                                 f"{math.prod(self.shape)} bytes (truncated?)")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int):
        """Yield consecutive (b, H, W, 3) uint8 batches, the last one possibly shorter."""
        row = math.prod(self.shape[1:])
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.key + ".npy") as f:
                f.read(self.offset)
                for start in range(0, len(self), batch_size):
                    n = min(batch_size, len(self) - start)
                    data = f.read(n * row)
                    if len(data) != n * row:
                        raise EvalInputError(f"{self.path}: '{self.key}' ends after "
                                             f"{start + len(data) // row} of {len(self)} "
                                             "images (truncated)")
                    yield np.frombuffer(data, np.uint8).reshape((n,) + self.shape[1:])
        except (zipfile.BadZipFile, OSError) as e:
            raise EvalInputError(f"{self.path}: read failed ({e}): truncated or "
                                 "corrupted?") from e


def read_reference(path: str) -> dict:
    """The ADM reference batch: {'mu', 'sigma', 'mu_s', 'sigma_s' (float64 or None),
    'images' (NpzImages or None)}. Needs `mu`/`sigma` or `arr_0`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            moments = {k: (np.asarray(npz[k], np.float64) if k in keys else None)
                       for k in ("mu", "sigma", "mu_s", "sigma_s")}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise EvalInputError(f"{path}: cannot be read as an npz reference batch ({e})") from e
    for mu_key, sigma_key, dim in (("mu", "sigma", 2048), ("mu_s", "sigma_s", 2023)):
        mu, sigma = moments[mu_key], moments[sigma_key]
        if (mu is None) != (sigma is None):
            raise EvalInputError(f"{path}: has only one of '{mu_key}'/'{sigma_key}'")
        if mu is not None and (mu.shape != (dim,) or sigma.shape != (dim, dim)):
            raise EvalInputError(f"{path}: '{mu_key}' {mu.shape} / '{sigma_key}' "
                                 f"{sigma.shape}, expected ({dim},) / ({dim}, {dim})")
    images = NpzImages(path) if "arr_0" in keys else None
    if moments["mu"] is None and images is None:
        raise EvalInputError(f"{path}: a reference batch needs 'mu'/'sigma' or 'arr_0' "
                             f"images, found {sorted(keys)}")
    return dict(moments, images=images)


# ----------------------------------------------------------------------------- statistics


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
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2,
                                                                                    np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), \
        np.atleast_2d(np.asarray(sigma2, np.float64))
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


# ----------------------------------------------------------------------------- the job


def run_inception(net: InceptionNet, images: NpzImages, *, batch_size: int,
                  desc: str) -> dict:
    """Streams a file through the Inception: pool3 and logits_unbiased rows (float32) and
    float64 moments of pool3 and of the sFID spatial features."""
    batch_size = net.round_batch(batch_size)
    n = len(images)
    pool3 = np.empty((n, 2048), np.float32)
    logits = np.empty((n, inception_lib.NUM_CLASSES), np.float32)
    moments, spatial_moments = MomentAccumulator(), MomentAccumulator()
    progress = Progress(n, desc, "img")
    start = 0
    for batch in images.batches(batch_size):
        out = net.features(batch, pad_to=batch_size)
        pool3[start:start + len(batch)] = out["pool3"]
        logits[start:start + len(batch)] = out["logits_unbiased"]
        moments.update(out["pool3"])
        spatial_moments.update(out["spatial"])
        start += len(batch)
        progress.update(len(batch))
    return {"pool3": pool3, "logits_unbiased": logits,
            "mu": moments.mean(), "sigma": moments.cov(),
            "mu_s": spatial_moments.mean(), "sigma_s": spatial_moments.cov()}


def evaluate_samples(samples_path: str, ref_path: str, inception_dir: str, mesh=None,
                     batch_size: int = 250, out_path: str | None = None,
                     fid_method: str = "eigh") -> dict:
    """FID, sFID, IS, precision and recall of an ADM sample file against a reference batch.

    Returns (and, when `out_path` is given, writes as JSON from process 0) a dict with
    fid, sfid, inception_score, precision, recall, num_samples, reference and details.
    sfid is None without spatial reference moments or images; precision/recall are None
    without reference images.
    """
    t0 = time.perf_counter()
    samples = NpzImages(samples_path)
    if len(samples) < 2:
        raise EvalInputError(f"{samples_path}: {len(samples)} image; FID needs at least 2")
    reference = read_reference(ref_path)
    net = load_inception(inception_dir, mesh=mesh)
    acts = run_inception(net, samples, batch_size=batch_size, desc="inception samples")
    ref_acts = None
    if reference["images"] is not None:
        ref_acts = run_inception(net, reference["images"], batch_size=batch_size,
                                 desc="inception reference")
    source = ref_acts if reference["mu"] is None else reference
    fid = frechet_distance(acts["mu"], acts["sigma"], source["mu"], source["sigma"],
                           method=fid_method)
    spatial_source = reference if reference["mu_s"] is not None else ref_acts
    sfid = None if spatial_source is None else frechet_distance(
        acts["mu_s"], acts["sigma_s"], spatial_source["mu_s"], spatial_source["sigma_s"],
        method=fid_method)
    precision = recall = None
    if ref_acts is not None:
        precision, recall = precision_recall(ref_acts["pool3"], acts["pool3"])
    result = {
        "fid": fid, "sfid": sfid, "inception_score": inception_score(acts["logits_unbiased"]),
        "precision": precision, "recall": recall, "num_samples": len(samples),
        "samples": os.path.abspath(samples_path), "reference": os.path.abspath(ref_path),
        "num_reference_images": None if ref_acts is None else len(reference["images"]),
        "reference_moments": "npz mu/sigma" if reference["mu"] is not None
        else "reference images", "evaluator": EVALUATOR, "fid_method": fid_method,
        "seconds": time.perf_counter() - t0,
    }
    if out_path and jax.process_index() == 0:
        write_json(out_path, result, indent=2, sort_keys=True)
    return result


def eval_stage(cfg, workdir: str, mesh) -> dict:
    """The main job's `--stage=eval`: the merged samples of `--stage=sample` against the
    configured reference batch, written to `<workdir>/eval.json`."""
    samples_path = os.path.join(workdir, "samples", f"samples_{cfg.sample.num_samples}.npz")
    if not os.path.exists(samples_path):
        raise EvalInputError(f"{samples_path} is missing: run --stage=sample first "
                             f"(config.sample.num_samples={cfg.sample.num_samples})")
    result = evaluate_samples(samples_path, cfg.eval.ref_path, cfg.eval.inception_path,
                              mesh=mesh, batch_size=cfg.eval.batch_size,
                              out_path=os.path.join(workdir, "eval.json"))
    if jax.process_index() == 0:
        print(format_table(result), flush=True)
    return result


def format_table(result: dict) -> str:
    rows = [("FID", result["fid"]), ("sFID", result["sfid"]),
            ("Inception Score", result["inception_score"]),
            ("Precision", result["precision"]), ("Recall", result["recall"]),
            ("samples", result["num_samples"]), ("reference", result["reference"])]
    fmt = lambda v: "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    return "\n".join(f"{name:<16} {fmt(value)}" for name, value in rows)


# ----------------------------------------------------------------------------- benchmark


def bench_inception(batch: int = 64, iters: int = 10, *, image_size: int = 256,
                    dtype: str = "float32", precision: str | None = "highest",
                    mesh=None) -> dict:
    """Images/s of the FID Inception forward (random weights, uint8 input at image_size),
    sharded over the mesh; compile time excluded."""
    model = inception_lib.InceptionV3(rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype),
                                      precision=precision)
    net = InceptionNet(model, mesh)
    batch = net.round_batch(batch)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    local = images[parallel.process_batch_slice(batch)]
    x = parallel.host_to_global(local, net.mesh)
    t = time.perf_counter()
    compiled = _apply.lower(net.graphdef, net.state, x).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(net.state, x))
    t = time.perf_counter()
    for _ in range(iters):
        out = compiled(net.state, x)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - t) / iters
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    n_dev = jax.device_count()  # XLA's cost analysis counts one device's partition
    return {"benchmark": "inception", "batch": batch, "iters": iters,
            "image_size": image_size, "dtype": dtype, "precision": precision,
            "seconds_per_batch": seconds, "images_per_sec": batch / seconds,
            "compile_seconds": compile_s, "gflops_per_image": flops * n_dev / batch / 1e9,
            "tflops_per_device": flops / seconds / 1e12, "num_devices": n_dev,
            "device_kind": jax.devices()[0].device_kind}


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfm_jax.evaluate",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("--samples", required=True, help=f"sample npz ({SAMPLE_LAYOUT})")
    parser.add_argument("--ref", required=True,
                        help="reference batch npz (mu/sigma[/mu_s/sigma_s] and/or arr_0)")
    parser.add_argument("--inception", required=True,
                        help="directory from `python -m convert inception`")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--batch-size", type=int, default=250,
                        help="global Inception batch (rounded up to the device count)")
    parser.add_argument("--fid-method", choices=("eigh", "sqrtm"), default="eigh",
                        help="Tr sqrt(S1 S2) by eigenvalues (default) or scipy sqrtm (ADM)")
    args = parser.parse_args(argv)
    parallel.initialize_distributed()
    try:
        result = evaluate_samples(args.samples, args.ref, args.inception,
                                  batch_size=args.batch_size, out_path=args.out,
                                  fid_method=args.fid_method)
    except EvalInputError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(format_table(result), flush=True)
        if args.out:
            print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
