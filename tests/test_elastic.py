"""Elastic resume: a checkpoint written on one topology resumes on another (2 processes x 4
devices -> 1 x 8 and 1 x 4, 8 devices -> 4) with the losses of the uninterrupted run (to
reduction-order rounding, <= 1e-6 relative); the state lands on the new mesh's shardings;
the data stream is rebuilt from its process-independent position; what cannot resume (a
changed global batch, a device count that does not divide it, an older per-process data
state on another topology) says so in one line. Also what a restarted or reshaped run
relies on besides: the persistent compile cache a restart loads its train step from, and
grad_accum=-1 planned for the mesh at hand."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmfm_jax import checkpoint, parallel, train
from tests.processes import CHILDREN, free_port, reap_children  # noqa: F401 (autouse)
from tests.test_train import tiny_config, write_mixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-6


def losses_by_step(workdir) -> dict[int, float]:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]  # a resumed step overwrites an earlier record
    return out


def assert_same_losses(got: dict, want: dict, steps) -> None:
    assert sorted(got) == list(steps), sorted(got)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=RTOL,
                               atol=0)


# ---------------------------------------------------------------- one process, 8 -> 4

def elastic_config(num_steps: int):
    cfg = tiny_config(num_steps=num_steps, ckpt_every=2, log_every=1, ckpt_keep=3,
                      ckpt_keep_period=0, sample_every=0)
    cfg.data.num_workers = 0
    return cfg


@pytest.fixture(scope="module")
def meshes():
    devices = jax.devices()
    return {"8": parallel.make_mesh({"data": 8, "fsdp": 1}),
            "4": parallel.make_mesh({"data": 2, "fsdp": 2}, devices=devices[:4])}


def make_workdir(path) -> str:
    write_mixtures(os.path.join(path, "gmm"))
    return str(path)


def preempt_at(step: int):
    """A callback that SIGTERMs this process at `step`: the loop saves it and returns."""
    def callback(s):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return callback


@pytest.fixture(scope="module")
def written_on_eight(tmp_path_factory, meshes):
    """(uninterrupted 6-step losses, a workdir preempted at step 4), both on 8 devices with
    the same config (so the step compiles once)."""
    ref = make_workdir(tmp_path_factory.mktemp("ref"))
    train.train(elastic_config(6), ref, meshes["8"])
    run = make_workdir(tmp_path_factory.mktemp("run"))
    result = train.train(elastic_config(6), run, meshes["8"], callbacks=[preempt_at(4)])
    assert result.preempted and result.step == 4
    return losses_by_step(ref), run


def resume_copy(run, dest) -> str:
    shutil.copytree(run, dest)
    return str(dest)


def test_eight_devices_resume_on_four_onto_the_new_shardings(tmp_path, meshes,
                                                             written_on_eight):
    """8 data-parallel devices write step 4; a (data 2, fsdp 2) mesh of 4 devices restores
    it onto its own shardings and continues to step 6 with the uninterrupted losses, with
    the checkpoint's own grain state and with the stream rebuilt from its position."""
    want, run = written_on_eight
    own = resume_copy(run, tmp_path / "own")
    rebuilt = resume_copy(run, tmp_path / "rebuilt")
    data_dir = os.path.join(rebuilt, "checkpoints", "4", "data")
    for name in os.listdir(data_dir):
        os.remove(os.path.join(data_dir, name))  # no per-process state: rebuild the stream

    trainer = train.Trainer.create(elastic_config(6), own, meshes["4"])
    ckpt = checkpoint.checkpointer(elastic_config(6), own)
    state = ckpt.restore(4, trainer.abstract())
    ckpt.close()
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.shardings)):
        assert leaf.sharding == sharding
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(
        trainer.shardings.params))  # fsdp really shards something on the new mesh

    for workdir in (own, rebuilt):
        train.train(elastic_config(6), workdir, meshes["4"], trainer=trainer)
        got = losses_by_step(workdir)
        assert_same_losses(got, want, range(1, 7))
        assert all(got[s] == want[s] for s in range(1, 5))  # written before the resume


