"""`python -m mmfm_jax.reproduce` on the converted synthetic release: one row with
autoguidance, a few samples, both result files with every field, resume, refusals."""

import contextlib
import io
import json
import math
import os

import pytest

from mmfm_jax import reproduce
from mmfm_jax.evaluate import EVALUATOR
from tests.release_fixture import shared_models

ROW = "uncond-80-ag"  # unconditional model + its DiTDH-S guide: both conditionings' paths
NUM = 8
FIELDS = {
    "row", "encoder", "setting", "epochs", "checkpoint", "checkpoint_sha256", "autoguidance",
    "guide", "guidance_scale", "guidance_interval", "published_fid", "fid",
    "fid_minus_published", "sfid", "inception_score", "precision", "recall", "nfe",
    "network_evaluations", "num_samples", "comparable_to_published", "seed", "compute_dtype",
    "state_dtype", "conditioning", "evaluator", "fid_method", "reference",
    "reference_moments", "workdir", "device_kind", "platform", "device_count",
    "process_count", "reused", "sample_seconds", "eval_seconds",
}


def run(models: str, workdir: str, *extra: str, rows: str = ROW) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = reproduce.main(["--models", models, "--rows", rows, "--num-samples", str(NUM),
                             "--batch-size", "8", "--eval-batch-size", "8",
                             "--compute-dtype", "float32", "--workdir", workdir, *extra])
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    models = shared_models(tmp_path_factory)
    workdir = str(tmp_path_factory.mktemp("reproduce") / "runs")
    rc, log = run(models, workdir)
    return {"rc": rc, "log": log, "models": models, "workdir": workdir}


def _results(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def test_a_row_writes_both_result_files_with_every_field(first_run):
    assert first_run["rc"] == 0, first_run["log"]
    results = _results(first_run["workdir"])
    assert results["num_samples"] == NUM and results["comparable_to_published"] is False
    (row,) = results["rows"]
    assert set(row) == FIELDS
    assert row["row"] == ROW and row["setting"] == "GMM (uncond)" and row["epochs"] == 80
    assert row["checkpoint"] == "uncond-gmm-100k.pt" and row["guide"] == "dit-s-uncond-gmm-25k.pt"
    assert row["published_fid"] == 3.17 and row["conditioning"] == "none"
    assert math.isfinite(row["fid"]) and math.isfinite(row["sfid"])
    assert row["inception_score"] >= 1.0 - 1e-6
    assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0
    assert row["nfe"] == 49 and row["network_evaluations"] == {"model": 49, "guide": 49}
    assert row["guidance_scale"] == 1.5 and row["guidance_interval"] == [0.0, 1.0]
    assert (row["compute_dtype"], row["state_dtype"], row["seed"]) == ("float32", "float32", 0)
    assert row["num_samples"] == NUM and row["comparable_to_published"] is False
    assert row["evaluator"] == EVALUATOR and row["device_kind"] and row["device_count"] == 8
    assert row["reused"] is False and row["sample_seconds"] > 0
    with open(os.path.join(first_run["workdir"], "results.md")) as f:
        md = f.read()
    assert "NOT comparable" in md and f"| {ROW} |" in md and "| 3.17 |" in md
    assert f"{row['fid']:.3f}" in md and "49 + 49 guide" in md and "yes (1.5, (0.0, 1.0))" in md
    for text in ("ODE state float32", "compute dtype float32", "seed 0", "8 x ", EVALUATOR):
        assert text in md


def test_the_row_ran_the_main_jobs_stages(first_run):
    rowdir = os.path.join(first_run["workdir"], ROW)
    with open(os.path.join(rowdir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["mode_conditional"] is False and cfg["sample"]["guidance"] == "autoguidance"
    assert cfg["sample"]["model_path"] == os.path.join(first_run["models"],
                                                       "dinov2-b/uncond-gmm-100k")
    assert cfg["sample"]["guide_path"].endswith("autoguidance/dit-s-uncond-gmm-25k")
    assert cfg["gmm"]["num_components"] == 6 and cfg["sample"]["num_steps"] == 50
    with open(os.path.join(rowdir, "eval.json")) as f:
        assert json.load(f)["num_samples"] == NUM
    assert os.path.exists(os.path.join(rowdir, "samples", f"samples_{NUM}.npz"))


def test_rerun_reuses_the_finished_row(first_run):
    eval_json = os.path.join(first_run["workdir"], ROW, "eval.json")
    before = os.stat(eval_json).st_mtime_ns
    rc, log = run(first_run["models"], first_run["workdir"])
    assert rc == 0, log
    assert f"row {ROW}: reusing" in log and "inception samples" not in log
    assert os.stat(eval_json).st_mtime_ns == before
    (row,) = _results(first_run["workdir"])["rows"]
    assert row["reused"] is True and row["sample_seconds"] > 0  # the original run's time


def test_other_sampling_settings_in_the_same_workdir_are_refused(first_run):
    rc, log = run(first_run["models"], first_run["workdir"], "--seed", "1")
    assert rc == 2 and "sampled with sample.seed=0, this run uses 1" in log
    assert len(log.strip().splitlines()) == 2  # the row's header and the error


def test_missing_artifacts_and_unknown_rows_are_one_line(first_run, tmp_path):
    rc, log = run(first_run["models"], str(tmp_path), rows="mae-b-mode-20")
    assert rc == 2 and "mae-b" in log and len(log.strip().splitlines()) == 1, log
    rc, log = run(first_run["models"], str(tmp_path), rows="mode-99")
    assert rc == 2 and "unknown row" in log and "mode-80-ag" in log
    rc, log = run(str(tmp_path), str(tmp_path))
    assert rc == 2 and "manifest.json: missing" in log


def test_rows_cover_the_published_table():
    rows = reproduce.parse_rows("all")
    assert len(rows) == 12 and {r.name for r in rows} >= {"mode-80", "mode-80-ag", "uncond-20"}
    assert reproduce.ROWS["mode-80-ag"].published_fid == 2.78
    assert [r.name for r in reproduce.parse_rows("mode-80,mode-80-ag")] == ["mode-80",
                                                                             "mode-80-ag"]


def test_a_model_converted_with_the_wrong_conditioning_is_refused(first_run):
    manifest = reproduce.read_manifest(first_run["models"])
    row = reproduce.ROWS["uncond-80"]
    found = reproduce.row_artifacts(manifest, first_run["models"], row)
    found["model"]["settings"] = dict(found["model"]["settings"], use_y_conditioning=True)
    with pytest.raises(reproduce.ReproduceError, match="use_y_conditioning=True"):
        reproduce._check_consistent(row, found)


def test_row_config_carries_the_requested_protocol(first_run):
    import argparse

    manifest = reproduce.read_manifest(first_run["models"])
    row = reproduce.ROWS["mode-80"]
    found = reproduce.row_artifacts(manifest, first_run["models"], row)
    args = argparse.Namespace(num_samples=1000, batch_size=100, seed=0,
                              compute_dtype="bfloat16", state_dtype="bfloat16",
                              eval_batch_size=200)
    cfg = reproduce.row_config(row, found, args, num_devices=8)
    assert cfg.mode_conditional is True and cfg.sample.guidance == "none"
    assert cfg.sample.batch_size == 104  # rounded up to the device count
    assert (cfg.sample.compute_dtype, cfg.sample.state_dtype) == ("bfloat16", "bfloat16")
    assert cfg.sample.model_path.endswith("dinov2-b/mode-gmm-100k")
    assert cfg.eval.ref_path.endswith("fid_reference.npz")
