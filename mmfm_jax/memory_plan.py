"""Memory plan: the fastest (fsdp, remat, grad_accum) whose DiTDH train step fits a device.

Why: nothing else tells a user whether DiTDH-XL at global batch 1024 fits 8 x H100 or a
v5e-256 before they pay for the pod. The answer comes from a linear memory model of one
train step, per device:

    bytes = fixed(fsdp, remat) + per_sample(remat) x micro_batch
    fixed = state(fsdp) + batch_bytes x per_device_batch + overhead(remat)
            + grad_coeff x params(fsdp)
            + [grad_accum > 1] x (accum_overhead + accum_coeff x params(fsdp))

* state(fsdp): params, EMA and the two Adam moments (4 x float32 per parameter) plus the
  frozen tables, exact, from the logical sharding the trainer applies (`state_bytes`:
  dimensions the fsdp axis does not divide stay replicated, as `parallel.logical_sharding`
  leaves them). params(fsdp) is the per-device float32 parameter bytes alone.
* batch_bytes: the input latents and CLS token of one sample (the whole per-device batch
  is an argument of the step even when it is accumulated in micro-batches).
* overhead, grad_coeff, per_sample, accum_*: fitted (`fit`) from XLA's compiled memory
  analysis of ahead-of-time compiles (`bench compile`: nothing is allocated) at a few
  small per-device batches, two fsdp sizes, with and without accumulation. grad_coeff
  counts the temporaries that shard like the parameters (gradients, optimizer updates);
  overhead the ones that do not (all-gathered weights, scalars); per_sample the
  activations kept for the backward pass; accum_* what the accumulation loop adds (its
  gradient carry and loop buffers).

CPU-COMPILED MEMORY IS AN ESTIMATE FOR ACCELERATORS: XLA:CPU fuses, lays out and schedules
differently from XLA:GPU and XLA:TPU (no cuDNN/flash attention, no TPU memory-space
assignment), and the runtime, fragmentation and collectives' buffers are not in it; `plan`
therefore only fills `margin` (default 0.9) of the device memory. Refit on the accelerator
itself (the same compiles there) for a number to trust.

"Fastest" is an order, not a timing: among the settings that fit, fewest grad_accum steps
first (each is a serial pass over the model with its weight all-gathers), then the cheapest
remat policy (none < policies that save matmul outputs < full recomputation), then the
smallest fsdp (less all-gather / reduce-scatter traffic, groups that stay inside a host).

`plan(model, ...)` is pure and fast (the trainer calls it when config.train.grad_accum=-1);
`fit(measurements, ...)` turns compiled memory into a `MemoryModel`; `state_bytes` is the
analytic part; `PlanError` carries a one-line reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

GIB = 2**30
DEFAULT_MARGIN = 0.9
# Dense per-device memory of the accelerators the README table covers, GiB.
DEVICE_MEMORY_GIB = {"H100": 80.0, "H200": 140.0, "A100": 80.0, "v4": 32.0, "v5e": 16.0,
                     "v5p": 95.0, "v6e": 32.0}
# Recompute cost rank of remat policies: none, policies that keep matmul outputs, full.
NO_RECOMPUTE = ("none", "everything_saveable")
FULL_RECOMPUTE = ("full", "nothing_saveable")


class PlanError(ValueError):
    """No setting fits, or the request itself is impossible (one line)."""


def remat_rank(remat: str) -> int:
    """0 for no recomputation, 2 for full, 1 for every policy in between."""
    return 0 if remat in NO_RECOMPUTE else 2 if remat in FULL_RECOMPUTE else 1


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One compiled train step's memory per device, with its setting and analytic parts."""

    fsdp: int
    remat: str
    per_device_batch: int
    grad_accum: int
    total_bytes: int  # argument + output - alias + temp (compiled memory analysis)
    state_bytes: int  # analytic state(fsdp)
    param_bytes: int  # analytic params(fsdp)

    @property
    def micro_batch(self) -> int:
        return self.per_device_batch // self.grad_accum


