"""Elastic resume: a checkpoint written on one topology resumes on another (2 processes x 4
devices -> 1 x 8 and 1 x 4, 8 devices -> 4) with the losses of the uninterrupted run (to
reduction-order rounding, <= 1e-6 relative); the state lands on the new mesh's shardings;
the data stream is rebuilt from its process-independent position; what cannot resume (a
changed global batch, a device count that does not divide it, an older per-process data
state on another topology) says so in one line."""

import json
import os
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest

from mmfm_jax import checkpoint, parallel, train
from tests.test_train import tiny_config, write_mixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-6
CHILDREN: list[subprocess.Popen] = []


def losses_by_step(workdir) -> dict[int, float]:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]  # a resumed step overwrites an earlier record
    return out


def assert_same_losses(got: dict, want: dict, steps) -> None:
    assert sorted(got) == list(steps), sorted(got)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=RTOL,
                               atol=0)


# ---------------------------------------------------------------- one process, 8 -> 4

def elastic_config(num_steps: int):
    cfg = tiny_config(num_steps=num_steps, ckpt_every=2, log_every=1, ckpt_keep=3,
                      ckpt_keep_period=0, sample_every=0)
    cfg.data.num_workers = 0
    return cfg


@pytest.fixture(scope="module")
def meshes():
    devices = jax.devices()
    return {"8": parallel.make_mesh({"data": 8, "fsdp": 1}),
            "4": parallel.make_mesh({"data": 2, "fsdp": 2}, devices=devices[:4])}


def make_workdir(path) -> str:
    write_mixtures(os.path.join(path, "gmm"))
    return str(path)


def preempt_at(step: int):
    """A callback that SIGTERMs this process at `step`: the loop saves it and returns."""
    def callback(s):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return callback


@pytest.fixture(scope="module")
def written_on_eight(tmp_path_factory, meshes):
    """(uninterrupted 6-step losses, a workdir preempted at step 4), both on 8 devices with
    the same config (so the step compiles once)."""
    ref = make_workdir(tmp_path_factory.mktemp("ref"))
    train.train(elastic_config(6), ref, meshes["8"])
    run = make_workdir(tmp_path_factory.mktemp("run"))
    result = train.train(elastic_config(6), run, meshes["8"], callbacks=[preempt_at(4)])
    assert result.preempted and result.step == 4
    return losses_by_step(ref), run


def resume_copy(run, dest) -> str:
    shutil.copytree(run, dest)
    return str(dest)


def test_eight_devices_resume_on_four_onto_the_new_shardings(tmp_path, meshes,
                                                             written_on_eight):
    """8 data-parallel devices write step 4; a (data 2, fsdp 2) mesh of 4 devices restores
    it onto its own shardings and continues to step 6 with the uninterrupted losses, with
    the checkpoint's own grain state and with the stream rebuilt from its position."""
    want, run = written_on_eight
    own = resume_copy(run, tmp_path / "own")
    rebuilt = resume_copy(run, tmp_path / "rebuilt")
    data_dir = os.path.join(rebuilt, "checkpoints", "4", "data")
    for name in os.listdir(data_dir):
        os.remove(os.path.join(data_dir, name))  # no per-process state: rebuild the stream

    trainer = train.Trainer.create(elastic_config(6), own, meshes["4"])
    ckpt = checkpoint.checkpointer(elastic_config(6), own)
    state = ckpt.restore(4, trainer.abstract())
    ckpt.close()
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.shardings)):
        assert leaf.sharding == sharding
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(
        trainer.shardings.params))  # fsdp really shards something on the new mesh

    for workdir in (own, rebuilt):
        train.train(elastic_config(6), workdir, meshes["4"], trainer=trainer)
        got = losses_by_step(workdir)
        assert_same_losses(got, want, range(1, 7))
        assert all(got[s] == want[s] for s in range(1, 5))  # written before the resume


def test_old_per_process_data_state_resumes_on_the_same_processes(tmp_path, meshes,
                                                                  written_on_eight):
    """A checkpoint without the data position (the older format) still resumes from its
    own grain state when the process count is the same."""
    want, run = written_on_eight
    old = resume_copy(run, tmp_path / "old")
    shutil.rmtree(os.path.join(old, "checkpoints", "4", checkpoint.POSITION_ITEM))
    train.train(elastic_config(6), old, meshes["8"])
    assert_same_losses(losses_by_step(old), want, range(1, 7))


def test_unresumable_data_state_is_one_line(tmp_path, meshes, written_on_eight):
    """A changed global batch; an older checkpoint with no state for this topology. Both
    are refused before the state is read or anything compiles."""
    _, run = written_on_eight
    bigger = elastic_config(6)
    bigger.train.batch_size = 32
    with pytest.raises(checkpoint.ResumeError) as err:
        train.train(bigger, resume_copy(run, tmp_path / "bigger"), meshes["8"])
    message = str(err.value)
    assert "\n" not in message and "global batch is 32" in message
    assert "batch_size=16" in message and "/checkpoints/4" in message

    old = resume_copy(run, tmp_path / "old")
    step_dir = os.path.join(old, "checkpoints", "4")
    shutil.rmtree(os.path.join(step_dir, checkpoint.POSITION_ITEM))
    os.rename(os.path.join(step_dir, "data", "process_0-of-1.json"),
              os.path.join(step_dir, "data", "process_0-of-2.json"))  # as if 2 wrote it
    with pytest.raises(checkpoint.ResumeError) as err:
        train.train(elastic_config(6), old, meshes["8"])
    message = str(err.value)
    assert "\n" not in message and "written by 2 process(es)" in message
