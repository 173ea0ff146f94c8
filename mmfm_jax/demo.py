"""The embedded demo: MM-FM against the Gaussian source on 8x8 digits, end to end on CPU.

It runs the ImageNet code path at toy scale, through the same stages as the main job: the
identity pixel encoder stands in for the RAE (the flattened image is the "CLS token"),
the fit_gmm job fits the CLS mixture and the spatial statistics, the train job trains a
small DiTDH with mode coupling and mode conditioning and, for the same number of steps,
the Gaussian-source baseline; the EMA weights come back through
`checkpoint.load_ema_model` and the sampling job's program draws samples at 5, 10, 25 and
50 Euler steps. The report is the pixel-space
Frechet distance to held-out digits per step count (`metrics.json`), the sample grids
(`samples.png`) and the distance against steps (`fd_vs_steps.png`). Rerunning with the same
workdir resumes (finished stages are skipped). Through `python -m mmfm_jax.main` (`make
demo`) the console stays under 40 lines (stages, progress, the report); the log file
`<workdir>/log.txt` holds the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from mmfm_jax import data, logs, parallel, pixel_encoder, sample_job, train_job
from mmfm_jax.checkpoint import load_ema_model
from mmfm_jax.evaluate import frechet_distance
from mmfm_jax.files import write_json
from mmfm_jax.gmm.job import fit_gmm_stage
from mmfm_jax.gmm.stage import load_fitted

EULER_STEPS = (5, 10, 25, 50)
METHODS = ("mm_fm", "gaussian")
GRID = 64  # samples per grid in samples.png


def variant(cfg, method: str) -> ml_collections.ConfigDict:
    """The run config of one side: MM-FM keeps the given GMM setting (mode-conditional
    unless the config says otherwise); the baseline is the Gaussian source, unconditional."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    if method == "gaussian":
        c.source, c.mode_conditional, c.train.label_dropout = "gaussian", False, 0.0
    elif cfg.source != "gmm":
        c.source, c.mode_conditional = "gmm", True
    return c


def _moments(images_unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = images_unit.reshape(images_unit.shape[0], -1).astype(np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def sample_images(cfg, model, mixture, mesh, num_steps: int) -> np.ndarray:
    """cfg.sample.num_samples samples of `model` as float images in [0, 1] (B, H, W, C),
    through the sampling job's compiled program (uint8 truncation included)."""
    spec = dataclasses.replace(sample_job.spec_from_config(cfg, model), num_steps=num_steps)
    batch = parallel.shard_batch_size(int(cfg.sample.batch_size), mesh)
    sampler = sample_job.Sampler(model, mesh, spec, batch_size=batch, mixture=mixture,
                                 decode_fn=pixel_encoder.decode)
    n = int(cfg.sample.num_samples)
    out = []
    for start in range(0, n, batch):
        _, images, _ = sampler(start)
        out.append(images)
    images = np.concatenate(out)[:n]
    channels = cfg.model.in_channels
    return images[..., :channels].astype(np.float32) / 255.0  # grey was repeated to RGB


def _grid(images: np.ndarray, cols: int = 8) -> np.ndarray:
    n, h, w = images.shape[:3]
    rows = -(-n // cols)
    canvas = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1), np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = \
            img[..., 0]
    return canvas


def write_plots(workdir: str, fd: dict, grids: dict) -> None:
    """samples.png (one grid per method and step count) and fd_vs_steps.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(METHODS), len(EULER_STEPS),
                             figsize=(2.6 * len(EULER_STEPS), 3.1 * len(METHODS)))
    for i, method in enumerate(METHODS):
        for j, steps in enumerate(EULER_STEPS):
            ax = axes[i, j]
            ax.imshow(_grid(grids[method][steps]), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_title(f"{method}, {steps} steps\nFD {fd[method][str(steps)]:.2f}",
                         fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "samples.png"), dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, label in zip(METHODS, ("MM-FM (GMM source + mode)", "Gaussian source")):
        ax.plot(EULER_STEPS, [fd[method][str(s)] for s in EULER_STEPS], marker="o",
                label=label)
    ax.set_xscale("log")
    ax.set_xticks(EULER_STEPS, [str(s) for s in EULER_STEPS])
    ax.set_xlabel("Euler steps (grid points)")
    ax.set_ylabel("Frechet distance (pixels, held-out digits)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "fd_vs_steps.png"), dpi=100)
    plt.close(fig)


def run_demo(cfg, workdir: str, mesh) -> dict:
    """Fit, train both sides, sample, and write metrics.json, samples.png, fd_vs_steps.png.

    Returns the metrics dict ({"frechet_distance": {...}, "train_steps", "seconds"})."""
    t0 = time.perf_counter()
    runs = {m: (variant(cfg, m), os.path.join(workdir, m)) for m in METHODS}
    fit_gmm_stage(*runs["mm_fm"], mesh)  # nothing to do once both mixtures are saved
    for method in METHODS:
        c, d = runs[method]
        logging.info("demo: training %s for %d steps", method, c.train.num_steps)
        train_job.train_stage(c, d, mesh)

    holdout = cfg.data.get("digits_holdout", 0.2)
    _, heldout, _ = data.load_digits_split(holdout)
    mu_ref, sigma_ref = _moments(heldout.astype(np.float32) / 255.0)
    fd: dict[str, dict[str, float]] = {m: {} for m in METHODS}
    grids: dict[str, dict[int, np.ndarray]] = {m: {} for m in METHODS}
    for method in METHODS:
        c, d = runs[method]
        model = load_ema_model(c, d, mesh)
        mixtures = load_fitted(c, d)
        mixture = None if mixtures is None else mixtures[1]
        for steps in EULER_STEPS:
            images = sample_images(c, model, mixture, mesh, steps)
            mu, sigma = _moments(images)
            fd[method][str(steps)] = frechet_distance(mu, sigma, mu_ref, sigma_ref)
            grids[method][steps] = images[:GRID]
            logging.info("demo: %s, %d Euler steps: Frechet distance %.4f", method, steps,
                         fd[method][str(steps)], extra=logs.FILE_ONLY)  # the report has it
    metrics = {"frechet_distance": fd, "train_steps": int(cfg.train.num_steps),
               "seconds": time.perf_counter() - t0}
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_plots(workdir, fd, grids)
        write_json(os.path.join(workdir, "metrics.json"), metrics, indent=2)
        print(format_report(metrics))
        logging.info("demo report:\n%s", format_report(metrics), extra=logs.FILE_ONLY)
    return metrics


def format_report(metrics: dict) -> str:
    fd = metrics["frechet_distance"]
    lines = [f"Frechet distance to held-out digits (pixels), {metrics['train_steps']} train "
             f"steps each, {metrics['seconds']:.0f} s in all",
             "Euler steps " + "".join(f"{s:>10d}" for s in EULER_STEPS)]
    for method in METHODS:
        lines.append(f"{method:<11} " + "".join(f"{fd[method][str(s)]:>10.3f}"
                                                 for s in EULER_STEPS))
    return "\n".join(lines)
