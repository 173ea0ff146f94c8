"""Benchmarks: DiTDH train step and sampling (MFU), GMM EM, Inception; optional references.

`python -m mmfm_jax.bench {train,sample,gmm,inception} [options] [--json FILE]` prints a
table and writes JSON with the device, the software versions, the settings and the
measured figures. `train` times the production step (`train.Trainer`'s jitted, donated
step, on cached latents with the Gaussian source) and `sample` the production sampler
(`sample_job.Sampler`: the 50-point Euler loop in one program, plain and with
autoguidance). TFLOP/s use the model's analytic count (`DiTDHConfig.flops_per_sample`, a
train step = 3 forwards), checked against XLA's cost analysis; MFU divides by the dense
bf16 peak of the device kind (null on CPU). `--vs-torch` times the plain PyTorch DiTDH of
the tests (tests/torch_ditdh.py, run as upstream runs it) in the same process first and
adds `ratio_vs_reference` = reference time / ours; `gmm --vs-sklearn` does the same
against scikit-learn.
"""

from __future__ import annotations

import argparse
import gc
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

from mmfm_jax import parallel, sample_job
from mmfm_jax import train as train_lib
from mmfm_jax.config_schema import get_base_config
from mmfm_jax.files import write_json
from mmfm_jax.flow import default_shift
from mmfm_jax.models import DiTDH, DiTDHConfig, shard_model
from mmfm_jax.models.ditdh import MODEL_SIZES, abstract_model

# Named sizes plus two small ones for tests and smoke runs (encoder, head).
SIZES = dict(MODEL_SIZES,
             tiny=dict(hidden_size=(32, 48), depth=(2, 1), num_heads=(2, 3)),
             tiny_guide=dict(hidden_size=(16, 32), depth=(1, 1), num_heads=(1, 2)))
GUIDE_SIZE = {"tiny": "tiny_guide", "tiny_guide": "tiny_guide"}  # others: DiTDH-S (MM-FM)
NUM_SAMPLE_STEPS = 50
GUIDANCE_SCALE = 1.5
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
            "python": platform.python_version(),
            "versions": versions, "peak_tflops_per_device": peak_tflops(peak_override)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def peak_tflops(override: float | None = None) -> float | None:
    """Dense bf16 peak per device (train.PEAK_TFLOPS by device kind); None on CPU."""
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind.lower()
    for name, value in train_lib.PEAK_TFLOPS:
        if name.lower() in kind:
            return value
    return None


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
                 dtype: str = "float32", remat: bool = False,
                 attention: str | None = None) -> DiTDHConfig:
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    return DiTDHConfig(input_size=input_size, in_channels=channels,
                       hidden_size=s["hidden_size"], depth=s["depth"],
                       num_heads=s["num_heads"], num_classes=num_classes,
                       compute_dtype=dtype, remat=remat, attention_impl=attention)


def upstream_params(cfg: DiTDHConfig) -> dict:
    """RAE's `stage_2.params` for `cfg` (what the PyTorch reference is built from)."""
    return {"input_size": cfg.input_size, "patch_size": 1, "in_channels": cfg.in_channels,
            "hidden_size": list(cfg.hidden_size), "depth": list(cfg.depth),
            "num_heads": list(cfg.num_heads), "mlp_ratio": cfg.mlp_ratio,
            "class_dropout_prob": cfg.class_dropout_prob, "num_classes": cfg.num_classes,
            "use_qknorm": False, "use_swiglu": True, "use_rope": True, "use_rmsnorm": True,
            "wo_shift": False}


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


