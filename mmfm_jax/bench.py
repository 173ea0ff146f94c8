"""Benchmarks: DiTDH train step and sampling (MFU), GMM EM, Inception; compile and memory plan.

`python -m mmfm_jax.bench {train,sample,gmm,inception,compile,plan} [options] [--json FILE]`
prints a table and writes JSON with the device, the software versions, the settings and
the measured figures. `train` times the production step (`train.Trainer`'s jitted,
donated step, on cached latents with the Gaussian source) and `sample` the production
sampler (`sample_job.Sampler`: the 50-point Euler loop in one program, plain and with
autoguidance). TFLOP/s use the model's analytic count (`DiTDHConfig.flops_per_sample`, a
train step = 3 forwards), checked against XLA's cost analysis; MFU divides by the dense
bf16 peak of the device kind (`metrics.peak_tflops`, null on CPU). `--vs-torch` times the
plain PyTorch DiTDH of benchmarks/torch_ditdh.py (run as upstream runs it, by
`mmfm_jax.bench_torch`) in the same process first, on as many threads as XLA:CPU uses
(both counts recorded), and adds `ratio_vs_reference` = reference time / ours;
`gmm --vs-sklearn` does the same against scikit-learn. `inception` times the FID job's
`evaluate.InceptionNet`; `report` renders JSON files as the README's table.

`compile` lowers and compiles the production train step and sampler from abstract,
sharded state on fake CPU devices (`bench_compile`: nothing is allocated) and prints
compile seconds and XLA's memory analysis per device; `plan` picks the fastest (fsdp,
remat, grad_accum) that fits an accelerator from a memory model fitted to such compiles
(`memory_plan`; CPU-compiled memory is an estimate for accelerators).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax import bench_compile, bench_torch, memory_plan, parallel, sample_job
from mmfm_jax import metrics as metrics_lib
from mmfm_jax import train as train_lib
from mmfm_jax.config_schema import get_base_config
from mmfm_jax.evaluate import InceptionNet
from mmfm_jax.files import write_json
from mmfm_jax.flow import default_shift
from mmfm_jax.models import DiTDH, DiTDHConfig, shard_model
from mmfm_jax.models import inception as inception_lib
from mmfm_jax.models.ditdh import COMPUTE_DTYPES, MODEL_SIZES, abstract_model

# Named sizes plus two small ones for tests and smoke runs (encoder, head).
SIZES = dict(MODEL_SIZES,
             tiny=dict(hidden_size=(32, 48), depth=(2, 1), num_heads=(2, 3)),
             tiny_guide=dict(hidden_size=(16, 32), depth=(1, 1), num_heads=(1, 2)))
GUIDE_SIZE = {"tiny": "tiny_guide", "tiny_guide": "tiny_guide"}  # others: DiTDH-S (MM-FM)
NUM_SAMPLE_STEPS = 50
GUIDANCE_SCALE = 1.5
INCEPTION_IMAGE_SIZE = 256  # ImageNet 256 samples, as the FID job reads them
VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "scikit-learn")


# ------------------------------------------------------------------------------- common

def environment(peak_override: float | None = None) -> dict:
    """Device and software description of this run (no torch import: versions only)."""
    dev = jax.devices()[0]
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"device_kind": dev.device_kind, "platform": dev.platform,
            "num_devices": jax.device_count(), "num_processes": jax.process_count(),
            "host_cpu": _cpu_model(), "host_cpus": os.cpu_count(),
            "python": platform.python_version(), "versions": versions,
            "peak_tflops_per_device": metrics_lib.peak_tflops(peak_override)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def peak_memory() -> dict:
    """Peak bytes: the devices' allocator peak when they report one, else the host RSS."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        return {"peak_memory_bytes": max(int(s["peak_bytes_in_use"]) for s in stats),
                "peak_memory_source": "device"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_memory_bytes": int(rss), "peak_memory_source": "host_rss"}


