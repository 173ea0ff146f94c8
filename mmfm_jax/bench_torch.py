"""The PyTorch side of `python -m mmfm_jax.bench {train,sample} --vs-torch`.

Times the plain PyTorch DiTDH of benchmarks/torch_ditdh.py, run as upstream RAE runs it
(the same train step and Euler loop, bf16 autocast when ours is bf16), in this process
before ours, and releases its memory so JAX can allocate. The reference lives outside the
package and is loaded by path, so the library never imports torch or the benchmarks.

Side by side means the same resources: on CPU torch gets as many threads as XLA:CPU's
thread pool has (`xla_cpu_threads`: the CPUs this process may run on, which is what
XLA sizes its pool by), unless `--torch-threads` says otherwise; both counts go in the
rows (`threads`) and the settings.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import math
import os
import pathlib
import time

from mmfm_jax.flow import default_shift
from mmfm_jax.models import DiTDHConfig
from mmfm_jax.sampling import euler_grid

REFERENCE = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "torch_ditdh.py"


@functools.cache
def reference_class():
    """`TorchDiTDH` from benchmarks/torch_ditdh.py beside the package (a checkout; an
    installed wheel has no benchmarks/), loaded by path so the library never imports it."""
    if not REFERENCE.is_file():
        raise SystemExit(f"bench: --vs-torch needs {REFERENCE}, which only a repository "
                         "checkout has")
    spec = importlib.util.spec_from_file_location("_mmfm_torch_ditdh", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise SystemExit(f"bench: --vs-torch: {REFERENCE} cannot be imported: {e}") from e
    return module.TorchDiTDH


def upstream_params(cfg: DiTDHConfig) -> dict:
    """RAE's `stage_2.params` for `cfg` (what the PyTorch reference is built from)."""
    return {"input_size": cfg.input_size, "patch_size": 1, "in_channels": cfg.in_channels,
            "hidden_size": list(cfg.hidden_size), "depth": list(cfg.depth),
            "num_heads": list(cfg.num_heads), "mlp_ratio": cfg.mlp_ratio,
            "class_dropout_prob": cfg.class_dropout_prob, "num_classes": cfg.num_classes,
            "use_qknorm": False, "use_swiglu": True, "use_rope": True, "use_rmsnorm": True,
            "wo_shift": False}


def xla_cpu_threads() -> int:
    """Threads of XLA:CPU's intra-op pool: the CPUs this process may run on (its affinity
    mask, as tsl's MaxParallelism counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def reference_threads(args) -> int:
    """--torch-threads, else as many threads as XLA:CPU uses (equal resources)."""
    return int(args.torch_threads or xla_cpu_threads())


def _torch_device(threads: int):
    import torch
    torch.set_num_threads(threads)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_model(cfg: DiTDHConfig, device):
    """The plain PyTorch DiTDH of benchmarks/ (upstream module and key names)."""
    return reference_class()(upstream_params(cfg)).to(device)


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


def _reference_row(cfg: DiTDHConfig, batch: int, args, seconds_on) -> dict:
    """The reference's row from `seconds_on(device)`; its memory is released before ours
    allocates."""
    import torch
    device = _torch_device(reference_threads(args))
    seconds = seconds_on(device)
    _torch_release(device)
    return {"name": "torch", "seconds": seconds, "device": str(device),
            "autocast_bf16": cfg.compute_dtype == "bfloat16", "batch": batch,
            "threads": torch.get_num_threads()}


def torch_train(cfg: DiTDHConfig, batch: int, args) -> dict:
    """The reference's train-step row."""
    return _reference_row(cfg, batch, args,
                          lambda device: _torch_train_seconds(cfg, batch, args, device))


def _torch_train_seconds(cfg: DiTDHConfig, batch: int, args, device) -> float:
    """Seconds per step of `torch_train_step`."""
    return _torch_timed(torch_train_step(cfg, batch, device), device, args.warmup, args.steps)


def torch_train_step(cfg: DiTDHConfig, batch: int, device):
    """`step()`: the upstream-style PyTorch step at the same configuration: logit-normal
    shifted t, velocity MSE under bf16 autocast (when our dtype is bf16), backward,
    global-norm clip 1.0, AdamW (0.9, 0.95), per-parameter EMA update."""
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

    return step


def torch_sample(cfg: DiTDHConfig, guide_cfg: DiTDHConfig | None, batch: int, args, *,
                 num_steps: int, guidance_scale: float) -> dict:
    """The reference's sampling row (autoguided when `guide_cfg` is given)."""
    return _reference_row(cfg, batch, args, lambda device: _torch_sample_seconds(
        cfg, guide_cfg, batch, args, device, num_steps, guidance_scale))


def _torch_sample_seconds(cfg: DiTDHConfig, guide_cfg: DiTDHConfig | None, batch: int, args,
                          device, num_steps: int, guidance_scale: float) -> float:
    """Seconds per batch of the upstream Euler loop (num_steps - 1 evaluations,
    autoguidance v_g + w (v - v_g) when a guide is given) under no_grad and bf16 autocast
    as ours."""
    import torch

    model = _torch_model(cfg, device).eval()
    guide = None if guide_cfg is None else _torch_model(guide_cfg, device).eval()
    autocast = cfg.compute_dtype == "bfloat16"
    s, c = cfg.input_size, cfg.in_channels
    grid = [float(v) for v in euler_grid(num_steps, default_shift(s, s, c))]
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
                    v = v_g + guidance_scale * (v - v_g)
            x = x + (t_next - t_cur) * v
        return x

    return _torch_timed(sample, device, min(args.warmup, 1), args.steps)
