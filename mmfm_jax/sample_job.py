"""The sampling job (`--stage=sample`): ADM-format sample files from a trained model.

Every sample is a function of (seed, global index) alone: its mode, source noise and class
label come from `fold_in(key, index)` inside one compiled program (source draw, the whole
Euler loop, guidance, decode, uint8), so the images do not depend on the batch, the device
count or the process count. Each process writes the rows it holds as
`samples/shard_{start:07d}_{end:07d}.npz`; a rerun skips the indices already on disk, and
process 0 merges the shards into `samples/samples_{N}.npz` (`arr_0` uint8 NHWC, `labels`).

Paths go through `etils.epath`, so the workdir may be local, NFS or `gs://` (the merge
needs every process's shards visible to process 0: a shared filesystem or a bucket).

The model is a converted directory (config.sample.model_path) or the EMA weights of the
workdir's latest checkpoint (`checkpoint.load_ema_model`); the mixture comes from the
run's GMM directory (`gmm.stage.load_fitted`); both are checked first, so a missing one
is one line before anything loads. `grid_evaluator` is the same program as a training
evaluator (a PNG grid of EMA samples, which the train job hands to the loop), and
`generate_images` draws indices 0..N-1 in memory for the in-training FID
(`fid_scorer.FidEvaluator`). `SamplingParts` loads model, guide, mixture and decoder once,
for the sampling stage and for each point of the guidance sweep.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import zipfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from mmfm_jax import files, metrics, parallel, sampling
from mmfm_jax.checkpoint import load_ema_model
from mmfm_jax.config import ConfigError
from mmfm_jax.flow import time_shift
from mmfm_jax.gmm.stage import load_fitted, require_fitted
from mmfm_jax.models import load_ditdh

SHARD_RE = re.compile(r"^shard_(\d{7})_(\d{7})\.npz$")
GRID_SIZE = 64


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """Static settings of one compiled sampler."""

    latent_shape: tuple[int, int, int]  # (H, W, C) of the model input
    num_steps: int = 50  # grid points; num_steps - 1 model evaluations
    shift: float = 1.0
    conditioning: str = "none"  # mode (y = the drawn mode) | class | none (y = null label)
    guidance: str = "none"  # none | autoguidance | cfg
    scale: float = 1.5
    interval: tuple[float, float] = (0.0, 1.0)
    num_classes: int = 0  # class-conditional models: labels drawn uniformly in [0, n)
    seed: int = 0
    state_dtype: str = "float32"  # ODE state; "bfloat16": MM-FM's --precision bf16 protocol


def draw_sources(spec: SampleSpec, indices: jax.Array, null_label: int, mixture=None):
    """Per-index source noise x(t=1), saved label and model label y.

    Mode-conditional and unconditional-GMM models draw the mode from the mixture weights and
    the noise from that mode; the Gaussian baseline draws N(0, I) (label -1)."""
    root = jax.random.key(spec.seed)

    def one(index):
        k_mode, k_noise, k_class = jax.random.split(jax.random.fold_in(root, index), 3)
        if mixture is None:
            label = jnp.int32(-1)
            x = jax.random.normal(k_noise, (1, *spec.latent_shape), jnp.float32)[0]
        else:
            label = mixture.sample_modes(k_mode, 1)[0]
            x = mixture.sample(k_noise, label[None])[0]
        if spec.conditioning == "class":
            label = jax.random.randint(k_class, (), 0, spec.num_classes, jnp.int32)
        y = label if spec.conditioning in ("mode", "class") else jnp.int32(null_label)
        return x, label, y

    return jax.vmap(one)(indices)


def to_uint8(images: jax.Array) -> jax.Array:
    """clamp to [0, 1], x255, truncating cast (upstream `sample_ddp.py`); grey -> RGB."""
    out = (jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.uint8)
    return jnp.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


def generate(model, indices: jax.Array, spec: SampleSpec, *, mixture=None, guide=None,
             decode_fn: Callable[[jax.Array], jax.Array] | None = None):
    """Traceable core: indices (B,) -> (uint8 images (B, H, W, 3), labels (B,))."""
    x0, labels, y = draw_sources(spec, indices, model.null_label, mixture)
    if spec.guidance == "autoguidance":
        velocity = sampling.autoguidance_velocity(model, guide, y, scale=spec.scale,
                                                  interval=spec.interval)
    elif spec.guidance == "cfg":
        velocity = sampling.cfg_velocity(model, y, scale=spec.scale, interval=spec.interval)
    else:
        velocity = sampling.conditional_velocity(model, y)
    latents = sampling.euler_sample(velocity, x0, num_steps=spec.num_steps, shift=spec.shift,
                                    state_dtype=spec.state_dtype)
    images = latents if decode_fn is None else decode_fn(latents)
    return to_uint8(images), labels


def _split(obj):
    """(pure apply, state): NNX modules (or their bound methods) travel as jit arguments."""
    if obj is None:
        return (lambda state, *a: None), None
    module, name = obj, None
    if not isinstance(obj, nnx.Module) and isinstance(getattr(obj, "__self__", None),
                                                       nnx.Module):
        module, name = obj.__self__, obj.__name__
    if not isinstance(module, nnx.Module):
        return (lambda state, *a: obj(*a)), None
    graphdef, state = nnx.split(module)

    def apply(state, *args):
        merged = nnx.merge(graphdef, state)
        return (getattr(merged, name) if name else merged)(*args)
    return apply, state


class Sampler:
    """`generate` compiled once over `mesh`: global batch of indices in, this process's rows
    out. Parameters keep their shardings; the batch is split over every device."""

    def __init__(self, model, mesh, spec: SampleSpec, *, batch_size: int, mixture=None,
                 guide=None, decode_fn=None):
        if batch_size % parallel.num_batch_shards(mesh):
            raise ValueError(f"sample batch {batch_size} is not divisible by the "
                             f"{parallel.num_batch_shards(mesh)} batch shards of the mesh")
        if spec.guidance == "autoguidance" and guide is None:
            raise ValueError("guidance 'autoguidance' needs a guide model (sample.guide_path)")
        self.mesh, self.spec, self.batch_size = mesh, spec, batch_size
        graphdef, model_state = nnx.split(model)
        self._graphdef = graphdef
        guide_graph, guide_state = nnx.split(guide) if guide is not None else (None, None)
        decode_apply, decode_state = _split(decode_fn)
        self._args = parallel.replicate_unplaced(
            (model_state, guide_state, decode_state, mixture), mesh)
        self._sharding = parallel.batch_sharding(mesh, 1)

        def program(model_state, guide_state, decode_state, mixture, indices):
            m = nnx.merge(graphdef, model_state)
            g = nnx.merge(guide_graph, guide_state) if guide_graph is not None else None
            dec = None if decode_fn is None else (lambda z: decode_apply(decode_state, z))
            return generate(m, indices, spec, mixture=mixture, guide=g, decode_fn=dec)

        self._program = jax.jit(program, out_shardings=(
            parallel.batch_sharding(mesh, 4), self._sharding))
        # Rows of each global batch that this process holds (static: set by the sharding).
        index_map = self._sharding.addressable_devices_indices_map((batch_size,))
        self.local_rows = np.unique(np.concatenate(
            [np.arange(batch_size)[s[0]] for s in index_map.values()]))

    def use_model(self, model) -> None:
        """Sample from new weights of the same architecture (a later EMA) without
        recompiling."""
        graphdef, model_state = nnx.split(model)
        if graphdef != self._graphdef:
            raise ValueError("Sampler.use_model: the model's structure differs from the one "
                             "this sampler was compiled for")
        self._args = (parallel.replicate_unplaced(model_state, self.mesh), *self._args[1:])

    def __call__(self, start: int, *, gather: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples start .. start + batch_size - 1: (global row indices, images, labels) of
        the rows this process holds (`gather`: every row, on every process)."""
        indices = np.arange(start, start + self.batch_size, dtype=np.int32)
        global_indices = jax.make_array_from_callback(indices.shape, self._sharding,
                                                      lambda idx: indices[idx])
        images, labels = self._program(*self._args, global_indices)
        images, labels = parallel.global_to_host((images, labels), gather=gather)
        return (indices if gather else indices[self.local_rows]), images, labels


