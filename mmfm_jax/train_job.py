"""The training job (`--stage=train`): the trainer with its evaluators wired in.

`train.py` trains and knows nothing of sampling; `sample_job.py` samples and knows nothing
of training. This module joins them as big_vision's train loop takes its evaluators: it
builds the Trainer, has the sampling module build the PNG-grid evaluator from the
trainer's mixture and decoder, and hands both to `train.train`, which calls the evaluator
every config.train.sample_every steps. A SIGTERM ends the process (exit 143) once its
checkpoint is saved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mmfm_jax import sample_job, train


def train_stage(cfg, workdir: str, mesh, *,
                callbacks: Sequence[Callable[[int], None]] = ()) -> train.TrainResult:
    """Train (or resume) to config.train.num_steps with the EMA sample grid on schedule."""
    trainer = train.Trainer.create(cfg, workdir, mesh)
    grid = sample_job.grid_evaluator(cfg, workdir, mesh, mixture=trainer.source_mixture,
                                     decode_fn=trainer.encoder.decode)
    result = train.train(cfg, workdir, mesh, trainer=trainer, callbacks=callbacks,
                         evaluators=[grid])
    if result.preempted:
        raise SystemExit(143)
    return result
