"""What every converter shares: safe loading, strict key matching, the report.

Every converter maps an upstream state dict to named numpy arrays, checks that every key
is consumed and every shape matches (the library's `strict_keys`), and writes a model
directory through `mmfm_jax.models.model_dir` (atomically: a failed conversion leaves
nothing behind; the GMM converter uses `mmfm_jax.files.atomic_directory` itself).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import numpy as np

from mmfm_jax.models.strict_keys import check_keys


class ConversionError(ValueError):
    """A refused conversion; the message names the file, keys and shapes involved."""


def load_torch(path: str) -> object:
    """torch.load with weights_only=True: tensors and plain containers, never code."""
    import torch

    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file")
    try:
        return _torch_load(torch, path)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: refused to unpickle (weights_only=True): {first}") from e
    except Exception as e:  # corrupted zip, truncated file, ...
        raise ConversionError(f"{path}: cannot be read as a PyTorch file: {e}") from e


def _torch_load(torch, path: str):
    """Memory-mapped where the file allows it (zip format), so a 13 GB training dict is
    not read whole into every converter process; legacy (non-zip) files load normally."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zipfile" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def to_numpy_state(state: Mapping, path: str = "") -> dict[str, np.ndarray]:
    """A torch state dict (tensors) -> {key: float32/int numpy array}; strips DDP and
    torch.compile prefixes (`module.`, `_orig_mod.`)."""
    import torch

    out = {}
    for key, value in state.items():
        clean = key
        for prefix in ("module.", "_orig_mod."):
            while clean.startswith(prefix):
                clean = clean[len(prefix):]
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: key {key!r} holds {type(value).__name__}, "
                                  "not a tensor")
        out[clean] = value.detach().cpu().float().numpy() if value.is_floating_point() \
            else value.detach().cpu().numpy()
    return out


class KeyConsumer:
    """Hands out state-dict entries by key and records what was asked for, with which shape.

    `finish()` runs the library's one strict check (`strict_keys.check_keys`): one error
    listing missing, mis-shaped and unexpected keys, so a corrupted or mismatched
    checkpoint is refused with everything wrong named at once. Callers that find a layout
    they cannot interpret add their own line to `misshaped`.
    """

    def __init__(self, state: Mapping[str, np.ndarray], source: str,
                 ignore: tuple[str, ...] = ()):
        self.state = dict(state)
        self.source = source
        self.ignore = tuple(ignore)
        self.expected: dict[str, tuple[int, ...] | None] = {}
        self.misshaped: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        """The entry (None when missing); `shape`, when given, is checked by `finish`."""
        self.expected[key] = None if shape is None else tuple(shape)
        return self.state.get(key)

    def finish(self) -> None:
        check_keys(self.expected, self.state, self.source, ignore=self.ignore,
                   misshaped=self.misshaped, error=ConversionError)


def report(lines: list[str]) -> None:
    """Converters print what they read and wrote."""
    for line in lines:
        print(line, flush=True)
