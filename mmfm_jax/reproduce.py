"""Reproduce MM-FM's published FID table (REFERENCE.md i.1) from the converted release.

`python -m mmfm_jax.reproduce --models models/ --rows mode-80,mode-80-ag --num-samples 50000
--workdir runs/ [--batch-size N] [--seed 0] [--compute-dtype bfloat16] [--state-dtype float32]`

`models/` is what `python -m convert artifacts` wrote; its `manifest.json` says which
directory holds which checkpoint, guide, RAE, GMM, Inception and reference batch. Each
requested row is one sampling run and one evaluation in `runs/<row>/`, through the very
functions `python -m mmfm_jax.main --stage=sample` and `--stage=eval` call
(`sample_job.sample_stage`, `evaluate.eval_stage`, after `config.validate` and with the
run's config saved as `runs/<row>/config.json`), so a number here is a number of the main
job. A row is resumable: sampling resumes from its shards, and a finished row (its
`eval.json` for the same sample count and reference, its config unchanged) is reused
as is. A row whose workdir holds samples of other settings (seed, dtypes, models) is
refused rather than mixed.

Writes `results.json` (every field of every row) and `results.md` (published FID beside
ours, sFID, IS, precision, recall, NFE, guidance, dtypes, seed, sample count, device,
evaluator). Fewer than 50,000 samples is a smoke run: FID-N is biased upward at small N,
and results.md says these numbers are not comparable to the published FID-50K.

NFE counts velocity evaluations of the ODE: 49 for the 50-point Euler grid. With
autoguidance each of them evaluates the main model and the DiTDH-S guide once on the
same batch, so `network_evaluations` reports 49 + 49.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from mmfm_jax import files

PUBLISHED_EVALUATOR = "guided-diffusion TensorFlow evaluator (ADM), FID-50K"
PUBLISHED_SOURCE = "MM-FM README Results table (REFERENCE.md i.1): bf16 sampling, seed 0"
STEPS_OF_EPOCHS = {20: "25k", 80: "100k"}
AG_SCALE = 1.5
AG_INTERVAL = (0.0, 1.0)
FULL_COUNT = 50_000
NUM_GRID_POINTS = 50  # Euler grid points: 49 velocity evaluations
ROW_FILE = "row.json"  # a row's record, beside its eval.json


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the published table."""

    encoder: str  # dinov2-b | siglip2-b | mae-b
    setting: str  # uncond ("GMM (uncond)") | mode ("GMM + Mode")
    epochs: int  # 20 (25k steps) | 80 (100k steps)
    autoguidance: bool  # DiTDH-S guide of the same setting, scale 1.5
    published_fid: float

    @property
    def name(self) -> str:
        prefix = "" if self.encoder == "dinov2-b" else f"{self.encoder}-"
        return f"{prefix}{self.setting}-{self.epochs}" + ("-ag" if self.autoguidance else "")

    @property
    def steps(self) -> str:
        return STEPS_OF_EPOCHS[self.epochs]

    @property
    def label(self) -> str:
        return {"uncond": "GMM (uncond)", "mode": "GMM + Mode"}[self.setting]


PUBLISHED = (
    Row("dinov2-b", "uncond", 20, False, 4.84), Row("dinov2-b", "uncond", 20, True, 4.03),
    Row("dinov2-b", "uncond", 80, False, 3.84), Row("dinov2-b", "uncond", 80, True, 3.17),
    Row("dinov2-b", "mode", 20, False, 4.77), Row("dinov2-b", "mode", 20, True, 4.07),
    Row("dinov2-b", "mode", 80, False, 3.20), Row("dinov2-b", "mode", 80, True, 2.78),
    Row("siglip2-b", "uncond", 20, False, 8.23), Row("siglip2-b", "mode", 20, False, 7.25),
    Row("mae-b", "uncond", 20, False, 17.03), Row("mae-b", "mode", 20, False, 16.24),
)
ROWS = {row.name: row for row in PUBLISHED}
# Settings that must match between a row's saved config.json and a rerun.
SAMPLING_KEYS = ("mode_conditional", "rae.path", "gmm.path", "sample.model_path",
                 "sample.guide_path", "sample.guidance", "sample.guidance_scale",
                 "sample.guidance_interval", "sample.num_steps", "sample.seed",
                 "sample.compute_dtype", "sample.state_dtype")


