"""`config.train.grad_accum=-1`: the trainer asks the memory plan how many micro-batches it needs.

Why: the per-device batch that fits depends on the model, the mesh, the remat policy and
the device, and a run resumed on another topology (elastic resume) has another per-device
batch. With -1 the trainer keeps its mesh and remat and takes the fewest accumulation steps
whose predicted per-device bytes fit (`memory_plan.choose_grad_accum`, from the fitted
memory model `python -m mmfm_jax.bench plan --fit --model-json PATH` writes; an estimate
from XLA:CPU compiles, see memory_plan.py). The device memory is
`config.train.device_memory_gib` when set, else the device's own limit
(`memory_stats()["bytes_limit"]`). Devices that report no limit (CPU) get 1, with a log
line saying why; anything that cannot be resolved is one ConfigError line.
"""

from __future__ import annotations

import logging

from mmfm_jax import memory_plan
from mmfm_jax.config import ConfigError

AUTO = -1


def device_memory_bytes(cfg, device) -> float | None:
    """Per-device memory for the plan: config.train.device_memory_gib if > 0, else the
    device's reported limit, else None (the device reports none, e.g. CPU)."""
    gib = float(cfg.train.get("device_memory_gib", -1.0))
    if gib > 0:
        return gib * memory_plan.GIB
    try:
        stats = device.memory_stats()
    except (RuntimeError, NotImplementedError):  # backends without memory statistics
        stats = None
    limit = (stats or {}).get("bytes_limit")
    return float(limit) if limit else None


def resolve_grad_accum(cfg, mcfg, mesh) -> int:
    """config.train.grad_accum, with -1 replaced by the memory plan's choice for `mesh`
    (fsdp and device count), `mcfg.remat` and the global batch."""
    requested = int(cfg.train.grad_accum)
    if requested != AUTO:
        return requested
    device = mesh.devices.flat[0]
    memory = device_memory_bytes(cfg, device)
    if memory is None:
        logging.info("config.train.grad_accum=-1: %s devices report no memory limit and "
                     "config.train.device_memory_gib is not set, so there is nothing to "
                     "plan against: using grad_accum=1", device.platform)
        return 1
    path = cfg.train.get("memory_model", "")
    if not path:
        raise ConfigError(
            f"config.train.grad_accum=-1 on {device.device_kind} "
            f"({memory / memory_plan.GIB:.1f} GiB per device) needs config.train.memory_model:"
            " the JSON `python -m mmfm_jax.bench plan --fit --model-json PATH` writes for "
            "this model; or set config.train.grad_accum >= 1")
    batch, devices = int(cfg.train.batch_size), int(mesh.size)
    try:
        setting = memory_plan.choose_grad_accum(
            memory_plan.load_model(path), mcfg, global_batch=batch, devices=devices,
            fsdp=int(mesh.shape["fsdp"]), remat=mcfg.remat_policy,
            device_memory_bytes=memory, rules=cfg.mesh.get("rules"))
    except memory_plan.PlanError as e:
        raise ConfigError(f"config.train.grad_accum=-1 (config.train.memory_model={path!r}):"
                          f" {e}") from None
    logging.info("config.train.grad_accum=-1: the memory plan chose grad_accum=%d (%s; "
                 "predicted %.2f GiB of %.2f GiB per device, an estimate from %s)",
                 setting.grad_accum, setting.describe(),
                 setting.predicted_bytes / memory_plan.GIB, memory / memory_plan.GIB, path)
    return setting.grad_accum
