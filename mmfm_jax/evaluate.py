"""The FID evaluation job: Inception features of a sample file and a reference batch, and
the ADM figures (FID, sFID, Inception Score, precision and recall) computed from them.

`python -m mmfm_jax.evaluate --samples FILE.npz --ref FILE.npz --inception DIR
[--out FILE.json] [--batch-size N]` reads an ADM sample file (arr_0 uint8 NHWC) and a
reference batch (`mu`/`sigma` [+ `mu_s`/`sigma_s`] and/or `arr_0` images), runs the Flax
FID Inception sharded over the mesh, reduces the moments in float64 on the host and prints
and writes the figures; `--stage=eval` of the main job calls `eval_stage`. As
guided-diffusion's `evaluations/evaluator.py`: FID on pool3, sFID on
`mixed_6/conv`[..., :7] (2023 dims), reference moments from the npz when present (else
from the reference images), IS from the unbiased logits, precision/recall against the
reference images. The metrics themselves are `mmfm_jax.fid_metrics` (pure functions of
features); this module owns the files, the network and the mesh.

`python -m mmfm_jax.evaluate reference --images DIR_or_NPZ --out REF.npz --inception DIR`
builds such a reference batch for one's own data: the float64 moments over every image and
a seeded 10k `arr_0` subset (all images when fewer) for precision/recall. Folder images are
decoded to RGB and cut with ADM's `center_crop_arr` (the crop of ADM's data loader); npz
images are used as stored.

Numbers from this job are those of this port of the TF graph; report them as such.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax import files, parallel
from mmfm_jax.fid_metrics import (
    MomentAccumulator,
    frechet_distance,
    inception_score,
    precision_recall,
)
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

    def __call__(self, images, *, intermediates: bool = False) -> dict:
        return _apply(self.graphdef, self.state, images, intermediates=intermediates)

    def compile(self, images):
        """The forward compiled ahead of time for `images` (a global array or its
        ShapeDtypeStruct); call the result as `compiled(net.state, images)`."""
        return _apply.lower(self.graphdef, self.state, images).compile()

    def round_batch(self, batch_size: int) -> int:
        """The smallest multiple of the number of batch shards >= batch_size."""
        return parallel.shard_batch_size(batch_size, self.mesh)

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
    A directory that cannot be loaded is an EvalInputError with the loader's message.
    """
    try:
        model = inception_lib.load(inception_dir, dtype=dtype, precision=precision)
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    return InceptionNet(model, mesh)


# ----------------------------------------------------------------------------- files


class NpzImages:
    """An image array inside an npz, validated from its header and read batch by batch
    (a 50k x 256 x 256 x 3 file is 9.8 GB; it is never loaded whole)."""

    def __init__(self, path: str, key: str = "arr_0", limit: int | None = None):
        self.path, self.key = path, key
        shape, fortran, dtype, data_end = self._read_header()
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            hint = " (looks channel-first: NCHW)" if len(shape) == 4 and shape[1] == 3 else ""
            raise EvalInputError(f"{path}: '{key}' is {dtype} {shape}"
                                 f"{' Fortran-ordered' if fortran else ''}{hint}; "
                                 f"expected {SAMPLE_LAYOUT}")
        if shape[0] < 1:
            raise EvalInputError(f"{path}: '{key}' holds no images {shape}")
        self.shape = shape
        if data_end != self.offset + math.prod(shape):
            raise EvalInputError(f"{path}: '{key}' holds {data_end - self.offset} bytes "
                                 f"of data, but its header declares {shape} uint8 = "
                                 f"{math.prod(shape)} bytes (truncated?)")
        if limit:  # only the first `limit` images
            self.shape = (min(limit, shape[0]),) + shape[1:]

    def _read_header(self) -> tuple[tuple[int, ...], bool, np.dtype, int]:
        """(shape, fortran order, dtype, member size) of the array; sets `self.offset`,
        where its data starts inside the member."""
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                if self.key not in names:
                    raise EvalInputError(f"{self.path}: no '{self.key}' array (holds {names}); "
                                         f"expected {SAMPLE_LAYOUT}")
                info = zf.getinfo(self.key + ".npy")
                with zf.open(info) as f:
                    shape, fortran, dtype = files.read_npy_header(f)
                    self.offset = f.tell()
        except EvalInputError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise EvalInputError(f"{self.path}: cannot be read as an npz file ({e}): "
                                 f"truncated or corrupted? expected {SAMPLE_LAYOUT}") from e
        return shape, fortran, dtype, info.file_size

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


# ----------------------------------------------------------------------------- the job