@dataclasses.dataclass(frozen=True)
class Setting:
    """One candidate of the plan and its predicted per-device bytes."""

    fsdp: int
    data: int
    remat: str
    grad_accum: int
    per_device_batch: int
    micro_batch: int
    predicted_bytes: int

    def describe(self) -> str:
        return (f"fsdp={self.fsdp} data={self.data} remat={self.remat} "
                f"grad_accum={self.grad_accum} (micro-batch {self.micro_batch} of "
                f"{self.per_device_batch} per device): {self.predicted_bytes / GIB:.1f} GiB")


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """Fitted per-device memory of one model configuration's train step (see module doc).

    state and params map fsdp -> analytic per-device bytes; only those fsdp sizes can be
    planned."""

    description: str
    state: Mapping[int, int]
    params: Mapping[int, int]
    batch_bytes: int
    grad_coeff: float
    overhead: Mapping[str, float]
    per_sample: Mapping[str, float]
    accum_overhead: float = 0.0
    accum_coeff: float = 0.0
    source: str = "XLA:CPU ahead-of-time compiles (an estimate for accelerators)"
    validation: Sequence[Mapping] = ()

    @property
    def remats(self) -> tuple[str, ...]:
        return tuple(sorted(self.per_sample, key=lambda r: (remat_rank(r), r)))

    def fixed(self, fsdp: int, remat: str, per_device_batch: int, grad_accum: int) -> float:
        accum = (self.accum_overhead + self.accum_coeff * self.params[fsdp]
                 if grad_accum > 1 else 0.0)
        return (self.state[fsdp] + self.batch_bytes * per_device_batch + self.overhead[remat]
                + self.grad_coeff * self.params[fsdp] + accum)

    def predict(self, fsdp: int, remat: str, per_device_batch: int, grad_accum: int) -> int:
        if fsdp not in self.state:
            raise PlanError(f"memory model: no state bytes for fsdp={fsdp} "
                            f"(has {sorted(self.state)})")
        if remat not in self.per_sample:
            raise PlanError(f"memory model: remat {remat!r} was not fitted "
                            f"(has {', '.join(self.remats)})")
        micro = per_device_batch // grad_accum
        return int(round(self.fixed(fsdp, remat, per_device_batch, grad_accum)
                         + self.per_sample[remat] * micro))

    def with_tables(self, state: Mapping[int, int], params: Mapping[int, int]) -> MemoryModel:
        """The same fit with analytic tables for other fsdp sizes (e.g. another device count)."""
        return dataclasses.replace(self, state=dict(state), params=dict(params))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["state"] = {str(k): v for k, v in self.state.items()}
        d["params"] = {str(k): v for k, v in self.params.items()}
        d["validation"] = list(self.validation)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> MemoryModel:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(known - set(d) - {"source", "validation", "accum_overhead",
                                           "accum_coeff"})
        if missing:
            raise PlanError(f"memory model: missing keys {missing}")
        d = {k: v for k, v in d.items() if k in known}
        d["state"] = {int(k): int(v) for k, v in d["state"].items()}
        d["params"] = {int(k): int(v) for k, v in d["params"].items()}
        d["validation"] = tuple(d.get("validation", ()))
        return cls(**d)


def model_key(size: str, mcfg) -> str:
    """What a MemoryModel was fitted for (its `description`): the size name, compute
    dtype, latent shape, classes, scanned blocks and attention; a model fitted for another
    key does not describe this one."""
    return (f"DiTDH-{size} {mcfg.compute_dtype} latents {mcfg.input_size}x"
            f"{mcfg.input_size}x{mcfg.in_channels} classes {mcfg.num_classes} "
            f"scan {bool(getattr(mcfg, 'scan_blocks', False))} attention "
            f"{mcfg.attention_impl or 'default'}")