def _round_batch(batch: int, mesh) -> int:
    shards = parallel.num_batch_shards(mesh)
    return max(shards, -(-batch // shards) * shards)


# -------------------------------------------------------------------------------- train

def run_config(args, batch: int):
    """The run's ConfigDict: production defaults (imagenet256_xl) with the benchmark's model,
    Gaussian source and cached latents (the encoder is not part of the timed step)."""
    cfg = get_base_config("gaussian", False, "imagenet256_xl")
    size = SIZES[args.size]
    m = cfg.model
    m.size = args.size
    m.hidden_size, m.depth, m.num_heads = (size["hidden_size"], size["depth"],
                                           size["num_heads"])
    m.input_size, m.in_channels, m.num_classes = args.input_size, args.channels, args.num_classes
    m.compute_dtype, m.remat = args.dtype, bool(args.remat)
    m.attention_impl = args.attention or ""
    cfg.mode_conditional = True  # labels go through the table, as in the class-cond reference
    cfg.gmm.num_components = args.num_classes
    cfg.rae.kind = "identity"
    cfg.data.image_size = args.input_size
    cfg.mesh.fsdp = args.fsdp
    cfg.train.batch_size = batch
    return cfg


class _TrainProgram:
    """The production step of a Trainer compiled ahead of time at one global batch."""

    def __init__(self, trainer, batch: int, donate: bool):
        mesh, m = trainer.mesh, trainer.cfg.model
        shape = (batch, m.input_size, m.input_size, m.in_channels)
        self.batch_abstract = {
            "latents": jax.ShapeDtypeStruct(shape, jnp.float32,
                                            sharding=parallel.batch_sharding(mesh, 4)),
            "cls": jax.ShapeDtypeStruct((batch, m.in_channels), jnp.float32,
                                        sharding=parallel.batch_sharding(mesh, 2))}
        step = trainer.step_fn if donate else jax.jit(trainer.step_fn.__wrapped__)
        t = time.perf_counter()
        self.compiled = step.lower(trainer.abstract(), trainer.encoder_state, trainer.mixtures,
                                   self.batch_abstract).compile()
        self.compile_seconds = time.perf_counter() - t
        self.batch = batch

    def memory(self) -> dict:
        mem = self.compiled.memory_analysis()
        if mem is None:
            return {}
        return {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes",
                                                  "output_size_in_bytes",
                                                  "alias_size_in_bytes", "temp_size_in_bytes")}


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
    probe = _round_batch(probe, mesh)
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
        rows.append(torch_train(mcfg, _round_batch(int(batch), mesh), args))
    trainer = train_lib.Trainer.create(cfg, "", mesh)
    extra = {}
    if batch == "auto":
        batch, extra["auto_batch"] = auto_batch(trainer, args.probe_batch, not args.no_donate,
                                                args.memory_gb and args.memory_gb * 2**30)
    batch = _round_batch(int(batch), mesh)
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
    ours = {"name": "ours", "seconds": seconds, "loss": loss,
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
            "attention": mcfg.attention_impl, "fsdp": args.fsdp, "donate": not args.no_donate,
            "warmup": args.warmup, "timed_iterations": args.steps}


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
    batch = _round_batch(int(args.batch), mesh)
    mcfg = model_config(args.size, input_size=args.input_size, channels=args.channels,
                        num_classes=args.num_classes, dtype=args.dtype,
                        attention=args.attention)
    gcfg = model_config(GUIDE_SIZE.get(args.size, "S"), input_size=args.input_size,
                        channels=args.channels, num_classes=args.num_classes,
                        dtype=args.dtype, attention=args.attention)
    settings = _model_settings(args, mcfg)
    del settings["remat"], settings["donate"]
    settings.update(batch=batch, guide_size=GUIDE_SIZE.get(args.size, "S"),
                    num_steps=NUM_SAMPLE_STEPS, guidance_scale=GUIDANCE_SCALE)
    rows = []
    guidances = ("none", "autoguidance") if args.guidance == "both" else (args.guidance,)
    if args.vs_torch:
        for guidance in guidances:
            rows.append(torch_sample(mcfg, gcfg if guidance == "autoguidance" else None,
                                     batch, args))
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
                     "flops_per_image": evals * fwd,
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


# ---------------------------------------------------------------------- gmm, inception

def bench_gmm_cmd(args, peak: float | None) -> dict:
    from mmfm_jax.bench_gmm import bench_gmm
    r = bench_gmm(args.n, args.k, args.d, args.steps, args.vs_sklearn, print_fn=print)
    # E-step distances and statistics: about 6 N K D flops per iteration (float32 here).
    flops = 6.0 * args.n * args.k * args.d
    rows = [{"name": "ours", "seconds": r["seconds_per_iteration"],
             "log_likelihood": r["log_likelihood"],
             "tflops_per_device": flops / r["seconds_per_iteration"] / jax.device_count() / 1e12}]
    if args.vs_sklearn:
        rows.append({"name": "sklearn", "seconds": r["sklearn_seconds_per_iteration"],
                     "log_likelihood": r["sklearn_log_likelihood"]})
        rows[0]["ratio_vs_reference"] = r["ratio_vs_reference"]
        rows[0]["log_likelihood_rel_diff"] = r["log_likelihood_rel_diff"]
    return {"settings": {"n": args.n, "k": args.k, "d": args.d, "iterations": args.steps},
            "rows": rows, **peak_memory()}


def bench_inception_cmd(args, peak: float | None) -> dict:
    from mmfm_jax.evaluate import bench_inception
    r = bench_inception(int(args.batch), args.steps, dtype=args.dtype,
                        precision=None if args.dtype == "bfloat16" else "highest")
    row = {"name": "ours", "seconds": r["seconds_per_batch"],
           "images_per_sec": r["images_per_sec"], "tflops_per_device": r["tflops_per_device"],
           "mfu": r["tflops_per_device"] / peak if peak else None}
    return {"settings": {"batch": r["batch"], "image_size": r["image_size"],
                         "dtype": r["dtype"], "precision": r["precision"],
                         "timed_iterations": args.steps},
            "rows": [row], "gflops_per_image_xla": r["gflops_per_image"],
            "compile_seconds": r["compile_seconds"], **peak_memory()}


# ------------------------------------------------------------------ PyTorch reference

def _torch_device(threads: int | None = None):
    import torch
    if threads:
        torch.set_num_threads(threads)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_model(cfg: DiTDHConfig, device):
    """The plain PyTorch DiTDH of the tests (upstream module and key names)."""
    try:
        from tests.torch_ditdh import TorchDiTDH
    except ImportError as e:
        raise SystemExit("bench: --vs-torch needs tests/torch_ditdh.py (run from the repository "
                         f"root): {e}") from e
    return TorchDiTDH(upstream_params(cfg)).to(device)


def _torch_sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _torch_release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        import torch
        torch.cuda.empty_cache()


def _torch_timed(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _torch_sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _torch_sync(device)
    return (time.perf_counter() - t) / iters


def torch_train(cfg: DiTDHConfig, batch: int, args) -> dict:
    """The reference's train-step row; its memory is released before ours allocates."""
    import torch
    device = _torch_device(args.torch_threads)
    seconds = _torch_train_seconds(cfg, batch, args, device)
    _torch_release(device)
    return {"name": "torch", "seconds": seconds, "device": str(device),
            "autocast_bf16": cfg.compute_dtype == "bfloat16", "batch": batch,
            "threads": torch.get_num_threads()}


def _torch_train_seconds(cfg: DiTDHConfig, batch: int, args, device) -> float:
    """Seconds per step of the upstream-style PyTorch step at the same configuration:
    logit-normal shifted t, velocity MSE under bf16 autocast (when our dtype is bf16),
    backward, global-norm clip 1.0, AdamW (0.9, 0.95), per-parameter EMA update."""
    import torch
    model = _torch_model(cfg, device).train()
    ema = _torch_model(cfg, device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    autocast = cfg.compute_dtype == "bfloat16"
    s, c = cfg.input_size, cfg.in_channels
    shift = default_shift(s, s, c)
    phi_beta = float(torch.special.ndtr(torch.tensor(math.log(0.999 / 0.001))))
    gen = torch.Generator(device=device).manual_seed(0)
    x1 = torch.randn(batch, c, s, s, device=device, generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device, generator=gen)
    ema_pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters())]

    def step():
        x0 = torch.randn(x1.shape, device=device, generator=gen)
        u = torch.rand(batch, device=device, generator=gen) * phi_beta
        t = torch.sigmoid(torch.special.ndtri(u)).clamp(0, 0.999)
        t = shift * t / (1 + (shift - 1) * t)
        tb = t[:, None, None, None]
        xt, ut = (1 - tb) * x1 + tb * x0, x0 - x1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            pred = model(xt, t, y)
        loss = ((pred.float() - ut) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in ema_pairs:
                e.mul_(0.9995).add_(p.detach(), alpha=1 - 0.9995)

    return _torch_timed(step, device, args.warmup, args.steps)


def torch_sample(cfg: DiTDHConfig, guide_cfg: DiTDHConfig | None, batch: int, args) -> dict:
    """The reference's sampling row; its memory is released before ours allocates."""
    import torch
    device = _torch_device(args.torch_threads)
    seconds = _torch_sample_seconds(cfg, guide_cfg, batch, args, device)
    _torch_release(device)
    return {"name": "torch", "seconds": seconds, "device": str(device),
            "autocast_bf16": cfg.compute_dtype == "bfloat16", "batch": batch,
            "threads": torch.get_num_threads()}


def _torch_sample_seconds(cfg: DiTDHConfig, guide_cfg: DiTDHConfig | None, batch: int, args,
                          device) -> float:
    """Seconds per batch of the upstream Euler loop (49 evaluations, autoguidance
    v_g + w (v - v_g) when a guide is given) under no_grad and bf16 autocast as ours."""
    import torch

    from mmfm_jax.sampling import euler_grid
    model = _torch_model(cfg, device).eval()
    guide = None if guide_cfg is None else _torch_model(guide_cfg, device).eval()
    autocast = cfg.compute_dtype == "bfloat16"
    s, c = cfg.input_size, cfg.in_channels
    grid = [float(v) for v in euler_grid(NUM_SAMPLE_STEPS, default_shift(s, s, c))]
    gen = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn(batch, c, s, s, device=device, generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device, generator=gen)

    @torch.no_grad()
    def sample():
        x = noise
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            t = torch.full((batch,), t_cur, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                v = model(x, t, y).float()
                if guide is not None:
                    v_g = guide(x, t, y).float()
                    v = v_g + GUIDANCE_SCALE * (v - v_g)
            x = x + (t_next - t_cur) * v
        return x

    return _torch_timed(sample, device, min(args.warmup, 1), args.steps)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmfm_jax.bench",
                                description=__doc__.strip().splitlines()[0])
    sub = p.add_subparsers(dest="benchmark", required=True)

    def common(sp, steps: int, warmup: int = 1):
        sp.add_argument("--json", help="write the result here")
        sp.add_argument("--steps", type=int, default=steps, help="timed iterations")
        sp.add_argument("--warmup", type=int, default=warmup, help="untimed iterations")
        sp.add_argument("--peak-tflops", type=float, default=None,
                        help="per-device peak for MFU (default: by device kind)")

    def model(sp, batch: str):
        sp.add_argument("--size", default="S", choices=sorted(SIZES))
        sp.add_argument("--batch", type=_batch, default=batch, help="global batch")
        sp.add_argument("--input-size", type=int, default=16, help="latent side S")
        sp.add_argument("--channels", type=int, default=768, help="latent channels C")
        sp.add_argument("--num-classes", type=int, default=1000)
        sp.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
        sp.add_argument("--attention", choices=("xla", "cudnn"), default=None,
                        help="jax.nn.dot_product_attention implementation (default: JAX's)")
        sp.add_argument("--fsdp", type=int, default=1, help="FSDP mesh axis size")
        sp.add_argument("--no-donate", action="store_true", help="do not donate the state")
        sp.add_argument("--vs-torch", action="store_true",
                        help="also time the PyTorch reference (tests/torch_ditdh.py)")
        sp.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads for the reference (default: torch's)")

    tr = sub.add_parser("train", help="the jitted train step")
    model(tr, "8")
    tr.add_argument("--remat", action="store_true", help="rematerialise every block")
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
    common(gm, steps=3, warmup=0)
    rep = sub.add_parser("report", help="markdown table of benchmark JSON files")
    rep.add_argument("files", nargs="+")
    inc = sub.add_parser("inception", help="FID Inception features per second")
    inc.add_argument("--batch", type=int, default=16)
    inc.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    common(inc, steps=3)
    return p


RUNNERS = {"train": bench_train, "sample": bench_sample, "gmm": bench_gmm_cmd,
           "inception": bench_inception_cmd}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.benchmark == "report":
        print(report(args.files), flush=True)
        return {}
    if getattr(args, "vs_torch", False):
        # Torch runs first in the same process; JAX must not take the GPU memory up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    parallel.initialize_distributed()
    argv = sys.argv[1:] if argv is None else list(argv)
    result = {"benchmark": args.benchmark,
              "command": "python -m mmfm_jax.bench " + shlex.join(argv),
              "environment": environment(args.peak_tflops),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result.update(RUNNERS[args.benchmark](args, result["environment"]["peak_tflops_per_device"]))
    if jax.process_index() == 0:
        print(format_table(result), flush=True)
        if args.json:
            write_json(args.json, result, indent=2, sort_keys=True)
            print(f"wrote {args.json}", flush=True)
    return result


if __name__ == "__main__":
    main()
