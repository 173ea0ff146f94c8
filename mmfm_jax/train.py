"""The MM-FM trainer: the train state, the jitted train step, the Trainer and the loop.

One step is one compiled program on the shared mesh, with the state donated:
frozen encode (RAE, or the demo's pixel identity) -> mode from the CLS mixture (soft or
hard) -> x0 from that mode's spatial Gaussian (N(0, I) for the Gaussian baseline) ->
t (logit-normal or uniform, then shifted) -> x_t and target x0 - x1 -> velocity MSE ->
gradients (optionally accumulated over micro-batches with `lax.scan`) -> optax
(global-norm clip, AdamW on RAE's flat-then-linear schedule) -> EMA. The randomness of
step s is `fold_in(rng, s)` split per use, so a resumed run draws exactly what the
uninterrupted run drew. The model is split once (`model_parts`) into the trainable
`nnx.Param` state and the frozen tables (pos-embed, Fourier W, RoPE), which are carried
along unchanged (so the EMA over them is the identity, as upstream). Shardings follow
config.mesh.rules; the Trainer logs each parameter's PartitionSpec when it is built.

The loop knows nothing of sampling: `train(..., evaluators=...)` calls each evaluator
(`(step, ema_model)`, e.g. the sampling module's PNG grid, the in-training FID) every
`evaluator.every` steps (default config.train.sample_every) and logs the scalars it
returns; the train job (`train_job.py`) wires them in. Neighbours: the frozen encoder
(`frozen_encoder.py`), the mixtures (`gmm/stage.py`), checkpoints, the EMA restore and
export (`checkpoint.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from mmfm_jax import auto_accum, compile_cache, flow, frozen_encoder, metrics, parallel
from mmfm_jax import config as config_lib
from mmfm_jax.checkpoint import PreemptionGuard, check_finite, checkpointer, export_ema
from mmfm_jax.gmm.stage import load_fitted
from mmfm_jax.model_parts import ModelParts, abstract_model_state, model_config, pure, split
from mmfm_jax.models import DiTDH, DiTDHConfig
from mmfm_jax.models.state_arrays import flat_variables

Evaluator = Callable[[int, DiTDH], Any]  # (step, EMA model), every `.every` steps


def evaluator_due(evaluator: Evaluator, step: int, default_every: int) -> bool:
    """An evaluator runs every `evaluator.every` steps (config.train.sample_every when it
    has none; 0: never)."""
    every = int(getattr(evaluator, "every", default_every))
    return every > 0 and step % every == 0


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; all leaves are arrays (checkpointed as is).

    params/ema/frozen are pure dicts of the model's nnx state (Param / frozen tables);
    rng is the base key (uint32[2]) that each step folds its index into.
    """

    params: Any
    frozen: Any
    ema: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


# ---------------------------------------------------------------------------------- setup

def check_config(cfg) -> None:
    """Training-specific consistency checks (one line each, naming the key)."""
    if cfg.mode_conditional and cfg.model.num_classes != cfg.gmm.num_components:
        raise config_lib.ConfigError(
            f"config.model.num_classes={cfg.model.num_classes} must equal "
            f"config.gmm.num_components={cfg.gmm.num_components} for a mode-conditional model")
    if cfg.mode_conditional and cfg.train.label_dropout > 0 >= cfg.model.class_dropout_prob:
        raise config_lib.ConfigError(
            f"config.train.label_dropout={cfg.train.label_dropout} needs a null row: set "
            "config.model.class_dropout_prob > 0")