def generate_images(sampler: Sampler, num_samples: int, *, desc: str = "sample"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Samples 0 .. num_samples - 1 in memory, on every process: (uint8 images, labels)."""
    progress = metrics.Progress(num_samples, desc, "img")
    images, labels = [], []
    for start in range(0, num_samples, sampler.batch_size):
        _, batch_images, batch_labels = sampler(start, gather=True)
        images.append(batch_images)
        labels.append(batch_labels)
        progress.update(min(sampler.batch_size, num_samples - start))
    return np.concatenate(images)[:num_samples], np.concatenate(labels)[:num_samples]


# ---- shard files --------------------------------------------------------------------------

def _shard_problem(path: epath.Path, start: int, end: int) -> str | None:
    """Why a shard file is unusable (None when it is complete)."""
    try:
        shape, dtype = files.npz_header(path, "arr_0")
        lshape, _ = files.npz_header(path, "labels")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    if dtype != np.uint8 or len(shape) != 4 or shape[0] != end - start or shape[-1] != 3:
        return f"arr_0 is {dtype} {shape}, expected uint8 ({end - start}, H, W, 3)"
    if lshape != (end - start,):
        return f"labels have shape {lshape}, expected ({end - start},)"
    return None


def scan_shards(samples_dir: epath.Path, *, remove_bad: bool) -> list[tuple[int, int, epath.Path]]:
    """Complete shards as sorted (start, end, path); bad ones are reported (and removed by
    the one process asked to, so that they are regenerated)."""
    found = []
    if not samples_dir.exists():
        return found
    for path in samples_dir.iterdir():
        m = SHARD_RE.match(path.name)
        if not m:
            continue
        start, end = int(m.group(1)), int(m.group(2))
        problem = _shard_problem(path, start, end) if end > start else "empty range"
        if problem is None:
            found.append((start, end, path))
            continue
        logging.warning("sample shard %s is %s; it will be regenerated", path, problem)
        if remove_bad:
            path.unlink(missing_ok=True)
    return sorted(found, key=lambda s: (s[0], s[1]))


def _covered(shards, num_samples: int) -> np.ndarray:
    mask = np.zeros(num_samples, bool)
    for start, end, _ in shards:
        mask[start:min(end, num_samples)] = True
    return mask


def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of a sorted index array."""
    if indices.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(indices, breaks)]


