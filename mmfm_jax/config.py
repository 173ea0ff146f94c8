"""Config validation: every invalid run stops before any work with one line naming the key."""

import os

import ml_collections

from mmfm_jax import parallel
from mmfm_jax.files import write_json
from mmfm_jax.models import ditdh

STAGES = ("all", "fit_gmm", "train", "sample", "eval", "sweep")


class ConfigError(ValueError):
    """A configuration problem; its message is one line naming the key and the fix."""


def _require_path(cfg, key: str, what: str, fix: str):
    value = cfg
    for part in key.split("."):
        value = value[part]
    if not value:
        raise ConfigError(f"config.{key} is empty: {what} is required for preset "
                          f"{cfg.preset!r}; {fix}")
    if "://" not in str(value) and not os.path.exists(value):
        raise ConfigError(f"config.{key}={value!r} does not exist: {what} not found; {fix}")


def validate(cfg: ml_collections.ConfigDict, stage: str, num_devices: int) -> None:
    """Raise ConfigError for the first problem found (unknown values, paths, divisibility)."""
    if stage not in STAGES:
        raise ConfigError(f"--stage={stage!r} is unknown; choose one of {', '.join(STAGES)}")
    if cfg.source not in ("gmm", "gaussian"):
        raise ConfigError(f"config.source={cfg.source!r} is unknown; use 'gmm' or 'gaussian'")
    if cfg.gmm.assignment not in ("soft", "hard"):
        raise ConfigError(f"config.gmm.assignment={cfg.gmm.assignment!r}; use 'soft' or 'hard'")
    if cfg.train.time_dist not in ("logit-normal", "uniform"):
        raise ConfigError(f"config.train.time_dist={cfg.train.time_dist!r}; "
                          "use 'logit-normal' or 'uniform'")
    if cfg.sample.guidance not in ("none", "autoguidance", "cfg"):
        raise ConfigError(f"config.sample.guidance={cfg.sample.guidance!r}; "
                          "use 'none', 'autoguidance' or 'cfg'")
    policies = tuple(ditdh.COMPUTE_DTYPES)  # "bfloat16" is the autocast-like policy
    for key, allowed in (("model.compute_dtype", policies),
                         ("sample.compute_dtype", policies),
                         ("rae.compute_dtype", ("float32", "bfloat16")),
                         ("sample.state_dtype", ("float32", "bfloat16"))):
        group, name = key.split(".")
        value = cfg[group].get(name, allowed[0])
        if value not in allowed:
            raise ConfigError(f"config.{key}={value!r} is unknown; use one of "
                              f"{', '.join(allowed)}")
    if cfg.mode_conditional and cfg.source != "gmm":
        raise ConfigError("config.mode_conditional=True needs config.source='gmm'")
    for key in ("train.batch_size", "sample.batch_size"):
        batch = cfg[key.split(".")[0]][key.split(".")[1]]
        if batch <= 0 or batch % num_devices:
            raise ConfigError(f"config.{key}={batch} is not divisible by the {num_devices} "
                              f"devices; set --config.{key} to a multiple of {num_devices}")
    _check_grad_accum(cfg, num_devices)
    for axis in parallel.MESH_AXES:
        size = cfg.mesh.get(axis, 1)
        if size != -1 and (size <= 0 or num_devices % size):
            raise ConfigError(f"config.mesh.{axis}={size} does not divide the {num_devices} "
                              "devices; use a divisor or -1 (the rest)")
    _check_rules(cfg.mesh.get("rules", parallel.LOGICAL_AXIS_RULES))
    if cfg.preset == "demo":
        return
    needs_data = stage in ("all", "fit_gmm", "train")
    if needs_data and cfg.data.kind != "latent_cache":
        _require_path(cfg, "data.path", "the ImageNet train split",
                      "pass --config.data.path=/path/to/imagenet/train")
    if needs_data and cfg.data.kind == "latent_cache":
        _require_path(cfg, "data.latent_cache", "the latent cache",
                      "pass --config.data.latent_cache=DIR")
    if cfg.rae.kind == "dinov2" and stage in ("all", "fit_gmm", "train", "sample", "sweep"):
        _require_path(cfg, "rae.path", "the converted RAE (encoder, decoder, statistics)",
                      "run `python -m convert rae ... --out DIR` and pass --config.rae.path=DIR")
    if cfg.sample.guidance == "autoguidance" and stage in ("all", "sample", "sweep"):
        _require_path(cfg, "sample.guide_path", "the DiTDH-S guide for autoguidance",
                      "run `python -m convert ditdh ...` and pass --config.sample.guide_path=DIR")
    if stage in ("all", "eval"):
        _require_path(cfg, "eval.inception_path", "the converted FID Inception",
                      "run `python -m convert inception ...` and pass "
                      "--config.eval.inception_path=DIR")
        _require_path(cfg, "eval.ref_path", "the ADM reference batch",
                      "pass --config.eval.ref_path=VIRTUAL_imagenet256_labeled.npz")


def _check_grad_accum(cfg, num_devices: int) -> None:
    """grad_accum >= 1 dividing the per-device batch, or -1 (chosen by the memory plan when
    the trainer starts: auto_accum.py), whose memory model file must then exist if set."""
    accum, per_device = cfg.train.grad_accum, cfg.train.batch_size // num_devices
    if accum == -1:
        path = cfg.train.get("memory_model", "")
        if path and "://" not in str(path) and not os.path.exists(path):
            raise ConfigError(f"config.train.memory_model={path!r} does not exist: the JSON "
                              "`python -m mmfm_jax.bench plan --fit --model-json PATH` writes")
        return
    if accum < 1 or per_device % accum:
        raise ConfigError(f"config.train.grad_accum={accum} must divide the per-device batch "
                          f"{per_device} (or be -1: chosen by the memory plan)")


def _check_rules(rules) -> None:
    try:
        parallel.normalize_rules(rules)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.mesh.rules: {e}") from None


def save(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Write the resolved config as `<workdir>/config.json` (atomically; gs:// works)."""
    write_json(f"{workdir}/config.json", cfg.to_dict(), indent=2, sort_keys=True,
               default=list)
