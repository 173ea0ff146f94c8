"""The guidance sweep (`--stage=sweep`): FID-N over guidance scales and intervals.

Guided FID depends strongly on the scale and on the interval of t where guidance is on,
and a model is reported at its best point, so the sweep measures every point of
config.sweep.scales x config.sweep.intervals (no intervals: config.sample.guidance_interval)
with config.sweep.num_samples samples each. Per point, the sampling stage's loop
(`sample_job.run_sampling`: the same program, shards and merge as `--stage=sample`)
writes `<workdir>/sweep/<point>/samples/`, and the evaluation job's FID
(`fid_scorer.FidScorer`, the Inception and the reference loaded once for all points)
goes to `<workdir>/sweep/<point>/result.json`. The model, guide, mixture and decoder load
once (`sample_job.SamplingParts`). A rerun reuses finished points and resumes an
interrupted one shard by shard; a point whose settings changed (another checkpoint, step
count, sample count) is sampled again. The end: `<workdir>/sweep.json` (every point and
the best), a table on the console and `sweep.png` (FID against scale, one line per
interval).
"""

from __future__ import annotations

import io
import json
import logging
import os

import jax
import ml_collections
from etils import epath

from mmfm_jax import evaluate, files, logs, sample_job
from mmfm_jax.config import ConfigError
from mmfm_jax.fid_scorer import FidScorer, require_eval_paths


def parse_scales(value) -> tuple[float, ...]:
    """config.sweep.scales: "1.0,1.25,1.5" (or a sequence of numbers)."""
    items = [v for v in value.replace(" ", "").split(",") if v] if isinstance(value, str) \
        else list(value)
    try:
        scales = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        scales = ()
    if not scales:
        raise ConfigError(f"config.sweep.scales={value!r}: expected comma-separated guidance "
                          "scales, e.g. --config.sweep.scales=1.0,1.25,1.5,1.75")
    return scales


def parse_intervals(value, default) -> tuple[tuple[float, float], ...]:
    """config.sweep.intervals: "lo:hi,lo:hi" (or pairs); empty: the one `default`."""
    if not value:
        return (tuple(float(v) for v in default),)
    pairs = [p.split(":") for p in value.replace(" ", "").split(",") if p] \
        if isinstance(value, str) else [tuple(p) for p in value]
    out = []
    for pair in pairs:
        try:
            lo, hi = (float(v) for v in pair)
        except (TypeError, ValueError):
            lo = hi = -1.0
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"config.sweep.intervals={value!r}: each interval is lo:hi with "
                              "0 <= lo < hi <= 1, comma-separated, e.g. 0:1,0.1:0.9")
        out.append((lo, hi))
    return tuple(out)


def point_name(scale: float, interval: tuple[float, float]) -> str:
    return f"scale{scale:g}_t{interval[0]:g}-{interval[1]:g}"


def point_config(cfg, scale: float, interval: tuple[float, float]):
    """The run config of one point: its scale, interval and sample count."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.sample.guidance_scale = float(scale)
    c.sample.guidance_interval = tuple(interval)
    c.sample.num_samples = int(cfg.sweep.num_samples)
    return c


def model_source(cfg, workdir: str) -> str:
    """What the sweep samples from, for the reuse check: the model directory or the step
    of the workdir's latest checkpoint."""
    if cfg.sample.model_path:
        return os.path.abspath(cfg.sample.model_path)
    import orbax.checkpoint as ocp

    directory = os.path.join(workdir, "checkpoints")
    return f"{os.path.abspath(directory)} step {max(ocp.utils.checkpoint_steps(directory))}"


def _settings(cfg, source: str) -> dict:
    s = cfg.sample
    settings = {"guidance": s.guidance, "scale": float(s.guidance_scale),
                "interval": [float(v) for v in s.guidance_interval],
                "num_samples": int(s.num_samples), "num_steps": int(s.num_steps),
                "seed": int(s.seed), "state_dtype": str(s.state_dtype),
                "compute_dtype": str(s.compute_dtype), "model": source,
                "guide": os.path.abspath(s.guide_path) if s.guidance == "autoguidance" else None,
                "reference": os.path.abspath(cfg.eval.ref_path)}
    return json.loads(json.dumps(settings))


