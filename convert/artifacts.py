"""MM-FM's whole release folder -> every converted model directory, in one command.

`python -m convert artifacts --src artifacts/ --encoder dinov2-b=PATH [--encoder mae-b=PATH]
--inception FILE --out models/ [--jobs N] [--verify]`

A user who downloaded `luo00042/mm-fm` (REFERENCE.md g.9) would otherwise type four
converters per model with the right paths. This finds what the release layout holds,
converts it with the per-artifact converters (the same code as `python -m convert ditdh |
rae | gmm | inception`) and writes `OUT/manifest.json`, which `mmfm_jax.reproduce` reads:

* checkpoints/<enc>/{uncond,mode}-gmm-{25k,100k}.pt -> <enc>/{uncond,mode}-gmm-{25k,100k}
* checkpoints/autoguidance/dit-s-{uncond,mode}-gmm-25k.pt
  -> autoguidance/dit-s-{uncond,mode}-gmm-25k
* decoders/<enc>/ViTXL_n08/model.pt [+ config.json], normalization_stats/<enc>/stat.pt and
  --encoder <enc>=DIR -> <enc>/rae
* gmm/<enc>/gmm_n{K}_*.pkl + spatial_gmm_from_cls_n{K}_*.pkl -> <enc>/gmm
  (<enc>/gmm-{K} when the folder holds several K)
* fid_reference/VIRTUAL_imagenet256_labeled.npz -> fid_reference.npz (a hard link, else a
  copy)
* --inception FILE (pytorch-fid's pt_inception-2015-12-05 weights) -> inception

<enc> is dinov2-b, siglip2-b or mae-b. The conditioning of every checkpoint is read from
its training dict and its release name (`convert.conditioning`). The GMM's latent shape
comes from the shape of the encoder's `stat.pt`. A decoder other than the released ViT-XL needs its
ViTMAEConfig as `config.json` beside `model.pt` (for the head count).

Independent outputs convert in a process pool (`--jobs`, default: the CPU count, capped so
that the largest checkpoint fits in the available memory that many times: torch.load of a
13 GB training dict is CPU- and memory-bound). Each finished output is recorded in the
manifest at once (atomic write): its source files (path, size, sha256, mtime), the options
it was converted with and its settings (conditioning, weights, sizes, encoder). A rerun
skips an output whose directory exists and whose entry matches the sources' size and
sha256 (re-hashed only when a file's size or mtime changed, or always with `--verify`).
What is absent is skipped with one line each; every error names the file, and the other
outputs still convert.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import time

from convert.common import ConversionError

ENCODERS = ("dinov2-b", "siglip2-b", "mae-b")
SETTINGS = ("uncond", "mode")
STEPS_EPOCHS = {"25k": 20, "100k": 80}  # 1251 steps per epoch at batch 1024
GUIDE_ENCODER = "dinov2-b"  # the released DiTDH-S guides are DINOv2-B models
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mmfm_jax.artifacts"
REFERENCE_NAME = "fid_reference/VIRTUAL_imagenet256_labeled.npz"


@dataclasses.dataclass(frozen=True)
class Job:
    """One output: what to run, on which files, with which options."""

    output: str  # relative to --out, e.g. "dinov2-b/mode-gmm-100k"
    kind: str  # ditdh | rae | gmm | inception | reference
    sources: tuple[str, ...]  # absolute paths of the files read
    options: dict = dataclasses.field(default_factory=dict)  # passed on; part of the entry
    info: dict = dataclasses.field(default_factory=dict)  # role/encoder/...: settings


def add_arguments(parser) -> None:
    parser.add_argument("--src", required=True, help="the release folder (luo00042/mm-fm)")
    parser.add_argument("--out", required=True, help="output folder (models/)")
    parser.add_argument("--encoder", action="append", default=[], metavar="NAME=DIR",
                        help=f"Hugging Face encoder folder per encoder ({', '.join(ENCODERS)})"
                             "; repeat for several; needed for that encoder's RAE")
    parser.add_argument("--inception", default=None,
                        help="pytorch-fid's pt_inception-2015-12-05-*.pth (FID Inception)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel conversions (default: CPUs, capped by memory)")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every source even when its size and mtime are unchanged")


# --------------------------------------------------------------------------- planning


def parse_encoders(values: list[str]) -> dict[str, str]:
    encoders = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or name not in ENCODERS:
            raise ConversionError(f"--encoder {value!r}: expected NAME=DIR with NAME one of "
                                  f"{', '.join(ENCODERS)}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConversionError(f"--encoder {name}={path}: {path} is not a Hugging Face "
                                  "model folder (no config.json)")
        encoders[name] = os.path.abspath(path)
    return encoders


def _rel(src: str, path: str) -> str:
    return os.path.relpath(path, src)


def plan_checkpoints(src: str) -> tuple[list[Job], list[str]]:
    """The DiTDH checkpoints of the release (main models and guides)."""
    jobs, notes = [], []
    for enc in ENCODERS:
        folder = os.path.join(src, "checkpoints", enc)
        if not os.path.isdir(folder):
            notes.append(f"skip checkpoints/{enc}/: absent")
            continue
        for setting in SETTINGS:
            for steps, epochs in STEPS_EPOCHS.items():
                name = f"{setting}-gmm-{steps}"
                path = os.path.join(folder, name + ".pt")
                if not os.path.isfile(path):
                    notes.append(f"skip {_rel(src, path)}: absent")
                    continue
                jobs.append(Job(f"{enc}/{name}", "ditdh", (path,), info=dict(
                    role="model", encoder=enc, setting=setting, steps=steps, epochs=epochs)))
    for setting in SETTINGS:
        name = f"dit-s-{setting}-gmm-25k"
        path = os.path.join(src, "checkpoints", "autoguidance", name + ".pt")
        if not os.path.isfile(path):
            notes.append(f"skip {_rel(src, path)}: absent")
            continue
        jobs.append(Job(f"autoguidance/{name}", "ditdh", (path,), info=dict(
            role="guide", encoder=GUIDE_ENCODER, setting=setting, steps="25k", epochs=20)))
    return jobs, notes


def _encoder_files(folder: str) -> tuple[str, ...]:
    return tuple(sorted(p for p in glob.glob(os.path.join(folder, "*")) if os.path.isfile(p)))


def _latent_shape(stats_path: str) -> list[int]:
    """C, H, W of the encoder's latents: the shape of its normalisation variance."""
    from convert.rae import read_stats

    var = read_stats(stats_path)["var"]
    if var is None or var.ndim != 3:
        raise ConversionError(f"{stats_path}: 'var' has shape "
                              f"{None if var is None else var.shape}, expected (C, H, W)")
    return [int(v) for v in var.shape]