class ReproduceError(ValueError):
    """A request that cannot run; the message is one line naming the row, file or flag."""


def parse_rows(text: str) -> list[Row]:
    names = list(ROWS) if text.strip() == "all" else [n.strip() for n in text.split(",")
                                                      if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        raise ReproduceError(f"--rows {text!r}: unknown row(s) {unknown}; choose from "
                             f"{', '.join(ROWS)} or 'all'")
    return [ROWS[n] for n in dict.fromkeys(names)]


# --------------------------------------------------------------------------- the manifest


def read_manifest(models: str) -> dict:
    path = os.path.join(models, "manifest.json")
    if not os.path.exists(path):
        raise ReproduceError(f"{path}: missing; run `python -m convert artifacts --src "
                             f"RELEASE/ ... --out {models}` first")
    with open(path) as f:
        manifest = json.load(f)
    if not isinstance(manifest.get("outputs"), dict):
        raise ReproduceError(f"{path}: not a manifest of `python -m convert artifacts`")
    return manifest


def _find(manifest: dict, models: str, row: Row, what: str, kind: str, **settings) -> dict:
    """The manifest entry of `kind` whose settings match, with its absolute path."""
    for name, entry in sorted(manifest["outputs"].items()):
        st = entry.get("settings", {})
        if entry.get("kind") == kind and all(st.get(k) == v for k, v in settings.items()):
            path = os.path.join(models, name)
            if not os.path.exists(path):
                raise ReproduceError(f"row {row.name}: {path} ({what}) is in the manifest but "
                                     "missing; rerun `python -m convert artifacts`")
            return dict(entry, path=path)
    wanted = ", ".join(f"{k}={v}" for k, v in settings.items())
    raise ReproduceError(f"row {row.name}: no {what} ({kind} with {wanted}) in "
                         f"{os.path.join(models, 'manifest.json')}; is its release file "
                         "present? rerun `python -m convert artifacts`")


def row_artifacts(manifest: dict, models: str, row: Row) -> dict[str, dict]:
    """Every converted directory a row needs, checked against each other."""
    found = {
        "model": _find(manifest, models, row, "checkpoint", "ditdh", role="model",
                       encoder=row.encoder, setting=row.setting, steps=row.steps),
        "rae": _find(manifest, models, row, "RAE", "rae", encoder=row.encoder),
        "gmm": _find(manifest, models, row, "GMM", "gmm", encoder=row.encoder),
        "inception": _find(manifest, models, row, "FID Inception", "inception"),
        "reference": _find(manifest, models, row, "reference batch", "reference"),
    }
    if row.autoguidance:
        found["guide"] = _find(manifest, models, row, "autoguidance guide", "ditdh",
                               role="guide", setting=row.setting)
    _check_consistent(row, found)
    return found


def _check_consistent(row: Row, found: dict[str, dict]) -> None:
    model, gmm = found["model"]["settings"], found["gmm"]["settings"]
    want = row.setting == "mode"
    for part in ("model", "guide"):
        st = found.get(part, {}).get("settings")
        if st is not None and st["use_y_conditioning"] != want:
            raise ReproduceError(f"row {row.name}: {found[part]['path']} was converted with "
                                 f"use_y_conditioning={st['use_y_conditioning']}, but a "
                                 f"{row.label} row needs {want}; reconvert it")
    shape = [model["in_channels"], model["input_size"], model["input_size"]]
    if list(gmm["latent_shape_chw"]) != shape:
        raise ReproduceError(f"row {row.name}: {found['gmm']['path']} has latents "
                             f"{gmm['latent_shape_chw']}, the model {shape} (C, H, W)")
    if want and model["num_classes"] != gmm["num_components"]:
        raise ReproduceError(f"row {row.name}: {found['model']['path']} has "
                             f"{model['num_classes']} mode labels, {found['gmm']['path']} "
                             f"{gmm['num_components']} modes")


# --------------------------------------------------------------------------- one row


def row_config(row: Row, found: dict[str, dict], args, num_devices: int):
    """The main job's config for one row (preset imagenet256_xl, paths from the manifest)."""
    from mmfm_jax import parallel
    from mmfm_jax.config_schema import get_base_config

    cfg = get_base_config(source="gmm", mode_conditional=row.setting == "mode",
                          preset="imagenet256_xl")
    cfg.rae.path = found["rae"]["path"]
    cfg.gmm.path = found["gmm"]["path"]
    cfg.gmm.num_components = found["gmm"]["settings"]["num_components"]
    cfg.model.num_classes = found["model"]["settings"]["num_classes"]
    cfg.sample.model_path = found["model"]["path"]
    cfg.sample.num_samples = args.num_samples
    cfg.sample.batch_size = parallel.round_up(args.batch_size, num_devices)
    cfg.train.batch_size = cfg.sample.batch_size  # unused here; keeps validate's check true
    cfg.sample.num_steps = NUM_GRID_POINTS
    cfg.sample.seed = args.seed
    cfg.sample.compute_dtype = args.compute_dtype
    if "state_dtype" in cfg.sample:
        cfg.sample.state_dtype = args.state_dtype
    elif args.state_dtype != "float32":
        raise ReproduceError(f"--state-dtype {args.state_dtype}: this build has no "
                             "config.sample.state_dtype (the ODE state is float32)")
    if row.autoguidance:
        cfg.sample.guidance = "autoguidance"
        cfg.sample.guidance_scale = AG_SCALE
        cfg.sample.guidance_interval = AG_INTERVAL
        cfg.sample.guide_path = found["guide"]["path"]
    cfg.eval.inception_path = found["inception"]["path"]
    cfg.eval.ref_path = found["reference"]["path"]
    cfg.eval.batch_size = args.eval_batch_size
    return cfg


def _setting(cfg_dict: dict, key: str):
    value = cfg_dict
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return list(value) if isinstance(value, tuple) else value


def check_workdir(cfg, workdir: str) -> None:
    """Refuse a row workdir whose samples were made with other sampling settings."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    now = json.loads(json.dumps(cfg.to_dict(), default=list))
    changed = [k for k in SAMPLING_KEYS if _setting(saved, k) != _setting(now, k)]
    if changed:
        key = changed[0]
        raise ReproduceError(f"{workdir} was sampled with {key}={_setting(saved, key)!r}, "
                             f"this run uses {_setting(now, key)!r}; use another --workdir "
                             "or remove that folder")


def finished_eval(cfg, workdir: str) -> dict | None:
    """The row's eval.json when it is for this sample count and reference batch."""
    path = os.path.join(workdir, "eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    samples = os.path.abspath(os.path.join(workdir, "samples",
                                           f"samples_{cfg.sample.num_samples}.npz"))
    same = (result.get("num_samples") == cfg.sample.num_samples
            and result.get("samples") == samples
            and result.get("reference") == os.path.abspath(cfg.eval.ref_path))
    return result if same else None


