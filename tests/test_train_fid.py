"""The in-training FID (config.train.fid_every) is the offline eval job's FID: a tiny demo
model trained 4 steps logs `fid`/`fid_samples` at steps 2 and 4, and the step-4 value
equals `evaluate.evaluate_samples` on the samples `--stage=sample` writes for that
checkpoint (same seed, same indices) to 1e-6. Tiny parts: the digits demo, the
fixture-recipe FID Inception converted with `convert inception`, a 12-image reference."""

import glob
import math

import jax
import numpy as np
import pytest

from configs.mode_gmm import get_config
from mmfm_jax import config as config_lib
from mmfm_jax import evaluate, metrics, parallel, sample_job, train, train_job
from mmfm_jax.gmm.job import fit_gmm_stage
from tests.test_inception import converted_recipe_inception


@pytest.fixture(scope="module")
def fid_assets(tmp_path_factory):
    """{inception, ref}: the converted fixture Inception and an arr_0-only reference (so
    the reference moments come from its images, as in the eval job)."""
    root = tmp_path_factory.mktemp("fid_assets")
    converted_recipe_inception(root)
    images = np.random.default_rng(1).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "ref.npz", arr_0=images)
    return {"inception": str(root / "inception"), "ref": str(root / "ref.npz")}


def fid_config(assets):
    cfg = get_config(None)  # the digits demo: identity encoder, 8x8 pixels
    cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads = (32, 32), (1, 1), (2, 2)
    cfg.gmm.max_iter = 3
    cfg.train.batch_size, cfg.train.num_steps, cfg.train.log_every = 16, 4, 1
    cfg.train.ckpt_every, cfg.train.lr_decay_start, cfg.train.lr_decay_end = 4, 2, 4
    cfg.train.fid_every, cfg.train.fid_samples = 2, 16
    cfg.sample.num_samples, cfg.sample.batch_size, cfg.sample.num_steps = 16, 8, 3
    cfg.eval.batch_size = 8
    cfg.eval.inception_path, cfg.eval.ref_path = assets["inception"], assets["ref"]
    return cfg


@pytest.mark.slow  # ~40 s of CPU: training, sampling and two FID Inception passes
def test_in_training_fid_equals_the_offline_eval_job(tmp_path, fid_assets):
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    cfg, workdir = fid_config(fid_assets), str(tmp_path)
    fit_gmm_stage(cfg, workdir, mesh)
    train_job.train_stage(cfg, workdir, mesh)

    records = metrics.read_metrics(workdir)
    fid_records = [r for r in records if "fid" in r]
    assert [r["step"] for r in fid_records] == [2, 4]  # its own schedule: fid_every
    assert all(r["fid_samples"] == 16 and math.isfinite(r["fid"]) and r["fid"] > 0
               for r in fid_records)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    events = glob.glob(f"{workdir}/tensorboard/events.out.tfevents.*")
    assert events and any(b"fid_samples" in open(e, "rb").read() for e in events)

    samples = sample_job.sample_stage(cfg, workdir, mesh)  # EMA of the step-4 checkpoint
    offline = evaluate.evaluate_samples(str(samples), cfg.eval.ref_path,
                                        cfg.eval.inception_path, mesh=mesh,
                                        batch_size=cfg.eval.batch_size)
    assert offline["num_samples"] == 16
    assert abs(fid_records[-1]["fid"] - offline["fid"]) <= 1e-6, (fid_records, offline)


def test_fid_every_without_eval_paths_is_a_config_error(tmp_path, fid_assets):
    cfg = fid_config(fid_assets)
    cfg.eval.ref_path = ""
    with pytest.raises(config_lib.ConfigError, match=r"^config.eval.ref_path is empty: .* "
                                                     r"config.train.fid_every > 0"):
        train_job.train_stage(cfg, str(tmp_path), parallel.make_mesh())
    cfg.eval.ref_path, cfg.eval.inception_path = fid_assets["ref"], str(tmp_path / "none")
    with pytest.raises(config_lib.ConfigError, match=r"config.eval.inception_path=.* does not "
                                                     "exist"):
        train_job.train_stage(cfg, str(tmp_path), parallel.make_mesh())


def test_each_evaluator_keeps_its_own_schedule():
    def grid(step, model):
        return None
    grid.every = 0
    fid = lambda step, model: None  # noqa: E731 - no `every`: config.train.sample_every
    assert not any(train.evaluator_due(grid, s, 5) for s in range(1, 20))
    assert [s for s in range(1, 12) if train.evaluator_due(fid, s, 5)] == [5, 10]