def _gmm_pairs(folder: str) -> dict[int, tuple[str, str | None]]:
    """K -> (CLS pickle, spatial pickle or None) of one encoder's gmm/ folder."""
    pairs: dict[int, list] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.pkl"))):
        name = os.path.basename(path)
        match = re.search(r"_n(\d+)_", name)
        if not match:
            continue
        slot = 1 if name.startswith("spatial_gmm_from_cls") else 0
        pairs.setdefault(int(match.group(1)), [None, None])[slot] = path
    return {k: (v[0], v[1]) for k, v in pairs.items()}


def plan_gmm(src: str, enc: str) -> tuple[list[Job], list[str]]:
    folder = os.path.join(src, "gmm", enc)
    if not os.path.isdir(folder):
        return [], [f"skip gmm/{enc}/: absent"]
    stats = os.path.join(src, "normalization_stats", enc, "stat.pt")
    pairs = _gmm_pairs(folder)
    if not pairs:
        return [], [f"skip gmm/{enc}/: no gmm_n{{K}}_*.pkl pickles"]
    if not os.path.isfile(stats):
        return [], [f"skip gmm/{enc}/: needs {_rel(src, stats)} for the latent shape"]
    jobs, notes = [], []
    for k, (cls_path, spatial_path) in sorted(pairs.items()):
        if cls_path is None or spatial_path is None:
            have = _rel(src, cls_path or spatial_path)
            notes.append(f"skip gmm/{enc}/ K={k}: only {have}; both the CLS and the spatial "
                         "pickle are needed")
            continue
        output = f"{enc}/gmm" if len(pairs) == 1 else f"{enc}/gmm-{k}"
        jobs.append(Job(output, "gmm", (cls_path, spatial_path, stats),
                        info=dict(encoder=enc, num_components=k)))
    return jobs, notes


