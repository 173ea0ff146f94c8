"""The one on-disk format of every network: DiTDH, the RAE and the FID Inception.

A model directory holds two files:

* `config.json`: {"format": NAME, "format_version": 2, ...the network's own config};
* `weights.safetensors`: float32 arrays, each named by its "/"-joined variable path in
  `nnx.state(model)` ("blocks/0/attn/qkv/kernel").

`write` builds the directory atomically (`files.atomic_directory`: a failed conversion or
export leaves nothing behind); `load` is the one strict loader: a wrong or missing format,
a missing file, and every missing, unexpected or mis-shaped array are refused with one
ValueError line naming the file.

A network whose variables have two layouts (DiTDH's blocks unrolled as "blocks/{i}/..." or
stacked for `lax.scan` as "encoder_blocks/...") passes `relayout` to `load`, so either
layout loads into either model.

Directories written before this format still load: each network lists the layouts of
its earlier code (`Layout`): DiTDH's `model.safetensors` with a config.json without
format, the RAE's "mmfm_jax.rae/1" and the FID Inception's "mmfm_jax.fid_inception.v1"
with "."-joined names in `inception.safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from mmfm_jax import files
from mmfm_jax.models.state_arrays import module_from_arrays

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
VERSION = 2  # version 1: the per-network layouts of earlier code (`Layout`)
_FORMAT_KEYS = ("format", "format_version")


class MissingFileError(FileNotFoundError, ValueError):
    """A model directory without its config or weights. A ValueError too, so a caller
    catches one type for every reason a directory cannot be loaded."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a directory keeps its weights and how their names join a variable path."""

    format: str | None  # config.json's "format" entry; None: written without one
    weights_file: str = WEIGHTS_FILE
    separator: str = "/"


@dataclasses.dataclass(frozen=True)
class Format:
    """One network's directory format: its name, how to make one, the older layouts."""

    name: str
    convert_hint: str  # what to run when the directory is missing
    legacy: tuple[Layout, ...] = ()


def write(out_dir: str, fmt: Format, config: Mapping[str, Any],
          arrays: Mapping[str, np.ndarray]) -> None:
    """Write `config` and `arrays` ({"path/to/var": array}, stored float32) as the model
    directory `out_dir`, atomically (an existing one is replaced once the new one is
    complete)."""
    from safetensors.numpy import save_file

    with files.atomic_directory(out_dir) as tmp:
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()},
                  os.path.join(tmp, WEIGHTS_FILE))
        files.write_json(os.path.join(tmp, CONFIG_FILE),
                         {"format": fmt.name, "format_version": VERSION, **config},
                         indent=2, sort_keys=True)


def read_config(model_dir: str, fmt: Format) -> tuple[dict[str, Any], Layout]:
    """The network's config (format entries removed) and the layout of the directory."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: missing; {fmt.convert_hint}")
    with open(path) as f:
        config = json.load(f)
    layout = _layout(config, fmt, path)
    return {k: v for k, v in config.items() if k not in _FORMAT_KEYS}, layout


def _layout(config: Mapping[str, Any], fmt: Format, path: str) -> Layout:
    name, version = config.get("format"), config.get("format_version")
    if name == fmt.name and version == VERSION:
        return Layout(fmt.name)
    if version is None:
        for old in fmt.legacy:
            if name == old.format:
                return old
    raise ValueError(f"{path}: format {name!r} version {version!r}, expected {fmt.name!r} "
                     f"version {VERSION}")


def read_arrays(model_dir: str, fmt: Format, layout: Layout) -> tuple[dict[str, np.ndarray], str]:
    """({"path/to/var": array}, the weights file) of a directory in `layout`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = os.path.join(model_dir, layout.weights_file)
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: missing; {fmt.convert_hint}")
    try:
        arrays = load_file(path)
    except (SafetensorError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot be read: {first}") from e
    if layout.separator != "/":
        arrays = {k.replace(layout.separator, "/"): v for k, v in arrays.items()}
    return arrays, path


Relayout = Callable[[nnx.Module, Mapping[str, np.ndarray], str], Mapping[str, np.ndarray]]


def load(model_dir: str, fmt: Format, abstract: Callable[[dict[str, Any]], nnx.Module], *,
         mesh=None, relayout: Relayout | None = None):
    """The module of a model directory, strictly: `abstract(config)` builds the shape-only
    module from the directory's config; every one of its variables comes from the weights
    (float32, on `mesh` by its logical axes when given). `relayout(module, arrays, path)`,
    when given, first brings arrays stored in another variable layout into the module's
    (DiTDH's stacked or unrolled blocks), checking the stored names itself."""
    config, layout = read_config(model_dir, fmt)
    module = abstract(config)
    arrays, path = read_arrays(model_dir, fmt, layout)
    if relayout is not None:
        arrays = relayout(module, arrays, path)
    return module_from_arrays(module, arrays, source=path, mesh=mesh)