def test_old_per_process_data_state_resumes_on_the_same_processes(tmp_path, meshes,
                                                                  written_on_eight):
    """A checkpoint without the data position (the older format) still resumes from its
    own grain state when the process count is the same."""
    want, run = written_on_eight
    old = resume_copy(run, tmp_path / "old")
    shutil.rmtree(os.path.join(old, "checkpoints", "4", checkpoint.POSITION_ITEM))
    train.train(elastic_config(6), old, meshes["8"])
    assert_same_losses(losses_by_step(old), want, range(1, 7))


def test_unresumable_data_state_is_one_line(tmp_path, meshes, written_on_eight):
    """A changed global batch; an older checkpoint with no state for this topology. Both
    are refused before the state is read or anything compiles."""
    _, run = written_on_eight
    bigger = elastic_config(6)
    bigger.train.batch_size = 32
    with pytest.raises(checkpoint.ResumeError) as err:
        train.train(bigger, resume_copy(run, tmp_path / "bigger"), meshes["8"])
    message = str(err.value)
    assert "\n" not in message and "global batch is 32" in message
    assert "batch_size=16" in message and "/checkpoints/4" in message

    old = resume_copy(run, tmp_path / "old")
    step_dir = os.path.join(old, "checkpoints", "4")
    shutil.rmtree(os.path.join(step_dir, checkpoint.POSITION_ITEM))
    os.rename(os.path.join(step_dir, "data", "process_0-of-1.json"),
              os.path.join(step_dir, "data", "process_0-of-2.json"))  # as if 2 wrote it
    with pytest.raises(checkpoint.ResumeError) as err:
        train.train(elastic_config(6), old, meshes["8"])
    message = str(err.value)
    assert "\n" not in message and "written by 2 process(es)" in message


# ------------------------------------------- processes: 2 x 4 devices -> 1 x 8, 1 x 4

TRAIN_FLAGS = ["--config=configs/gaussian.py", "--stage=train", "--config.train.batch_size=16",
               "--config.train.ckpt_every=2", "--config.train.log_every=1",
               "--config.model.depth=(1,1)", "--config.model.hidden_size=(32,32)"]




