"""Precomputed latent cache: normalised latents and CLS tokens of both flips of every image.

Caching both flips keeps training exact (REFERENCE.md f: the random flip is then a choice
between the two cached encodings) while dropping the per-step encoder pass. Layout of the
directory: `latents.npy` (N, 2, H, W, C), `cls.npy` (N, 2, D), `labels.npy` (N,) int32 and
`meta.json`, written last, so a cache without it is incomplete. Index 0 along the flip
axis is the image as stored, index 1 its horizontal flip. bfloat16 is stored as raw uint16.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mmfm_jax.files import write_json

_DTYPES = ("float32", "float16", "bfloat16")


def _storage(dtype: str):
    if dtype not in _DTYPES:
        raise ValueError(f"latent cache dtype {dtype!r}; expected one of {_DTYPES}")
    return np.uint16 if dtype == "bfloat16" else np.dtype(dtype)


def _logical(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


class LatentCacheWriter:
    """Fills a cache of `num_records` rows in any order; `finish()` marks it complete."""

    def __init__(self, path: str, num_records: int, latent_shape: tuple[int, int, int],
                 cls_dim: int, dtype: str = "float16"):
        os.makedirs(path, exist_ok=True)
        if os.path.exists(os.path.join(path, "meta.json")):
            os.remove(os.path.join(path, "meta.json"))  # incomplete until finish()
        self.path, self.dtype = path, dtype
        self.num_records = int(num_records)
        self.latent_shape, self.cls_dim = tuple(int(s) for s in latent_shape), int(cls_dim)
        store = _storage(dtype)
        open_ = np.lib.format.open_memmap
        self._lat = open_(os.path.join(path, "latents.npy"), "w+", store,
                          (self.num_records, 2, *self.latent_shape))
        self._cls = open_(os.path.join(path, "cls.npy"), "w+", store,
                          (self.num_records, 2, self.cls_dim))
        self._labels = open_(os.path.join(path, "labels.npy"), "w+", np.int32,
                             (self.num_records,))

    def write(self, indices, latents, cls, labels) -> None:
        """Rows `indices`: latents (n, 2, H, W, C), cls (n, 2, D), labels (n,)."""
        indices = np.asarray(indices)
        n = len(indices)
        for what, arr, shape in (("latents", latents, (n, 2, *self.latent_shape)),
                                 ("cls", cls, (n, 2, self.cls_dim)), ("labels", labels, (n,))):
            if np.shape(arr) != shape:
                raise ValueError(f"latent cache {self.path}: {what} has shape {np.shape(arr)}, "
                                 f"expected {shape}")
        logical = _logical(self.dtype)
        store = _storage(self.dtype)
        self._lat[indices] = np.asarray(latents).astype(logical).view(store)
        self._cls[indices] = np.asarray(cls).astype(logical).view(store)
        self._labels[indices] = np.asarray(labels, np.int32)

    def finish(self) -> None:
        for arr in (self._lat, self._cls, self._labels):
            arr.flush()
        meta = dict(num_records=self.num_records, latent_shape=list(self.latent_shape),
                    cls_dim=self.cls_dim, dtype=self.dtype, flip_axis=1)
        write_json(os.path.join(self.path, "meta.json"), meta)


def write_latent_cache(path: str, latents, cls, labels, dtype: str = "float16") -> None:
    """Write a whole cache at once: latents (N, 2, H, W, C), cls (N, 2, D), labels (N,)."""
    latents = np.asarray(latents)
    if latents.ndim != 5 or latents.shape[1] != 2:
        raise ValueError(f"latent cache {path}: latents have shape {latents.shape}, expected "
                         f"(N, 2, H, W, C) with both flips")
    writer = LatentCacheWriter(path, latents.shape[0], latents.shape[2:], np.shape(cls)[-1],
                               dtype)
    writer.write(np.arange(latents.shape[0]), latents, cls, labels)
    writer.finish()


class LatentCacheSource:
    """Random access to a finished cache: `{"latents": (2, H, W, C), "cls": (2, D), "label"}`."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"latent cache {path!r} has no meta.json (missing or "
                                    f"incomplete: LatentCacheWriter.finish() was not reached)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.path = os.path.abspath(path)
        self._arrays = None
        self._open()
        if self._arrays[0].shape != (self.meta["num_records"], 2, *self.meta["latent_shape"]):
            raise ValueError(f"latent cache {path}: latents.npy has shape "
                             f"{self._arrays[0].shape}, meta.json says "
                             f"{(self.meta['num_records'], 2, *self.meta['latent_shape'])}")

    def _open(self):
        load = lambda name: np.load(os.path.join(self.path, name), mmap_mode="r")
        self._arrays = (load("latents.npy"), load("cls.npy"), load("labels.npy"))

    def __getstate__(self):  # memmaps are reopened in worker processes
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return int(self.meta["num_records"])

    def __repr__(self) -> str:
        return f"LatentCacheSource(path={self.path!r}, num_records={len(self)})"

    def __getitem__(self, key: int) -> dict:
        lat, cls, labels = self._arrays
        logical = _logical(self.meta["dtype"])
        key = int(key)
        return {"latents": np.array(lat[key]).view(logical),
                "cls": np.array(cls[key]).view(logical), "label": np.int32(labels[key])}
