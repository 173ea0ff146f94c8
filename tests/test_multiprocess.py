"""Two processes on localhost (CPU, 4 fake devices each, JAX's distributed runtime with gloo
collectives) against one process with 8 devices: the sampling job writes the same images;
the real training stage checkpoints, resumes and ends with the one-process result; a killed
worker makes the other exit non-zero within the heartbeat bound and the restarted pair
resumes from the last checkpoint."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from mmfm_jax import parallel, sample_job
from tests.processes import CHILDREN, free_port, reap_children  # noqa: F401 (autouse)
from tests.test_sample_job import SAMPLE_N, job_sampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_S = 20  # initialize_distributed(heartbeat_s): bound on failure detection

CHILD = r'''
import sys
task, coordinator, nproc, pid, out = sys.argv[1:6]
nproc, pid = int(nproc), int(pid)
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from mmfm_jax import parallel
if nproc > 1:
    parallel.initialize_distributed(coordinator, nproc, pid, heartbeat_s=int(sys.argv[6]))
mesh = parallel.make_mesh()
print("devices", jax.process_count(), jax.local_device_count(), jax.device_count(), flush=True)

if task == "sample":
    from mmfm_jax import sample_job
    from tests.test_sample_job import SAMPLE_N, job_sampler
    sample_job.run_sampling(job_sampler(mesh), out, SAMPLE_N)
'''



def start(tmp_path, task, out, *, nproc, devices):
    """Launch `nproc` children (each with `devices` fake CPU devices) of CHILD."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMFM_", "SLURM_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    coordinator = f"localhost:{free_port()}"
    procs = []
    for pid in range(nproc):
        log = open(tmp_path / f"{task}_{nproc}_{pid}_{time.time_ns()}.log", "w+")
        args = [sys.executable, str(script), task, coordinator, str(nproc), str(pid), str(out),
                str(HEARTBEAT_S)]
        procs.append((subprocess.Popen(args, cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
        CHILDREN.append(procs[-1][0])
    return procs


def finish(procs, timeout=240):
    outs = []
    for proc, log in procs:
        rc = proc.wait(timeout=timeout)
        log.seek(0)
        text = log.read()
        assert rc == 0, f"child exited {rc}:\n{text[-3000:]}"
        outs.append(text)
    return outs


def test_two_processes_write_the_same_samples_as_one(tmp_path):
    procs = start(tmp_path, "sample", tmp_path / "two", nproc=2, devices=4)
    # meanwhile, the reference in this process (8 devices)
    ref = sample_job.run_sampling(job_sampler(parallel.make_mesh()), tmp_path / "one",
                                  SAMPLE_N)
    outs = finish(procs)
    assert all("devices 2 4 8" in o for o in outs)
    with np.load(ref) as a, np.load(tmp_path / "two" / f"samples_{SAMPLE_N}.npz") as b:
        assert a["arr_0"].shape == (SAMPLE_N, 4, 4, 3)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    names = sorted(os.listdir(tmp_path / "two"))
    # each process wrote its own rows of every batch
    assert "shard_0000000_0000004.npz" in names and "shard_0000004_0000008.npz" in names



TRAIN_FLAGS = ["--config=configs/gaussian.py", "--stage=train", "--config.train.batch_size=16",
               "--config.train.ckpt_every=2", "--config.train.log_every=1",
               "--config.model.depth=(1,1)", "--config.model.hidden_size=(32,32)"]


def start_main(tmp_path, workdir, steps, *, nproc, devices):
    """`python -m mmfm_jax.main --stage=train` (the demo digits, Gaussian source) on
    `nproc` processes of `devices` fake devices each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMFM_", "SLURM_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", MMFM_HEARTBEAT_S=str(HEARTBEAT_S))
    port = free_port()
    procs = []
    for pid in range(nproc):
        dist = ([f"--coordinator_address=localhost:{port}", f"--num_processes={nproc}",
                 f"--process_id={pid}"] if nproc > 1 else [])
        log = open(tmp_path / f"main_{nproc}_{pid}_{time.time_ns()}.log", "w+")
        args = [sys.executable, "-m", "mmfm_jax.main", f"--workdir={workdir}", *TRAIN_FLAGS,
                f"--config.train.num_steps={steps}", *dist]
        procs.append((subprocess.Popen(args, cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
        CHILDREN.append(procs[-1][0])
    return procs


def test_main_train_stage_on_two_processes_resumes_to_the_one_process_result(tmp_path):
    """The real training stage: 2 processes x 4 devices train 4 steps and checkpoint, a new
    pair restores step 4 and trains to 6; the EMA weights and losses equal those of one
    uninterrupted process with 8 devices."""
    import torch

    ref = start_main(tmp_path, tmp_path / "ref", 6, nproc=1, devices=8)
    finish(start_main(tmp_path, tmp_path / "two", 4, nproc=2, devices=4), timeout=400)
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]
    outs = finish(start_main(tmp_path, tmp_path / "two", 6, nproc=2, devices=4), timeout=400)
    assert "resuming from step 4" in outs[0]
    finish(ref, timeout=400)

    def losses(workdir):
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        return {r["step"]: r["loss"] for r in rows}

    one, two = losses(tmp_path / "ref"), losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))
    np.testing.assert_allclose([two[s] for s in range(1, 7)], [one[s] for s in range(1, 7)],
                               rtol=1e-5)
    a = torch.load(tmp_path / "ref" / "export" / "ema_0000006.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "export" / "ema_0000006.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k].numpy(), a[k].numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=k)


def test_sigkilled_sampling_job_reruns_to_the_exact_set(tmp_path):
    """`python -m mmfm_jax.main --stage=sample` killed (SIGKILL) mid-run, then rerun: the
    merged file holds every index once, with the images of an uninterrupted run."""
    from mmfm_jax.models import save_ditdh
    from tests.test_sample_job import tiny_model

    save_ditdh(tiny_model(), str(tmp_path / "model"))
    n = 1200
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMFM_", "SLURM_"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    args = [sys.executable, "-m", "mmfm_jax.main", "--config=configs/gaussian.py",
            f"--workdir={tmp_path / 'work'}", "--stage=sample",
            f"--config.sample.model_path={tmp_path / 'model'}",
            f"--config.sample.num_samples={n}", "--config.sample.batch_size=8",
            "--config.sample.num_steps=20"]
    samples = tmp_path / "work" / "samples"
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    CHILDREN.append(proc)
    deadline = time.time() + 120
    while time.time() < deadline and not (samples.exists() and len(os.listdir(samples)) >= 3):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = [p for p in os.listdir(samples) if p.startswith("shard_")]
    assert 3 <= len(done) < n // 8 and not (samples / f"samples_{n}.npz").exists()
    subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    with np.load(samples / f"samples_{n}.npz") as f:
        images = f["arr_0"]
    assert images.shape == (n, 4, 4, 3)
    spec = sample_job.SampleSpec(latent_shape=(4, 4, 3), num_steps=20, shift=1.0, seed=0)
    check = np.r_[0:16, n - 16:n]
    model = tiny_model()
    want, _ = jax.jit(lambda i: sample_job.generate(model, i, spec,
                                                    decode_fn=lambda z: (z + 1) / 2))(check)
    np.testing.assert_array_equal(images[check], want)


def test_main_killed_worker_stops_the_other_and_the_restarted_pair_resumes(tmp_path):
    """`python -m mmfm_jax.main --stage=train` on 2 processes: SIGKILL one after a checkpoint;
    the survivor exits non-zero within the heartbeat bound instead of hanging, and the same
    command restarted on both processes resumes from the last checkpoint."""
    run = tmp_path / "two"
    procs = start_main(tmp_path, run, 100_000, nproc=2, devices=4)
    ckpts = run / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts.exists() and any(
            name.isdigit() and int(name) >= 4 for name in os.listdir(ckpts))):
        assert all(p.poll() is None for p, _ in procs), "a process exited before the kill"
        time.sleep(0.2)
    procs[1][0].kill()
    t0 = time.time()
    rc = procs[0][0].wait(timeout=HEARTBEAT_S + 90)
    took = time.time() - t0
    assert rc != 0, "the surviving process must fail when its peer dies"
    assert took < HEARTBEAT_S + 60, f"the survivor took {took:.0f} s to exit"
    last = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
    outs = finish(start_main(tmp_path, run, last + 2, nproc=2, devices=4), timeout=400)
    assert f"resuming from step {last}" in outs[0]
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert steps[-1] == last + 2