def xla_flops(compiled) -> float | None:
    """FLOPs per device of a compiled program by XLA's cost analysis (None if unknown).
    While loops (scans) count their body once."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def throughput(flops_per_item: float, items: int, seconds: float, peak: float | None,
               devices: int | None = None) -> dict:
    """images/s, TFLOP/s per device and MFU for `items` processed in `seconds` on `devices`
    (default: all of JAX's)."""
    tflops = flops_per_item * items / seconds / (devices or jax.device_count()) / 1e12
    return {"images_per_sec": items / seconds, "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else None}


def _timed(run, carry, warmup: int, iters: int):
    """Seconds per call of `carry = run(carry)` after `warmup` untimed calls."""
    for _ in range(warmup):
        carry = run(carry)
    jax.block_until_ready(carry)
    t = time.perf_counter()
    for _ in range(iters):
        carry = run(carry)
    jax.block_until_ready(carry)
    return (time.perf_counter() - t) / iters, carry


def model_config(size: str, *, input_size: int, channels: int, num_classes: int,
                 dtype: str = "float32", remat: str | None = None, scan: bool | None = None,
                 attention: str | None = None) -> DiTDHConfig:
    """A DiTDH of a named size; remat / scan only when given (the model's defaults else)."""
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    return DiTDHConfig(input_size=input_size, in_channels=channels,
                       hidden_size=s["hidden_size"], depth=s["depth"],
                       num_heads=s["num_heads"], num_classes=num_classes,
                       compute_dtype=dtype, attention_impl=attention,
                       **bench_compile.model_option_values(remat=remat, scan=scan))


def forward_flops_check(cfg: DiTDHConfig, batch: int = 1) -> dict:
    """Analytic forward FLOPs per sample against XLA's count for one compiled forward
    (abstract weights, one device: nothing is allocated)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    s, c = cfg.input_size, cfg.in_channels
    fwd = jax.jit(lambda st, x, t, y: nnx.merge(graphdef, st)(x, t, y))
    compiled = fwd.lower(state, jax.ShapeDtypeStruct((batch, s, s, c), jnp.float32),
                         jax.ShapeDtypeStruct((batch,), jnp.float32),
                         jax.ShapeDtypeStruct((batch,), jnp.int32)).compile()
    xla = xla_flops(compiled)
    analytic = cfg.flops_per_sample()
    return {"analytic_forward_flops_per_sample": analytic,
            "xla_forward_flops_per_sample": None if xla is None else xla / batch,
            "forward_flops_xla_over_analytic": None if xla is None else xla / batch / analytic}


# -------------------------------------------------------------------------------- train

def run_config(args, batch: int, mesh_sizes: dict | None = None):
    """The run's ConfigDict: production defaults (imagenet256_xl) with the benchmark's model,
    Gaussian source and cached latents (the encoder is not part of the timed step); the
    mesh is (data -1, fsdp --fsdp) unless `mesh_sizes` are given."""
    cfg = get_base_config("gaussian", False, "imagenet256_xl")
    size = SIZES[args.size]
    m = cfg.model
    m.size = args.size
    m.hidden_size, m.depth, m.num_heads = (size["hidden_size"], size["depth"],
                                           size["num_heads"])
    m.input_size, m.in_channels, m.num_classes = args.input_size, args.channels, args.num_classes
    m.compute_dtype = args.dtype
    bench_compile.set_model_options(m, remat=getattr(args, "remat", None),
                                    scan=getattr(args, "scan", None))
    m.attention_impl = args.attention or ""
    cfg.mode_conditional = True  # labels go through the table, as in the class-cond reference
    cfg.gmm.num_components = args.num_classes
    cfg.rae.kind = "identity"
    cfg.data.image_size = args.input_size
    if mesh_sizes is None:
        cfg.mesh.fsdp = args.fsdp
    else:
        cfg.mesh.data, cfg.mesh.fsdp = mesh_sizes["data"], mesh_sizes["fsdp"]
    cfg.train.batch_size = batch
    return cfg


class _TrainProgram:
    """The production step of a Trainer compiled ahead of time at one global batch."""

    def __init__(self, trainer, batch: int, donate: bool):
        self.batch_abstract = bench_compile.abstract_batch(trainer.mesh, trainer.cfg.model,
                                                           batch)
        self.compiled, report = bench_compile.compile_train(trainer, batch, donate=donate)
        self.compile_seconds = report["lower_seconds"] + report["compile_seconds"]
        self._memory = report["memory"]
        self.batch = batch

    def memory(self) -> dict:
        return dict(self._memory)


def auto_batch(trainer, probe: int, donate: bool, memory_bytes: float | None,
               margin: float = 0.9) -> tuple[int, dict]:
    """Largest global batch whose step fits `margin` of device memory, from XLA's memory
    analysis of one probe compile (temp bytes / probe rows per device, an overestimate since
    it includes the batch-independent temporaries), a multiple of 8 rows per device."""
    mesh = trainer.mesh
    if memory_bytes is None:
        stats = jax.local_devices()[0].memory_stats() or {}
        memory_bytes = stats.get("bytes_limit")
    if not memory_bytes:
        raise SystemExit("bench: --batch auto needs the device memory size; this device "
                         "reports none (pass --memory-gb)")
    shards = parallel.num_batch_shards(mesh)
    probe = parallel.shard_batch_size(probe, mesh)
    mem = _TrainProgram(trainer, probe, donate).memory()
    fixed = (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"]
             - mem["alias_size_in_bytes"])
    per_row = mem["temp_size_in_bytes"] / (probe // shards)
    rows = int((margin * memory_bytes - fixed) // per_row) // 8 * 8
    if rows < 1:
        raise SystemExit(f"bench: --batch auto: even 8 rows per device do not fit "
                         f"{memory_bytes / 2**30:.1f} GiB (fixed {fixed / 2**30:.1f} GiB, "
                         f"{per_row / 2**20:.0f} MiB per row)")
    info = {"probe_batch": probe, "probe_memory": mem, "memory_limit_bytes": int(memory_bytes),
            "estimated_bytes_per_row": per_row}
    return rows * shards, info


def bench_train(args, peak: float | None) -> dict:
    batch = args.batch
    if batch == "auto" and args.vs_torch:
        raise SystemExit("bench: --vs-torch compares one configuration; give a fixed --batch")
    cfg = run_config(args, 8 if batch == "auto" else int(batch))
    mesh = parallel.make_mesh(dict(cfg.mesh))
    mcfg = train_lib.model_config(cfg)
    settings = _model_settings(args, mcfg)
    rows = []
    if args.vs_torch:  # first: on a GPU it must release its memory before ours allocates
        rows.append(bench_torch.torch_train(mcfg, parallel.shard_batch_size(int(batch), mesh),
                                            args))
    trainer = train_lib.Trainer.create(cfg, "", mesh)
    extra = {}
    if batch == "auto":
        batch, extra["auto_batch"] = auto_batch(trainer, args.probe_batch, not args.no_donate,
                                                args.memory_gb and args.memory_gb * 2**30)
    batch = parallel.shard_batch_size(int(batch), mesh)
    settings["batch"] = batch
    program = _TrainProgram(trainer, batch, not args.no_donate)
    state = trainer.init()
    rng = np.random.default_rng(0)
    host = {"latents": rng.standard_normal(program.batch_abstract["latents"].shape, np.float32),
            "cls": np.zeros(program.batch_abstract["cls"].shape, np.float32)}
    data = parallel.host_to_global(host, mesh)
    compiled = program.compiled

    def run(carry):
        return compiled(carry[0], trainer.encoder_state, trainer.mixtures, data)

    seconds, (state, metrics) = _timed(run, (state, None), args.warmup, args.steps)
    loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(loss):
        raise SystemExit(f"bench: the train step produced loss {loss}")
    fwd = mcfg.flops_per_sample()
    xla = xla_flops(compiled)
    analytic_step = 3 * fwd * batch
    ours = {"name": "ours", "seconds": seconds, "loss": loss, **_our_threads(),
            **throughput(3 * fwd, batch, seconds, peak)}
    for ref in rows:  # the reference runs on one device
        ref.update(throughput(3 * fwd, ref["batch"], ref["seconds"], peak, devices=1))
    rows.insert(0, ours)
    _add_ratio(rows)
    del state
    flops = {"analytic_forward_flops_per_sample": fwd,
             "analytic_flops_per_step": analytic_step,
             "xla_flops_per_step": None if xla is None else xla * jax.device_count(),
             "step_flops_xla_over_analytic": None if xla is None
             else xla * jax.device_count() / analytic_step}
    return {"settings": settings, "rows": rows, "flops": flops,
            "compile_seconds": program.compile_seconds, "compiled_memory": program.memory(),
            **extra, **peak_memory()}


def _model_settings(args, mcfg: DiTDHConfig) -> dict:
    return {"size": args.size, "input_size": mcfg.input_size, "channels": mcfg.in_channels,
            "num_classes": mcfg.num_classes, "dtype": mcfg.compute_dtype, "remat": mcfg.remat,
            "scan": getattr(mcfg, "scan_blocks", False),
            "attention": mcfg.attention_impl, "fsdp": args.fsdp, "donate": not args.no_donate,
            "warmup": args.warmup, "timed_iterations": args.steps,
            "xla_threads": bench_torch.xla_cpu_threads() if _on_cpu() else None,
            "torch_threads": bench_torch.reference_threads(args) if args.vs_torch else None}


def _on_cpu() -> bool:
    return jax.devices()[0].platform == "cpu"


def _our_threads() -> dict:
    """The thread count of our row on CPU (XLA:CPU's pool), nothing on accelerators."""
    return {"threads": bench_torch.xla_cpu_threads()} if _on_cpu() else {}


def _add_ratio(rows: list[dict]) -> None:
    """`ratio_vs_reference` on our row: the reference's time over ours."""
    ref = [r for r in rows if r["name"] != "ours"]
    if ref:
        rows[0]["ratio_vs_reference"] = ref[0]["seconds"] / rows[0]["seconds"]


# ------------------------------------------------------------------------------- sample

def bench_sample(args, peak: float | None) -> dict:
    """50-point Euler sampling of the production Sampler, without and with autoguidance
    (a DiTDH-S guide, as MM-FM), images/s and MFU from the analytic forward count."""
    mesh = parallel.make_mesh({"data": -1, "fsdp": args.fsdp})
    batch = parallel.shard_batch_size(int(args.batch), mesh)
    mcfg = model_config(args.size, input_size=args.input_size, channels=args.channels,
                        num_classes=args.num_classes, dtype=args.dtype,
                        attention=args.attention, scan=args.scan)
    gcfg = model_config(GUIDE_SIZE.get(args.size, "S"), input_size=args.input_size,
                        channels=args.channels, num_classes=args.num_classes,
                        dtype=args.dtype, attention=args.attention, scan=args.scan)
    settings = _model_settings(args, mcfg)
    del settings["remat"], settings["donate"]
    settings.update(batch=batch, guide_size=GUIDE_SIZE.get(args.size, "S"),
                    num_steps=NUM_SAMPLE_STEPS, guidance_scale=GUIDANCE_SCALE)
    rows = []
    guidances = ("none", "autoguidance") if args.guidance == "both" else (args.guidance,)
    if args.vs_torch:
        for guidance in guidances:
            rows.append(bench_torch.torch_sample(
                mcfg, gcfg if guidance == "autoguidance" else None, batch, args,
                num_steps=NUM_SAMPLE_STEPS, guidance_scale=GUIDANCE_SCALE))
    model = shard_model(DiTDH(mcfg, rngs=nnx.Rngs(0)), mesh)
    guide = (shard_model(DiTDH(gcfg, rngs=nnx.Rngs(1)), mesh)
             if "autoguidance" in guidances else None)
    ours, compile_seconds = [], {}
    evals = NUM_SAMPLE_STEPS - 1
    for guidance in guidances:
        spec = sample_job.SampleSpec(
            latent_shape=(mcfg.input_size, mcfg.input_size, mcfg.in_channels),
            num_steps=NUM_SAMPLE_STEPS,
            shift=default_shift(mcfg.input_size, mcfg.input_size, mcfg.in_channels),
            conditioning="class", guidance=guidance, scale=GUIDANCE_SCALE,
            num_classes=mcfg.num_classes)
        sampler = sample_job.Sampler(model, mesh, spec, batch_size=batch,
                                     guide=guide if guidance == "autoguidance" else None)
        t = time.perf_counter()
        jax.block_until_ready(sampler(0))
        compile_seconds[guidance] = time.perf_counter() - t  # compile and one batch
        seconds, _ = _timed(lambda start, f=sampler: (f(start)[0], start + batch)[1], batch,
                            args.warmup, args.steps)
        fwd = mcfg.flops_per_sample() + (gcfg.flops_per_sample() if guidance ==
                                          "autoguidance" else 0)
        ours.append({"name": f"ours/{guidance}", "seconds": seconds,
                     "flops_per_image": evals * fwd, **_our_threads(),
                     **throughput(evals * fwd, batch, seconds, peak)})
    for row, ref in zip(ours, rows):  # the references ran in the same guidance order
        ref["name"] = "torch/" + row["name"].split("/")[1]
        ref.update(throughput(row["flops_per_image"], batch, ref["seconds"], peak, devices=1))
        row["ratio_vs_reference"] = ref["seconds"] / row["seconds"]
    result = {"settings": settings, "rows": ours + rows,
              "first_call_seconds": compile_seconds, **peak_memory()}
    if args.flops_check:
        result["flops"] = forward_flops_check(mcfg)
    return result


# ------------------------------------------------------------------------ compile, plan

def bench_compile_cmd(args, peak: float | None) -> dict:
    """Lower and compile the production train step and sampler of one setting (or, with
    --compare-scan, of the unscanned and the scanned model) from abstract state."""
    sizes = bench_compile.parse_mesh(args.mesh)
    mesh = bench_compile.mesh_on_first_devices(sizes)
    batch = parallel.shard_batch_size(int(args.batch), mesh)
    if args.compare_scan and not bench_compile.model_options_supported()["scan_blocks"]:
        raise bench_compile.CompileError("bench: --compare-scan: this DiTDH has no scanned "
                                         "blocks yet; compile --no-scan alone")
    programs, state, remat = [], None, None
    for scan in ((False, True) if args.compare_scan else (args.scan,)):
        cfg = run_config(args, batch, mesh_sizes=sizes)
        bench_compile.set_model_options(cfg.model, scan=scan)
        trainer = train_lib.Trainer.create(cfg, "", mesh)
        bench_compile.check_options_applied(trainer.mcfg, remat=args.remat, scan=scan)
        scanned = bool(getattr(trainer.mcfg, "scan_blocks", False))
        _, report = bench_compile.compile_train(trainer, batch)
        programs.append({"program": "train", "scan": scanned, **report})
        if args.sample:
            guide = (model_config(GUIDE_SIZE.get(args.size, "S"), input_size=args.input_size,
                                  channels=args.channels, num_classes=args.num_classes,
                                  dtype=args.dtype, attention=args.attention, scan=scan)
                     if args.guidance == "autoguidance" else None)
            sample_batch = parallel.shard_batch_size(int(args.sample_batch or batch), mesh)
            _, report = bench_compile.compile_sampler(trainer.mcfg, mesh, sample_batch,
                                                      guide_cfg=guide,
                                                      rules=cfg.mesh.get("rules"))
            programs.append({"program": f"sample/{args.guidance}", "scan": scanned,
                             "batch": sample_batch, **report})
        state = bench_compile.state_report(trainer.abstract())
        remat = bench_compile.remat_name(trainer.mcfg)
    settings = {"size": args.size, "batch": batch, "per_device_batch": batch // mesh.size,
                "mesh": sizes, "dtype": args.dtype, "remat": remat,
                "input_size": args.input_size, "channels": args.channels,
                "num_classes": args.num_classes, "attention": args.attention,
                "platform": jax.devices()[0].platform,
                "persistent_cache_dir": jax.config.jax_compilation_cache_dir}
    return {"settings": settings, "rows": [], "programs": programs,
            "analytic_state_per_device": state,
            "live_array_bytes": bench_compile.live_array_bytes(),
            "host_peak_rss_bytes": bench_compile.host_peak_rss_bytes()}


# Targets of the README's memory-plan table: (name, chips, GiB per chip). TPU v5p-N and
# v4-N count TensorCores (2 per chip); v5e-N counts chips.
PLAN_TARGETS = (("8 x H100 80GB", 8, 80.0), ("8 x H200 141GB (140 GiB)", 8, 140.0),
                ("v5p-64 (32 chips x 95 GiB)", 32, 95.0),
                ("v5e-256 (256 chips x 16 GiB)", 256, 16.0),
                ("v4-32 (16 chips x 32 GiB)", 16, 32.0))
MEMORY_MODEL_DIR = bench_torch.REFERENCE.parent  # benchmarks/ of the checkout


def _default_model_json(args) -> str:
    scan = "_scan" if args.scan else ""
    return str(MEMORY_MODEL_DIR / f"memory_model_{args.size}_{args.dtype}{scan}.json")


def memory_model(args, cfg) -> memory_plan.MemoryModel:
    """The fitted memory model of this model configuration: read from --model-json when
    it was fitted for the same configuration, else (or with --fit) fitted now from
    ahead-of-time compiles on 8 CPU devices and written there."""
    mcfg = train_lib.model_config(cfg)
    key = memory_plan.model_key(args.size, mcfg)
    path = args.model_json or _default_model_json(args)
    if not args.fit and os.path.exists(path):
        model = memory_plan.load_model(path)
        if model.description == key:
            return model
        print(f"plan: {path} was fitted for '{model.description}', not '{key}': refitting")
    print(f"plan: fitting the memory model of {key} from ahead-of-time compiles "
          "(XLA:CPU, nothing allocated)", flush=True)

    def measure(fsdp, remat, per_device_batch, grad_accum):
        sizes = {"data": memory_plan.FIT_DEVICES // fsdp, "fsdp": fsdp}
        mem = bench_compile.train_step_memory(cfg, sizes, remat=remat,
                                              per_device_batch=per_device_batch,
                                              grad_accum=grad_accum)
        return mem["peak_bytes_estimate"]

    model = memory_plan.fit_by_compiling(
        measure, mcfg, remats=bench_compile.remat_choices(), description=key,
        rules=cfg.mesh.get("rules"), log=lambda line: print(line, flush=True),
        source=f"XLA:CPU ahead-of-time compiles, jax {jax.__version__} (an estimate "
               "for accelerators)")
    write_json(path, model.to_dict(), indent=2, sort_keys=True)
    print(f"plan: wrote {path}", flush=True)
    return model


def _plan_target(model, mcfg, args, cfg, name: str, devices: int, memory_gib: float) -> dict:
    """The plan of one target, and the best setting without remat beside it."""
    fsdps = args.fsdp_choices or memory_plan.divisors(devices)
    state, params = memory_plan.state_tables(mcfg, devices, fsdps, cfg.mesh.get("rules"))
    model = model.with_tables(state, params)
    row = {"target": name, "devices": devices, "device_memory_gib": memory_gib}

    def best(remats):
        try:
            chosen = memory_plan.plan(model, global_batch=args.global_batch, devices=devices,
                                      device_memory_bytes=memory_gib * memory_plan.GIB,
                                      margin=args.margin, fsdps=fsdps, remats=remats)
        except memory_plan.PlanError as e:
            return {"fits": False, "error": str(e)}
        return {"fits": True, **dataclasses.asdict(chosen),
                "predicted_gib": chosen.predicted_bytes / memory_plan.GIB}

    row.update(best(args.remat_choices))
    if row["fits"] and row["remat"] != "none" and "none" in model.per_sample:
        row["without_remat"] = best(["none"])
    return row


def plan_config(args):
    """The run config `bench plan` models (its mesh is chosen by the plan)."""
    return run_config(args, 8, mesh_sizes={"data": -1, "fsdp": 1})


def bench_plan_cmd(args, peak: float | None) -> dict:
    """The fastest (fsdp, remat, grad_accum) that fits, for one target or the README's."""
    cfg = plan_config(args)
    mcfg = train_lib.model_config(cfg)
    model = memory_model(args, cfg)
    if args.table:
        targets = PLAN_TARGETS
    else:
        memory = args.device_memory or memory_plan.DEVICE_MEMORY_GIB.get(args.device_kind or "")
        if not args.devices or not memory:
            raise SystemExit("bench plan: give --devices and --device-memory GiB (or a known "
                             f"--device-kind: {', '.join(memory_plan.DEVICE_MEMORY_GIB)}), "
                             "or --table")
        targets = ((f"{args.devices} x {args.device_kind or f'{memory:g} GiB'}",
                    args.devices, float(memory)),)
    rows = [_plan_target(model, mcfg, args, cfg, *t) for t in targets]
    if not args.table and not rows[0]["fits"]:
        raise SystemExit(rows[0]["error"])
    settings = {"size": args.size, "dtype": args.dtype, "global_batch": args.global_batch,
                "margin": args.margin, "scan": args.scan}
    return {"settings": settings, "rows": rows, "memory_model": model.to_dict()}


# ---------------------------------------------------------------------- gmm, inception

def bench_gmm_cmd(args, peak: float | None) -> dict:
    """`gmm`: in-memory EM (truncated and dense M-step) against plain matmuls of the same
    shapes and optionally scikit-learn, or with --stream EM over a memory-mapped file
    (mmfm_jax/bench_gmm.py defines every figure). EM runs on one device: TFLOP/s are
    that device's, counted as 8 N K D per dense iteration."""
    from mmfm_jax import bench_gmm as bg
    settings = {"n": args.n, "k": args.k, "d": args.d, "iterations": args.steps}
    if args.stream:
        r = bg.bench_gmm_stream(args.n, args.k, args.d, args.steps, args.chunk_rows,
                                args.memmap, args.gpu_json, print_fn=print)
        row = {"name": "ours/streamed", "seconds": r["seconds_per_iteration"],
               "tflops_per_device": r["effective_tflops"]}
        return {"settings": dict(settings, chunk_rows=args.chunk_rows), "rows": [row],
                "gmm": r, **peak_memory()}
    r = bg.bench_gmm(args.n, args.k, args.d, args.steps, args.vs_sklearn, print_fn=print,
                     dense=not args.no_dense)
    rows = [{"name": "ours", "seconds": r["seconds_per_iteration"],
             "log_likelihood": r["log_likelihood"], "tflops_per_device": r["effective_tflops"]}]
    if args.vs_sklearn:
        rows.append({"name": "sklearn", "seconds": r["sklearn_seconds_per_iteration"],
                     "log_likelihood": r["sklearn_log_likelihood"]})
        rows[0]["ratio_vs_reference"] = r["ratio_vs_reference"]
        rows[0]["log_likelihood_rel_diff"] = r["log_likelihood_rel_diff"]
    keys = ("roofline_fraction", "roofline_fraction_truncated", "roofline_seconds",
            "seconds_per_iteration_dense", "tflops", "matmul_tflops", "ratio_vs_reference",
            "ratio_vs_reference_dense", "load_average")
    return {"settings": settings, "rows": rows, "gmm": r,
            **{k: r[k] for k in keys if k in r}, **peak_memory()}


def bench_inception_cmd(args, peak: float | None) -> dict:
    """Images/s of the FID Inception forward (random weights, uint8 input at
    INCEPTION_IMAGE_SIZE, resized inside), sharded over every device; compile time excluded."""
    precision = None if args.dtype == "bfloat16" else "highest"
    net = InceptionNet(inception_lib.InceptionV3(rngs=nnx.Rngs(0), dtype=jnp.dtype(args.dtype),
                                                 precision=precision))
    batch = net.round_batch(int(args.batch))
    size = INCEPTION_IMAGE_SIZE
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    x = parallel.host_to_global(images[parallel.process_batch_slice(batch)], net.mesh)
    t = time.perf_counter()
    compiled = net.compile(x)
    compile_seconds = time.perf_counter() - t
    seconds, _ = _timed(lambda _: compiled(net.state, x), None, 1, args.steps)
    flops = xla_flops(compiled) or 0.0  # one device's partition
    tflops = flops / seconds / 1e12
    row = {"name": "ours", "seconds": seconds, "images_per_sec": batch / seconds,
           "tflops_per_device": tflops, "mfu": tflops / peak if peak else None}
    return {"settings": {"batch": batch, "image_size": size, "dtype": args.dtype,
                         "precision": precision, "timed_iterations": args.steps},
            "rows": [row], "gflops_per_image_xla": flops * jax.device_count() / batch / 1e9,
            "compile_seconds": compile_seconds, **peak_memory()}


# ---------------------------------------------------------------------------------- CLI

COLUMNS = (("name", "{}"), ("seconds", "{:.4f}"), ("images_per_sec", "{:.2f}"),
           ("tflops_per_device", "{:.3f}"), ("mfu", "{:.1%}"), ("ratio_vs_reference", "{:.2f}x"))


def format_table(result: dict) -> str:
    """One line per measured row plus the device and the FLOP check."""
    env = result["environment"]
    lines = [f"{result['benchmark']} on {env['num_devices']} x {env['device_kind']} "
             f"({env['platform']}), jax {env['versions']['jax']}, settings "
             + json.dumps(result["settings"], sort_keys=True),
             "  ".join(f"{name:>18}" for name, _ in COLUMNS)]
    for row in result["rows"]:
        cells = []
        for name, fmt in COLUMNS:
            value = row.get(name)
            cells.append(f"{'-' if value is None else fmt.format(value):>18}")
        lines.append("  ".join(cells))
    for key in ("flops", "auto_batch"):
        if key in result:
            lines.append(f"{key}: " + json.dumps(result[key], sort_keys=True))
    lines.append(f"peak memory: {result['peak_memory_bytes'] / 2**20:.0f} MiB "
                 f"({result['peak_memory_source']})")
    return "\n".join(lines)


def format_compile(result: dict) -> str:
    """compile: one line per program (seconds, MiB per device), then the analytic state."""
    env, st, mib = result["environment"], result["settings"], 2**20
    lines = [f"compile on {env['num_devices']} x {env['device_kind']} ({env['platform']}), "
             f"jax {env['versions']['jax']}: DiTDH-{st['size']} {st['dtype']}, global batch "
             f"{st['batch']} ({st['per_device_batch']} per device), mesh {st['mesh']}, remat "
             f"{st['remat']}. Memory is XLA:CPU's analysis: an estimate for accelerators.",
             f"{'program':<16}{'scan':>6}{'lower s':>9}{'compile s':>10}{'(cpu s)':>9}"
             f"{'argument':>10}"
             f"{'output':>10}{'alias':>10}{'temp':>10}{'code':>8}{'peak':>10}  (MiB per device)"]
    for p in result["programs"]:
        m = p["memory"]
        cells = [m.get(k, 0) / mib for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                             "alias_size_in_bytes", "temp_size_in_bytes")]
        lines.append(f"{p['program']:<16}{str(p['scan']):>6}{p['lower_seconds']:>9.1f}"
                     f"{p['compile_seconds']:>10.1f}{p['compile_cpu_seconds']:>9.1f}"
                     + "".join(f"{c:>10.1f}" for c in cells)
                     + f"{m.get('generated_code_size_in_bytes', 0) / mib:>8.1f}"
                     f"{m.get('peak_bytes_estimate', 0) / mib:>10.1f}")
    a = result["analytic_state_per_device"]
    lines.append("analytic state per device (MiB, by the applied sharding): " + ", ".join(
        f"{k} {a[k] / mib:.1f}" for k in ("params", "ema", "adam_mu", "adam_nu", "frozen",
                                          "total")))
    lines.append(f"host peak RSS {result['host_peak_rss_bytes'] / 2**30:.2f} GiB, live device "
                 f"arrays {result['live_array_bytes']} bytes")
    return "\n".join(lines)


def format_plan(result: dict) -> str:
    """plan: the chosen setting per target (and the best one without remat), or why
    nothing fits."""
    st = result["settings"]
    lines = [f"memory plan: DiTDH-{st['size']} {st['dtype']}, global batch "
             f"{st['global_batch']}, fill <= {st['margin']:.0%} of device memory; memory "
             "model fitted to XLA:CPU compiles (an estimate for accelerators). Order: fewest "
             "grad_accum, then cheapest remat, then smallest fsdp."]

    def describe(r: dict) -> str:
        return (f"fsdp={r['fsdp']} data={r['data']} remat={r['remat']} grad_accum="
                f"{r['grad_accum']} (micro-batch {r['micro_batch']}/device) "
                f"{r['predicted_gib']:.1f} GiB")

    for row in result["rows"]:
        if not row["fits"]:
            lines.append(f"{row['target']}: {row['error']}")
            continue
        line = f"{row['target']}: {describe(row)} of {row['device_memory_gib']:g}"
        alt = row.get("without_remat")
        if alt:
            line += "; without remat: " + (describe(alt) if alt["fits"] else "none fits")
        lines.append(line)
    return "\n".join(lines)


FORMATTERS = {"compile": format_compile, "plan": format_plan}


REPORT_SETTINGS = ("size", "input_size", "channels", "batch", "dtype", "attention", "remat",
                   "donate", "fsdp", "n", "k", "d", "image_size")


def report(paths: list[str]) -> str:
    """A markdown table of benchmark JSON files (the README's performance table), then the
    commands that produced them."""
    def cell(value, fmt):
        return "-" if value is None else fmt.format(value)

    lines = ["| benchmark | device | settings | run | s / iteration | images/s | "
             "TFLOP/s per device | MFU | reference time / ours |",
             "|---|---|---|---|---|---|---|---|---|"]
    commands = []
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        env, st = r["environment"], r["settings"]
        device = f"{env['num_devices']} x {env['device_kind']}"
        if env["platform"] == "cpu":
            device += f" ({env.get('host_cpu')}, {env['host_cpus']} cores)"
        setting = ", ".join(f"{k} {st[k]}" for k in REPORT_SETTINGS if st.get(k) is not None)
        for row in r["rows"]:
            if "name" not in row:  # compile / plan results have no timed rows
                continue
            name = row["name"] + (f" ({row['threads']} threads)" if row.get("threads") else "")
            lines.append(f"| {r['benchmark']} | {device} | {setting} | {name} | "
                         f"{cell(row.get('seconds'), '{:.4g}')} | "
                         f"{cell(row.get('images_per_sec'), '{:.4g}')} | "
                         f"{cell(row.get('tflops_per_device'), '{:.3g}')} | "
                         f"{cell(row.get('mfu'), '{:.1%}')} | "
                         f"{cell(row.get('ratio_vs_reference'), '{:.2f}x')} |")
        commands.append(f"- `{r['command']}`")
    return "\n".join(lines + ["", "Commands:", ""] + commands)


def _batch(value: str):
    if value == "auto":
        return value
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--batch {value}: must be >= 1 or 'auto'")
    return n


def _common_args(sp, steps: int, warmup: int = 1) -> None:
    """--json, --steps, --warmup, --peak-tflops of every timed benchmark."""
    sp.add_argument("--json", help="write the result here")
    sp.add_argument("--steps", type=int, default=steps, help="timed iterations")
    sp.add_argument("--warmup", type=int, default=warmup, help="untimed iterations")
    sp.add_argument("--peak-tflops", type=float, default=None,
                    help="per-device peak for MFU (default: by device kind)")


def _timed_model_args(sp, batch: str) -> None:
    """The DiTDH train / sample options."""
    _model_shape_args(sp, "S")
    sp.add_argument("--batch", type=_batch, default=batch, help="global batch")
    sp.add_argument("--fsdp", type=int, default=1, help="FSDP mesh axis size")
    sp.add_argument("--no-donate", action="store_true", help="do not donate the state")
    sp.add_argument("--vs-torch", action="store_true",
                    help="also time the PyTorch reference (benchmarks/torch_ditdh.py)")
    sp.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads for the reference (default: the "
                    "threads XLA:CPU uses, so both get the same cores)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmfm_jax.bench",
                                description=__doc__.strip().splitlines()[0])
    sub = p.add_subparsers(dest="benchmark", required=True)

    common, model = _common_args, _timed_model_args

    tr = sub.add_parser("train", help="the jitted train step")
    model(tr, "8")
    tr.add_argument("--remat", nargs="?", const=True, default=None, choices=REMAT_NAMES,
                    help="rematerialise every block (bare: full; or a jax.checkpoint_policies "
                    "name where the model has policies)")
    tr.add_argument("--probe-batch", type=int, default=32,
                    help="--batch auto: the probe compile's global batch")
    tr.add_argument("--memory-gb", type=float, default=None,
                    help="--batch auto: device memory (default: the device's limit)")
    common(tr, steps=5)
    sa = sub.add_parser("sample", help="50-point Euler sampling, plain and autoguidance")
    model(sa, "8")
    sa.add_argument("--guidance", choices=("none", "autoguidance", "both"), default="both")
    sa.add_argument("--no-flops-check", dest="flops_check", action="store_false",
                    help="skip the analytic-vs-XLA forward FLOP check")
    common(sa, steps=2)
    gm = sub.add_parser("gmm", help="diagonal GMM EM seconds per iteration")
    gm.add_argument("--n", type=int, default=20_000)
    gm.add_argument("--k", type=int, default=256)
    gm.add_argument("--d", type=int, default=768)
    gm.add_argument("--vs-sklearn", action="store_true")
    gm.add_argument("--no-dense", action="store_true",
                    help="skip the dense-M-step fit (and so roofline_fraction)")
    gm.add_argument("--stream", action="store_true",
                    help="EM over a memory-mapped file read in chunks: s/iteration, peak RSS")
    gm.add_argument("--chunk-rows", type=int, default=16_384, help="--stream chunk rows")
    gm.add_argument("--memmap", default=None, help="--stream file (default: a temp file)")
    gm.add_argument("--gpu-json", default=None,
                    help="--stream: a GPU `bench gmm --json` file to project ImageNet from")
    common(gm, steps=3, warmup=0)
    gm.add_argument("--iters", dest="steps", type=int, default=argparse.SUPPRESS,
                    help="EM iterations timed (API.md's name for --steps)")
    rep = sub.add_parser("report", help="markdown table of benchmark JSON files")
    rep.add_argument("files", nargs="+")
    inc = sub.add_parser("inception", help="FID Inception features per second")
    inc.add_argument("--batch", type=int, default=16)
    inc.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    common(inc, steps=3)
    _compile_parser(sub)
    _plan_parser(sub)
    return p


REMAT_NAMES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
               "nothing_saveable", "everything_saveable", "checkpoint_dots",
               "checkpoint_dots_with_no_batch_dims")


def _model_shape_args(sp, size: str) -> None:
    """The model and input options every DiTDH benchmark shares."""
    sp.add_argument("--size", default=size, choices=sorted(SIZES))
    sp.add_argument("--input-size", type=int, default=16, help="latent side S")
    sp.add_argument("--channels", type=int, default=768, help="latent channels C")
    sp.add_argument("--num-classes", type=int, default=1000)
    sp.add_argument("--dtype", choices=tuple(COMPUTE_DTYPES), default="bfloat16",
                    help="precision policy: bfloat16 follows torch autocast; bfloat16_all "
                         "casts the streams too")
    sp.add_argument("--attention", choices=("xla", "cudnn"), default=None,
                    help="jax.nn.dot_product_attention implementation (default: JAX's)")
    sp.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                    help="scanned blocks (nnx.scan) or the Python loop (default: the model's)")


def _aot_args(sp) -> None:
    sp.add_argument("--platform", choices=("cpu", "native"), default="cpu",
                    help="cpu: fake CPU devices, as many as needed (default); native: the "
                    "devices JAX finds")
    sp.add_argument("--json", help="write the result here")
    sp.add_argument("--peak-tflops", type=float, default=None, help=argparse.SUPPRESS)


def _compile_parser(sub) -> None:
    co = sub.add_parser("compile", help="ahead-of-time compile of the train step and the "
                        "sampler from abstract state: compile seconds, memory per device")
    _model_shape_args(co, "XL")
    co.add_argument("--batch", type=int, default=8, help="global train batch")
    co.add_argument("--mesh", default="data=1,fsdp=8", help="mesh sizes, e.g. data=1,fsdp=8")
    co.add_argument("--remat", choices=REMAT_NAMES, default=None,
                    help="remat policy (default: the model's)")
    co.add_argument("--compare-scan", action="store_true",
                    help="compile the unscanned and the scanned model in this one process")
    co.add_argument("--no-sample", dest="sample", action="store_false",
                    help="compile only the train step")
    co.add_argument("--sample-batch", type=int, default=None,
                    help="global sampling batch (default: --batch)")
    co.add_argument("--guidance", choices=("none", "autoguidance"), default="none",
                    help="sampler guidance (autoguidance adds a DiTDH-S guide)")
    _aot_args(co)


def _plan_parser(sub) -> None:
    pl = sub.add_parser("plan", help="fastest (fsdp, remat, grad_accum) that fits a device, "
                        "from a memory model fitted to CPU ahead-of-time compiles")
    _model_shape_args(pl, "XL")
    pl.add_argument("--global-batch", type=int, default=1024)
    pl.add_argument("--devices", type=int, default=None, help="accelerator count")
    pl.add_argument("--device-memory", type=float, default=None, help="GiB per device")
    pl.add_argument("--device-kind", default=None,
                    help=f"fills --device-memory: {', '.join(memory_plan.DEVICE_MEMORY_GIB)}")
    pl.add_argument("--margin", type=float, default=memory_plan.DEFAULT_MARGIN,
                    help="fraction of device memory the plan may fill")
    pl.add_argument("--table", action="store_true",
                    help="plan the README targets: 8 x H100, 8 x H200, v5p-64, v5e-256, v4-32")
    pl.add_argument("--fsdp", dest="fsdp_choices", type=int, action="append", default=None,
                    help="restrict fsdp to these sizes (repeatable)")
    pl.add_argument("--remat", dest="remat_choices", choices=REMAT_NAMES, action="append",
                    default=None, help="restrict remat to these policies (repeatable)")
    pl.add_argument("--fit", action="store_true", help="refit the memory model (compiles)")
    pl.add_argument("--model-json", default=None,
                    help="fitted memory model (default: benchmarks/memory_model_SIZE_DTYPE.json)")
    _aot_args(pl)


RUNNERS = {"train": bench_train, "sample": bench_sample, "gmm": bench_gmm_cmd,
           "inception": bench_inception_cmd,
           "compile": bench_compile_cmd, "plan": bench_plan_cmd}


def _prepare_devices(args) -> None:
    """compile / plan run on fake CPU devices, as many as their mesh needs; this must
    happen before anything starts JAX's backend."""
    if args.benchmark not in ("compile", "plan"):
        return
    if args.benchmark == "compile":
        sizes = bench_compile.parse_mesh(args.mesh)
        needed = sizes["data"] * sizes["fsdp"]
    else:
        needed = memory_plan.FIT_DEVICES
    if args.platform == "cpu":
        bench_compile.ensure_cpu_devices(needed)
    elif jax.device_count() < needed:
        raise SystemExit(f"bench: the mesh needs {needed} devices, {jax.device_count()} found")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.benchmark == "report":
        print(report(args.files), flush=True)
        return {}
    if getattr(args, "vs_torch", False):
        # Torch runs first in the same process; JAX must not take the GPU memory up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    _prepare_devices(args)
    parallel.initialize_distributed()
    argv = sys.argv[1:] if argv is None else list(argv)
    result = {"benchmark": args.benchmark,
              "command": "python -m mmfm_jax.bench " + shlex.join(argv),
              "environment": environment(args.peak_tflops),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result.update(RUNNERS[args.benchmark](args, result["environment"]["peak_tflops_per_device"]))
    if jax.process_index() == 0:
        print(FORMATTERS.get(args.benchmark, format_table)(result), flush=True)
        if args.json:
            write_json(args.json, result, indent=2, sort_keys=True)
            print(f"wrote {args.json}", flush=True)
    return result


if __name__ == "__main__":
    main()
