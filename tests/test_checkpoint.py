"""Checkpoints: retention and atomicity, exact resume after a crash and after SIGTERM, the
NaN guard, the EMA export and `load_ema_model`."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfm_jax import checkpoint, parallel, train, train_job
from mmfm_jax.models import export_torch_state_dict
from tests.test_train import tiny_config, write_mixtures

NUM_STEPS = 8


def run_config(**overrides):
    cfg = tiny_config(num_steps=NUM_STEPS, ckpt_every=3, log_every=1, ckpt_keep=2,
                      ckpt_keep_period=0, sample_every=0)
    cfg.data.num_workers = 0
    for k, v in overrides.items():
        cfg.train[k] = v
    return cfg


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"data": 2, "fsdp": 1}, devices=jax.devices()[:2])


def make_workdir(base) -> str:
    write_mixtures(os.path.join(base, "gmm"))
    return str(base)


def losses_by_step(workdir: str) -> dict[int, float]:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]  # a rerun step overwrites the killed run's record
    return out


def latest_step(workdir: str) -> int | None:
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
    step = ckpt.latest_step()
    ckpt.close()
    return step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mesh):
    workdir = make_workdir(tmp_path_factory.mktemp("straight"))
    result = train_job.train_stage(run_config(sample_every=NUM_STEPS), workdir, mesh)
    assert result.step == NUM_STEPS and not result.preempted
    return workdir


class Killed(Exception):
    pass


def test_retention_keeps_last_n_and_every_mth(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=2, keep_period=4)
    for step in range(1, 10):
        ckpt.save(step, {"x": jnp.full((3,), step, jnp.float32)})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9]
    os.makedirs(tmp_path / "ck" / "12.orbax-checkpoint-tmp-1")  # a save cut off mid-write
    reopened = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=2, keep_period=4)
    assert reopened.latest_step() == 9
    target = {"x": jax.ShapeDtypeStruct((3,), jnp.float32)}
    np.testing.assert_array_equal(np.asarray(reopened.restore(9, target)["x"]), 9.0)
    reopened.close()
    ckpt.close()


def test_resume_after_crash_and_sigterm_repeats_the_losses_exactly(tmp_path, mesh,
                                                                   uninterrupted):
    """Killed at step 5 (last checkpoint 3), restarted, SIGTERM at step 7 (saved there),
    restarted again: every step's loss equals the uninterrupted run's, bit for bit."""
    workdir = make_workdir(tmp_path)
    cfg = run_config()

    def crash(step):
        if step == 5:
            raise Killed()

    with pytest.raises(Killed):
        train.train(cfg, workdir, mesh, callbacks=[crash])
    assert latest_step(workdir) == 3

    def preempt(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as exit_info:  # the stage exits once step 7 is saved
        train_job.train_stage(cfg, workdir, mesh, callbacks=[preempt])
    assert exit_info.value.code == 143
    assert latest_step(workdir) == 7
    result = train.train(cfg, workdir, mesh)
    assert result.step == NUM_STEPS and not result.preempted

    want, got = losses_by_step(uninterrupted), losses_by_step(workdir)
    assert sorted(got) == list(range(1, NUM_STEPS + 1))
    assert got == want
    ema_a = checkpoint.load_ema_model(cfg, uninterrupted, mesh)
    ema_b = checkpoint.load_ema_model(cfg, workdir, mesh)
    for a, b in zip(jax.tree.leaves(jax.device_get(ema_a)), jax.tree.leaves(
            jax.device_get(ema_b))):
        np.testing.assert_array_equal(a, b)


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                              mesh):
    """An infinite learning rate from step 5 on makes the parameters NaN at step 5."""
    workdir = make_workdir(tmp_path)
    cfg = run_config(ckpt_every=2, lr_decay_start=4, lr_decay_end=5, lr_end=float("inf"))
    with pytest.raises(checkpoint.NonFiniteError, match="at step 5") as err:
        train.train(cfg, workdir, mesh)
    assert err.value.step == 5 and err.value.last_checkpoint == 4
    ckpt = checkpoint.Checkpointer(workdir + "/checkpoints", keep=2)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    model = checkpoint.load_ema_model(cfg, workdir, mesh)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(
        jax.device_get(model)))


def test_logs_and_sample_grid(uninterrupted):
    with open(os.path.join(uninterrupted, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    for key in ("loss", "grad_norm", "lr", "steps_per_sec", "images_per_sec",
                "tflops_per_device", "mfu"):
        assert key in records[-1]
    assert records[-1]["images_per_sec"] == pytest.approx(16 * records[-1]["steps_per_sec"])
    assert records[-1]["lr"] == pytest.approx(1e-3)
    grid = os.path.join(uninterrupted, "samples", f"train_grid_{NUM_STEPS:07d}.png")
    with open(grid, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_ema_export_is_the_upstream_state_dict(uninterrupted, mesh):
    torch = pytest.importorskip("torch")
    path = os.path.join(uninterrupted, "export", f"ema_{NUM_STEPS:07d}.pt")
    exported = torch.load(path, weights_only=True)
    model = checkpoint.load_ema_model(run_config(), uninterrupted, mesh)
    want = export_torch_state_dict(model)
    assert list(exported) == list(want)
    assert "y_embedder.embedding_table.weight" in exported and "t_embedder.W" in exported
    for k, v in want.items():
        np.testing.assert_array_equal(exported[k].numpy(), v)
