"""Random-access sources: ImageFolder trees, scikit-learn digits, and the decoding wrapper.

Raw sources return `{"bytes", "label", "name"}` (encoded images) or `{"image", "label"}`
(already decoded arrays); `DecodedSource` turns either into a fixed-size uint8 image, or
`image=None` for a record that could not be read. Every source has a stable `repr`, which
grain compares when it restores an iterator state.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from mmfm_jax.data.transforms import decode_and_crop

log = logging.getLogger(__name__)

# torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_imagefolder(root: str) -> tuple[list[str], list[str], np.ndarray]:
    """torchvision ImageFolder order: sorted class directories, then a sorted walk of each.

    Returns (class names, file paths relative to `root`, int32 labels). The order fixes the
    record keys, so it must match upstream's (the GMM fit reads images in this order).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageFolder root {root!r} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"ImageFolder root {root!r} has no class subdirectories")
    files, labels, empty = [], [], []
    for label, cls in enumerate(classes):
        before = len(files)
        for dirpath, _, fnames in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.relpath(os.path.join(dirpath, fname), root))
                    labels.append(label)
        if len(files) == before:
            empty.append(cls)
    if empty:
        raise FileNotFoundError(f"ImageFolder root {root!r}: no image files "
                                f"({', '.join(IMG_EXTENSIONS)}) in class folders {empty[:10]}")
    return classes, files, np.asarray(labels, np.int32)


class ImageFolderSource:
    """Class-subdirectory image tree; label = index of the sorted class directory."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.classes, files, self._labels = list_imagefolder(self.root)
        self._files = np.asarray([f.encode() for f in files])  # compact for worker pickles

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __repr__(self) -> str:
        return f"ImageFolderSource(root={self.root!r}, num_records={len(self)})"

    def name(self, key: int) -> str:
        return self._files[key].decode()

    def __getitem__(self, key: int) -> dict:
        key = int(key)
        name = self.name(key)
        try:
            with open(os.path.join(self.root, name), "rb") as f:
                data = f.read()
        except OSError as err:
            log.warning("skipping unreadable image %s (record %d): %s", name, key, err)
            data = None
        return {"bytes": data, "label": int(self._labels[key]), "name": name}


def class_balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted record indices of a class-balanced `fraction` of the data (MM-FM's
    `--data-limit-percentage` study): per class round(fraction * n_c) records, at least one,
    drawn without replacement by a generator seeded with `seed`."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data.limit_fraction={fraction}: expected a fraction in (0, 1]")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = max(1, int(round(fraction * len(members))))
        keep.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(keep))


class SubsetSource:
    """The records `indices` of a raw source, renumbered 0..len-1 (flips key on the new
    numbers, so a subset run is deterministic on its own)."""

    def __init__(self, raw, indices: np.ndarray):
        self.raw, self.indices = raw, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"SubsetSource({self.raw!r}, num_records={len(self)})"

    def name(self, key: int) -> str:
        return self.raw.name(int(self.indices[key]))

    def __getitem__(self, key: int) -> dict:
        return self.raw[int(self.indices[int(key)])]


def load_digits_split(holdout: float | int = 0.2, seed: int = 0):
    """scikit-learn's 8x8 digits as uint8 (N, 8, 8, 1) images, split by a fixed permutation.

    Values 0..16 are scaled to 0..255 (rounded). `holdout` is a fraction of the 1797 images
    or a count. Returns (train_images, heldout_images, train_labels int32).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    n = len(images)
    n_test = int(round(holdout * n)) if isinstance(holdout, float) else int(holdout)
    if not 0 < n_test < n:
        raise ValueError(f"digits holdout {holdout!r} leaves {n - n_test} of {n} for training; "
                         f"expected a fraction in (0, 1) or a count in [1, {n - 1}]")
    perm = np.random.default_rng(seed).permutation(n)
    test, train = perm[:n_test], np.sort(perm[n_test:])
    return images[train], images[np.sort(test)], labels[train]


class DigitsSource:
    """The training part of `load_digits_split`: decoded (8, 8, 1) uint8 images in memory."""

    def __init__(self, holdout: float | int = 0.2, seed: int = 0):
        self._spec = (holdout, seed)
        self._images, _, self._labels = load_digits_split(holdout, seed)

    def __len__(self) -> int:
        return len(self._images)

    def __repr__(self) -> str:
        return f"DigitsSource(holdout={self._spec[0]!r}, seed={self._spec[1]})"

    def __getitem__(self, key: int) -> dict:
        return {"image": self._images[int(key)], "label": int(self._labels[int(key)])}


class DecodedSource:
    """A raw source decoded and ADM-centre-cropped to `image_size` inside the read threads.

    Returns `{"image": uint8 (S, S, C) or None, "label": int32, "index": int64}`; None marks
    an unreadable record (already logged with its name and key).
    """

    def __init__(self, raw, image_size: int):
        self.raw = raw
        self.image_size = int(image_size)
        self.channels = 1 if isinstance(raw, DigitsSource) else 3
        if isinstance(raw, DigitsSource) and self.image_size != 8:
            raise ValueError(f"data.image_size={self.image_size} with data.kind='digits'; "
                             f"the digits are 8x8, expected 8")

    def __len__(self) -> int:
        return len(self.raw)

    def __repr__(self) -> str:
        return f"DecodedSource({self.raw!r}, image_size={self.image_size})"

    def __getitem__(self, key: int) -> dict:
        key = int(key)
        rec = self.raw[key]
        if "image" in rec:
            image = rec["image"]  # in-memory arrays (digits) are stored at their final size
        else:
            image = decode_and_crop(rec["bytes"], self.image_size, name=rec["name"], key=key)
        return {"image": image, "label": np.int32(rec["label"]), "index": np.int64(key)}