def _write_npz(path: epath.Path, **arrays) -> None:
    """Atomic write; the temporary name is per process, so processes never share one."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    files.write_bytes(path, buf.getvalue(), suffix=f".tmp{jax.process_index()}")


def merge_shards(samples_dir: epath.Path, num_samples: int) -> epath.Path:
    """Stream every shard into `samples_{N}.npz` (arr_0, labels) after checking that the
    shards tile [0, N) with no gap and no overlap."""
    shards = scan_shards(samples_dir, remove_bad=False)
    pos, used = 0, []
    for start, end, path in shards:
        if start >= num_samples:
            continue
        if start < pos:
            raise RuntimeError(f"{path}: samples {start}..{end - 1} were already written by "
                               f"{used[-1][2]}; remove one of them")
        if start > pos:
            raise RuntimeError(f"{samples_dir}: samples {pos}..{start - 1} are missing")
        used.append((start, end, path))
        pos = end
    if pos < num_samples:
        raise RuntimeError(f"{samples_dir}: samples {pos}..{num_samples - 1} are missing")
    if pos > num_samples:
        raise RuntimeError(f"{used[-1][2]} ends at {pos}, past num_samples={num_samples}")
    image_shape, _ = files.npz_header(used[0][2], "arr_0")
    out = samples_dir / f"samples_{num_samples}.npz"
    tmp = samples_dir / (out.name + ".tmp")
    labels = []
    header = {"descr": "|u1", "fortran_order": False,
              "shape": (num_samples, *image_shape[1:])}
    with tmp.open("wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for _, _, path in used:
                with path.open("rb") as g, np.load(g) as shard:
                    if shard["arr_0"].shape[1:] != image_shape[1:]:
                        raise RuntimeError(f"{path}: images {shard['arr_0'].shape[1:]}, "
                                           f"expected {image_shape[1:]} as in {used[0][2]}")
                    member.write(np.ascontiguousarray(shard["arr_0"]).tobytes())
                    labels.append(shard["labels"])
        with zf.open("labels.npy", "w") as member:
            np.lib.format.write_array(member, np.concatenate(labels).astype(np.int32))
    tmp.rename(out)
    return out


def write_grid(images: np.ndarray, path: epath.Path) -> None:
    """Square PNG grid of uint8 NHWC images."""
    from PIL import Image

    n = len(images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    h, w, c = images.shape[1:]
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = img
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    files.write_bytes(path, buf.getvalue())


def grid_evaluator(cfg, workdir: str, mesh, *, mixture=None, decode_fn=None,
                   num_images: int = GRID_SIZE) -> Callable[[int, object], str]:
    """A training evaluator: `evaluate(step, ema_model)` writes a PNG grid of `num_images`
    samples (this job's program, indices 0..) as `<workdir>/samples/train_grid_{step}.png`
    and returns its path; `evaluate.every` is config.train.sample_every. `mixture` and
    `decode_fn` are the trainer's (on the mesh). The sampler compiles on the first call."""
    batch = parallel.shard_batch_size(num_images, mesh)
    out_dir = epath.Path(workdir) / "samples"
    samplers: list[Sampler] = []

    def evaluate(step: int, model) -> str:
        if not samplers:
            samplers.append(Sampler(model, mesh, spec_from_config(cfg, model),
                                    batch_size=batch, mixture=mixture, decode_fn=decode_fn))
        else:
            samplers[0].use_model(model)
        _, images, _ = samplers[0](0, gather=True)
        out = out_dir / f"train_grid_{step:07d}.png"
        if jax.process_index() == 0:
            write_grid(images[:num_images], out)
        return str(out)
    evaluate.every = int(cfg.train.sample_every)
    return evaluate


# ---- the job --------------------------------------------------------------------------------

def _batches_to_run(sampler: Sampler, done: np.ndarray, num_samples: int) -> list[int]:
    """Batch starts where some process still misses rows (agreed by every process)."""
    starts = np.arange(0, num_samples, sampler.batch_size)
    local = np.array([np.any(~done[rows[rows < num_samples]])
                      for rows in (s + sampler.local_rows for s in starts)], bool)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(starts))
        local = local.any(axis=0)
    return [int(s) for s, need in zip(starts, local) if need]