def run_inception(net: InceptionNet, images, *, batch_size: int, desc: str,
                  keep_features: bool = True, on_batch=None) -> dict:
    """Streams images (`NpzImages` or `FolderImages`) through the Inception: float64
    moments of pool3 and of the sFID spatial features and, with `keep_features`, the pool3
    and logits_unbiased rows (float32). `on_batch(batch)` sees every image batch."""
    batch_size = net.round_batch(batch_size)
    n = len(images)
    pool3 = np.empty((n if keep_features else 0, 2048), np.float32)
    logits = np.empty((n if keep_features else 0, inception_lib.NUM_CLASSES), np.float32)
    moments, spatial_moments = MomentAccumulator(), MomentAccumulator()
    progress = Progress(n, desc, "img")
    start = 0
    for batch in images.batches(batch_size):
        out = net.features(batch, pad_to=batch_size)
        if keep_features:
            pool3[start:start + len(batch)] = out["pool3"]
            logits[start:start + len(batch)] = out["logits_unbiased"]
        if on_batch is not None:
            on_batch(batch)
        moments.update(out["pool3"])
        spatial_moments.update(out["spatial"])
        start += len(batch)
        progress.update(len(batch))
    return {"pool3": pool3[:start], "logits_unbiased": logits[:start], "count": start,
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
        files.write_json(out_path, result, indent=2, sort_keys=True)
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


# ----------------------------------------------------------------------------- references

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm")
REFERENCE_SUBSET = 10_000  # ADM's reference batches hold 10k images for precision/recall


class FolderImages:
    """Every image file under a folder (recursively, sorted), decoded to RGB and cut with
    ADM's `center_crop_arr` to `image_size` (the crop of ADM's data loader and of the
    training data here), in batches decoded by a thread pool. Unreadable files are
    skipped and counted (`skipped`), never fatal."""

    def __init__(self, folder: str, image_size: int = 256, limit: int | None = None,
                 threads: int = 8):
        self.folder, self.image_size, self.threads = folder, image_size, threads
        paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                       for name in names if name.lower().endswith(IMAGE_SUFFIXES))
        if not paths:
            raise EvalInputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.paths = paths[:limit] if limit else paths
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int):
        from mmfm_jax.data.transforms import decode_and_crop

        path = self.paths[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = None
        image = decode_and_crop(data, self.image_size, name=path, key=index)
        if image is None:
            self.skipped.append(path)
        return image

    def batches(self, batch_size: int):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.threads) as pool:
            for start in range(0, len(self), batch_size):
                rows = range(start, min(start + batch_size, len(self)))
                images = [im for im in pool.map(self._load, rows) if im is not None]
                if images:
                    yield np.stack(images)


