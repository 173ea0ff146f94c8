"""Whether a DiTDH checkpoint reads its label y: the one architecture fact shapes cannot show.

An unconditional MM-FM model ("GMM (uncond)", `use_y_conditioning: false`) still carries
its label table (upstream builds the `y_embedder` and leaves it unused), so a converter
that infers the config from the tensors alone would build a conditional model and add an
untrained label row to every time embedding. The answer is read from what the file and
its name say, strongest first:

1. `--conditional` / `--unconditional` (the user's word);
2. a `use_y_conditioning` entry of `--params`;
3. the MM-FM training dict: a `use_y_conditioning` (or `mode_conditional: true`) entry
   anywhere in `training_cfg` (or a `config` entry), and `config_path`, the training YAML's
   name (`DiTDH-XL_DINOv2-B-UNCONDITIONAL-GMM-8192-DIAG.yaml` or
   `...-MODE-CONDITIONAL-GMM-8192-DIAG.yaml`);
4. the release file name: `uncond-gmm-*` / `mode-gmm-*` (also `dit-s-uncond-gmm-25k`).

Sources 3 and 4 must agree (a disagreement is refused, naming both). When none speaks, a
training dict is refused with one line asking for a flag; a raw state dict is RAE's
release layout (`stage2_model.pt`, class-conditional) and converts as conditional, saying
so; with `--params`, upstream's default (conditional) applies.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

from convert.common import ConversionError

_UNCOND_NAME = re.compile(r"(?:^|[-_.])uncond(?:itional)?-gmm(?:[-_.]|$)", re.IGNORECASE)
_MODE_NAME = re.compile(r"(?:^|[-_.])mode(?:-cond(?:itional)?)?-gmm(?:[-_.]|$)", re.IGNORECASE)
_UNCOND_YAML = re.compile(r"(?:^|[-_.])UNCONDITIONAL(?:[-_.]|$)")
_COND_YAML = re.compile(r"(?:^|[-_.])(?:MODE|CLASS)-CONDITIONAL(?:[-_.]|$)")
_CONFIG_ENTRIES = ("training_cfg", "config")  # training-dict entries that may hold a config
LABEL_TABLE = "y_embedder.embedding_table.weight"


@dataclasses.dataclass(frozen=True)
class Evidence:
    conditional: bool
    source: str  # where it was read, for the report and for error messages


def word(conditional: bool) -> str:
    return "conditional" if conditional else "unconditional"


def _find_keys(tree, depth: int = 0):
    """(key, value) pairs of every nested mapping entry, depth-first (at most 5 deep)."""
    if not isinstance(tree, Mapping) or depth > 5:
        return
    for key, value in tree.items():
        yield str(key), value
        yield from _find_keys(value, depth + 1)


def from_config_entries(obj: Mapping) -> Evidence | None:
    """`use_y_conditioning` (or `mode_conditional: true`) inside training_cfg / config."""
    for entry in _CONFIG_ENTRIES:
        for key, value in _find_keys(obj.get(entry)):
            if key == "use_y_conditioning" and isinstance(value, bool):
                return Evidence(value, f"{entry} use_y_conditioning={value}")
            if key == "mode_conditional" and value is True:
                return Evidence(True, f"{entry} mode_conditional=True")
    return None


def from_config_path(obj: Mapping) -> Evidence | None:
    """The training YAML's name stored as `config_path`."""
    path = obj.get("config_path")
    if not isinstance(path, str):
        return None
    name = os.path.basename(path).upper()
    if _UNCOND_YAML.search(name):
        return Evidence(False, f"config_path {path!r}")
    if _COND_YAML.search(name):
        return Evidence(True, f"config_path {path!r}")
    return None


def from_file_name(path: str) -> Evidence | None:
    """MM-FM's release names: `uncond-gmm-*` / `mode-gmm-*`."""
    name = os.path.basename(path)
    if _UNCOND_NAME.search(name):
        return Evidence(False, f"file name {name!r}")
    if _MODE_NAME.search(name):
        return Evidence(True, f"file name {name!r}")
    return None


def is_training_dict(obj) -> bool:
    return isinstance(obj, Mapping) and ("ema" in obj or "model" in obj)


def _evidence(obj, ckpt: str) -> list[Evidence]:
    found = []
    if is_training_dict(obj):
        found += [e for e in (from_config_entries(obj), from_config_path(obj)) if e]
    name = from_file_name(ckpt)
    return found + ([name] if name else [])


def resolve(obj, ckpt: str, *, requested: bool | None = None,
            params: Mapping | None = None) -> tuple[bool, str]:
    """(use_y_conditioning, the report line saying where it came from)."""
    if requested is not None:
        flag = "--conditional" if requested else "--unconditional"
        overridden = [e.source for e in _evidence(obj, ckpt) if e.conditional != requested]
        note = f"; overrides {', '.join(overridden)}" if overridden else ""
        return requested, f"  conditioning: {word(requested)} ({flag}{note})"
    if params is not None and "use_y_conditioning" in params:
        value = bool(params["use_y_conditioning"])
        return value, f"  conditioning: {word(value)} (--params use_y_conditioning={value})"
    evidence = _evidence(obj, ckpt)
    if len({e.conditional for e in evidence}) > 1:
        said = "; ".join(f"{e.source} says {word(e.conditional)}" for e in evidence)
        raise ConversionError(f"{ckpt}: conflicting conditioning: {said}; pass --conditional "
                              "or --unconditional")
    if evidence:
        value = evidence[0].conditional
        return value, (f"  conditioning: {word(value)} (use_y_conditioning {value}) from "
                       + " and ".join(e.source for e in evidence))
    if params is not None:
        return True, ("  conditioning: conditional (--params has no use_y_conditioning: "
                      "upstream's default)")
    if not is_training_dict(obj):
        return True, ("  conditioning: conditional (a raw state dict: RAE's class-conditional "
                      "release layout; pass --unconditional if it is not)")
    raise ConversionError(
        f"{ckpt}: cannot tell whether the model reads its label: training_cfg has no "
        f"use_y_conditioning, config_path {obj.get('config_path')!r} names neither "
        "UNCONDITIONAL nor MODE-CONDITIONAL, and the file name is not uncond-gmm-*/mode-gmm-*; "
        "pass --conditional or --unconditional (or --params with use_y_conditioning)")


def unused_table_note(state: Mapping, conditional: bool) -> list[str]:
    """The report line for an unconditional model's label table (loaded, never read)."""
    if conditional or LABEL_TABLE not in state:
        return []
    shape = tuple(state[LABEL_TABLE].shape)
    return [f"  {LABEL_TABLE} {shape}: present but unused (use_y_conditioning false); "
            "kept in the model's label table, which the forward never reads"]
