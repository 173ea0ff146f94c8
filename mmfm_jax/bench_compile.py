"""Ahead-of-time compiles of the production train step and sampler, nothing allocated.

Why: a DiTDH-XL run on a pod can fail for memory or spend an hour compiling before it
prints a step; both are knowable on a laptop. `python -m mmfm_jax.bench compile` (and the
memory fit of `bench plan`) lower and compile, from `jax.ShapeDtypeStruct`s that carry
their shardings, exactly the programs production runs:

* the train step: `train.Trainer.create(cfg, ...)`'s jitted, donated `step_fn` (the
  trainer's own step builder and shardings) against `Trainer.abstract()` (the TrainState
  from `jax.eval_shape`) and an abstract cached-latent batch;
* the sampler: the program of `sample_job.Sampler` (the 50-point Euler loop, plain or
  autoguided) against the model's `nnx.eval_shape` state on its parameter shardings.
  `Sampler.__init__` places real weights, so the same jitted program is rebuilt here
  around `sample_job.generate` with the Sampler's output shardings.

Devices are fake CPU devices by default (`ensure_cpu_devices` sets `jax_num_cpu_devices`
before the backend starts, like XLA_FLAGS=--xla_force_host_platform_device_count=N), so
compile time and `compiled.memory_analysis()` are XLA:CPU's: per device argument, output,
alias, temporary and generated-code bytes. CPU-compiled memory is an estimate for
accelerators (see memory_plan.py). `state_report` adds the analytic per-device bytes of
params, EMA and the Adam moments by the sharding actually applied.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm_jax import parallel, sample_job
from mmfm_jax import train as train_lib
from mmfm_jax.flow import default_shift
from mmfm_jax.models import DiTDHConfig
from mmfm_jax.models.ditdh import abstract_model, state_shardings

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes")


class CompileError(SystemExit):
    """A setting this process cannot compile (one line, no traceback)."""


# ------------------------------------------------------------------------------- devices

def ensure_cpu_devices(n: int) -> None:
    """Make at least `n` CPU devices the backend: before JAX starts its backend this sets
    `jax_platforms=cpu` and `jax_num_cpu_devices`; after, it checks the count."""
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", max(int(n), 1))
    except RuntimeError:
        pass  # the backend is already up (tests, a second call): check what it has
    if jax.devices()[0].platform != "cpu" or jax.device_count() < n:
        raise CompileError(f"bench: the mesh needs {n} CPU devices but this process has "
                           f"{jax.device_count()} {jax.devices()[0].platform} devices; run it "
                           "as its own process (`python -m mmfm_jax.bench ...`) or set "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=8' -> {'data': 1, 'fsdp': 8} (one-line error on anything else)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in parallel.MESH_AXES or not value.isdigit() or int(value) < 1:
            raise CompileError(f"bench: --mesh {text!r}: expected e.g. data=1,fsdp=8 (axes "
                               f"{', '.join(parallel.MESH_AXES)}, sizes >= 1)")
        sizes[name] = int(value)
    return {axis: sizes.get(axis, 1) for axis in parallel.MESH_AXES}


def mesh_on_first_devices(sizes: dict[str, int]):
    """A (data, fsdp) mesh on the first data x fsdp devices."""
    n = sizes["data"] * sizes["fsdp"]
    return parallel.make_mesh(sizes, devices=jax.devices()[:n])


# ------------------------------------------------------------------------ model options

def model_options_supported() -> dict[str, bool]:
    """Which run-time options this DiTDH has: `scan_blocks`, and `remat` as a policy name
    (str) rather than on/off (bool)."""
    fields = {f.name: f for f in dataclasses.fields(DiTDHConfig)}
    remat = fields["remat"]
    return {"scan_blocks": "scan_blocks" in fields,
            "remat_policies": "str" in str(remat.type) or isinstance(remat.default, str)}


def remat_choices() -> tuple[str, ...]:
    """Remat settings the model accepts, cheapest first (see memory_plan.remat_rank)."""
    if model_options_supported()["remat_policies"]:
        return ("none", "dots_saveable", "full")
    return ("none", "full")


def model_option_values(*, remat: str | bool | None = None, scan: bool | None = None) -> dict:
    """{remat, scan_blocks} for DiTDHConfig / config.model from --remat / --scan, in the form
    the model takes (a bool stays a bool: True is full remat in every version of the
    model); only the options given. One-line error for what this model cannot do."""
    supported, out = model_options_supported(), {}
    if isinstance(remat, bool):
        out["remat"] = remat
    elif remat is not None:
        if not supported["remat_policies"] and remat not in ("none", "full"):
            raise CompileError(f"bench: --remat {remat}: this DiTDH has only remat on/off "
                               "(none | full)")
        out["remat"] = remat if supported["remat_policies"] else remat == "full"
    if scan is not None:
        if supported["scan_blocks"]:
            out["scan_blocks"] = bool(scan)
        elif scan:
            raise CompileError("bench: --scan: this DiTDH has no scanned blocks "
                               "(DiTDHConfig.scan_blocks does not exist yet)")
    return out


def set_model_options(m, *, remat: str | None = None, scan: bool | None = None) -> None:
    """Write --remat / --scan into a run's config.model (see model_option_values)."""
    for key, value in model_option_values(remat=remat, scan=scan).items():
        with m.ignore_type():  # config.model.remat may still be declared a bool
            m[key] = value


