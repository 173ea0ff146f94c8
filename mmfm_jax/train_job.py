"""The training job (`--stage=train`): the trainer with its evaluators wired in.

`train.py` trains and knows nothing of sampling; `sample_job.py` samples and knows nothing
of training. This module joins them as big_vision's train loop takes its evaluators: it
builds the Trainer, has the sampling module build the PNG-grid evaluator (every
config.train.sample_every steps) and, with config.train.fid_every > 0, the FID evaluator
(`fid_scorer.FidEvaluator`: the sampling program plus the evaluation job's FID, logged as
`fid`/`fid_samples`) from the trainer's mixture and decoder, and hands them to
`train.train`, which calls each on its own schedule (`evaluator.every`). Inputs are
checked before anything is built: missing mixtures or FID paths are one line. A SIGTERM
ends the process (exit 143) once its checkpoint is saved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mmfm_jax import fid_scorer, sample_job, train
from mmfm_jax.gmm.stage import require_fitted


def train_stage(cfg, workdir: str, mesh, *,
                callbacks: Sequence[Callable[[int], None]] = ()) -> train.TrainResult:
    """Train (or resume) to config.train.num_steps with the EMA evaluators on schedule."""
    with_fid = int(cfg.train.get("fid_every", 0)) > 0
    if with_fid:
        fid_scorer.require_eval_paths(cfg, "config.train.fid_every > 0")
    require_fitted(cfg, workdir)
    trainer = train.Trainer.create(cfg, workdir, mesh)
    evaluators = [sample_job.grid_evaluator(cfg, workdir, mesh, mixture=trainer.source_mixture,
                                            decode_fn=trainer.encoder.decode)]
    if with_fid:
        evaluators.append(fid_scorer.FidEvaluator(cfg, mesh, mixture=trainer.source_mixture,
                                                  decode_fn=trainer.encoder.decode))
    result = train.train(cfg, workdir, mesh, trainer=trainer, callbacks=callbacks,
                         evaluators=evaluators)
    if result.preempted:
        raise SystemExit(143)
    return result
