"""The guidance sweep (`--stage=sweep`): two CFG scales of a tiny converted model (Gaussian
source, demo pixel decoder), FID-16 per point through the eval job's code against a
reference built by `evaluate reference`; sweep.json, the table, sweep.png; a rerun reuses
every point; the per-point FID equals the eval job's on that point's sample file."""

import json
import math
import os

import jax
import numpy as np
import pytest

from configs.gaussian import get_config
from mmfm_jax import config as config_lib
from mmfm_jax import evaluate, parallel, sweep
from mmfm_jax.models import save_ditdh
from tests.test_inception import converted_recipe_inception
from tests.test_sample_job import tiny_model


def test_parse_scales_and_intervals():
    assert sweep.parse_scales("1.0, 1.25,1.5") == (1.0, 1.25, 1.5)
    assert sweep.parse_scales((2, 3)) == (2.0, 3.0)
    assert sweep.parse_intervals("", (0.0, 1.0)) == ((0.0, 1.0),)
    assert sweep.parse_intervals("0:1,0.1:0.9", (0.0, 1.0)) == ((0.0, 1.0), (0.1, 0.9))
    with pytest.raises(config_lib.ConfigError, match="config.sweep.scales"):
        sweep.parse_scales("1.0,abc")
    with pytest.raises(config_lib.ConfigError, match="config.sweep.intervals"):
        sweep.parse_intervals("0.9:0.1", (0.0, 1.0))
    assert sweep.point_name(1.25, (0.0, 1.0)) == "scale1.25_t0-1"


@pytest.fixture(scope="module")
def sweep_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_assets")
    converted_recipe_inception(root)
    save_ditdh(tiny_model(), str(root / "model"))
    images = np.random.default_rng(2).integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    np.savez(root / "ref_images.npz", arr_0=images)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    evaluate.build_reference(str(root / "ref_images.npz"), str(root / "ref.npz"),
                             str(root / "inception"), mesh=mesh, batch_size=8, subset=8)
    cfg = get_config("demo")
    cfg.sample.model_path = str(root / "model")
    cfg.sample.guidance = "cfg"
    cfg.sample.batch_size, cfg.sample.num_steps = 8, 3
    cfg.sweep.scales, cfg.sweep.num_samples = "1.0,3.0", 16
    cfg.eval.batch_size = 8
    cfg.eval.inception_path, cfg.eval.ref_path = str(root / "inception"), str(root / "ref.npz")
    return cfg, mesh


def test_sweep_two_points_then_resume(tmp_path, sweep_setup, capsys):
    cfg, mesh = sweep_setup
    workdir = str(tmp_path)
    summary = sweep.sweep_stage(cfg, workdir, mesh)
    points = summary["points"]
    assert [(p["scale"], p["interval"]) for p in points] == [(1.0, [0.0, 1.0]),
                                                            (3.0, [0.0, 1.0])]
    for p in points:
        assert math.isfinite(p["fid"]) and p["fid"] > 0 and math.isfinite(p["sfid"])
        assert p["num_samples"] == 16 and os.path.exists(p["samples"])
    assert points[0]["fid"] != points[1]["fid"]  # the scale changes the samples
    assert summary["best"]["fid"] == min(p["fid"] for p in points)
    with open(tmp_path / "sweep.json") as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    with open(tmp_path / "sweep.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "guidance sweep: cfg, FID-16" in table and "<- best" in table
    assert table.count("0-1") == 2

    # the eval job on a point's sample file gives that point's FID and sFID
    offline = evaluate.evaluate_samples(points[1]["samples"], cfg.eval.ref_path,
                                        cfg.eval.inception_path, mesh=mesh, batch_size=8)
    assert abs(offline["fid"] - points[1]["fid"]) <= 1e-6
    assert abs(offline["sfid"] - points[1]["sfid"]) <= 1e-6

    # a rerun reuses both points; a point without its result is scored again, not resampled
    merged = [p["samples"] for p in points]
    mtimes = [os.stat(m).st_mtime_ns for m in merged]
    os.remove(tmp_path / "sweep" / points[1]["name"] / "result.json")
    again = sweep.sweep_stage(cfg, workdir, mesh)
    assert [os.stat(m).st_mtime_ns for m in merged] == mtimes
    assert [p["fid"] for p in again["points"]] == [p["fid"] for p in points]