def remat_name(mcfg) -> str:
    """The model's remat setting as a policy name (none | full | a checkpoint policy)."""
    if hasattr(mcfg, "remat_policy"):
        return mcfg.remat_policy
    return remat_label(mcfg.remat)


def remat_label(value: str | bool | None) -> str:
    """A remat option as a policy name: True -> full, False / None -> none."""
    if isinstance(value, bool) or value is None:
        return "full" if value else "none"
    return str(value)


def check_options_applied(mcfg, *, remat: str | None, scan: bool | None) -> None:
    """The model the trainer built must carry the requested options (config pass-through)."""
    if remat is not None and remat_name(mcfg) != remat_label(remat):
        raise CompileError(f"bench: --remat {remat_label(remat)} did not reach the model (it has "
                           f"{remat_name(mcfg)}): model_parts.model_config must pass "
                           "config.model.remat through")
    if scan is not None and bool(getattr(mcfg, "scan_blocks", False)) != scan:
        raise CompileError(f"bench: --scan={scan} did not reach the model: "
                           "model_parts.model_config must pass config.model.scan_blocks through")


# ---------------------------------------------------------------------------- programs

def memory_fields(compiled) -> dict[str, int]:
    """XLA's per-device memory analysis of a compiled program, plus `peak_bytes_estimate`
    = arguments + outputs - aliased + temporaries (the live device bytes of one call)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    out = {k: int(getattr(mem, k, 0) or 0) for k in MEMORY_FIELDS}
    out["peak_bytes_estimate"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                  - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    return out


def lower_and_compile(jitted, *args) -> tuple[object, dict]:
    """(compiled, report) of `jitted` at abstract args: wall and CPU seconds (all threads
    of this process: the honest figure on a shared machine) of lowering and compiling,
    and the memory analysis."""
    wall, cpu = time.perf_counter(), time.process_time()
    lowered = jitted.lower(*args)
    lower = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_ = time.perf_counter() - wall, time.process_time() - cpu
    return compiled, {"lower_seconds": lower[0], "lower_cpu_seconds": lower[1],
                      "compile_seconds": compile_[0], "compile_cpu_seconds": compile_[1],
                      "memory": memory_fields(compiled)}


def abstract_batch(mesh, m, batch: int) -> dict:
    """The cached-latent batch of the train step as sharded ShapeDtypeStructs."""
    shape = (batch, m.input_size, m.input_size, m.in_channels)
    return {"latents": jax.ShapeDtypeStruct(shape, jnp.float32,
                                            sharding=parallel.batch_sharding(mesh, 4)),
            "cls": jax.ShapeDtypeStruct((batch, m.in_channels), jnp.float32,
                                        sharding=parallel.batch_sharding(mesh, 2))}


def compile_train(trainer, batch: int, *, donate: bool = True):
    """(compiled, report) of the Trainer's production step at global `batch`, from the
    abstract TrainState: no parameter is allocated."""
    step = trainer.step_fn if donate else jax.jit(trainer.step_fn.__wrapped__)
    return lower_and_compile(step, trainer.abstract(), trainer.encoder_state,
                             trainer.mixtures, abstract_batch(trainer.mesh, trainer.cfg.model,
                                                              batch))


def abstract_model_state(mcfg: DiTDHConfig, mesh, rules=None):
    """(graphdef, nnx.State of ShapeDtypeStructs on the parameter shardings) of a model as
    the sampling stage loads it (`load_ditdh(mesh=...)` places variables the same way)."""
    with parallel.axis_rules(rules):
        graphdef, state = nnx.split(abstract_model(mcfg))
        shardings = state_shardings(state, mesh)
    return graphdef, jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)


def sampler_program(graphdef, guide_graph, spec: sample_job.SampleSpec, mesh):
    """`sample_job.Sampler`'s jitted program (no decoder, no mixture: latents out)."""
    def program(model_state, guide_state, decode_state, mixture, indices):
        m = nnx.merge(graphdef, model_state)
        g = nnx.merge(guide_graph, guide_state) if guide_graph is not None else None
        return sample_job.generate(m, indices, spec, mixture=mixture, guide=g)

    return jax.jit(program, out_shardings=(parallel.batch_sharding(mesh, 4),
                                           parallel.batch_sharding(mesh, 1)))