def lr_schedule(t) -> optax.Schedule:
    """RAE's schedule: constant `lr` up to `lr_decay_start` optimizer steps, then linear
    to `lr_end` at `lr_decay_end`, constant after (no warm-up)."""
    start, end = int(t.lr_decay_start), int(t.lr_decay_end)
    if end <= start:
        return optax.constant_schedule(float(t.lr))
    return optax.join_schedules(
        [optax.constant_schedule(float(t.lr)),
         optax.linear_schedule(float(t.lr), float(t.lr_end), end - start)], [start])


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clip, then AdamW (RAE: betas 0.9/0.95, eps 1e-8, no weight decay)."""
    schedule = lr_schedule(t)
    parts = [optax.clip_by_global_norm(float(t.grad_clip))] if t.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=float(t.b1), b2=float(t.b2), eps=float(t.eps),
                             weight_decay=float(t.weight_decay)))
    return optax.chain(*parts), schedule


def place_mixtures(mixtures, mesh):
    """(CLS mixture, spatial mixture) on the mesh (None stays None): the spatial means
    (K, H, W, C) split over the modes when K divides the devices, the rest replicated."""
    if mixtures is None:
        return None
    cls_mix, spatial = mixtures
    means = spatial.means
    spatial = spatial.replace(means=None)
    cls_mix, spatial = jax.device_put((cls_mix, spatial), parallel.replicated(mesh))
    means = jax.device_put(means, parallel.logical_sharding(
        mesh, ("modes", None, None, None), means.shape))
    return cls_mix, spatial.replace(means=means)


def _state_shardings(mcfg: DiTDHConfig, tx, mesh) -> tuple[ModelParts, TrainState, dict]:
    """ModelParts, the NamedSharding tree of the TrainState (params by their logical axes,
    optimizer moments like their params, scalars replicated) and the abstract params."""
    parts, params, frozen = abstract_model_state(mcfg, mesh)
    p_sh, f_sh = (jax.tree.map(lambda s: s.sharding, t) for t in (params, frozen))
    rep = parallel.replicated(mesh)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, p_sh,
                                   transform_non_params=lambda _: rep)
    return parts, TrainState(params=p_sh, frozen=f_sh, ema=p_sh, opt_state=opt_sh,
                             step=rep, rng=rep), params


def fresh_state(mcfg: DiTDHConfig, tx, seed: int) -> TrainState:
    """A new model's state (traceable): EMA a copy of the params, step 0."""
    model = DiTDH(mcfg, rngs=nnx.Rngs(seed))
    _, params, frozen = split(model)
    params, frozen = pure(params), pure(frozen)
    return TrainState(params=params, frozen=frozen, ema=jax.tree.map(jnp.copy, params),
                      opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                      rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1))


def init_state(mcfg: DiTDHConfig, tx, shardings: TrainState, seed: int) -> TrainState:
    """A fresh state, built directly in its shardings."""
    return jax.jit(functools.partial(fresh_state, mcfg, tx, seed), out_shardings=shardings)()


def abstract_state(mcfg: DiTDHConfig, tx, shardings: TrainState, seed: int) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
    shapes = jax.eval_shape(functools.partial(fresh_state, mcfg, tx, seed))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


# ------------------------------------------------------------------------------ the step