def launch(workdir, steps: int, *, nproc: int, devices: int, cache, extra=()):
    """`python -m mmfm_jax.main --stage=train` (demo digits, Gaussian source, a tiny
    DiTDH) on `nproc` localhost processes of `devices` fake CPU devices each, sharing the
    compilation cache `cache`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMFM_", "SLURM_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    port = free_port()
    procs = []
    for pid in range(nproc):
        dist = ([f"--coordinator_address=localhost:{port}", f"--num_processes={nproc}",
                 f"--process_id={pid}"] if nproc > 1 else [])
        log = open(f"{workdir}.{nproc}x{devices}.{pid}.{time.time_ns()}.log", "w+")
        args = [sys.executable, "-m", "mmfm_jax.main", f"--workdir={workdir}", *TRAIN_FLAGS,
                f"--config.train.num_steps={steps}", f"--config.compile_cache={cache}",
                *dist, *extra]
        procs.append((subprocess.Popen(args, cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
        CHILDREN.append(procs[-1][0])
    return procs


def finish(procs, timeout=400, expect_rc=0) -> list[str]:
    outs = []
    for proc, log in procs:
        rc = proc.wait(timeout=timeout)
        log.seek(0)
        text = log.read()
        assert rc == expect_rc, f"child exited {rc}:\n{text[-3000:]}"
        outs.append(text)
    return outs


@pytest.fixture(scope="module")
def written_by_two_processes(tmp_path_factory):
    """(the uninterrupted 6-step losses of 1 process x 8 devices, a workdir trained to step
    4 by 2 processes x 4 devices, the shared compile cache), the two runs side by side."""
    base = tmp_path_factory.mktemp("elastic")
    cache = base / "compile_cache"
    ref = launch(base / "ref", 6, nproc=1, devices=8, cache=cache)
    two = launch(base / "two", 4, nproc=2, devices=4, cache=cache)
    finish(two)
    finish(ref)
    assert sorted(os.listdir(base / "two" / "checkpoints")) == ["2", "4"]
    written = os.listdir(base / "two" / "checkpoints" / "4" / "data")
    assert sorted(n for n in written if n.startswith("process_")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert os.listdir(cache), "the compile cache is empty after two runs"
    return losses_by_step(base / "ref"), base / "two", cache


def resume_two_process_checkpoint(tmp_path, written, *, devices: int) -> tuple[dict, str]:
    want, two, cache = written
    run = resume_copy(two, tmp_path / f"on_{devices}")
    (out,) = finish(launch(run, 6, nproc=1, devices=devices, cache=cache))
    assert "resuming from step 4" in out and "Traceback" not in out
    got = losses_by_step(run)
    assert_same_losses(got, want, range(1, 7))
    return got, out


def test_two_processes_resume_on_one_process_of_eight(tmp_path, written_by_two_processes):
    """The issue's failure (grain: `.../4/data/process_0-of-1.json does not exist`): now
    the stream is rebuilt from the saved position and the state lands on the 8 devices of
    one process; the losses continue as in the uninterrupted run, and the train step comes
    from the compile cache the uninterrupted 1 x 8 run filled."""
    _, out = resume_two_process_checkpoint(tmp_path, written_by_two_processes, devices=8)
    assert "rebuilding the data stream of process 0 of 1 at global batch 4" in out
    hits = [line for line in out.splitlines() if "compile cache" in line and "hit(s)" in line]
    assert hits and not hits[0].split(": ", 1)[1].startswith("0 hit"), hits


@pytest.mark.slow
def test_two_processes_resume_on_one_process_of_four(tmp_path, written_by_two_processes):
    resume_two_process_checkpoint(tmp_path, written_by_two_processes, devices=4)


def test_refusals_on_the_command_line_are_one_line(tmp_path, written_by_two_processes):
    """A changed global batch, and a device count that does not divide it: `error: ...`
    (one line, exit 2), no traceback, nothing trained."""
    _, two, cache = written_by_two_processes
    cases = [(["--config.train.batch_size=32"], 8, "global batch is 32"),
             ([], 6, "not divisible by the 6 devices")]
    for extra, devices, expected in cases:
        run = resume_copy(two, tmp_path / f"refused_{devices}")
        (out,) = finish(launch(run, 6, nproc=1, devices=devices, cache=cache, extra=extra),
                        expect_rc=2)
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and expected in errors[0], out[-2000:]
        assert "Traceback" not in out
        assert max(losses_by_step(run)) == 4


# ------------------------------------------------------- the compile cache restarts share

CACHE_CHILD = r'''
import json, sys
from mmfm_jax import compile_cache
compile_cache.enable(sys.argv[1])
import jax, numpy as np
from mmfm_jax import parallel, train
from tests.test_train import tiny_config, write_mixtures
write_mixtures(sys.argv[2] + "/gmm")
mesh = parallel.make_mesh({"data": 2, "fsdp": 1}, devices=jax.devices()[:2])
trainer = train.Trainer.create(tiny_config(), sys.argv[2], mesh)
state = trainer.init()
before = compile_cache.stats()
batch = {"image": np.zeros((16, 8, 8, 1), np.uint8), "label": np.zeros(16, np.int32)}
state, metrics = trainer.step(state, batch)
jax.block_until_ready(metrics)
print("STATS", json.dumps({"before": before, "after": compile_cache.stats()}))
'''


def test_a_restarted_process_loads_the_train_step_from_the_compile_cache(tmp_path):
    """Two processes in turn build the same tiny trainer and run one step with one cache
    folder: the first compiles the step (a miss) and writes it, the second loads it (a hit,
    no miss), as JAX's own cache events count them."""
    script = tmp_path / "child.py"
    script.write_text(CACHE_CHILD)
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMFM_", "SLURM_"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    runs = []
    for i in range(2):
        out = subprocess.run([sys.executable, str(script), str(cache), str(tmp_path / f"w{i}")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        line = [x for x in out.stdout.splitlines() if x.startswith("STATS ")][-1]
        runs.append(json.loads(line.split(" ", 1)[1]))
        if i == 0:
            entries = os.listdir(cache)
            assert entries, "the first process wrote no cache entry"
    first, second = runs
    assert first["after"]["misses"] > first["before"]["misses"]  # the step compiled
    assert first["after"]["hits"] == first["before"]["hits"] == 0
    assert second["after"]["hits"] > second["before"]["hits"] > 0  # init and step loaded
    assert second["after"]["misses"] == second["before"]["misses"]
    assert len(os.listdir(cache)) == len(entries)  # nothing new to write


def test_compile_cache_folder_follows_the_config():
    from mmfm_jax import compile_cache

    assert compile_cache.resolve(compile_cache.DEFAULT, "runs/a/") == "runs/a/compile_cache"
    assert compile_cache.resolve("gs://b/cache", "runs/a") == "gs://b/cache"
    assert compile_cache.resolve("", "runs/a") == ""
    cfg = tiny_config()
    assert cfg.compile_cache == compile_cache.DEFAULT


# ------------------------------------------------- grad_accum=-1: chosen by the memory plan

def plan_model(mcfg, per_sample: float):
    """A fitted memory model (memory_plan.MemoryModel) of `mcfg` on 8 devices, fsdp 1."""
    from mmfm_jax import memory_plan

    state, params = memory_plan.state_tables(mcfg, 8, (1,))
    return memory_plan.MemoryModel(description="tiny", state=state, params=params,
                                   batch_bytes=4 * (8 * 8 + 64), grad_coeff=1.0,
                                   overhead={"none": 1e6}, per_sample={"none": per_sample})


def test_grad_accum_auto_is_one_where_devices_report_no_memory(meshes, caplog):
    from mmfm_jax import auto_accum, config, model_parts

    cfg = tiny_config(grad_accum=-1)
    config.validate(cfg, "train", 8)
    with caplog.at_level("INFO"):
        got = auto_accum.resolve_grad_accum(cfg, model_parts.model_config(cfg), meshes["8"])
    assert got == 1 and "report no memory limit" in caplog.text
    for bad in (0, -2, 3):
        with pytest.raises(config.ConfigError, match="grad_accum") as err:
            config.validate(tiny_config(grad_accum=bad), "train", 8)
        assert "\n" not in str(err.value)


def test_grad_accum_auto_takes_the_fewest_micro_batches_that_fit(tmp_path, meshes):
    """Per-device batch 2: a device memory between the predictions of 1 and 2 micro-
    batches gives grad_accum=2; one below both, and a missing memory model, are one-line
    ConfigErrors."""
    from mmfm_jax import auto_accum, config, memory_plan, model_parts

    cfg = tiny_config(grad_accum=-1)
    mcfg = model_parts.model_config(cfg)
    model = plan_model(mcfg, per_sample=4e6)
    path = tmp_path / "memory_model.json"
    path.write_text(json.dumps(model.to_dict()))
    one, two = (model.predict(1, "none", 2, n) for n in (1, 2))
    assert two < one
    cfg.train.memory_model = str(path)
    cfg.train.device_memory_gib = (one + two) / 2 / memory_plan.DEFAULT_MARGIN / memory_plan.GIB
    assert auto_accum.resolve_grad_accum(cfg, mcfg, meshes["8"]) == 2
    cfg.train.device_memory_gib = two / 2 / memory_plan.GIB
    with pytest.raises(config.ConfigError, match="nothing fits") as err:
        auto_accum.resolve_grad_accum(cfg, mcfg, meshes["8"])
    assert "\n" not in str(err.value)
    cfg.train.memory_model = ""
    with pytest.raises(config.ConfigError, match="needs config.train.memory_model"):
        auto_accum.resolve_grad_accum(cfg, mcfg, meshes["8"])
    cfg.train.memory_model = str(tmp_path / "missing.json")
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.validate(cfg, "train", 8)
