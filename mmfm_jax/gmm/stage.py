"""A run's mixtures: where they live, how the fit writes them, how a run reads them back.

`fit_from_batches` is the fit of `--stage=fit_gmm` (CLS tokens -> CLS mixture -> spatial
pass, resumable between the two; `gmm/job.py` feeds it encoded images). `gmm_dir` is the
run's mixture directory (config.gmm.path, else `<workdir>/gmm`) and `load_fitted` the one
reader that training and sampling share; `require_fitted` is its check, which the train and
sample stages run first so that a missing mixture is one line before any model is built.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

import numpy as np
from jax.sharding import Mesh

from mmfm_jax.config import ConfigError
from mmfm_jax.gmm import io
from mmfm_jax.gmm.em import fit_diag_gmm
from mmfm_jax.gmm.mixture import CLSMixture, SpatialMixture
from mmfm_jax.gmm.spatial import spatial_pass


def fit_from_batches(batches_fn: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], cfg,
                     mesh: Mesh | None, out_dir: str,
                     log_fn: Callable[[str], None] = print,
                     iteration_log_fn: Callable[[str], None] | None = None
                     ) -> tuple[CLSMixture, SpatialMixture]:
    """Fit both mixtures into `out_dir` and return them.

    batches_fn() returns a fresh iterator of host batches (latents_nhwc (B, H, W, C)
    normalised latents, cls (B, D) CLS tokens) over the fit images (224 centre crops, no
    flip; REFERENCE e.1-e.2); it is called once for the CLS tokens and once for the spatial
    pass. cfg is the run config (its `gmm` block) or that block: num_components, max_iter,
    tol, reg_covar, init, seed, chunk_size (E-step rows per chunk), flip. When `out_dir`
    already holds the CLS mixture, the EM is skipped and only the spatial pass runs.
    `log_fn` gets the stage's lines, `iteration_log_fn` (default `log_fn`) the EM's one
    line per iteration.
    """
    g = cfg.gmm if hasattr(cfg, "gmm") else cfg
    if io.has_cls(out_dir):
        log_fn(f"fit_gmm: CLS mixture found in {out_dir}, skipping EM")
        cls_mixture = io.load_cls(out_dir)
    else:
        t0 = time.perf_counter()
        cls_tokens = np.concatenate([np.asarray(c, np.float32) for _, c in batches_fn()])
        log_fn(f"fit_gmm: {cls_tokens.shape[0]} CLS tokens of dim {cls_tokens.shape[1]} "
               f"collected in {time.perf_counter() - t0:.1f} s; EM with K={g.num_components}")
        result = fit_diag_gmm(cls_tokens, g.num_components, max_iter=g.max_iter, tol=g.tol,
                              reg_covar=g.reg_covar, init=g.init, seed=g.seed, mesh=mesh,
                              chunk_size=g.chunk_size, screen=g.screen,
                              log_fn=iteration_log_fn or log_fn)
        cls_mixture = result.mixture
        io.save_cls(out_dir, cls_mixture, {
            "n_samples": result.n_samples, "n_iter": result.n_iter,
            "converged": result.converged, "lower_bound": result.lower_bound,
            "log_likelihood": result.log_likelihood, "bic": result.bic,
            "history": result.history})
        log_fn(f"fit_gmm: CLS mixture saved to {out_dir} (converged={result.converged}, "
               f"{result.n_iter} iterations, BIC {result.bic:.6g})")
    t0 = time.perf_counter()
    spatial, counts = spatial_pass(batches_fn(), cls_mixture, mesh=mesh, flip=g.flip)
    io.save_spatial(out_dir, spatial, counts, {"flip_augmentation": bool(g.flip),
                                               "num_samples": int(counts.sum()),
                                               "empty_modes": int((counts == 0).sum())})
    log_fn(f"fit_gmm: spatial mixture saved to {out_dir} ({int(counts.sum())} latents incl. "
           f"flips, {int((counts == 0).sum())} empty modes, {time.perf_counter() - t0:.1f} s)")
    return cls_mixture, spatial


def gmm_dir(cfg, workdir: str) -> str:
    """The run's mixture directory: config.gmm.path, else `<workdir>/gmm`."""
    return cfg.gmm.path or os.path.join(workdir, "gmm")


def require_fitted(cfg, workdir: str) -> None:
    """Fail fast, reading nothing: a GMM run whose mixtures are not on disk raises
    FileNotFoundError with one line naming the directory and the fix (the Gaussian
    baseline needs none)."""
    if cfg.source != "gmm":
        return
    path = gmm_dir(cfg, workdir)
    missing = [name for name, present in (("CLS", io.has_cls(path)),
                                          ("spatial", io.has_spatial(path))) if not present]
    if missing:
        where = f"config.gmm.path={cfg.gmm.path!r}" if cfg.gmm.path else "the workdir"
        raise FileNotFoundError(
            f"{path}: no fitted {' and '.join(missing)} mixture{'s' * (len(missing) > 1)} "
            f"(from {where}); run "
            "--stage=fit_gmm first or set config.gmm.path to converted mixtures")


def load_fitted(cfg, workdir: str) -> tuple[CLSMixture, SpatialMixture] | None:
    """(CLS mixture, spatial mixture) of a GMM run, None for the Gaussian baseline.

    Raises FileNotFoundError (`require_fitted`) when a mixture is missing and ConfigError
    when its mode count is not config.gmm.num_components."""
    if cfg.source != "gmm":
        return None
    require_fitted(cfg, workdir)
    path = gmm_dir(cfg, workdir)
    cls_mix, spatial = io.load(path)
    k = cfg.gmm.num_components
    if cls_mix.n_components != k:
        raise ConfigError(f"{path}: mixture has {cls_mix.n_components} modes, config.gmm."
                          f"num_components is {k}; set --config.gmm.num_components="
                          f"{cls_mix.n_components} or refit")
    return cls_mix, spatial