@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The static settings of the compiled step."""

    source: str  # gmm | gaussian
    mode_conditional: bool
    assignment: str  # soft | hard
    time_dist: str
    time_mu: float
    time_sigma: float
    shift: float
    label_dropout: float
    null_label: int
    grad_accum: int
    ema_decay: float

    @classmethod
    def from_config(cls, cfg, mcfg: DiTDHConfig) -> StepOptions:
        t, m = cfg.train, cfg.model
        return cls(source=cfg.source, mode_conditional=bool(cfg.mode_conditional),
                   assignment=cfg.gmm.assignment, time_dist=t.time_dist,
                   time_mu=float(t.time_mu), time_sigma=float(t.time_sigma),
                   shift=flow.time_shift(t.time_shift, (m.input_size, m.input_size,
                                                        m.in_channels)),
                   label_dropout=float(t.label_dropout) if cfg.mode_conditional else 0.0,
                   null_label=mcfg.null_label, grad_accum=int(t.grad_accum),
                   ema_decay=float(t.ema_decay))


def flow_batch(opts: StepOptions, key: jax.Array, x1: jax.Array, cls: jax.Array, mixtures):
    """(x_t, shifted t, model labels y, target) for data latents x1 and their CLS tokens.

    The source uses the drawn mode even when its label is dropped (upstream drops labels
    inside the model, after the coupling)."""
    k_mode, k_src, k_time, k_drop = jax.random.split(key, 4)
    b = x1.shape[0]
    if opts.source == "gmm":
        cls_mix, spatial = mixtures
        modes = cls_mix.assign(k_mode, cls, mode=opts.assignment)
        x0 = spatial.sample(k_src, modes)
    else:
        modes = jnp.full((b,), opts.null_label, jnp.int32)
        x0 = jax.random.normal(k_src, x1.shape, jnp.float32)
    t = flow.sample_time(k_time, b, dist=opts.time_dist, mu=opts.time_mu,
                         sigma=opts.time_sigma)
    t = flow.shift_time(t, opts.shift)
    x_t, target = flow.interpolate(t, x0, x1)
    if opts.mode_conditional:
        y = flow.drop_labels(k_drop, modes, opts.label_dropout, opts.null_label)
    else:
        y = jnp.full((b,), opts.null_label, jnp.int32)
    return x_t, t, y, target


def _micro_batches(tree, n: int, mesh):
    """(B, ...) -> (n, B/n, ...) with micro-batch j = rows j, j+n, ...: every device keeps
    its own rows, so no data moves."""
    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, parallel.BATCH_AXES, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.tree.map(split, tree)


def make_train_step(parts: ModelParts, encoder_graphdef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, opts: StepOptions, mesh,
                    shardings: TrainState) -> Callable:
    """`step(state, encoder_state, mixtures, batch) -> (state, metrics)`, jitted on `mesh`
    with the state donated; metrics are replicated scalars (loss, grad_norm, param_norm,
    lr)."""

    def loss_fn(params, frozen, encoder_state, mixtures, batch, key):
        if "latents" in batch:  # latent cache: the encode already happened offline
            x1 = batch["latents"].astype(jnp.float32)
            cls = batch["cls"].astype(jnp.float32)
        else:
            x1, cls = frozen_encoder.encode(encoder_graphdef, encoder_state, batch["image"])
            x1 = jax.lax.stop_gradient(x1.astype(jnp.float32))
            cls = jax.lax.stop_gradient(cls)
        x_t, t, y, target = flow_batch(opts, key, x1, cls, mixtures)
        pred = parts.merge(params, frozen)(x_t, t, y)
        return jnp.mean(flow.per_sample_loss(pred, target))

    grad_fn = jax.value_and_grad(loss_fn)

    def step(state: TrainState, encoder_state, mixtures, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for constrain_batch
            return _step(state, encoder_state, mixtures, batch)

    def _step(state: TrainState, encoder_state, mixtures, batch):
        key = jax.random.fold_in(state.rng, state.step)
        batch = {k: v for k, v in batch.items() if k in ("image", "latents", "cls")}
        if opts.grad_accum == 1:
            loss, grads = grad_fn(state.params, state.frozen, encoder_state, mixtures, batch,
                                  key)
        else:
            def body(carry, xs):
                index, micro = xs
                l, g = grad_fn(state.params, state.frozen, encoder_state, mixtures, micro,
                               jax.random.fold_in(key, index))
                return (carry[0] + l, jax.tree.map(jnp.add, carry[1], g)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            xs = (jnp.arange(opts.grad_accum), _micro_batches(batch, opts.grad_accum, mesh))
            (loss, grads), _ = jax.lax.scan(body, zeros, xs)
            loss = loss / opts.grad_accum
            grads = jax.tree.map(lambda g: g / opts.grad_accum, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = jnp.float32(opts.ema_decay)
        ema = jax.tree.map(lambda e, p: e * d + (1.0 - d) * p, state.ema, params)
        metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.global_norm(params),
                   "lr": jnp.asarray(schedule(state.step), jnp.float32)}
        new = TrainState(params=params, frozen=state.frozen, ema=ema, opt_state=opt_state,
                         step=state.step + 1, rng=state.rng)
        return new, metrics

    rep = parallel.replicated(mesh)
    return jax.jit(step, donate_argnums=(0,),
                   out_shardings=(shardings, {k: rep for k in
                                              ("loss", "grad_norm", "param_norm", "lr")}))


# ------------------------------------------------------------------------------- trainer

@dataclasses.dataclass
class Trainer:
    """Everything one run compiles and carries: config, mesh, model parts, shardings,
    optimizer, encoder state, mixtures and the compiled step."""

    cfg: Any
    mesh: Any
    mcfg: DiTDHConfig
    parts: ModelParts
    shardings: TrainState
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    encoder: Any
    encoder_state: Any
    mixtures: Any
    step_fn: Callable

    @classmethod
    def create(cls, cfg, workdir: str, mesh) -> Trainer:
        """Build (or reuse) everything for `cfg` on `mesh`, sharded by config.mesh.rules,
        and log the parameters' PartitionSpecs."""
        check_config(cfg)
        mcfg = model_config(cfg)
        with parallel.axis_rules(cfg.mesh.get("rules")) as rules:
            encoder = frozen_encoder.make_encoder(cfg, mesh)
            enc_graphdef, enc_state = frozen_encoder.place_encoder(encoder, mesh)
            mixtures = place_mixtures(load_fitted(cfg, workdir), mesh)
            hyper = tuple(sorted(cfg.train.to_dict().items()))
            opts = dataclasses.replace(  # grad_accum=-1: the memory plan's choice
                StepOptions.from_config(cfg, mcfg),
                grad_accum=auto_accum.resolve_grad_accum(cfg, mcfg, mesh))
            parts, shardings, params, tx, schedule, step_fn = _compiled(
                mcfg, opts, mesh, hyper, enc_graphdef, rules)
        log_param_shardings(params, mesh)
        return cls(cfg, mesh, mcfg, parts, shardings, tx, schedule, encoder, enc_state,
                   mixtures, step_fn)

    def init(self) -> TrainState:
        return init_state(self.mcfg, self.tx, self.shardings, int(self.cfg.seed))

    def abstract(self) -> TrainState:
        return abstract_state(self.mcfg, self.tx, self.shardings, int(self.cfg.seed))

    def step(self, state: TrainState, host_batch) -> tuple[TrainState, dict]:
        batch = parallel.host_to_global(host_batch, self.mesh)
        return self.step_fn(state, self.encoder_state, self.mixtures, batch)

    def ema_model(self, state: TrainState) -> DiTDH:
        return self.parts.merge(state.ema, state.frozen)

    @property
    def source_mixture(self):
        """The spatial mixture that sampling draws x(t=1) from (None: Gaussian source)."""
        return None if self.mixtures is None else self.mixtures[1]


