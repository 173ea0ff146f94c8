"""The embedded demo: MM-FM beats the Gaussian source at few Euler steps (paper's claim at
toy scale). The default test runs a reduced configuration; the slow one the real demo
through the command line."""

import json
import os
import subprocess
import sys

import jax
import pytest

from configs.mode_gmm import get_config
from mmfm_jax import demo, parallel
from tests.conftest import REPO


def reduced_config():
    cfg = get_config(None)
    cfg.model.hidden_size = (32, 32)
    cfg.model.depth = (1, 1)
    cfg.model.num_heads = (2, 2)
    cfg.train.batch_size = 32
    cfg.train.num_steps = 200
    cfg.train.lr_decay_start = 150
    cfg.train.lr_decay_end = 200
    cfg.train.ema_decay = 0.98
    cfg.train.ckpt_every = 200
    cfg.train.log_every = 50
    cfg.data.num_workers = 0
    cfg.sample.num_samples = 256
    cfg.sample.batch_size = 256
    return cfg


def check_report(workdir: str, train_steps: int) -> dict:
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics) == {"frechet_distance", "train_steps", "seconds"}
    assert metrics["train_steps"] == train_steps
    fd = metrics["frechet_distance"]
    assert set(fd) == {"mm_fm", "gaussian"}
    for method in fd:
        assert set(fd[method]) == {"5", "10", "25", "50"}
        assert all(v > 0 for v in fd[method].values())
    for steps in ("5", "10"):  # the few-step claim
        assert fd["mm_fm"][steps] < fd["gaussian"][steps], fd
    for name in ("samples.png", "fd_vs_steps.png"):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return metrics


def test_reduced_demo_shows_mm_fm_ahead_at_few_steps(tmp_path):
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    demo.run_demo(reduced_config(), str(tmp_path), mesh)
    check_report(str(tmp_path), 200)


@pytest.mark.slow
def test_full_demo_from_the_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-m", "mmfm_jax.main", f"--workdir={tmp_path}"],
                   cwd=REPO, env=env, check=True, timeout=1200)
    metrics = check_report(str(tmp_path), get_config(None).train.num_steps)
    print(demo.format_report(metrics))  # the time depends on the machine's load: reported


# The reduced demo through the command line (the same stages and logging as `make demo`).
REDUCED_FLAGS = ("--config.model.hidden_size=(32, 32)", "--config.model.depth=(1, 1)",
                 "--config.train.batch_size=32", "--config.train.num_steps=40",
                 "--config.train.lr_decay_start=20", "--config.train.lr_decay_end=40",
                 "--config.train.ckpt_every=20", "--config.train.log_every=10",
                 "--config.sample.num_samples=128", "--config.sample.batch_size=128")


@pytest.mark.slow  # two trainings and eight sampling compiles: minutes on 2 CPU cores
def test_demo_console_is_short_and_the_log_file_keeps_the_rest(tmp_path):
    """Under 40 console lines (stdout + stderr: stages, progress, results, warnings);
    orbax/absl INFO, the EM iterations and the parameter table are in <workdir>/log.txt."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "mmfm_jax.main", f"--workdir={tmp_path}",
                           *REDUCED_FLAGS], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    console = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(console[-40:])
    assert len(console) < 40, "\n".join(console)
    assert not any("orbax" in line or "CheckpointManager" in line or "EM iteration" in line
                   for line in console), "\n".join(console)
    assert proc.stdout.startswith("Frechet distance to held-out digits")
    assert any(line.startswith("train: 40/40 steps") for line in console)
    with open(tmp_path / "log.txt") as f:
        log = f.read()
    for kept in ("CheckpointManager", "EM iteration 100:", "blocks/0/attn/qkv/kernel",
                 "demo: gaussian, 50 Euler steps: Frechet distance"):
        assert kept in log, kept