def _say(text: str) -> None:
    """Console lines from process 0 only."""
    import jax

    if jax.process_index() == 0:
        print(text, flush=True)


def _saved_timings(workdir: str) -> dict:
    """The sampling and evaluation seconds of the run that made a reused eval.json."""
    path = os.path.join(workdir, ROW_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    return {k: saved[k] for k in ("sample_seconds", "eval_seconds") if k in saved}


def run_row(row: Row, cfg, workdir: str) -> tuple[dict, dict]:
    """Sample and evaluate one row through the main job's stage functions; (eval result,
    timings). A finished row is reused."""
    import jax

    from mmfm_jax import config as config_lib
    from mmfm_jax import parallel
    from mmfm_jax.evaluate import eval_stage
    from mmfm_jax.sample_job import sample_stage

    check_workdir(cfg, workdir)
    result = finished_eval(cfg, workdir)
    if result is not None:
        _say(f"row {row.name}: reusing {os.path.join(workdir, 'eval.json')}")
        return result, {**_saved_timings(workdir), "reused": True}
    for stage in ("sample", "eval"):
        config_lib.validate(cfg, stage, jax.device_count())
    if jax.process_index() == 0:
        config_lib.save(cfg, workdir)
    mesh = parallel.make_mesh(cfg.mesh)
    timings = {"reused": False}
    with jax.set_mesh(mesh), parallel.axis_rules(cfg.mesh.rules):
        t0 = time.perf_counter()
        sample_stage(cfg, workdir, mesh)
        timings["sample_seconds"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        result = eval_stage(cfg, workdir, mesh)
        timings["eval_seconds"] = round(time.perf_counter() - t0, 2)
    return result, timings


# --------------------------------------------------------------------------- results


def device_info() -> dict:
    import jax

    return {"device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "device_count": jax.device_count(), "process_count": jax.process_count()}


def row_record(row: Row, cfg, found: dict, result: dict, timings: dict, workdir: str) -> dict:
    """Every reported field of one row."""
    nfe = cfg.sample.num_steps - 1
    model = found["model"]
    return {
        "row": row.name, "encoder": row.encoder, "setting": row.label, "epochs": row.epochs,
        "checkpoint": os.path.basename(model["sources"][0]["path"]),
        "checkpoint_sha256": model["sources"][0]["sha256"],
        "autoguidance": row.autoguidance,
        "guide": (os.path.basename(found["guide"]["sources"][0]["path"])
                  if row.autoguidance else None),
        "guidance_scale": AG_SCALE if row.autoguidance else None,
        "guidance_interval": list(AG_INTERVAL) if row.autoguidance else None,
        "published_fid": row.published_fid, "fid": result["fid"],
        "fid_minus_published": result["fid"] - row.published_fid,
        "sfid": result["sfid"], "inception_score": result["inception_score"],
        "precision": result["precision"], "recall": result["recall"],
        "nfe": nfe, "network_evaluations": {"model": nfe,
                                            "guide": nfe if row.autoguidance else 0},
        "num_samples": result["num_samples"],
        "comparable_to_published": result["num_samples"] >= FULL_COUNT,
        "seed": cfg.sample.seed, "compute_dtype": cfg.sample.compute_dtype,
        "state_dtype": cfg.sample.get("state_dtype", "float32"),
        "conditioning": "mode" if row.setting == "mode" else "none",
        "evaluator": result["evaluator"], "fid_method": result.get("fid_method"),
        "reference": result["reference"],
        "reference_moments": result.get("reference_moments"),
        "workdir": os.path.abspath(workdir),
        **device_info(), **timings,
    }


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_markdown(records: list[dict], num_samples: int) -> str:
    """The results table, published beside ours, with the run's settings."""
    first = records[0]
    lines = ["# MM-FM published table: reproduction", ""]
    if num_samples < FULL_COUNT:
        lines += [f"**Smoke run: {num_samples} samples per row. FID-{num_samples} is biased "
                  "upward at small sample counts; these numbers are NOT comparable to the "
                  "published FID-50K.**", ""]
    lines += [
        f"- ours: {first['evaluator']}, FID by {first['fid_method']}",
        f"- published: {PUBLISHED_EVALUATOR}; {PUBLISHED_SOURCE}",
        f"- device: {first['device_count']} x {first['device_kind']} ({first['platform']}), "
        f"{first['process_count']} process(es)",
        f"- sampling: {NUM_GRID_POINTS}-point Euler grid, compute dtype "
        f"{first['compute_dtype']}, ODE state {first['state_dtype']}, seed {first['seed']}, "
        f"{num_samples} samples per row", "",
        "| row | encoder | setting | epochs | AG (scale, interval) | NFE | published FID | "
        "our FID | sFID | IS | precision | recall | samples |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ag = (f"yes ({r['guidance_scale']}, {tuple(r['guidance_interval'])})"
              if r["autoguidance"] else "-")
        nfe = f"{r['nfe']} + {r['network_evaluations']['guide']} guide" \
            if r["autoguidance"] else str(r["nfe"])
        lines.append(f"| {r['row']} | {r['encoder']} | {r['setting']} | {r['epochs']} | {ag} "
                     f"| {nfe} | {_fmt(r['published_fid'])} | {_fmt(r['fid'], 3)} | "
                     f"{_fmt(r['sfid'], 3)} | {_fmt(r['inception_score'])} | "
                     f"{_fmt(r['precision'], 4)} | {_fmt(r['recall'], 4)} | "
                     f"{r['num_samples']} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, records: list[dict], num_samples: int) -> None:
    import jax

    if jax.process_index() != 0:
        return
    summary = {"rows": records, "num_samples": num_samples,
               "comparable_to_published": num_samples >= FULL_COUNT,
               "published_evaluator": PUBLISHED_EVALUATOR, "published_source": PUBLISHED_SOURCE}
    files.write_json(os.path.join(out_dir, "results.json"), summary, indent=2, sort_keys=True)
    files.write_bytes(os.path.join(out_dir, "results.md"),
                      results_markdown(records, num_samples).encode())


# --------------------------------------------------------------------------- CLI


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m mmfm_jax.reproduce", description=__doc__.strip().splitlines()[0],
        epilog="rows (published FID): " + ", ".join(f"{r.name} ({r.published_fid:.2f})"
                                                    for r in PUBLISHED))
    parser.add_argument("--models", required=True,
                        help="output folder of `python -m convert artifacts` (manifest.json)")
    parser.add_argument("--rows", required=True,
                        help="comma-separated row names (see below) or 'all'")
    parser.add_argument("--num-samples", type=int, default=FULL_COUNT,
                        help="samples per row (50000 = FID-50K; e.g. 1000 for a smoke run)")
    parser.add_argument("--workdir", required=True, help="one subfolder per row")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="global sampling batch (rounded up to the device count)")
    parser.add_argument("--eval-batch-size", type=int, default=200, help="Inception batch")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (published: 0)")
    parser.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="DiTDH compute dtype (published: bf16 autocast)")
    parser.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="ODE state dtype (upstream's bf16 run kept it in bfloat16)")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2 (FID needs two samples)")
    return args