@functools.lru_cache(maxsize=8)
def _compiled(mcfg: DiTDHConfig, opts: StepOptions, mesh, hyper: tuple, enc_graphdef,
              rules: parallel.Rules):
    """Model parts, shardings (by `rules`), abstract params, optimizer and the jitted step,
    shared by every trainer of the same settings in this process (a resumed or repeated
    run compiles nothing new)."""
    t = ml_collections.ConfigDict(dict(hyper))
    tx, schedule = make_optimizer(t)
    with parallel.axis_rules(rules):
        parts, shardings, params = _state_shardings(mcfg, tx, mesh)
    step_fn = make_train_step(parts, enc_graphdef, tx, schedule, opts, mesh, shardings)
    return parts, shardings, params, tx, schedule, step_fn


def log_param_shardings(params, mesh) -> None:
    """One table (logging.info): each parameter's path, shape and resolved PartitionSpec."""
    rows = flat_variables(params)
    width = max(len(p) for p in rows)
    lines = [f"  {path:<{width}}  {str(tuple(s.shape)):<16} {s.sharding.spec}"
             for path, s in rows.items()]
    logging.info("parameter shardings on mesh %s (config.mesh.rules):\n%s",
                 dict(mesh.shape), "\n".join(lines))


@dataclasses.dataclass
class TrainResult:
    step: int
    preempted: bool
    last_metrics: dict


