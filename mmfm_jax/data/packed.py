"""Packed ImageFolder: ArrayRecord shards of the original encoded bytes plus label and name.

Packing stores the files' bytes unchanged, so decoding a packed record gives exactly the
image the ImageFolder path gives, and the record keys keep the ImageFolder order (shards
are contiguous). One record: b"MMF1", int32 label, uint16 name length, UTF-8 relative path,
then the encoded image.
"""

from __future__ import annotations

import glob
import logging
import os
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from mmfm_jax.data.sources import list_imagefolder

log = logging.getLogger(__name__)

MAGIC = b"MMF1"
_HEADER = struct.Struct("<4siH")


def encode_record(data: bytes, label: int, name: str) -> bytes:
    name_b = name.encode()
    return _HEADER.pack(MAGIC, int(label), len(name_b)) + name_b + data


def decode_record(record: bytes) -> tuple[bytes, int, str]:
    """(image bytes, label, name); ValueError on a record that is not in this format."""
    if len(record) < _HEADER.size:
        raise ValueError(f"record of {len(record)} bytes is shorter than the header")
    magic, label, name_len = _HEADER.unpack_from(record)
    if magic != MAGIC:
        raise ValueError(f"record starts with {magic!r}, expected {MAGIC!r}")
    start = _HEADER.size + name_len
    return record[start:], label, record[_HEADER.size:start].decode(errors="replace")


def shard_paths(out_path: str, num_shards: int) -> list[str]:
    return [f"{out_path}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def resolve_packed_paths(path: str) -> list[str]:
    """A shard file, a glob pattern, or the `--out` prefix given to `pack` -> sorted shards."""
    if any(ch in path for ch in "*?["):
        paths = sorted(glob.glob(path))
    elif os.path.isfile(path):
        paths = [path]
    else:
        paths = sorted(glob.glob(glob.escape(path) + "-*-of-*"))
    if not paths:
        raise FileNotFoundError(f"data.path={path!r} matches no ArrayRecord file (expected a "
                                f"file, a glob, or the prefix written by `python -m "
                                f"mmfm_jax.data pack --out PREFIX`)")
    return paths


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        log.warning("packing %s as an empty (skipped) record: %s", path, err)
        return b""


def pack_imagefolder(src_dir: str, out_path: str, num_shards: int = 64, *,
                     num_threads: int = 16, progress_every: float = 10.0) -> list[str]:
    """Pack an ImageFolder tree into `num_shards` ArrayRecord files `OUT-0000i-of-0000n`.

    Shards are written under a temporary name and renamed when complete. Unreadable files
    become empty records (skipped at read time) so that record keys equal ImageFolder indices.
    Prints a progress line every `progress_every` seconds. Returns the shard paths.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    _, files, labels = list_imagefolder(src_dir)
    n = len(files)
    if not 1 <= num_shards <= n:
        raise ValueError(f"num_shards={num_shards} for {n} images; expected 1..{n}")
    if os.path.dirname(out_path):
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
    paths = shard_paths(out_path, num_shards)
    start_time = last = time.monotonic()
    done = 0
    with ThreadPoolExecutor(num_threads) as pool:
        for shard, path in enumerate(paths):
            lo, hi = shard * n // num_shards, (shard + 1) * n // num_shards
            tmp = path + ".tmp"
            writer = ArrayRecordWriter(tmp, "group_size:1")
            try:
                for chunk in range(lo, hi, 1024):
                    keys = range(chunk, min(chunk + 1024, hi))
                    blobs = pool.map(_read, [os.path.join(src_dir, files[k]) for k in keys])
                    for k, data in zip(keys, blobs):
                        writer.write(encode_record(data, labels[k], files[k]))
                    done += len(keys)
                    now = time.monotonic()
                    if now - last >= progress_every:
                        last = now
                        print(f"packed {done}/{n} images ({done / (now - start_time):.0f}/s), "
                              f"shard {shard + 1}/{num_shards}", file=sys.stderr, flush=True)
            finally:
                writer.close()
            os.replace(tmp, path)
    print(f"packed {n} images into {num_shards} shards {out_path}-*-of-{num_shards:05d} in "
          f"{time.monotonic() - start_time:.1f} s", file=sys.stderr, flush=True)
    return paths


class PackedSource:
    """Reads `pack_imagefolder` output; records come back as `{"bytes", "label", "name"}`."""

    def __init__(self, path: str):
        import grain

        self.paths = resolve_packed_paths(path)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)
        if len(self._source) == 0:
            raise ValueError(f"ArrayRecord files {self.paths[:3]} hold no records")
        try:
            decode_record(self._source[0])
        except ValueError as err:
            raise ValueError(f"{self.paths[0]} is not a packed image file "
                             f"(`python -m mmfm_jax.data pack`): {err}") from None

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"PackedSource({self._source!r})"

    def __getitem__(self, key: int) -> dict:
        key = int(key)
        try:
            data, label, name = decode_record(self._source[key])
        except ValueError as err:
            log.warning("skipping malformed packed record %d: %s", key, err)
            return {"bytes": None, "label": 0, "name": f"record {key}"}
        return {"bytes": data, "label": label, "name": name}
