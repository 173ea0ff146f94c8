"""The main job end to end through its CLI with the DINOv2 RAE: `python -m mmfm_jax.main
--config=configs/mode_gmm.py:imagenet256_s --stage=all` (fit_gmm -> train -> sample -> eval)
on tiny real parts (the fixture RAE, the fixture-recipe FID Inception, a 24-image ImageFolder
tree), then the same command again, which must resume and redo nothing."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convert.__main__ import main as convert_main
from mmfm_jax.data.transforms import center_crop_arr
from mmfm_jax.gmm import io as gmm_io
from tests.conftest import REPO, fixture_path
from tests.release_fixture import photo_crops
from tests.test_inception import converted_recipe_inception

NUM_IMAGES = 24
METRIC_KEYS = {"step", "loss", "grad_norm", "lr", "steps_per_sec", "images_per_sec",
               "tflops_per_device", "mfu"}
# A DiTDH of 2 blocks on the fixture RAE's 16x16x32 latents; K = 3 modes; 3 steps of 8.
TINY = {
    "data.kind": "imagefolder", "data.num_workers": 0,
    "model.in_channels": 32, "model.input_size": 16, "model.hidden_size": "(32, 48)",
    "model.depth": "(1, 1)", "model.num_heads": "(2, 2)", "model.num_classes": 3,
    "model.compute_dtype": "float32", "rae.compute_dtype": "float32",
    "gmm.num_components": 3, "gmm.encode_batch_size": 8,
    "train.batch_size": 8, "train.num_steps": 3, "train.log_every": 1,
    "train.ckpt_every": 3, "train.sample_every": 0,
    "sample.num_samples": 16, "sample.batch_size": 8, "sample.num_steps": 4,
    "eval.batch_size": 8,
}


def _photos() -> list[np.ndarray]:
    """Square crops (256 px and up) of the photos bundled with scikit-image/scikit-learn."""
    return photo_crops(NUM_IMAGES)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Data tree, ADM-style reference batch, converted RAE and converted Inception."""
    root = tmp_path_factory.mktemp("pipeline_assets")
    crops = _photos()
    for i, crop in enumerate(crops):
        folder = root / "train" / f"n0000000{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(folder / f"img_{i:03d}.JPEG", quality=90)
    ref = np.stack([center_crop_arr(Image.fromarray(c), 256) for c in crops[:16]])
    np.savez(root / "ref.npz", arr_0=ref.astype(np.uint8))
    rae = fixture_path("rae")
    assert convert_main([
        "rae", "--encoder", os.path.join(rae, "dinov2_with_registers"),
        "--decoder", os.path.join(rae, "decoder.pt"), "--stats", os.path.join(rae, "stat.pt"),
        "--decoder-config", os.path.join(rae, "decoder_config", "config.json"),
        "--out", str(root / "rae")]) == 0
    converted_recipe_inception(root)
    return {"data.path": str(root / "train"), "rae.path": str(root / "rae"),
            "eval.inception_path": str(root / "inception"), "eval.ref_path": str(root / "ref.npz")}


def run_main(config: str, stage: str, workdir, assets, devices: int = 8) -> str:
    """`python -m mmfm_jax.main` in a subprocess on `devices` fake CPU devices; its log."""
    overrides = [f"--config.{k}={v}" for k, v in {**TINY, **assets}.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run(
        [sys.executable, "-m", "mmfm_jax.main", f"--config={config}", f"--workdir={workdir}",
         f"--stage={stage}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{log[-6000:]}"
    return log


def _metrics(workdir) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _mtimes(workdir, names) -> dict[str, int]:
    return {n: os.stat(workdir / n).st_mtime_ns for n in names}


def _check_samples(workdir, num_modes: int | None) -> None:
    with np.load(workdir / "samples" / "samples_16.npz") as f:
        images, labels = f["arr_0"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (16, 256, 256, 3)
    assert images.std() > 1.0  # decoded pictures, not a constant
    assert labels.shape == (16,)
    if num_modes is not None:  # mode-conditional: the label is the drawn mode
        assert labels.min() >= 0 and labels.max() < num_modes


def _check_metrics(workdir) -> None:
    records = _metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert METRIC_KEYS <= set(r), sorted(r)
        for key in ("loss", "grad_norm", "lr", "steps_per_sec", "images_per_sec"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["mfu"] is None  # no peak FLOP/s known for CPU
    assert 0.2 < records[0]["loss"] < 10


def test_mode_gmm_dinov2_pipeline_end_to_end_then_resume(assets, tmp_path):
    workdir = tmp_path / "run"
    log = run_main("configs/mode_gmm.py:imagenet256_s", "all", workdir, assets)

    with open(workdir / "config.json") as f:
        saved = json.load(f)
    assert saved["rae"]["kind"] == "dinov2" and saved["model"]["hidden_size"] == [32, 48]

    # fit_gmm: every image encoded (224 centre crops), both mixtures with K = 3
    cls_mix, spatial = gmm_io.load(str(workdir / "gmm"))
    assert cls_mix.n_components == 3 and np.asarray(cls_mix.means).shape == (3, 32)
    assert np.asarray(spatial.means).shape == (3, 16, 16, 32)
    assert np.isfinite(np.asarray(spatial.means)).all()
    with open(workdir / "gmm" / "cls_mixture.json") as f:
        assert json.load(f)["n_samples"] == NUM_IMAGES
    with open(workdir / "gmm" / "spatial_mixture.json") as f:
        assert json.load(f)["num_samples"] == 2 * NUM_IMAGES  # with the flipped latents

    # train, sample, eval
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
    _check_metrics(workdir)
    assert os.listdir(workdir / "export") == ["ema_0000003.pt"]
    _check_samples(workdir, num_modes=3)
    with open(workdir / "eval.json") as f:
        result = json.load(f)
    assert math.isfinite(result["fid"]) and result["fid"] > 0
    assert math.isfinite(result["inception_score"]) and result["inception_score"] >= 1.0 - 1e-6
    assert result["num_samples"] == 16 and result["num_reference_images"] == 16
    assert "FID" in log

    # the same command again resumes: no refit, no training step, no new sample
    kept = ["gmm/cls_mixture.npz", "gmm/spatial_mixture.npz", "samples/samples_16.npz",
            "samples/shard_0000000_0000008.npz", "samples/shard_0000008_0000016.npz"]
    before = _mtimes(workdir, kept)
    log = run_main("configs/mode_gmm.py:imagenet256_s", "all", workdir, assets)
    assert "both mixtures found" in log and "EM iteration" not in log
    assert "resuming from step 3" in log
    assert "16 on disk, 0 batches" in log
    assert _mtimes(workdir, kept) == before
    assert [r["step"] for r in _metrics(workdir)] == [1, 2, 3]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
    with open(workdir / "eval.json") as f:
        assert json.load(f)["fid"] == pytest.approx(result["fid"], rel=1e-6)


def test_gaussian_baseline_train_then_sample(assets, tmp_path):
    workdir = tmp_path / "gaussian"
    run_main("configs/gaussian.py:imagenet256_s", "train", workdir, assets, devices=2)
    assert not os.path.exists(workdir / "gmm")
    _check_metrics(workdir)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
    run_main("configs/gaussian.py:imagenet256_s", "sample", workdir, assets, devices=2)
    _check_samples(workdir, num_modes=None)
