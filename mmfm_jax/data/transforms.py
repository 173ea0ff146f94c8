"""Per-image transforms: ADM's centre crop, safe decoding, and the per-record flip RNG.

The flip RNG is a pure function of (seed, record key, epoch), so a record gets the same flip
whatever the worker count, process count or resume point.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's `center_crop_arr` (guided-diffusion image_datasets.py), as RAE and MM-FM use it.

    Halve with BOX while the short side is at least twice the target, then BICUBIC-resize
    the short side to `image_size` (sizes rounded), then crop the centre (floor offsets).
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def decode_and_crop(data: bytes | None, image_size: int, *, name: str, key: int):
    """Encoded image bytes -> uint8 (S, S, 3) via RGB conversion and the ADM crop.

    Returns None (and logs the file) for unreadable or corrupt input: a bad image is skipped,
    never fatal.
    """
    if data is None:
        return None  # the source already logged the read error
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            arr = center_crop_arr(img.convert("RGB"), image_size)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        log.warning("skipping unreadable image %s (record %d): %s: %s",
                    name, key, type(err).__name__, err)
        return None
    if arr.shape != (image_size, image_size, 3):
        log.warning("skipping image %s (record %d): cropped to %s, expected %s",
                    name, key, arr.shape, (image_size, image_size, 3))
        return None
    return arr


def record_rng(seed: int, record_key: int, epoch: int) -> np.random.Generator:
    """The RNG of one record in one epoch: Philox keyed by (seed, record key, epoch), so the
    draw never depends on the batch, worker, process count or resume point."""
    if not (0 <= seed < 2**32 and 0 <= epoch < 2**32 and 0 <= record_key < 2**64):
        raise ValueError(f"record_rng needs 0 <= seed, epoch < 2**32 and 0 <= key < 2**64, got "
                         f"seed={seed}, epoch={epoch}, record_key={record_key}")
    return np.random.Generator(np.random.Philox(key=(seed << 96) | (epoch << 64) | record_key))


def flip_decision(rng: np.random.Generator) -> bool:
    """Horizontal flip with p = 0.5 (RandomHorizontalFlip), drawn from a record's RNG."""
    return bool(rng.random() < 0.5)