def compile_sampler(mcfg: DiTDHConfig, mesh, batch: int, *, guide_cfg: DiTDHConfig | None,
                    num_steps: int = 50, scale: float = 1.5, rules=None):
    """(compiled, report) of the 50-point class-conditional Euler sampler at global
    `batch` (autoguided by `guide_cfg` when given), from abstract weights."""
    s, c = mcfg.input_size, mcfg.in_channels
    spec = sample_job.SampleSpec(
        latent_shape=(s, s, c), num_steps=num_steps, shift=default_shift(s, s, c),
        conditioning="class", guidance="autoguidance" if guide_cfg else "none", scale=scale,
        num_classes=mcfg.num_classes)
    graphdef, state = abstract_model_state(mcfg, mesh, rules)
    guide_graph, guide_state = (abstract_model_state(guide_cfg, mesh, rules) if guide_cfg
                                else (None, None))
    indices = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=parallel.batch_sharding(mesh))
    return lower_and_compile(sampler_program(graphdef, guide_graph, spec, mesh), state,
                             guide_state, None, None, indices)


# --------------------------------------------------------------------- analytic memory

def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its shard shapes)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding else leaf.shape
        total += jnp.dtype(leaf.dtype).itemsize * math.prod(shape)
    return total


def state_report(abstract_state) -> dict[str, int]:
    """Per-device bytes of the TrainState parts by the shardings actually applied:
    params, EMA, Adam mu and nu, frozen tables and the whole state."""
    mu, nu = [], []

    def collect(path, leaf):
        names = {getattr(p, "name", getattr(p, "key", None)) for p in path}
        (mu if "mu" in names else nu if "nu" in names else []).append(leaf)

    jax.tree_util.tree_map_with_path(collect, abstract_state.opt_state)
    return {"params": per_device_bytes(abstract_state.params),
            "ema": per_device_bytes(abstract_state.ema),
            "adam_mu": per_device_bytes(mu), "adam_nu": per_device_bytes(nu),
            "frozen": per_device_bytes(abstract_state.frozen),
            "total": per_device_bytes(abstract_state)}


def host_peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def live_array_bytes() -> int:
    """Bytes of every live jax.Array in this process (0 when nothing was allocated)."""
    return int(sum(a.nbytes for a in jax.live_arrays()))


def train_step_memory(cfg, mesh_sizes: dict[str, int], *, remat: str | None,
                      per_device_batch: int, grad_accum: int = 1) -> dict:
    """Compiled memory of the production step for `cfg` on a (data, fsdp) mesh of the first
    devices at `per_device_batch` rows per device (the memory plan's measurement)."""
    cfg = cfg.copy_and_resolve_references()
    mesh = mesh_on_first_devices(mesh_sizes)
    batch = per_device_batch * mesh.devices.size
    cfg.mesh.data, cfg.mesh.fsdp = mesh_sizes["data"], mesh_sizes["fsdp"]
    cfg.train.batch_size, cfg.train.grad_accum = batch, grad_accum
    set_model_options(cfg.model, remat=remat)
    trainer = train_lib.Trainer.create(cfg, "", mesh)
    check_options_applied(trainer.mcfg, remat=remat, scan=None)
    _, report = compile_train(trainer, batch)
    return report["memory"]
