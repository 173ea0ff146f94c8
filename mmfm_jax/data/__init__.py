"""Input pipeline: grain sources (ImageFolder, packed ArrayRecord, digits, latent cache), ADM's
centre crop, per-record flips, per-process sharding, resumable iterators.

Modules: `transforms` (crop, decode, flip RNG), `sources` (ImageFolder, digits, decoding),
`packed` (ArrayRecord packing and reading), `latent_cache`, `loaders` (train and eval
loaders). `python -m mmfm_jax.data pack --src DIR --out PREFIX` packs an ImageFolder tree.
"""

from mmfm_jax.data.latent_cache import LatentCacheSource, LatentCacheWriter, write_latent_cache
from mmfm_jax.data.loaders import (
    EvalLoader,
    TrainLoader,
    make_eval_loader,
    make_source,
    make_train_loader,
)
from mmfm_jax.data.packed import PackedSource, pack_imagefolder
from mmfm_jax.data.sources import (
    DecodedSource,
    DigitsSource,
    ImageFolderSource,
    SubsetSource,
    class_balanced_subset,
    list_imagefolder,
    load_digits_split,
)
from mmfm_jax.data.transforms import center_crop_arr, decode_and_crop, flip_decision, record_rng

__all__ = [
    "DecodedSource", "DigitsSource", "EvalLoader", "ImageFolderSource", "LatentCacheSource",
    "LatentCacheWriter", "PackedSource", "SubsetSource", "TrainLoader", "center_crop_arr",
    "class_balanced_subset", "decode_and_crop",
    "flip_decision", "list_imagefolder", "load_digits_split", "make_eval_loader",
    "make_source", "make_train_loader", "pack_imagefolder", "record_rng", "write_latent_cache",
]