def load_model(path: str) -> MemoryModel:
    """A MemoryModel written by `bench plan --fit --model-json` (one-line error if bad)."""
    try:
        with open(path) as f:
            return MemoryModel.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError, TypeError, AttributeError) as e:
        raise PlanError(f"{path}: not a memory model ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------- analytic state

def state_bytes(mcfg, fsdp: int, devices: int, rules=None) -> dict[str, int]:
    """Per-device bytes of params, EMA, Adam mu and nu and the frozen tables of `mcfg` on
    a (devices / fsdp, fsdp) mesh, by the logical sharding the trainer applies (shape-only
    model on an abstract mesh: no devices, no memory)."""
    return _state_bytes_of(_abstract(mcfg, rules), fsdp, devices, rules)


def state_tables(mcfg, devices: int, fsdps: Iterable[int], rules=None):
    """({fsdp: state bytes}, {fsdp: param bytes}) per device for each fsdp size."""
    model = _abstract(mcfg, rules)
    state, params = {}, {}
    for f in fsdps:
        b = _state_bytes_of(model, f, devices, rules)
        state[f], params[f] = b["total"], b["params"]
    return state, params


def _abstract(mcfg, rules):
    from mmfm_jax import parallel
    from mmfm_jax.models.ditdh import abstract_model
    with parallel.axis_rules(rules):
        return abstract_model(mcfg)


def _state_bytes_of(model, fsdp: int, devices: int, rules) -> dict[str, int]:
    from flax import nnx
    from jax.sharding import AbstractMesh, AxisType

    from mmfm_jax import parallel
    from mmfm_jax.models.ditdh import flat_state, state_shardings

    if devices % fsdp:
        raise PlanError(f"fsdp={fsdp} does not divide {devices} devices")
    mesh = AbstractMesh((devices // fsdp, fsdp), parallel.MESH_AXES,
                        axis_types=(AxisType.Auto,) * 2)
    with parallel.axis_rules(rules):
        shardings = flat_state(state_shardings(model, mesh))
    params = frozen = 0
    for path, var in flat_state(model).items():
        shard = shardings[path].get_value().shard_shape(tuple(var.shape))
        nbytes = math.prod(shard) * np.dtype(var.dtype).itemsize
        if isinstance(var, nnx.Param):
            params += nbytes
        else:
            frozen += nbytes
    return {"params": params, "ema": params, "adam_mu": params, "adam_nu": params,
            "frozen": frozen, "total": 4 * params + frozen}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ------------------------------------------------------------------------------------ fit

def fit(measurements: Sequence[Measurement], *, batch_bytes: int, state: Mapping[int, int],
        params: Mapping[int, int], description: str, source: str | None = None,
        validation: Sequence[Measurement] = ()) -> MemoryModel:
    """Least-squares fit of grad_coeff, overhead(remat), per_sample(remat) and, when some
    measurements accumulate, accum_overhead and accum_coeff to compiled steps; needs, per
    remat, two micro-batch sizes, two fsdp sizes overall, and accumulation at two fsdp
    sizes if at all. `validation` steps are predicted, not fitted; their errors are kept."""
    remats = sorted({m.remat for m in measurements})
    for r in remats:
        if len({m.micro_batch for m in measurements if m.remat == r}) < 2:
            raise PlanError(f"memory fit: remat {r!r} needs two micro-batch sizes")
    if len({m.fsdp for m in measurements}) < 2:
        raise PlanError("memory fit: needs compiles at two fsdp sizes")
    accum_fsdps = {m.fsdp for m in measurements if m.grad_accum > 1}
    if len(accum_fsdps) == 1:
        raise PlanError("memory fit: accumulation needs compiles at two fsdp sizes")
    k = len(remats)
    a, b = np.zeros((len(measurements), 3 + 2 * k)), np.zeros(len(measurements))
    for i, m in enumerate(measurements):
        j, accum = remats.index(m.remat), float(m.grad_accum > 1)
        a[i, :3] = m.param_bytes, accum, accum * m.param_bytes
        a[i, 3 + j], a[i, 3 + k + j] = 1.0, m.micro_batch
        b[i] = m.total_bytes - m.state_bytes - batch_bytes * m.per_device_batch
    if not accum_fsdps:
        a[:, 1:3] = 0.0
    coef = np.linalg.lstsq(a, b, rcond=None)[0]
    model = MemoryModel(
        description=description, state=dict(state), params=dict(params),
        batch_bytes=int(batch_bytes), grad_coeff=float(coef[0]),
        accum_overhead=float(coef[1]), accum_coeff=float(coef[2]),
        overhead={r: float(coef[3 + j]) for j, r in enumerate(remats)},
        per_sample={r: float(coef[3 + k + j]) for j, r in enumerate(remats)},
        **({"source": source} if source else {}))
    checks = [_validate(model, m) for m in validation]
    return dataclasses.replace(model, validation=tuple(checks))


MeasureFn = Callable[[int, str, int, int], int]
FIT_FSDPS = (8, 2)  # on FIT_DEVICES devices: two sizes separate sharded from unsharded
FIT_DEVICES = 8
FIT_MICRO_BATCHES = (1, 4)  # per device: two points of the per-sample line


def fit_by_compiling(measure: MeasureFn, mcfg, *, remats: Sequence[str], description: str,
                     devices: int = FIT_DEVICES, fsdps: Sequence[int] = FIT_FSDPS,
                     micro_batches: Sequence[int] = FIT_MICRO_BATCHES, rules=None,
                     source: str | None = None, log=None) -> MemoryModel:
    """Fit a MemoryModel from `measure(fsdp, remat, per_device_batch, grad_accum)` (compiled
    bytes per device of the train step on `devices` devices): every remat at two
    micro-batches on fsdps[0], the first remat also on fsdps[1], and grad_accum=2 on both;
    then held-out checks kept as `validation` (the larger micro-batch on fsdps[1], four
    accumulation steps, accumulation with the last remat)."""
    state, params = state_tables(mcfg, devices, fsdps, rules)
    f1, f2 = fsdps[0], fsdps[1]
    small, large = micro_batches[0], micro_batches[-1]
    first, last = remats[0], remats[-1]
    fit_points = ([(f1, r, b, 1) for r in remats for b in micro_batches]
                  + [(f2, first, small, 1), (f1, first, 2 * large, 2),
                     (f2, first, 2 * small, 2)])
    checks = [(f2, first, large, 1), (f1, first, 2 * large, 4)]
    if last != first:
        checks.append((f1, last, 2 * large, 2))

    def measured(points):
        out = []
        for f, r, b, n in points:
            total = int(measure(f, r, b, n))
            if log:
                log(f"  compiled fsdp={f} remat={r} per-device batch {b} grad_accum {n}: "
                    f"{total / GIB:.2f} GiB")
            out.append(Measurement(f, r, b, n, total, state[f], params[f]))
        return out

    return fit(measured(fit_points), batch_bytes=_batch_bytes(mcfg), state=state,
               params=params, description=description, source=source,
               validation=measured(checks))


def _batch_bytes(mcfg) -> int:
    """float32 latents (S, S, C) and CLS token (C,) of one sample: the step's input."""
    return 4 * (mcfg.input_size * mcfg.input_size * mcfg.in_channels + mcfg.in_channels)


def _validate(model: MemoryModel, m: Measurement) -> dict:
    state = {**model.state, m.fsdp: m.state_bytes}
    params = {**model.params, m.fsdp: m.param_bytes}
    predicted = model.with_tables(state, params).predict(m.fsdp, m.remat, m.per_device_batch,
                                                         m.grad_accum)
    return {"fsdp": m.fsdp, "remat": m.remat, "per_device_batch": m.per_device_batch,
            "grad_accum": m.grad_accum, "compiled_bytes": m.total_bytes,
            "predicted_bytes": predicted, "relative_error": predicted / m.total_bytes - 1}


# ----------------------------------------------------------------------------------- plan

def candidates(model: MemoryModel, *, global_batch: int, devices: int,
               fsdps: Iterable[int] | None = None,
               remats: Iterable[str] | None = None) -> list[Setting]:
    """Every (fsdp, remat, grad_accum) for the batch on `devices`, fastest first."""
    if global_batch < 1 or devices < 1:
        raise PlanError(f"plan: global batch {global_batch} and devices {devices} must be >= 1")
    if global_batch % devices:
        raise PlanError(f"plan: global batch {global_batch} is not divisible by {devices} "
                        "devices (every device takes the same number of rows)")
    per_device = global_batch // devices
    fsdps = sorted(f for f in (fsdps or divisors(devices)) if devices % f == 0)
    missing = [f for f in fsdps if f not in model.state]
    if missing:
        raise PlanError(f"plan: the memory model has no state bytes for fsdp {missing}")
    remats = list(remats or model.remats)
    unknown = [r for r in remats if r not in model.per_sample]
    if unknown:
        raise PlanError(f"plan: remat {unknown[0]!r} is not in the memory model "
                        f"(fitted: {', '.join(model.remats)})")
    out = [Setting(fsdp=f, data=devices // f, remat=r, grad_accum=n,
                   per_device_batch=per_device, micro_batch=per_device // n,
                   predicted_bytes=model.predict(f, r, per_device, n))
           for n in divisors(per_device) for r in remats for f in fsdps]
    return sorted(out, key=lambda s: (s.grad_accum, remat_rank(s.remat), s.fsdp))


def plan(model: MemoryModel, *, global_batch: int, devices: int, device_memory_bytes: float,
         margin: float = DEFAULT_MARGIN, fsdps: Iterable[int] | None = None,
         remats: Iterable[str] | None = None) -> Setting:
    """The fastest setting (module doc: fewest grad_accum, cheapest remat, smallest fsdp)
    whose predicted per-device bytes fit `margin` x `device_memory_bytes`.

    `fsdps` / `remats` restrict the search (a trainer with a fixed mesh and remat passes
    its own, so only grad_accum is chosen). Raises PlanError (one line) when none fits."""
    if not 0 < margin <= 1:
        raise PlanError(f"plan: margin {margin} must be in (0, 1]")
    options = candidates(model, global_batch=global_batch, devices=devices, fsdps=fsdps,
                         remats=remats)
    budget = margin * device_memory_bytes
    for setting in options:
        if setting.predicted_bytes <= budget:
            return setting
    least = min(options, key=lambda s: s.predicted_bytes)
    raise PlanError(
        f"plan: nothing fits {margin:.0%} of {device_memory_bytes / GIB:.1f} GiB per device "
        f"for global batch {global_batch} on {devices} devices; the smallest is "
        f"{least.describe()}")


def choose_grad_accum(model: MemoryModel, mcfg, *, global_batch: int, devices: int,
                      fsdp: int, remat: str, device_memory_bytes: float,
                      margin: float = DEFAULT_MARGIN, rules=None) -> Setting:
    """The trainer's question when config.train.grad_accum=-1: with its mesh (`fsdp` of
    `devices`) and remat fixed, the fewest accumulation steps that fit (`Setting`, whose
    `grad_accum` it uses). `model` is a fitted MemoryModel of `mcfg` (e.g. `load_model`
    of the JSON `bench plan --fit` writes); its state tables are recomputed for this
    mesh. Raises PlanError (one line) when even one sample per micro-batch does not fit."""
    state, params = state_tables(mcfg, devices, [fsdp], rules)
    return plan(model.with_tables(state, params), global_batch=global_batch, devices=devices,
                device_memory_bytes=device_memory_bytes, margin=margin, fsdps=[fsdp],
                remats=[remat])
