"""Launch scripts: the commands they issue (stand-in gcloud/srun/scontrol/python record
their argv, one JSON line per call), quoting that survives spaces, and shellcheck."""

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/tpu_vm.sh", "launch/gpu_slurm.sbatch", "launch/gpu_multinode.sh"]
SPACED = "--config.data.path=/data/my images/train"
ARGS = ["--config=configs/mode_gmm.py:imagenet256_xl", "--workdir=gs://b/run 1", SPACED]

RECORDER = r'''#!{python}
import json, os, subprocess, sys
name = os.path.basename(sys.argv[0])
env = {{k: v for k, v in os.environ.items() if k.startswith(("MMFM_", "SLURM_PROCID"))}}
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"prog": name, "argv": sys.argv[1:], "env": env,
                        "cwd": os.getcwd()}}) + "\n")
if name == "scontrol":
    print("\n".join(os.environ["FAKE_HOSTS"].split()))
if name == "srun":  # run the task command once per task, as srun does
    cmd = sys.argv[1:]
    while cmd and cmd[0].startswith("-"):
        cmd = cmd[1:]
    for rank in range(int(os.environ["SLURM_NTASKS"])):
        rc = subprocess.call(cmd, env={{**os.environ, "SLURM_PROCID": str(rank)}})
        if rc:
            sys.exit(rc)
'''