class _Logger:
    """Collects per-step device metrics without syncing; `flush` fetches them, runs the
    NaN guard, and writes averaged records with throughput."""

    def __init__(self, cfg, workdir: str, flops_per_sample: int, start: int):
        self.cfg = cfg
        self.writer = metrics.MetricWriter(workdir)
        self.pending: list[tuple[int, dict]] = []
        self.window: list[dict] = []
        self.flops = flops_per_sample
        self.peak = metrics.peak_tflops(cfg.train.peak_tflops)
        self.t_last, self.step_last = time.perf_counter(), start
        self.progress = metrics.Progress(int(cfg.train.num_steps), "train", "steps",
                                         start=start)
        self.last: dict = {}

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def check(self, last_checkpoint: int | None) -> None:
        """Fetch the pending metrics and raise NonFiniteError on the first bad step."""
        if not self.pending:
            return
        steps = [s for s, _ in self.pending]
        records = jax.device_get([m for _, m in self.pending])
        self.pending = []
        records = [{k: float(v) for k, v in r.items()} for r in records]
        check_finite(steps, records, last_checkpoint)
        self.window.extend(records)
        self.progress.update(len(records), extra=f"loss {records[-1]['loss']:.4f}")

    def write(self, step: int) -> None:
        if not self.window:
            return
        now = time.perf_counter()
        steps_per_sec = (step - self.step_last) / max(now - self.t_last, 1e-9)
        images_per_sec = steps_per_sec * self.cfg.train.batch_size
        tflops = 3.0 * self.flops * images_per_sec / jax.device_count() / 1e12
        rec = {k: float(np.mean([r[k] for r in self.window])) for k in ("loss", "grad_norm",
                                                                         "param_norm")}
        rec.update(lr=self.window[-1]["lr"], steps_per_sec=steps_per_sec,
                   images_per_sec=images_per_sec, tflops_per_device=tflops,
                   mfu=tflops / self.peak if self.peak else None)
        self.writer.write(step, rec)
        self.writer.flush()
        self.last = rec
        self.window = []
        self.t_last, self.step_last = now, step

    def write_evaluation(self, step: int, result) -> None:
        """An evaluator's dict of scalars (e.g. fid, fid_samples) as its own record."""
        if isinstance(result, dict) and result:
            self.writer.write(step, result)
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _data_iterator(cfg):
    from mmfm_jax import data
    loader = data.make_train_loader(cfg.data, global_batch=int(cfg.train.batch_size),
                                    seed=int(cfg.seed))
    return iter(loader)


def train(cfg, workdir: str, mesh, *, trainer: Trainer | None = None,
          callbacks: Sequence[Callable[[int], None]] = (),
          evaluators: Sequence[Evaluator] = ()) -> TrainResult:
    """Train (or resume) under `workdir` until config.train.num_steps.

    Resumes from the latest checkpoint in `<workdir>/checkpoints` (state and data position).
    Saves every ckpt_every steps, at the end, and on SIGTERM (then returns preempted=True);
    a finished run exports the EMA weights to `<workdir>/export`. `trainer` is one already
    built for (cfg, workdir, mesh), else it is built here. `callbacks` run on the host after
    each step is dispatched (with its step number); `evaluators` get (step, EMA model)
    every `evaluator.every` steps (default config.train.sample_every), and a dict they
    return is written to metrics.jsonl/TensorBoard at that step.
    """
    trainer = trainer or Trainer.create(cfg, workdir, mesh)
    t = cfg.train
    data_iter = _data_iterator(cfg)
    ckpt = checkpointer(cfg, workdir)
    latest = ckpt.latest_step()
    if latest is not None:
        state = ckpt.restore(latest, trainer.abstract(), data_iter)
        logging.info("resuming from step %d", latest)
    else:
        state = trainer.init()
    start = int(jax.device_get(state.step))
    logger = _Logger(cfg, workdir, trainer.mcfg.flops_per_sample(), start)
    last_saved = latest
    step = start
    preempted = False
    try:
        with PreemptionGuard() as guard:
            for step in range(start + 1, int(t.num_steps) + 1):
                state, step_metrics = trainer.step(state, next(data_iter))
                if step == start + 1:  # the step has compiled (or come from the cache)
                    compile_cache.log_summary()
                logger.add(step, step_metrics)
                for callback in callbacks:
                    callback(step)
                preempted = guard.should_stop(step)
                final = step == int(t.num_steps)
                save = final or preempted or (t.ckpt_every > 0 and step % t.ckpt_every == 0)
                if save or step % t.log_every == 0:
                    logger.check(last_saved)
                    logger.write(step)
                if save:
                    ckpt.save(step, state, data_iter)
                    last_saved = step
                due = [e for e in evaluators if evaluator_due(e, step, t.sample_every)]
                if due:
                    ema_model = trainer.ema_model(state)
                    for evaluate in due:
                        logger.write_evaluation(step, evaluate(step, ema_model))
                if preempted:
                    logging.warning("preempted at step %d: checkpoint saved, exiting", step)
                    break
        if step == int(t.num_steps) and not preempted:
            export_ema(trainer.ema_model(state), os.path.join(workdir, "export"), step)
    finally:
        ckpt.close()
        logger.close()
    return TrainResult(step=step, preempted=preempted, last_metrics=logger.last)