def plan_rae(src: str, enc: str, encoder_dir: str | None) -> tuple[list[Job], list[str]]:
    decoder = os.path.join(src, "decoders", enc, "ViTXL_n08", "model.pt")
    stats = os.path.join(src, "normalization_stats", enc, "stat.pt")
    missing = [_rel(src, p) for p in (decoder, stats) if not os.path.isfile(p)]
    if len(missing) == 2:
        return [], [f"skip {enc}/rae: decoders/{enc}/ and normalization_stats/{enc}/ absent"]
    if missing:
        return [], [f"skip {enc}/rae: {missing[0]} absent"]
    if encoder_dir is None:
        return [], [f"skip {enc}/rae: no --encoder {enc}=DIR given (the Hugging Face folder)"]
    decoder_config = os.path.join(os.path.dirname(decoder), "config.json")
    has_config = os.path.isfile(decoder_config)
    sources = (decoder, stats) + ((decoder_config,) if has_config else ())
    return [Job(f"{enc}/rae", "rae", sources + _encoder_files(encoder_dir),
                options={"encoder_dir": encoder_dir,
                         "decoder_config": decoder_config if has_config else None},
                info=dict(encoder=enc))], []


def plan_shared(src: str, inception: str | None) -> tuple[list[Job], list[str]]:
    jobs, notes = [], []
    reference = os.path.join(src, REFERENCE_NAME)
    if os.path.isfile(reference):
        jobs.append(Job("fid_reference.npz", "reference", (reference,)))
    else:
        notes.append(f"skip fid_reference.npz: {REFERENCE_NAME} absent")
    if inception is None:
        notes.append("skip inception: no --inception FILE given (pt_inception-2015-12-05)")
    elif not os.path.isfile(inception):
        raise ConversionError(f"--inception {inception}: no such file")
    else:
        jobs.append(Job("inception", "inception", (os.path.abspath(inception),)))
    return jobs, notes


def plan(src: str, encoders: dict[str, str], inception: str | None
         ) -> tuple[list[Job], list[str]]:
    """Every output the release folder (and the user's files) allow, and what is skipped."""
    if not os.path.isdir(src):
        raise ConversionError(f"--src {src}: no such folder")
    src = os.path.abspath(src)
    jobs, notes = plan_checkpoints(src)
    for enc in ENCODERS:
        for part_jobs, part_notes in (plan_rae(src, enc, encoders.get(enc)),
                                      plan_gmm(src, enc)):
            jobs += part_jobs
            notes += part_notes
    shared_jobs, shared_notes = plan_shared(src, inception)
    planned = {p for j in jobs for p in j.sources}
    ignored = [f"ignored {_rel(src, p)}: not a release file name"
               for p in sorted(glob.glob(os.path.join(src, "checkpoints", "**", "*.pt"),
                                         recursive=True)) if p not in planned]
    return jobs + shared_jobs, notes + shared_notes + ignored


# --------------------------------------------------------------------------- sources


def sha256(path: str, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str, previous: dict | None = None, verify: bool = False) -> dict:
    """{path, size, mtime_ns, sha256}; the hash is reused from `previous` when the size and
    mtime are unchanged (unless `verify`)."""
    st = os.stat(path)
    record = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    same = (previous is not None and not verify and previous.get("size") == st.st_size
            and previous.get("mtime_ns") == st.st_mtime_ns and previous.get("sha256"))
    record["sha256"] = previous["sha256"] if same else sha256(path)
    return record


def up_to_date(job: Job, entry: dict | None, out_root: str, verify: bool) -> bool:
    """The output exists and its manifest entry matches the job's sources and options."""
    if entry is None or entry.get("options") != job.options:
        return False
    if not os.path.exists(os.path.join(out_root, job.output)):
        return False
    recorded = {s["path"]: s for s in entry.get("sources", [])}
    if sorted(recorded) != sorted(job.sources):
        return False
    for path in job.sources:
        if not os.path.isfile(path):
            return False
        now = file_record(path, recorded[path], verify)
        if (now["size"], now["sha256"]) != (recorded[path]["size"], recorded[path]["sha256"]):
            return False
    return True


