"""What every converter shares: safe loading, strict key matching, atomic output dirs.

Every converter maps an upstream state dict to named numpy arrays, checks that every key
is consumed and every shape matches, and writes its output directory atomically (a
temporary sibling renamed into place), so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np


class ConversionError(ValueError):
    """A refused conversion; the message names the file, keys and shapes involved."""


def load_torch(path: str) -> object:
    """torch.load with weights_only=True: tensors and plain containers, never code."""
    import torch

    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: refused to unpickle (weights_only=True): {first}") from e
    except Exception as e:  # corrupted zip, truncated file, ...
        raise ConversionError(f"{path}: cannot be read as a PyTorch file: {e}") from e


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
    """Hands out state-dict entries by key with shape checks and records what was used.

    `finish()` raises one error listing missing, mis-shaped and unexpected keys, so a
    corrupted or mismatched checkpoint is refused with everything wrong named at once.
    """

    def __init__(self, state: Mapping[str, np.ndarray], source: str,
                 ignore: tuple[str, ...] = ()):
        self.state = dict(state)
        self.source = source
        self.used: set[str] = set(k for k in self.state if k in ignore)
        self.missing: list[str] = []
        self.misshaped: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        if key not in self.state:
            self.missing.append(key + (f" (expected shape {tuple(shape)})" if shape else ""))
            return None
        self.used.add(key)
        value = self.state[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            self.misshaped.append(f"{key}: shape {tuple(value.shape)}, expected {tuple(shape)}")
        return value

    def finish(self) -> None:
        unexpected = [k for k in self.state if k not in self.used]
        problems = []
        if self.missing:
            problems.append("missing keys: " + ", ".join(self.missing))
        if self.misshaped:
            problems.append("mis-shaped keys: " + "; ".join(self.misshaped))
        if unexpected:
            problems.append("unexpected keys: " + ", ".join(
                f"{k} {tuple(self.state[k].shape)}" for k in unexpected))
        if problems:
            raise ConversionError(f"{self.source}: " + " | ".join(problems))


@contextlib.contextmanager
def atomic_directory(out_dir: str) -> Iterator[str]:
    """Yield a temporary directory next to `out_dir`; rename it into place on success.

    An existing `out_dir` is replaced only after the new one is complete. On any error the
    temporary directory is removed and `out_dir` is left as it was.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        _make_readable(tmp)
        if os.path.exists(out_dir):
            old = tmp + ".old"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(root: str) -> None:
    """mkdtemp creates 0700 (and some writers 0600): give the result normal permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def report(lines: list[str]) -> None:
    """Converters print what they read and wrote."""
    for line in lines:
        print(line, flush=True)
