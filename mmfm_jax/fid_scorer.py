"""FID of generated images inside a run, through the evaluation job's code, loaded once.

The eval stage (`evaluate.evaluate_samples`) loads the Inception and the reference for
one sample file. The in-training FID (config.train.fid_every) and the guidance sweep
(`sweep.py`) score many image sets in one process, so `FidScorer` keeps the network and
the reference moments and scores any image source through the same functions as the eval
job: `evaluate.run_inception` (config.eval.batch_size, the same zero padding, float64
moments), the reference moments chosen as the eval job chooses them (the npz's
`mu`/`sigma`, else those of its `arr_0` images) and `fid_metrics.frechet_distance`. The
same images therefore get the same FID online and offline (tests/test_train_fid.py holds
it to 1e-6), which is what users of RAE's online FID asked for.

`FidEvaluator` is the training evaluator that the train job hands to `train.train`: the
sampling job's program draws config.train.fid_samples images of the EMA model (indices
0.., config.sample.seed: the images `--stage=sample` writes for that model), the scorer
rates them, and train() logs the returned `fid` and `fid_samples` to metrics.jsonl and
TensorBoard every config.train.fid_every steps.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from mmfm_jax import evaluate, parallel, sample_job
from mmfm_jax.config import ConfigError
from mmfm_jax.fid_metrics import frechet_distance

_EVAL_PATHS = (
    ("inception_path", "the converted FID Inception",
     "run `python -m convert inception --weights pt_inception-2015-12-05.pth --out DIR` and "
     "pass --config.eval.inception_path=DIR"),
    ("ref_path", "the FID reference batch",
     "pass --config.eval.ref_path=VIRTUAL_imagenet256_labeled.npz (or build one with "
     "`python -m mmfm_jax.evaluate reference`)"),
)


def require_eval_paths(cfg, needed_by: str) -> None:
    """One ConfigError line naming the key when config.eval.inception_path or ref_path is
    empty or does not exist (gs:// paths are not checked)."""
    for key, what, fix in _EVAL_PATHS:
        value = str(cfg.eval[key])
        if not value:
            raise ConfigError(f"config.eval.{key} is empty: {what} is needed by {needed_by}; "
                              f"{fix}")
        if "://" not in value and not os.path.exists(value):
            raise ConfigError(f"config.eval.{key}={value!r} does not exist: {what} is needed "
                              f"by {needed_by}; {fix}")


class ArrayImages:
    """uint8 (N, H, W, 3) images in memory with the interface of `evaluate.NpzImages`."""

    def __init__(self, images: np.ndarray, name: str = "generated images"):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise evaluate.EvalInputError(f"{name}: {images.dtype} {images.shape}; expected "
                                          f"{evaluate.SAMPLE_LAYOUT}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int):
        for start in range(0, len(self.images), batch_size):
            yield self.images[start:start + batch_size]


class FidScorer:
    """The FID Inception and a reference batch, loaded once; `score(images)` per set."""

    def __init__(self, inception_path: str, ref_path: str, mesh, *, batch_size: int,
                 fid_method: str = "eigh"):
        self.reference = evaluate.read_reference(ref_path)
        self.net = evaluate.load_inception(inception_path, mesh=mesh)
        self.ref_path, self.batch_size, self.fid_method = ref_path, batch_size, fid_method
        self._moments: dict | None = None

    @classmethod
    def from_config(cls, cfg, mesh, needed_by: str) -> FidScorer:
        require_eval_paths(cfg, needed_by)
        return cls(cfg.eval.inception_path, cfg.eval.ref_path, mesh,
                   batch_size=int(cfg.eval.batch_size))

    def reference_moments(self) -> dict:
        """{mu, sigma, mu_s, sigma_s} as the eval job takes them: the npz's moments when it
        has them, else those of its images (computed once)."""
        if self._moments is None:
            ref = self.reference
            if ref["mu"] is not None:
                self._moments = {k: ref[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
            else:
                acts = evaluate.run_inception(self.net, ref["images"],
                                              batch_size=self.batch_size,
                                              desc="inception reference", keep_features=False)
                self._moments = {k: acts[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
        return self._moments

    def score(self, images, desc: str = "inception samples") -> dict:
        """{fid, sfid (None without spatial reference moments), num_samples} of an image
        source (`ArrayImages`, `evaluate.NpzImages`)."""
        if len(images) < 2:
            raise evaluate.EvalInputError(f"{desc}: {len(images)} image; FID needs at least 2")
        acts = evaluate.run_inception(self.net, images, batch_size=self.batch_size, desc=desc,
                                      keep_features=False)
        ref = self.reference_moments()
        fid = frechet_distance(acts["mu"], acts["sigma"], ref["mu"], ref["sigma"],
                               method=self.fid_method)
        sfid = None if ref["mu_s"] is None else frechet_distance(
            acts["mu_s"], acts["sigma_s"], ref["mu_s"], ref["sigma_s"], method=self.fid_method)
        return {"fid": fid, "sfid": sfid, "num_samples": len(images)}


class FidEvaluator:
    """A training evaluator: `evaluator(step, ema_model)` -> {"fid", "fid_samples"} of
    config.train.fid_samples samples; `every` = config.train.fid_every (train() reads it).
    The sampler compiles once; later calls swap in the new EMA weights."""

    def __init__(self, cfg, mesh, *, mixture=None, decode_fn=None,
                 scorer: FidScorer | None = None):
        self.cfg, self.mesh, self.mixture, self.decode_fn = cfg, mesh, mixture, decode_fn
        self.every = int(cfg.train.fid_every)
        self.num_samples = int(cfg.train.fid_samples)
        if self.num_samples < 2:
            raise ConfigError(f"config.train.fid_samples={self.num_samples}: FID needs at "
                              "least 2 samples")
        self.scorer = scorer or FidScorer.from_config(cfg, mesh, "config.train.fid_every > 0")
        self.batch_size = parallel.shard_batch_size(
            min(int(cfg.sample.batch_size), self.num_samples), mesh)
        self._sampler: sample_job.Sampler | None = None

    def __call__(self, step: int, model) -> dict:
        if self._sampler is None:
            self._sampler = sample_job.Sampler(
                model, self.mesh, sample_job.spec_from_config(self.cfg, model),
                batch_size=self.batch_size, mixture=self.mixture, decode_fn=self.decode_fn)
        else:
            self._sampler.use_model(model)
        images, _ = sample_job.generate_images(self._sampler, self.num_samples,
                                               desc=f"fid samples (step {step})")
        result = self.scorer.score(ArrayImages(images), desc=f"fid inception (step {step})")
        logging.info("step %d: FID-%d %.4f (EMA model, reference %s)", step, self.num_samples,
                     result["fid"], self.scorer.ref_path)
        return {"fid": result["fid"], "fid_samples": self.num_samples}