# --------------------------------------------------------------------------- converting


def _read_model_config(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    return {k: v for k, v in config.items() if k not in ("format", "format_version")}


def _convert_ditdh(job: Job, out_dir: str) -> tuple[list[str], dict]:
    from convert import ditdh

    lines = ditdh.convert(job.sources[0], out_dir)
    config = _read_model_config(out_dir)
    weights = next((m.group(1) for line in lines
                    if (m := re.match(r"\s*weights: ([^,]+),", line))), None)
    conditioning = next((line.strip() for line in lines if "conditioning:" in line), "")
    trainable = next((int(m.group(1).replace(",", "")) for line in lines
                      if (m := re.search(r"([\d,]+) trainable parameters", line))), None)
    settings = dict(use_y_conditioning=config["use_y_conditioning"],
                    conditioning="mode" if config["use_y_conditioning"] else "none",
                    conditioning_source=conditioning, weights=weights,
                    trainable_params=trainable,
                    **{k: config[k] for k in ("input_size", "in_channels", "hidden_size",
                                              "depth", "num_heads", "num_classes",
                                              "class_dropout_prob")})
    return lines, settings


def _run_converter(module_name: str, argv: list[str]) -> list[str]:
    """A converter's `run` with its own argument parser; its printed report, captured."""
    import argparse
    import importlib

    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m convert {module_name.split('.')[-1]}")
    module.add_arguments(parser)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.run(parser.parse_args(argv))
    return out.getvalue().splitlines()


def _convert_rae(job: Job, out_dir: str) -> tuple[list[str], dict]:
    decoder, stats = job.sources[:2]
    argv = ["--encoder", job.options["encoder_dir"], "--decoder", decoder, "--stats", stats,
            "--out", out_dir]
    if job.options["decoder_config"]:
        argv += ["--decoder-config", job.options["decoder_config"]]
    return _run_converter("convert.rae", argv), {"config": _read_model_config(out_dir)}


def _convert_gmm(job: Job, out_dir: str) -> tuple[list[str], dict]:
    cls_path, spatial_path, stats = job.sources
    shape = _latent_shape(stats)
    lines = _run_converter("convert.gmm", ["--cls", cls_path, "--spatial", spatial_path,
                                           "--latent-shape", ",".join(map(str, shape)),
                                           "--out", out_dir])
    return lines, {"latent_shape_chw": shape}


def _convert_inception(job: Job, out_dir: str) -> tuple[list[str], dict]:
    lines = _run_converter("convert.inception", ["--weights", job.sources[0], "--out", out_dir])
    return lines, {"config": _read_model_config(out_dir)}


def _place_reference(job: Job, out_path: str) -> tuple[list[str], dict]:
    """Check the ADM reference batch, then hard-link it into place (a copy across file
    systems), atomically."""
    from mmfm_jax.evaluate import EvalInputError, read_reference

    source = job.sources[0]
    try:
        ref = read_reference(source)
    except EvalInputError as e:
        raise ConversionError(str(e)) from None
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.link(source, tmp)
        method = "hard link"
    except OSError:
        shutil.copyfile(source, tmp)
        method = "copy"
    os.replace(tmp, out_path)
    settings = {"method": method, "moments": ref["mu"] is not None,
                "spatial_moments": ref["mu_s"] is not None,
                "images": None if ref["images"] is None else len(ref["images"])}
    return [f"{method} {source} -> {out_path}"], settings


CONVERTERS = {"ditdh": _convert_ditdh, "rae": _convert_rae, "gmm": _convert_gmm,
              "inception": _convert_inception, "reference": _place_reference}


def run_job(job: Job, out_root: str, previous: dict | None, verify: bool) -> dict:
    """Convert one output (in a worker process): its manifest entry, or {"error": line}."""
    t0 = time.perf_counter()
    out_path = os.path.join(out_root, job.output)
    try:
        lines, settings = CONVERTERS[job.kind](job, out_path)
        recorded = {s["path"]: s for s in (previous or {}).get("sources", [])}
        sources = [file_record(p, recorded.get(p), verify) for p in job.sources]
    except (ConversionError, ValueError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not any(p in message for p in job.sources):
            message = f"{job.sources[0]}: {message}"
        return {"output": job.output, "error": message}
    return {"output": job.output, "kind": job.kind, "sources": sources,
            "options": job.options, "settings": {**job.info, **settings},
            "seconds": round(time.perf_counter() - t0, 3), "report": lines}


# --------------------------------------------------------------------------- manifest


def read_manifest(out_root: str) -> dict:
    path = os.path.join(out_root, MANIFEST)
    if not os.path.exists(path):
        return {"format": MANIFEST_FORMAT, "version": 1, "outputs": {}}
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e}); remove it to reconvert "
                              "everything") from None
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("outputs"),
                                                                     dict):
        raise ConversionError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def write_manifest(out_root: str, manifest: dict) -> None:
    from mmfm_jax.files import write_json

    write_json(os.path.join(out_root, MANIFEST), manifest, indent=2, sort_keys=True)