def run_sampling(sampler: Sampler, samples_dir, num_samples: int, *,
                 png_grid: bool = True) -> epath.Path:
    """Generate the missing samples of [0, N), write this process's shards, then merge on
    process 0. Returns the merged file's path."""
    samples_dir = epath.Path(samples_dir)
    merged = samples_dir / f"samples_{num_samples}.npz"
    samples_dir.mkdir(parents=True, exist_ok=True)
    shards = scan_shards(samples_dir, remove_bad=jax.process_index() == 0)
    barrier("mmfm_sample_scan")
    done = _covered(shards, num_samples)
    todo = _batches_to_run(sampler, done, num_samples)
    logging.info("sampling %d images into %s: %d on disk, %d batches of %d to run",
                 num_samples, samples_dir, int(done.sum()), len(todo), sampler.batch_size)
    progress = metrics.Progress(len(todo), "sample", "batches")
    for start in todo:
        rows, images, labels = sampler(start)
        keep = (rows < num_samples) & ~done[np.minimum(rows, num_samples - 1)]
        for a, b in _runs(rows[keep]):
            sel = (rows >= a) & (rows < b)
            _write_npz(samples_dir / f"shard_{a:07d}_{b:07d}.npz", arr_0=images[sel],
                       labels=labels[sel].astype(np.int32))
        progress.update(1, extra=f"from index {start}, "
                        f"{progress.rate() * sampler.batch_size:.1f} images/s")
    barrier("mmfm_sample_written")
    if jax.process_index() == 0 and (todo or not merged.exists()):
        merged = merge_shards(samples_dir, num_samples)
        if png_grid:
            with merged.open("rb") as f, np.load(f) as data:
                write_grid(data["arr_0"][:GRID_SIZE], samples_dir / "grid.png")
        logging.info("wrote %s", merged)
    barrier("mmfm_sample_merged")  # every process may read the merged file from here on
    return merged


