"""Atomic file and directory writes, and npz headers, for every job's outputs.

A file is written under a temporary name and renamed into place, so a reader never sees a
half-written file (config.json, eval.json, metrics.json, sample shards); paths go through
etils.epath, so gs:// works too. Model directories are built in a temporary sibling folder
and renamed into place, so a failed conversion or export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator

import numpy as np
from etils import epath


def write_bytes(path, data: bytes, *, suffix: str = ".tmp") -> None:
    """Write `data` to `path` atomically, creating its folder. `suffix` names the temporary
    file (several processes writing beside each other pass distinct suffixes)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + suffix)
    tmp.write_bytes(data)
    tmp.replace(path)


def write_json(path, obj, **dump_kwargs) -> None:
    """Write `json.dumps(obj, **dump_kwargs)` to `path` atomically, creating its folder."""
    write_bytes(path, json.dumps(obj, **dump_kwargs).encode())


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


def read_npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from an open .npy stream, which is left at the data."""
    fmt = np.lib.format
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    version = fmt.read_magic(member)
    if version not in readers:
        raise ValueError(f"npy format version {version} is not supported")
    shape, fortran, dtype = readers[version](member)
    return tuple(int(s) for s in shape), bool(fortran), np.dtype(dtype)


def npz_header(path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one member of an .npz without reading its data."""
    path = epath.Path(path)
    with path.open("rb") as f, zipfile.ZipFile(f) as zf, zf.open(key + ".npy") as member:
        shape, _, dtype = read_npy_header(member)
    return shape, dtype
