"""Training checkpoints: orbax (async, atomic, retention), preemption and the NaN guard.

* `Checkpointer` wraps one `orbax.checkpoint.CheckpointManager` under
  `<workdir>/checkpoints`: item "state" (any pytree of arrays: params, EMA, optimizer,
  step, RNG) and, when given, item "data" (the grain iterator, through grain's own orbax
  handler, one JSON per process) and item "data_position" (the stream's process-independent
  position, `data/position.py`, one JSON). Saves are asynchronous; orbax writes into a
  temporary directory and renames it on commit, so a killed run never leaves a half
  checkpoint that `latest_step` would pick. Retention: the last `keep` plus every
  `keep_period`-th step.
* Elastic resume: the state is restored onto the shardings of the target (the new mesh's
  abstract state), so a checkpoint of 2 processes x 4 devices resumes on 1 x 8 or 1 x 4.
  The data iterator takes its own process's grain state when the checkpoint has one for
  this process and worker count (exact, as before; older checkpoints have only these),
  else it is rebuilt from "data_position". What cannot resume (an older checkpoint on
  another topology, a changed global batch or seed) raises `ResumeError`, one line.
* `PreemptionGuard` turns SIGTERM into a flag the train loop polls, so a preempted run
  saves its current step and exits instead of dying mid-step.
* `check_finite` is the NaN guard: it names the first step whose loss, gradient norm or
  parameter norm is not finite, so the run stops before that state is ever saved.
* `load_ema_model` is the EMA model of a workdir's latest checkpoint for sampling: it reads
  only `{ema, frozen}` of the saved state, targets built from the model config alone (no
  optimizer). `export_ema` writes the EMA weights in the upstream PyTorch layout.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import signal
import threading
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmfm_jax import files, parallel
from mmfm_jax.config import ConfigError
from mmfm_jax.data.position import DataPositionError
from mmfm_jax.model_parts import abstract_model_state, model_config
from mmfm_jax.models import DiTDH, export_torch_state_dict

STATE_ITEM = "state"
DATA_ITEM = "data"
POSITION_ITEM = "data_position"


class ResumeError(ValueError):
    """A checkpoint that cannot resume on this run's topology or settings (one line)."""


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss, gradient or parameter at a named step."""

    def __init__(self, step: int, values: Mapping[str, float], last_checkpoint: int | None):
        self.step = step
        self.values = dict(values)
        self.last_checkpoint = last_checkpoint
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        kept = (f"the last good checkpoint (step {last_checkpoint}) is intact"
                if last_checkpoint is not None else "no checkpoint was written")
        super().__init__(f"non-finite training state at step {step} ({shown}); stopping "
                         f"without saving it; {kept}")


GUARDED = ("loss", "grad_norm", "param_norm")


def check_finite(steps: Sequence[int], records: Sequence[Mapping[str, float]],
                 last_checkpoint: int | None) -> None:
    """Raise NonFiniteError for the first record with a non-finite guarded value."""
    for step, rec in zip(steps, records):
        values = {k: float(rec[k]) for k in GUARDED if k in rec}
        if not all(np.isfinite(v) for v in values.values()):
            raise NonFiniteError(step, values, last_checkpoint)


class Checkpointer:
    """Asynchronous orbax checkpoints of the train state and the data iterator."""

    def __init__(self, directory: str, *, keep: int, keep_period: int = 0,
                 use_async: bool = True):
        # orbax handles gs:// itself; only local paths are made absolute
        self.directory = directory if "://" in str(directory) else os.path.abspath(directory)
        handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(),
                    POSITION_ITEM: ocp.JsonCheckpointHandler()}
        try:  # grain registers its orbax handler and args on import
            import grain.checkpoint as grain_ckpt
            handlers[DATA_ITEM] = grain_ckpt.CheckpointHandler()
            self._grain = grain_ckpt
        except ImportError:  # pragma: no cover - grain is a base requirement
            self._grain = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1),
            keep_period=int(keep_period) if keep_period and keep_period > 0 else None,
            enable_async_checkpointing=use_async,
            create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None) -> bool:
        """Start an asynchronous save of `state` (and the iterator position) at `step`.

        Returns once the arrays are copied off the devices, so the caller may donate them.
        """
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iterator is not None and self._grain is not None:
            items[DATA_ITEM] = self._grain.CheckpointSave(data_iterator)
        if hasattr(data_iterator, "position"):
            items[POSITION_ITEM] = ocp.args.JsonSave(data_iterator.position())
        saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state, data_iterator=None):
        """The state at `step`, placed as `abstract_state` says (ShapeDtypeStructs with
        shardings: those of this run's mesh, whatever topology wrote it); `data_iterator`
        is moved to its saved position in place (module doc: elastic resume)."""
        if data_iterator is not None and self._grain is not None:
            self._restore_data(int(step), data_iterator)
        restored = self.manager.restore(
            int(step), args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(
                abstract_state)}))
        logging.info("checkpoint: restored step %d from %s", step, self.directory)
        return restored[STATE_ITEM]

    def _step_path(self, step: int, *parts: str):
        from etils import epath
        return epath.Path(self.directory).joinpath(str(step), *parts)

    def _saved_position(self, step: int) -> dict | None:
        if not self._step_path(step, POSITION_ITEM).exists():
            return None  # written before data positions existed
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **{POSITION_ITEM: ocp.args.JsonRestore()}))
        return dict(restored[POSITION_ITEM])

    def _restore_data(self, step: int, iterator) -> None:
        """This process's exact grain state when the checkpoint has one for this topology,
        else the stream rebuilt from the process-independent position; ResumeError when
        neither can continue the saved stream."""
        where = f"{self.directory}/{step}"
        if not self._step_path(step, DATA_ITEM).exists():
            raise ResumeError(f"checkpoint {where} has no data-iterator state; it cannot "
                              "resume the data order exactly")
        own_name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        own = self._step_path(step, DATA_ITEM, own_name)
        try:
            position = self._saved_position(step)
            if position is not None and hasattr(iterator, "check"):
                iterator.check(position)  # a changed global batch or seed: refused here
            raw = own.read_text() if own.exists() else None
            if raw is not None and (not hasattr(iterator, "accepts_state")
                                    or iterator.accepts_state(raw)):
                if hasattr(iterator, "restore_state"):
                    iterator.restore_state(raw, position["batches"] if position else step)
                else:
                    iterator.set_state(raw.encode())
                return
            if position is None or not hasattr(iterator, "seek"):
                raise ResumeError(self._no_position_message(where, step, own_name))
            logging.info("checkpoint: rebuilding the data stream of process %d of %d at "
                         "global batch %d (written by %s)", jax.process_index(),
                         jax.process_count(), position["batches"], self._writers(step))
            iterator.seek(position)
        except DataPositionError as e:
            raise ResumeError(f"cannot resume checkpoint {where}: {e}") from None

    def _writers(self, step: int) -> str:
        names = sorted(p.name for p in self._step_path(step, DATA_ITEM).glob("process_*.json"))
        counts = {n.rsplit("-of-", 1)[-1].removesuffix(".json") for n in names}
        return f"{'/'.join(sorted(counts))} process(es)" if counts else "no process"

    def _no_position_message(self, where: str, step: int, own_name: str) -> str:
        return (f"cannot resume checkpoint {where} here: it predates {POSITION_ITEM} (its "
                f"data state is per process, written by {self._writers(step)}) and has no "
                f"{own_name} of this run's data workers, sampler and source; resume it on "
                "the process count and config.data.num_workers that wrote it")

    def restore_subset(self, step: int, abstract_subset: dict) -> dict:
        """Only the top-level entries of the saved state named in `abstract_subset` (e.g.
        the EMA and frozen tables for sampling), without reading the rest."""
        reader = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler()})
        try:
            args = ocp.args.PyTreeRestore(
                item=abstract_subset,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subset),
                partial_restore=True)
            restored = reader.restore(int(step), args=ocp.args.Composite(**{STATE_ITEM: args}))
        finally:
            reader.close()
        return restored[STATE_ITEM]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionGuard:
    """Context manager: SIGTERM sets `requested` (the loop then saves and exits).

    With several processes every process must stop at the same step, so the decision also
    goes through JAX's preemption sync point (which the distributed runtime triggers).
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        self._event.set()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service not started: fall back to the flag
                pass
        return self._event.is_set()


def checkpointer(cfg, workdir: str) -> Checkpointer:
    """The Checkpointer of a run: `<workdir>/checkpoints` with config.train's retention."""
    return Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(cfg.train.ckpt_keep),
                        keep_period=int(cfg.train.ckpt_keep_period))