def _read_json(path: epath.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_point(parts, scorer: FidScorer, cfg_point, point_dir: epath.Path, mesh,
              settings: dict) -> dict:
    """Sample (resuming) and score one point; a finished point with equal settings is
    read back. Samples left by other settings are removed first."""
    name = point_dir.name
    done = _read_json(point_dir / "result.json")
    if done is not None and done.get("settings") == settings:
        logging.info("sweep: %s: reusing %s (FID %.4f)", name, point_dir / "result.json",
                     done["fid"])
        return done
    previous = _read_json(point_dir / "settings.json")
    if jax.process_index() == 0:
        if previous is not None and previous != settings and (point_dir / "samples").exists():
            logging.warning("sweep: %s: the settings changed; sampling it again", name)
            (point_dir / "samples").rmtree()
        files.write_json(point_dir / "settings.json", settings, indent=2, sort_keys=True)
    sample_job.barrier("mmfm_sweep_settings")
    merged = sample_job.run_sampling(parts.sampler(cfg_point, mesh), point_dir / "samples",
                                     settings["num_samples"], png_grid=True)
    score = scorer.score(evaluate.NpzImages(str(merged)), desc=f"inception {name}")
    result = {"name": name, "scale": settings["scale"], "interval": settings["interval"],
              "fid": score["fid"], "sfid": score["sfid"], "num_samples": score["num_samples"],
              "samples": str(merged), "settings": settings}
    if jax.process_index() == 0:
        files.write_json(point_dir / "result.json", result, indent=2, sort_keys=True)
    logging.info("sweep: %s: FID-%d %.4f", name, score["num_samples"], score["fid"])
    return result


def check_inputs(cfg) -> None:
    """The sweep's paths besides the eval job's: the RAE (decoder) and the guide."""
    if cfg.sample.guidance == "none":
        raise ConfigError("config.sample.guidance='none' has no scale to sweep; pass "
                          "--config.sample.guidance=cfg or autoguidance")
    needed = [("rae.path", cfg.rae.path, cfg.rae.kind == "dinov2", "the converted RAE "
               "(its decoder)"), ("sample.guide_path", cfg.sample.guide_path,
                                  cfg.sample.guidance == "autoguidance", "the DiTDH-S guide")]
    for key, value, required, what in needed:
        if required and (not value or ("://" not in value and not os.path.exists(value))):
            raise ConfigError(f"config.{key}={value!r}: {what} is needed by --stage=sweep; "
                              f"pass --config.{key}=DIR (a `python -m convert` output)")
    require_eval_paths(cfg, "--stage=sweep")


def sweep_stage(cfg, workdir: str, mesh) -> dict:
    """`--stage=sweep`: every point, then sweep.json, the console table and sweep.png."""
    check_inputs(cfg)
    scales = parse_scales(cfg.sweep.scales)
    intervals = parse_intervals(cfg.sweep.intervals, cfg.sample.guidance_interval)
    if int(cfg.sweep.num_samples) < 2:
        raise ConfigError(f"config.sweep.num_samples={cfg.sweep.num_samples}: FID needs at "
                          "least 2 samples")
    parts = sample_job.SamplingParts.load(cfg, workdir, mesh)
    source = model_source(cfg, workdir)
    scorer = FidScorer.from_config(cfg, mesh, "--stage=sweep")
    root = epath.Path(workdir) / "sweep"
    grid = [(scale, interval) for interval in intervals for scale in scales]
    points = []
    for i, (scale, interval) in enumerate(grid):
        cfg_point = point_config(cfg, scale, interval)
        logging.info("sweep point %d/%d: guidance %s, scale %g, interval %g-%g", i + 1,
                     len(grid), cfg.sample.guidance, scale, *interval)
        points.append(run_point(parts, scorer, cfg_point, root / point_name(scale, interval),
                                mesh, _settings(cfg_point, source)))
    best = min(points, key=lambda p: p["fid"])
    summary = {"guidance": cfg.sample.guidance, "num_samples": int(cfg.sweep.num_samples),
               "num_steps": int(cfg.sample.num_steps), "model": source,
               "reference": os.path.abspath(cfg.eval.ref_path), "evaluator": evaluate.EVALUATOR,
               "points": points, "best": {k: best[k] for k in ("name", "scale", "interval",
                                                               "fid")}}
    if jax.process_index() == 0:
        files.write_json(epath.Path(workdir) / "sweep.json", summary, indent=2, sort_keys=True)
        write_plot(summary, epath.Path(workdir) / "sweep.png")
        print(format_table(summary), flush=True)
        logging.info("sweep table:\n%s", format_table(summary), extra=logs.FILE_ONLY)
        print(f"wrote {os.path.join(workdir, 'sweep.json')} and sweep.png", flush=True)
    return summary


def format_table(summary: dict) -> str:
    n = summary["num_samples"]
    lines = [f"guidance sweep: {summary['guidance']}, FID-{n}, {summary['num_steps']} "
             "grid points",
             f"{'scale':>8}  {'interval':<11} {'FID':>10} {'sFID':>10}"]
    for p in summary["points"]:
        sfid = "n/a" if p["sfid"] is None else f"{p['sfid']:.4f}"
        interval = f"{p['interval'][0]:g}-{p['interval'][1]:g}"
        mark = "  <- best" if p["name"] == summary["best"]["name"] else ""
        lines.append(f"{p['scale']:>8g}  {interval:<11} {p['fid']:>10.4f} {sfid:>10}{mark}")
    return "\n".join(lines)


def write_plot(summary: dict, path: epath.Path) -> None:
    """FID against guidance scale, one line per interval, the best point starred."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for interval in sorted({tuple(p["interval"]) for p in summary["points"]}):
        rows = sorted((p["scale"], p["fid"]) for p in summary["points"]
                      if tuple(p["interval"]) == interval)
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o",
                label=f"interval [{interval[0]:g}, {interval[1]:g}]")
    best = summary["best"]
    ax.plot([best["scale"]], [best["fid"]], marker="*", markersize=14, color="k",
            linestyle="none", label=f"best: {best['fid']:.3f}")
    ax.set_xlabel("guidance scale")
    ax.set_ylabel(f"FID-{summary['num_samples']}")
    ax.set_title(f"{summary['guidance']} guidance sweep", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    files.write_bytes(path, buf.getvalue())
