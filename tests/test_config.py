"""Configs, presets, validation and the main job's command line."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from mmfm_jax import config as config_lib
from tests.conftest import REPO

CONFIG_FILES = ("mode_gmm", "uncond_gmm", "gaussian")
PRESETS = ("demo", "imagenet256_xl", "imagenet256_s")


def _config(name, preset=None):
    return importlib.import_module(f"configs.{name}").get_config(preset)


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_config_and_preset_builds(name, preset):
    cfg = _config(name, preset)
    assert cfg.preset == preset
    assert cfg.source == ("gaussian" if name == "gaussian" else "gmm")
    assert cfg.mode_conditional == (name == "mode_gmm")
    if name != "mode_gmm":
        assert cfg.train.label_dropout == 0.0


def test_default_preset_is_demo():
    assert _config("mode_gmm").preset == "demo"


def test_paper_presets():
    xl = _config("mode_gmm", "imagenet256_xl")
    assert xl.model.hidden_size == (1152, 2048) and xl.model.depth == (28, 2)
    assert xl.train.batch_size == 1024 and xl.train.num_steps == 100_000
    assert (xl.train.lr, xl.train.b1, xl.train.b2, xl.train.eps) == (2e-4, 0.9, 0.95, 1e-8)
    assert xl.train.ema_decay == 0.9995 and xl.train.grad_clip == 1.0
    s = _config("mode_gmm", "imagenet256_s")
    assert s.model.hidden_size == (384, 2048) and s.train.num_steps == 25_000
    assert xl.gmm.num_components == 8192 and xl.gmm.assignment == "soft"


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        _config("mode_gmm", "imagenet512")


def test_batch_not_divisible_by_devices():
    cfg = _config("mode_gmm", "demo")
    with cfg.unlocked():
        cfg.train.batch_size = 100
    with pytest.raises(config_lib.ConfigError, match=r"config.train.batch_size=100 .* 8 devices"):
        config_lib.validate(cfg, "train", 8)


def test_missing_imagenet_path_names_the_key(tmp_path):
    cfg = _config("mode_gmm", "imagenet256_xl")
    with pytest.raises(config_lib.ConfigError, match=r"config.data.path is empty"):
        config_lib.validate(cfg, "train", 8)
    with cfg.unlocked():
        cfg.data.path = str(tmp_path / "nope")
    with pytest.raises(config_lib.ConfigError, match=r"does not exist"):
        config_lib.validate(cfg, "train", 8)
    with cfg.unlocked():
        cfg.data.path = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"config.rae.path"):
        config_lib.validate(cfg, "train", 8)


def test_demo_validates_and_saves(tmp_path):
    cfg = _config("mode_gmm")
    config_lib.validate(cfg, "all", 8)
    config_lib.save(cfg, str(tmp_path))
    config_lib.save(cfg, str(tmp_path))  # a rerun overwrites it
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["preset"] == "demo" and saved["model"]["in_channels"] == 1


def _main(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "mmfm_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_cli_unknown_config_key_is_one_line(tmp_path):
    r = _main("--config=configs/mode_gmm.py", "--config.train.bogus=3", f"--workdir={tmp_path}")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert _error_lines(r.stderr) == [
        "error: --config.train.bogus: config has no key 'bogus'; see configs/base.py for the keys"]


def test_cli_missing_imagenet_path_is_one_line(tmp_path):
    r = _main("--config=configs/mode_gmm.py:imagenet256_xl", f"--workdir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = _error_lines(r.stderr)
    assert "config.data.path" in line and "--config.data.path=" in line


def test_cli_helpfull_documents_flags():
    r = _main("--helpfull")
    assert r.returncode in (0, 1), r.stderr  # absl exits 1 after printing usage
    assert "mmfm_jax/main.py" in r.stdout
    for flag in ("--config", "--workdir", "--stage", "--coordinator_address", "--num_processes"):
        assert flag in r.stdout


def test_mesh_rules_are_config_data(tmp_path):
    """config.mesh.rules defaults to the parallel table, survives config.json, and an
    unknown mesh axis stops the run with one line naming the key."""
    from mmfm_jax import parallel

    cfg = _config("mode_gmm")
    assert cfg.mesh.rules == parallel.LOGICAL_AXIS_RULES
    config_lib.save(cfg, str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert parallel.normalize_rules(saved["mesh"]["rules"]) == parallel.LOGICAL_AXIS_RULES
    with cfg.unlocked():
        cfg.mesh.rules = (("batch", ("data", "fsdp")), ("embed", "model"))
    with pytest.raises(config_lib.ConfigError,
                       match=r"^config.mesh.rules: logical axis 'embed' maps to unknown mesh "
                             r"axis 'model'"):
        config_lib.validate(cfg, "train", 8)


@pytest.mark.parametrize("key,value", [("model.compute_dtype", "float16"),
                                       ("sample.state_dtype", "bf16"),
                                       ("rae.compute_dtype", "bfloat16_all")])
def test_unknown_precision_is_one_line(key, value):
    cfg = _config("mode_gmm")
    group, name = key.split(".")
    cfg[group][name] = value
    with pytest.raises(config_lib.ConfigError, match=rf"config\.{key}='{value}' is unknown"):
        config_lib.validate(cfg, "train", 1)