class RandomSubset:
    """A seeded uniform subset of `size` rows of a stream, kept in stream order: every row
    gets a random key and the rows of the `size` smallest keys stay, in a preallocated
    buffer (only entering rows are copied; the result does not depend on the batching)."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.rng = size, np.random.default_rng(seed)
        self.keys = np.full(size, np.inf)
        self.order = np.full(size, -1, np.int64)
        self.rows: np.ndarray | None = None
        self.seen = 0

    def __call__(self, batch: np.ndarray) -> None:
        if self.rows is None:
            self.rows = np.zeros((self.size,) + batch.shape[1:], batch.dtype)
        new_keys = self.rng.random(len(batch))
        new_order = self.seen + np.arange(len(batch))
        self.seen += len(batch)
        if self.size == 0:
            return
        keys = np.concatenate([self.keys, new_keys])
        keep = np.argpartition(keys, self.size - 1)[:self.size]
        entering = keep[keep >= self.size] - self.size
        stays = np.zeros(self.size, bool)
        stays[keep[keep < self.size]] = True
        free = np.flatnonzero(~stays)  # as many slots as entering rows
        self.rows[free] = batch[entering]
        self.keys[free], self.order[free] = new_keys[entering], new_order[entering]

    def images(self) -> np.ndarray:
        filled = np.flatnonzero(self.order >= 0)
        return self.rows[filled[np.argsort(self.order[filled])]]


def reference_images(path: str, image_size: int = 256, limit: int | None = None):
    """An image source for a reference batch: a folder of image files or an npz `arr_0`."""
    if os.path.isdir(path):
        return FolderImages(path, image_size, limit)
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: no such folder or npz file")
    return NpzImages(path, limit=limit)


def build_reference(images_path: str, out_path: str, inception_dir: str, *, mesh=None,
                    batch_size: int = 250, subset: int = REFERENCE_SUBSET, seed: int = 0,
                    image_size: int = 256, limit: int | None = None) -> dict:
    """An ADM-format reference batch: `mu`/`sigma` (pool3) and `mu_s`/`sigma_s` (sFID) in
    float64 over every image, and `arr_0`, a seeded subset of `subset` images (all when
    fewer) for precision/recall. Written atomically from process 0; returns a summary."""
    t0 = time.perf_counter()
    images = reference_images(images_path, image_size, limit)
    net = load_inception(inception_dir, mesh=mesh)
    keeper = RandomSubset(subset, seed)
    acts = run_inception(net, images, batch_size=batch_size, desc="inception reference",
                         keep_features=False, on_batch=keeper)
    kept = keeper.images()
    if jax.process_index() == 0:
        directory = os.path.dirname(os.path.abspath(out_path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(out_path)}.tmp-{os.getpid()}.npz")
        subset_arrays = {"arr_0": kept} if len(kept) else {}
        np.savez(tmp, **subset_arrays, mu=acts["mu"], sigma=acts["sigma"], mu_s=acts["mu_s"],
                 sigma_s=acts["sigma_s"])
        os.replace(tmp, out_path)
    skipped = getattr(images, "skipped", [])
    return {"reference": os.path.abspath(out_path), "source": os.path.abspath(images_path),
            "num_images": acts["count"], "num_subset": len(kept), "skipped": len(skipped),
            "first_skipped": skipped[:3], "crop": ("ADM center_crop_arr to "
                                                  f"{image_size}" if os.path.isdir(images_path)
                                                  else "none (npz arr_0 as stored)"),
            "evaluator": EVALUATOR, "seconds": time.perf_counter() - t0}


def _inception_args(parser: argparse.ArgumentParser) -> None:
    """The flags every command that runs the Inception shares."""
    parser.add_argument("--inception", required=True,
                        help="directory from `python -m convert inception`")
    parser.add_argument("--batch-size", type=int, default=250,
                        help="global Inception batch (rounded up to the device count)")


def _run(prog: str, job):
    """Run `job()` after joining the process group; a bad input is one line on stderr and
    None (the caller exits 1)."""
    parallel.initialize_distributed()
    try:
        return job()
    except EvalInputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return None


def reference_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmfm_jax.evaluate reference",
        description="Build an ADM-format reference batch (mu, sigma, mu_s, sigma_s, arr_0) "
                    "from a folder of images (each ADM-centre-cropped to --image-size) or "
                    "an npz arr_0 (used as stored); `evaluate --ref` reads the result.")
    parser.add_argument("--images", required=True, help="image folder (recursive) or npz")
    parser.add_argument("--out", required=True, help="reference npz to write")
    _inception_args(parser)
    parser.add_argument("--subset", type=int, default=REFERENCE_SUBSET,
                        help="images kept as arr_0 for precision/recall (all when fewer)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="use only the first N images (sorted paths / npz rows)")
    parser.add_argument("--image-size", type=int, default=256, help="crop size (folders)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arr_0 subset")
    args = parser.parse_args(argv)
    summary = _run("evaluate reference", lambda: build_reference(
        args.images, args.out, args.inception, batch_size=args.batch_size,
        subset=args.subset, seed=args.seed, image_size=args.image_size,
        limit=args.num_images))
    if summary is None:
        return 1
    if jax.process_index() == 0:
        print(f"wrote {summary['reference']}: moments of {summary['num_images']} images "
              f"(crop: {summary['crop']}), arr_0 {summary['num_subset']} images"
              + (f"; skipped {summary['skipped']} unreadable, e.g. "
                 f"{summary['first_skipped'][0]}" if summary["skipped"] else ""), flush=True)
    return 0


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["reference"]:
        return reference_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m mmfm_jax.evaluate", description=__doc__.strip().splitlines()[0],
        epilog="`python -m mmfm_jax.evaluate reference --images DIR_or_NPZ --out REF.npz "
               "--inception DIR` builds a reference batch (see its --help).")
    parser.add_argument("--samples", required=True, help=f"sample npz ({SAMPLE_LAYOUT})")
    parser.add_argument("--ref", required=True,
                        help="reference batch npz (mu/sigma[/mu_s/sigma_s] and/or arr_0)")
    _inception_args(parser)
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--fid-method", choices=("eigh", "sqrtm"), default="eigh",
                        help="Tr sqrt(S1 S2) by eigenvalues (default) or scipy sqrtm (ADM)")
    args = parser.parse_args(argv)
    result = _run("evaluate", lambda: evaluate_samples(
        args.samples, args.ref, args.inception, batch_size=args.batch_size,
        out_path=args.out, fid_method=args.fid_method))
    if result is None:
        return 1
    if jax.process_index() == 0:
        print(format_table(result), flush=True)
        if args.out:
            print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