def barrier(name: str) -> None:
    """All processes meet here (nothing to do on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def spec_from_config(cfg, model) -> SampleSpec:
    """The sampler settings of a run: grid, shift (the training shift), conditioning."""
    mc = model.config
    shape = (mc.input_size, mc.input_size, mc.in_channels)
    shift = time_shift(cfg.train.time_shift, shape)
    if cfg.mode_conditional:
        conditioning = "mode"
    elif cfg.sample.guidance == "cfg":
        conditioning = "class"
    else:
        conditioning = "none"
    return SampleSpec(latent_shape=shape, num_steps=cfg.sample.num_steps, shift=float(shift),
                      conditioning=conditioning, guidance=cfg.sample.guidance,
                      scale=float(cfg.sample.guidance_scale),
                      interval=tuple(float(v) for v in cfg.sample.guidance_interval),
                      num_classes=mc.num_classes, seed=cfg.sample.seed,
                      state_dtype=str(cfg.sample.state_dtype))


def _load_model(cfg, workdir: str, mesh):
    if cfg.sample.model_path:
        return load_ditdh(cfg.sample.model_path, mesh=mesh,
                          compute_dtype=cfg.sample.compute_dtype)
    return load_ema_model(cfg, workdir, mesh)  # the EMA of the workdir's latest checkpoint


def require_checkpoint(cfg, workdir: str) -> None:
    """One ConfigError line, before orbax starts any thread, when sampling from the
    workdir's checkpoints (config.sample.model_path empty) finds none."""
    import orbax.checkpoint as ocp

    directory = os.path.join(workdir, "checkpoints")
    if not cfg.sample.model_path and not ocp.utils.checkpoint_steps(directory):
        raise ConfigError(f"{directory}: no checkpoint to sample from; train first "
                          "(--stage=train) or set config.sample.model_path to a converted "
                          "model directory")


def _load_decoder(cfg):
    if cfg.rae.kind == "identity":
        from mmfm_jax import pixel_encoder
        return pixel_encoder.decode
    from mmfm_jax import rae
    return rae.load_rae(cfg.rae.path).decode


@dataclasses.dataclass
class SamplingParts:
    """What a sampler is built from, loaded once: the model, the guide (autoguidance),
    the source mixture and the decoder. The guidance sweep builds one sampler per point."""

    model: object
    guide: object
    mixture: object
    decode_fn: Callable | None

    @classmethod
    def load(cls, cfg, workdir: str, mesh) -> SamplingParts:
        require_fitted(cfg, workdir)  # cheap checks first: one line, nothing loaded
        require_checkpoint(cfg, workdir)
        model = _load_model(cfg, workdir, mesh)
        guide = None
        if cfg.sample.guidance == "autoguidance":
            guide = load_ditdh(cfg.sample.guide_path, mesh=mesh,
                               compute_dtype=cfg.sample.compute_dtype)
        mixtures = load_fitted(cfg, workdir)
        return cls(model, guide, None if mixtures is None else mixtures[1],
                   _load_decoder(cfg))

    def sampler(self, cfg, mesh) -> Sampler:
        """The sampler of `cfg`'s settings (guidance, scale, interval, steps, seed)."""
        return Sampler(self.model, mesh, spec_from_config(cfg, self.model),
                       batch_size=cfg.sample.batch_size, mixture=self.mixture,
                       guide=self.guide, decode_fn=self.decode_fn)


def sample_stage(cfg, workdir: str, mesh) -> epath.Path:
    """`--stage=sample`: cfg.sample.num_samples images into <workdir>/samples."""
    sampler = SamplingParts.load(cfg, workdir, mesh).sampler(cfg, mesh)
    return run_sampling(sampler, epath.Path(workdir) / "samples", cfg.sample.num_samples,
                        png_grid=cfg.sample.png_grid)