def load_ema_model(cfg, workdir: str, mesh) -> DiTDH:
    """The EMA model of the latest checkpoint under `workdir`, sharded over `mesh` by
    config.mesh.rules, with config.sample.compute_dtype."""
    mcfg = model_config(cfg)
    with parallel.axis_rules(cfg.mesh.get("rules")):
        parts, ema, frozen = abstract_model_state(mcfg, mesh)
    ckpt = checkpointer(cfg, workdir)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"{ckpt.directory}: no checkpoint to sample from; "
                              "train first or set config.sample.model_path")
        restored = ckpt.restore_subset(step, {"ema": ema, "frozen": frozen})
    finally:
        ckpt.close()
    if cfg.sample.compute_dtype != mcfg.compute_dtype:
        mcfg = dataclasses.replace(mcfg, compute_dtype=cfg.sample.compute_dtype)
        parts, _, _ = abstract_model_state(mcfg, mesh)
    logging.info("loaded the EMA model of step %d from %s", step, ckpt.directory)
    return parts.merge(restored["ema"], restored["frozen"])


def export_ema(model: DiTDH, out_dir: str, step: int) -> str:
    """The EMA weights in the upstream PyTorch state-dict layout: `ema_{step}.pt` (a raw
    state dict, which RAE's and MM-FM's loaders accept) when torch is installed, else
    `ema_{step}.safetensors` with the same keys; written atomically. Collective: every
    process calls it, process 0 writes."""
    state_dict = export_torch_state_dict(model)
    if jax.process_index() != 0:
        return ""
    try:
        import torch
    except ImportError:
        from safetensors.numpy import save
        path = os.path.join(out_dir, f"ema_{step:07d}.safetensors")
        data = save({k: np.ascontiguousarray(v) for k, v in state_dict.items()})
    else:
        path = os.path.join(out_dir, f"ema_{step:07d}.pt")
        buf = io.BytesIO()
        torch.save({k: torch.from_numpy(np.array(v, copy=True)) for k, v in
                    state_dict.items()}, buf)
        data = buf.getvalue()
    files.write_bytes(path, data)
    logging.info("exported the EMA weights (upstream layout) to %s", path)
    return path
