"""Every stage's missing input ends `python -m mmfm_jax.main` with exit code 2 and one
`error: ...` line naming the file or the config key, with no traceback on the console (the
traceback is kept in the log file), and no orbax thread dying at exit."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO


def run_main(workdir, *args, config="configs/mode_gmm.py"):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "mmfm_jax.main", f"--config={config}",
                           f"--workdir={workdir}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def the_error_line(result, *names) -> str:
    """The run's one error line (the last line on stderr), which names every `names`."""
    console = result.stdout + result.stderr
    assert result.returncode == 2, console[-3000:]
    assert "Traceback" not in console and "cannot schedule new futures" not in console, console
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


@pytest.fixture
def eval_inputs(tmp_path):
    """Paths that exist, for the checks that come before the one a test is about."""
    inception = tmp_path / "inception"
    inception.mkdir()
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    return [f"--config.eval.inception_path={inception}", f"--config.eval.ref_path={ref}"]


def test_train_without_fitted_mixtures(tmp_path):
    work = tmp_path / "work"
    the_error_line(run_main(work, "--stage=train"), f"{work}/gmm", "--stage=fit_gmm",
                   "config.gmm.path")
    with open(work / "log.txt") as f:  # the console's line, with its traceback, in the log
        log = f.read()
    assert "no fitted CLS and spatial mixtures" in log and "Traceback" in log


def test_train_with_fid_but_no_inception(tmp_path):
    the_error_line(run_main(tmp_path / "work", "--stage=train", "--config.train.fid_every=10",
                            config="configs/gaussian.py"),
                   "config.eval.inception_path is empty", "config.train.fid_every")


def test_sample_without_a_checkpoint(tmp_path):
    work = tmp_path / "work"
    the_error_line(run_main(work, "--stage=sample", config="configs/gaussian.py"),
                   f"{work}/checkpoints", "config.sample.model_path")
    assert not (work / "checkpoints").exists()  # nothing created on the way


def test_sample_with_a_missing_model_directory(tmp_path):
    the_error_line(run_main(tmp_path / "work", "--stage=sample",
                            f"--config.sample.model_path={tmp_path / 'nomodel'}",
                            config="configs/gaussian.py"),
                   f"{tmp_path / 'nomodel'}/config.json")


def test_eval_without_samples(tmp_path, eval_inputs):
    work = tmp_path / "work"
    the_error_line(run_main(work, "--stage=eval", *eval_inputs),
                   f"{work}/samples/samples_512.npz", "--stage=sample")


def test_eval_without_a_reference(tmp_path, eval_inputs):
    the_error_line(run_main(tmp_path / "work", "--stage=eval", eval_inputs[0],
                            f"--config.eval.ref_path={tmp_path / 'none.npz'}"),
                   "config.eval.ref_path=", f"{tmp_path / 'none.npz'}", "does not exist")


def test_eval_without_the_inception(tmp_path, eval_inputs):
    the_error_line(run_main(tmp_path / "work", "--stage=eval", eval_inputs[1]),
                   "config.eval.inception_path is empty", "convert inception")


def test_eval_with_an_unconverted_inception_directory(tmp_path, eval_inputs):
    work = tmp_path / "work"
    (work / "samples").mkdir(parents=True)
    np.savez(work / "samples" / "samples_512.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8),
             labels=np.zeros(4, np.int32))
    the_error_line(run_main(work, "--stage=eval", *eval_inputs),
                   f"{tmp_path / 'inception'}/config.json")


def test_fit_gmm_without_data(tmp_path):
    empty = tmp_path / "train"
    empty.mkdir()
    the_error_line(run_main(tmp_path / "work", "--stage=fit_gmm", f"--config.data.path={empty}",
                            "--config.rae.kind=identity",
                            config="configs/mode_gmm.py:imagenet256_s"),
                   "config.data.path=", str(empty))


def test_sweep_without_a_model(tmp_path, eval_inputs):
    work = tmp_path / "work"
    the_error_line(run_main(work, "--stage=sweep", "--config.sample.guidance=cfg", *eval_inputs,
                            config="configs/gaussian.py"),
                   f"{work}/checkpoints", "config.sample.model_path")


def test_sweep_without_guidance(tmp_path, eval_inputs):
    the_error_line(run_main(tmp_path / "work", "--stage=sweep", *eval_inputs,
                            config="configs/gaussian.py"),
                   "config.sample.guidance='none'", "--config.sample.guidance=cfg")