def reproduce(args) -> list[dict]:
    import jax

    rows = parse_rows(args.rows)
    manifest = read_manifest(args.models)
    models = os.path.abspath(args.models)
    plans = [(row, row_artifacts(manifest, models, row)) for row in rows]  # fail fast
    records = []
    for row, found in plans:
        cfg = row_config(row, found, args, jax.device_count())
        workdir = os.path.join(args.workdir, row.name)
        _say(f"row {row.name}: {row.label}, {row.epochs} epochs"
             + (", autoguidance 1.5" if row.autoguidance else "")
             + f"; published FID {row.published_fid}")
        result, timings = run_row(row, cfg, workdir)
        records.append(row_record(row, cfg, found, result, timings, workdir))
        if jax.process_index() == 0:
            files.write_json(os.path.join(workdir, ROW_FILE), records[-1], indent=2,
                             sort_keys=True)
        write_results(args.workdir, records, args.num_samples)  # after every row
    return records


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mmfm_jax import parallel

    parallel.initialize_distributed()
    try:
        records = reproduce(args)
    except (ValueError, FileNotFoundError) as e:
        # Input errors (missing files, configs, shapes) are one line; other ValueErrors
        # are bugs and keep their traceback.
        if not (isinstance(e, (FileNotFoundError, ReproduceError))
                or type(e).__module__.startswith("mmfm_jax")):
            raise
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    _say(results_markdown(records, args.num_samples))
    _say(f"wrote {os.path.join(args.workdir, 'results.md')} and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
