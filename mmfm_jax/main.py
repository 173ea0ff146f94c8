"""The main job: `python -m mmfm_jax.main --config=configs/mode_gmm.py[:PRESET] --workdir=DIR`.

Flags, config, mesh, sharding rules, logging and stage dispatch; nothing else. Stages:
fit_gmm (`gmm/job.py`: encode the data, fit the CLS and spatial mixtures), train
(`train_job.py`: the trainer with the sample-grid and FID evaluators), sample
(`sample_job.py`), eval, sweep (`sweep.py`: FID over guidance scales and intervals); `all`
runs fit_gmm, train, sample and eval in order (the demo preset runs its own end-to-end
report). Every stage runs inside `parallel.axis_rules(config.mesh.rules)`. Rerunning with
the same workdir resumes.

The console shows the stage, progress bars, results and warnings; everything else
(orbax, absl, jax and grain INFO, per-iteration detail) goes to `<workdir>/log.txt`
(`logs.py`), or to the console too with `--verbosity=1`. A missing or invalid input (a
config key, a file the stage needs) ends the run with one `error: ...` line and exit
code 2; its traceback is kept in the log file.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time

from absl import app, flags
from ml_collections import config_flags

from mmfm_jax import config as config_lib
from mmfm_jax import logs

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", default="configs/mode_gmm.py",
    help_string="Config file and optional preset, FILE[:PRESET] (presets: demo (default), "
                "imagenet256_xl, imagenet256_s). Override any value with --config.KEY=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, checkpoints, GMM, "
                               "samples and logs; resumed when it already holds state. "
                               "Default: workdir/<config name>_<preset>.")
_STAGE = flags.DEFINE_enum("stage", "all", list(config_lib.STAGES),
                           "Which part of the pipeline to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for "
                                   "multi-process runs (GPU clusters); auto on Cloud TPU.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

# stage -> (module, function); each function takes (cfg, workdir, mesh).
STAGE_FUNCTIONS = {
    "fit_gmm": ("mmfm_jax.gmm.job", "fit_gmm_stage"),
    "train": ("mmfm_jax.train_job", "train_stage"),
    "sample": ("mmfm_jax.sample_job", "sample_stage"),
    "eval": ("mmfm_jax.evaluate", "eval_stage"),
    "sweep": ("mmfm_jax.sweep", "sweep_stage"),
    "demo": ("mmfm_jax.demo", "run_demo"),
}


def _stage_function(name: str):
    """Imported on use, so a sampling-only run never imports the trainer (and vice versa)."""
    module_name, fn_name = STAGE_FUNCTIONS[name]
    return getattr(importlib.import_module(module_name), fn_name)


def _default_workdir(cfg) -> str:
    config_path = config_flags.get_config_filename(FLAGS["config"]).split(":")[0]
    config_file = os.path.splitext(os.path.basename(config_path))[0]
    return os.path.join("workdir", f"{config_file}_{cfg.preset}")


def run(argv) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError(f"unexpected arguments {argv[1:]}; use --flag=value")
    import jax

    from mmfm_jax import parallel

    cfg = _CONFIG.value
    workdir = _WORKDIR.value or _default_workdir(cfg)
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    log_file = logs.attach_file(logs.log_path(workdir, jax.process_index()))
    parallel.log_topology()
    from mmfm_jax import compile_cache  # before any compile: every stage shares it
    compile_cache.setup(cfg, workdir)
    stage = _STAGE.value
    config_lib.validate(cfg, stage, jax.device_count())
    if stage in ("eval", "sweep"):  # every preset: the demo's validation skips paths
        from mmfm_jax.fid_scorer import require_eval_paths
        require_eval_paths(cfg, f"--stage={stage}")
    mesh = parallel.make_mesh(cfg.mesh)
    if jax.process_index() == 0:
        config_lib.save(cfg, workdir)
    logging.info("workdir %s, stage %s, preset %s, mesh %s (full log: %s)", workdir, stage,
                 cfg.preset, dict(mesh.shape), log_file)
    jax.set_mesh(mesh)
    # With a global mesh set, NNX resolves the logical axis names of parameter metadata
    # ("embed", "mlp", ...) through the run's rules when it builds (or shape-evaluates) a
    # model; every sharding built from logical axes in the stages uses them too.
    with parallel.axis_rules(cfg.mesh.rules):
        if cfg.preset == "demo" and stage == "all":
            _stage_function("demo")(cfg, workdir, mesh)
            return
        order = ["fit_gmm", "train", "sample", "eval"] if stage == "all" else [stage]
        if cfg.source == "gaussian" or cfg.gmm.path:
            order = [s for s in order if s != "fit_gmm" or stage == "fit_gmm"]
        for name in order:
            _stage_function(name)(cfg, workdir, mesh)


def _is_input_error(error: BaseException) -> bool:
    """Errors that are the user's input, reported in one line: ValueErrors of this
    package's own types (configs, files, shapes), and a missing or unreadable file that
    this package's code reports (raised in mmfm_jax/ or convert/). Anything else is a bug
    and keeps its traceback."""
    if isinstance(error, ValueError):
        return type(error).__module__.startswith(("mmfm_jax", "convert"))
    if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                          PermissionError)):
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is not None and os.path.abspath(
            tb.tb_frame.f_code.co_filename).startswith(logs.PACKAGE_DIRS)
    return False


def _join_library_threads(timeout: float = 10.0) -> None:
    """Let library threads (orbax's temporary-directory cleanup) end before the interpreter
    shuts down, so that an error exit prints no second traceback from them."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(deadline - time.monotonic(), 0.0))


def main(argv) -> None:
    logs.setup(verbose=FLAGS.verbosity >= 1)
    try:
        run(argv)
    except (ValueError, OSError) as e:
        if not _is_input_error(e):
            logging.error("the run failed", exc_info=True, extra=logs.FILE_ONLY)
            raise
        logging.error("error: %s", e, exc_info=True, extra=logs.FILE_ONLY)
        print(f"error: {e}", file=sys.stderr, flush=True)
        _join_library_threads()
        sys.exit(2)
    except Exception:
        logging.error("the run failed", exc_info=True, extra=logs.FILE_ONLY)
        raise


def _parse_flags(argv):
    """absl flag parsing with one clear line for a bad --config.KEY override."""
    try:
        return FLAGS(argv)
    except (KeyError, AttributeError) as e:  # config_flags: unknown key in an override
        key = str(e).strip("'\"")
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
               and key in a.split("=")[0]]
        where = bad[0] if bad else f"--config.{key}"
        print(f"error: {where}: config has no key {key!r}; see configs/base.py for the keys",
              file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def entry() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()