def default_jobs(jobs: list[Job]) -> int:
    """CPUs, capped so that the largest job's sources fit 1.5x in the available memory."""
    cpus = os.cpu_count() or 1
    largest = max((sum(os.path.getsize(p) for p in j.sources) for j in jobs), default=0)
    available = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    by_memory = cpus if not available or not largest else int(available // (1.5 * largest))
    return max(1, min(cpus, len(jobs), by_memory))


def _results(todo: list[Job], out_root: str, manifest: dict, verify: bool, workers: int):
    """Yield each job's result as it finishes (in a spawn-process pool when workers > 1)."""
    previous = manifest["outputs"]
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            yield run_job(job, out_root, previous.get(job.output), verify)
        return
    context = multiprocessing.get_context("spawn")  # no fork after torch/jax threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(run_job, job, out_root, previous.get(job.output), verify)
                   for job in todo]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def _print(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def _summary(result: dict) -> str:
    """The few settings worth a console line (the full report is in the manifest)."""
    st = result["settings"]
    if result["kind"] == "ditdh":
        return (f": {st['conditioning_source'].removeprefix('conditioning: ')}; "
                f"{st['weights']} weights, hidden {st['hidden_size']}, depth {st['depth']}")
    if result["kind"] == "gmm":
        return f": K={st['num_components']}, latent C,H,W={tuple(st['latent_shape_chw'])}"
    return ""


def convert_all(src: str, out_root: str, encoders: dict[str, str], inception: str | None,
                *, jobs: int | None = None, verify: bool = False) -> dict:
    """Plan, skip what is up to date, convert the rest, record each in the manifest.
    Returns {"converted", "up_to_date", "skipped", "failed"} (output names / lines)."""
    out_root = os.path.abspath(out_root)
    all_jobs, notes = plan(src, encoders, inception)
    _print(*notes)
    manifest = read_manifest(out_root)
    manifest["src"] = os.path.abspath(src)
    todo, fresh = [], []
    for job in all_jobs:
        entry = manifest["outputs"].get(job.output)
        (fresh if up_to_date(job, entry, out_root, verify) else todo).append(job)
    _print(*(f"up to date {job.output}" for job in fresh))
    workers = jobs or default_jobs(todo)
    if todo:
        _print(f"converting {len(todo)} output(s) with {workers} worker(s)")
    converted, failed = [], []
    for result in _results(todo, out_root, manifest, verify, workers):
        if "error" in result:
            failed.append(result["output"])
            _print(f"error: {result['output']}: {result['error']}")
            continue
        manifest["outputs"][result["output"]] = result
        write_manifest(out_root, manifest)
        converted.append(result["output"])
        _print(f"converted {result['output']} ({result['seconds']:.1f} s){_summary(result)}")
    write_manifest(out_root, manifest)
    _print(f"{len(converted)} converted, {len(fresh)} up to date, {len(notes)} skipped or "
           "ignored, "
           f"{len(failed)} failed; manifest {os.path.join(out_root, MANIFEST)}")
    return {"converted": converted, "up_to_date": [j.output for j in fresh],
            "skipped": notes, "failed": failed}


def run(args) -> None:
    summary = convert_all(args.src, args.out, parse_encoders(args.encoder), args.inception,
                          jobs=args.jobs, verify=args.verify)
    if summary["failed"]:
        raise ConversionError(f"{len(summary['failed'])} output(s) failed: "
                              f"{', '.join(summary['failed'])} (errors above)")