@pytest.fixture
def standins(tmp_path):
    """A bin/ directory of recorders placed first on PATH; returns (env, read_records)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("gcloud", "srun", "scontrol", "python"):
        path = bindir / name
        path.write_text(RECORDER.format(python=sys.executable))
        path.chmod(0o755)
    record = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMFM_", "SLURM_"))}
    env.update(PATH=f"{bindir}:{os.environ['PATH']}", RECORD=str(record),
               PYTHON=str(bindir / "python"))

    def records(prog=None):
        if not record.exists():
            return []
        rows = [json.loads(line) for line in record.read_text().splitlines()]
        return [r for r in rows if prog is None or r["prog"] == prog]
    return env, records


def run(script, args, env, **kw):
    return subprocess.run(["bash", os.path.join(REPO, script), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_passes(script):
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    out = subprocess.run([shellcheck, os.path.join(REPO, script)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def tpu_env(env):
    return {**env, "TPU_NAME": "my-slice", "ZONE": "us-central2-b", "PROJECT": "proj"}


def test_tpu_run_starts_the_main_job_on_every_worker_with_exact_arguments(standins, tmp_path):
    env, records = standins
    out = run("launch/tpu_vm.sh", ["run", *ARGS], tpu_env(env))
    assert out.returncode == 0, out.stderr
    (call,) = records("gcloud")
    argv = call["argv"]
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-slice"]
    assert argv[5:10] == ["--zone", "us-central2-b", "--project", "proj", "--worker=all"]
    assert argv[10] == "--command"
    # Execute the remote command line as a worker's shell would, with a recording python.
    home = tmp_path / "home"
    venv_bin = home / "mmfm_jax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    os.symlink(env["PYTHON"], venv_bin / "python")
    subprocess.run(["bash", "-c", argv[11]], cwd=home, env=env, check=True, timeout=30)
    deadline = time.time() + 20
    while not records("python") and time.time() < deadline:
        time.sleep(0.1)
    (job,) = records("python")
    assert job["argv"] == ["-m", "mmfm_jax.main", *ARGS]
    assert job["env"] == {"MMFM_DISTRIBUTED": "auto"}  # jax.distributed detects the slice
    assert job["cwd"] == str(home / "mmfm_jax")
    assert (home / "mmfm_jax" / "mmfm.pid").read_text().strip().isdigit()


def test_tpu_lifecycle_commands(standins):
    env, records = standins
    env = {**tpu_env(env), "ACCELERATOR": "v4-64", "SPOT": "1"}
    for args in (["create"], ["deploy"], ["logs", "3"], ["stop"], ["exec", "ls -l"],
                 ["delete"]):
        out = run("launch/tpu_vm.sh", args, env)
        assert out.returncode == 0, (args, out.stderr)
    calls = [c["argv"] for c in records("gcloud")]
    create, scp, deploy, logs, stop, exec_, delete = calls
    assert create == ["compute", "tpus", "tpu-vm", "create", "my-slice", "--zone",
                      "us-central2-b", "--project", "proj", "--accelerator-type", "v4-64",
                      "--version", "tpu-ubuntu2204-base", "--spot"]
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[4].endswith("mmfm_jax.tgz") and scp[5] == "my-slice:mmfm_jax.tgz"
    assert scp[-1] == "--worker=all"
    words = shlex.split(deploy[-1])
    assert "requirements.txt" in words and "jax[tpu]==0.10.2" in words
    assert logs[9] == "--worker=3" and "mmfm_jax/mmfm.log" in logs[-1]
    assert stop[9] == "--worker=all" and "kill -TERM" in stop[-1]
    assert exec_[-2:] == ["--command", "ls -l"]
    assert delete == ["compute", "tpus", "tpu-vm", "delete", "my-slice", "--zone",
                      "us-central2-b", "--project", "proj", "--quiet"]


def test_tpu_requires_a_name_and_zone(standins):
    env, records = standins
    out = run("launch/tpu_vm.sh", ["run", "--stage=sample"], {**env, "ZONE": "z"})
    assert out.returncode == 2 and "TPU_NAME" in out.stderr
    assert records() == []


def test_slurm_runs_one_process_per_task_with_the_first_node_as_coordinator(standins):
    env, records = standins
    env = {**env, "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "2",
           "FAKE_HOSTS": "gpu07 gpu08", "MMFM_PORT": "4321", "MMFM_REPO": REPO}
    out = run("launch/gpu_slurm.sbatch", ARGS, env)
    assert out.returncode == 0, out.stderr
    (scontrol,) = records("scontrol")
    assert scontrol["argv"] == ["show", "hostnames", "gpu[07-08]"]
    (srun,) = records("srun")
    assert srun["argv"][0] == "--kill-on-bad-exit=1"
    jobs = records("python")
    assert [j["env"]["MMFM_PROCESS_ID"] for j in jobs] == ["0", "1"]
    for job in jobs:
        assert job["argv"] == ["-m", "mmfm_jax.main", *ARGS]
        assert job["env"]["MMFM_COORDINATOR"] == "gpu07:4321"
        assert job["env"]["MMFM_NUM_PROCESSES"] == "2"
        assert job["cwd"] == REPO


def test_slurm_script_refuses_to_run_outside_slurm(standins):
    env, records = standins
    out = run("launch/gpu_slurm.sbatch", ARGS, env)
    assert out.returncode == 2 and "sbatch" in out.stderr
    assert records() == []


def test_multinode_exports_rank_and_coordinator(standins):
    env, records = standins
    env = {**env, "NODE_RANK": "1", "NUM_NODES": "2", "COORDINATOR": "10.0.0.1:29500"}
    out = run("launch/gpu_multinode.sh", ARGS, env)
    assert out.returncode == 0, out.stderr
    (job,) = records("python")
    assert job["argv"] == ["-m", "mmfm_jax.main", *ARGS]
    assert job["env"] == {"MMFM_COORDINATOR": "10.0.0.1:29500", "MMFM_NUM_PROCESSES": "2",
                          "MMFM_PROCESS_ID": "1"}
    bad = run("launch/gpu_multinode.sh", ARGS, {**env, "NODE_RANK": "2"})
    assert bad.returncode == 2 and "NODE_RANK=2" in bad.stderr
    missing = run("launch/gpu_multinode.sh", ARGS, {**env, "COORDINATOR": ""})
    assert missing.returncode == 2 and "COORDINATOR" in missing.stderr
    assert len(records("python")) == 1
