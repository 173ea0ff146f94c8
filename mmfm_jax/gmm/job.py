"""The fit_gmm job (`--stage=fit_gmm`): the frozen encoder over the data, then the fit.

Images are read in order (square centre crops at the encoder's input size, no flip),
encoded on the mesh by the same frozen encoder the trainer uses (`frozen_encoder`), and
handed to `gmm.stage.fit_from_batches`, which fits the CLS mixture and then runs the
spatial pass into the run's mixture directory. Each encode pass and the EM show one
progress bar on the console; the EM's per-iteration lines go to the log file. Kept out of
`gmm/__init__` so that reading or fitting mixtures never imports the data pipeline or the
RAE.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from mmfm_jax import data, frozen_encoder, logs, metrics, parallel
from mmfm_jax.config import ConfigError
from mmfm_jax.gmm import io
from mmfm_jax.gmm.stage import fit_from_batches, gmm_dir


def fit_gmm_stage(cfg, workdir: str, mesh) -> None:
    """Encode the data, fit the CLS mixture, then the spatial pass; writes the run's mixture
    directory. A rerun whose directory holds both mixtures does nothing (each pass reads
    the whole split)."""
    if cfg.source != "gmm":
        logging.info("fit_gmm: source %r needs no mixture; nothing to do", cfg.source)
        return
    out_dir = gmm_dir(cfg, workdir)
    if io.has_cls(out_dir) and io.has_spatial(out_dir):
        logging.info("fit_gmm: both mixtures found in %s; nothing to do", out_dir)
        return
    if cfg.data.kind == "latent_cache":
        raise ConfigError("--stage=fit_gmm reads images; config.data.kind="
                          "'latent_cache' has none (fit on the image data, or pass "
                          "config.gmm.path)")
    encoder = frozen_encoder.make_encoder(cfg, mesh)
    graphdef, enc_state = frozen_encoder.place_encoder(encoder, mesh)
    encode = jax.jit(lambda s, x: frozen_encoder.encode(graphdef, s, x))
    # square centre crops at the encoder's input size (224 for DINOv2), as the GMM scripts
    image_size = (encoder.cfg.encoder.input_size[0] if cfg.rae.kind == "dinov2"
                  else cfg.data.image_size)
    batch = parallel.shard_batch_size(int(cfg.gmm.encode_batch_size), mesh)
    em = _EMProgress(int(cfg.gmm.max_iter))

    def batches():
        try:
            loader = data.make_eval_loader(cfg.data, global_batch=batch, image_size=image_size)
        except FileNotFoundError as e:  # no images where config.data points
            raise ConfigError(f"config.data.path={cfg.data.path!r} (config.data.kind="
                              f"{cfg.data.kind!r}): {e}; --stage=fit_gmm encodes the "
                              "training images") from e
        what = "spatial pass" if io.has_cls(out_dir) else "CLS tokens"  # the EM runs between
        em.finish()
        progress = metrics.Progress(loader.num_records, f"fit_gmm encode ({what})", "img")
        for host in loader:
            images = parallel.host_to_global(host["image"], mesh)
            latents, cls = parallel.global_to_host(encode(enc_state, images))
            mask = np.asarray(host["mask"], bool)
            progress.update(min(batch, progress.total - progress.done))
            yield latents[mask], cls[mask]
        progress.finish()

    fit_from_batches(batches, cfg, mesh, out_dir, log_fn=logging.info, iteration_log_fn=em)


class _EMProgress:
    """The EM's per-iteration lines go to the log file; the console gets a progress bar."""

    def __init__(self, max_iter: int):
        self.max_iter = max_iter
        self.progress: metrics.Progress | None = None

    def __call__(self, line: str) -> None:
        logging.info(line, extra=logs.FILE_ONLY)
        if self.progress is None:  # started by the first iteration, after the encode pass
            self.progress = metrics.Progress(self.max_iter, "fit_gmm EM", "iterations")
        self.progress.update(1, extra=line.split(": ", 1)[-1].split(" (")[0])

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.finish()
