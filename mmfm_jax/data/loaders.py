"""grain loaders: the shuffled, flipped, process-sharded training stream and the ordered pass.

Training (`make_train_loader`): one global shuffle per epoch (IndexSampler, reshuffled every
epoch); process p of n reads the p-th contiguous block of every global batch (whichever
worker reads it: `FlipSampler`), so the processes see disjoint parts of each epoch and
together the whole of it, and the global batches do not depend on the process or worker
count. Images are read, decoded and cropped in grain's read threads (and worker
processes), unreadable ones are dropped and counted, and each record is flipped by an RNG
keyed on (seed, record key, epoch). Batches are host-local: `global_batch / process_count`
rows; `parallel.host_to_global` makes them global arrays. The iterator's state
(`get_state`/`set_state`, or orbax with `grain.checkpoint.CheckpointSave/CheckpointRestore`)
resumes the exact stream on the same processes and workers; `position()` / `seek()`
(`data/position.py`) resume it on any.

Evaluation (`make_eval_loader`): every record once, in order, no flip; global batch s holds
records [s*B, (s+1)*B), process p its p-th slice; the tail is padded and masked.
"""

from __future__ import annotations

import json
import logging
import math

import grain
import numpy as np
from grain._src.python.dataset.transformations.batch import make_batch  # not re-exported; shm

from mmfm_jax.data import position as position_lib
from mmfm_jax.data.latent_cache import LatentCacheSource
from mmfm_jax.data.packed import PackedSource
from mmfm_jax.data.sources import (
    DecodedSource,
    DigitsSource,
    ImageFolderSource,
    SubsetSource,
    class_balanced_subset,
)
from mmfm_jax.data.transforms import flip_decision, record_rng

log = logging.getLogger(__name__)

KINDS = ("digits", "imagefolder", "arrayrecord", "latent_cache")


def _get(cfg, key, default):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def make_source(data_cfg, image_size: int | None = None):
    """The random-access source for `data_cfg.kind` (images decoded to `image_size`)."""
    kind = data_cfg.kind
    size = int(image_size or data_cfg.image_size)
    if kind == "digits":
        return DecodedSource(DigitsSource(_get(data_cfg, "digits_holdout", 0.2)), size)
    if kind == "latent_cache":
        path = data_cfg.latent_cache or data_cfg.path
        if not path:
            raise ValueError("data.kind='latent_cache' needs data.latent_cache (or data.path)")
        return LatentCacheSource(path)
    if kind not in KINDS:
        raise ValueError(f"data.kind={kind!r}; expected one of {', '.join(KINDS)}")
    if not data_cfg.path:
        raise ValueError(f"data.kind={kind!r} needs data.path (the ImageNet train split)")
    raw = ImageFolderSource(data_cfg.path) if kind == "imagefolder" else PackedSource(
        data_cfg.path)
    fraction = float(_get(data_cfg, "limit_fraction", 1.0))
    if fraction != 1.0:
        if not hasattr(raw, "labels"):
            raise ValueError(f"data.limit_fraction={fraction} needs data.kind='imagefolder' "
                             "(the class-balanced subset reads the labels of every record)")
        raw = SubsetSource(raw, class_balanced_subset(raw.labels, fraction,
                                                      int(_get(data_cfg, "limit_seed", 42))))
    return DecodedSource(raw, size)


def _process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def _allow_worker_processes(num_workers: int) -> None:
    """grain's worker processes read absl flags; outside an absl app nothing parsed them."""
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()


class FlipSampler(grain.samplers.IndexSampler):
    """IndexSampler (global shuffle, reshuffled each epoch) whose per-record RNG is
    `record_rng(seed, record_key, epoch)`: independent of workers, processes and resumes.

    grain shards a stream by giving process p of n the indices p, p + n, ..., and worker w
    of W the w-th of every W of those; each worker batches its own records and grain
    interleaves the workers' batches round robin. This sampler re-maps the indices so that
    process p's k-th local batch (from worker k mod W) is the p-th contiguous block of the
    k-th global batch. The global batch (rows in process order) is then the same for any
    number of processes and workers, so a run on 2 hosts equals a run on 1, and a stream's
    position is one number (`data/position.py`). A finite stream (`num_epochs`, whose tail
    would not fill W batches on every worker) keeps grain's worker interleave: only its
    processes are re-mapped.
    """

    def __init__(self, num_records: int, *, seed: int, num_epochs: int | None,
                 local_batch: int = 1, process_count: int = 1, workers: int = 0):
        super().__init__(num_records, shuffle=True, num_epochs=num_epochs, seed=seed)
        self._n, self._flip_seed = num_records, seed
        self._local, self._procs = local_batch, process_count
        self._workers = max(workers, 1) if num_epochs is None else 1

    def position(self, index: int) -> int:
        """The stream position grain's `index` reads (see the class docstring)."""
        n, b, w = self._procs, self._local, self._workers
        if n == 1 and w == 1:
            return index
        p, local = index % n, index // n
        worker, row = local % w, local // w
        k = (row // b) * w + worker
        return k * b * n + p * b + row % b

    def __getitem__(self, index: int):
        position = self.position(index)
        md = super().__getitem__(position)
        rng = record_rng(self._flip_seed, int(md.record_key), position // self._n)
        # keep grain's own index: its iterator state counts requested positions
        return grain.RecordMetadata(index=index, record_key=md.record_key, rng=rng)


class _DropUnreadable(grain.transforms.Filter):
    """Drops records whose image could not be read and counts them until the next batch."""

    def __init__(self):
        self.pending = 0

    def filter(self, element) -> bool:
        if element.get("image", True) is None:
            self.pending += 1
            return False
        return True


class _Flip(grain.transforms.RandomMap):
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def random_map(self, element, rng):
        flip = self.enabled and flip_decision(rng)
        if "latents" in element:  # cached encodings of both flips: pick one
            k = int(flip)
            return {"latents": element["latents"][k], "cls": element["cls"][k],
                    "label": element["label"]}
        image = element["image"]
        return {"image": np.ascontiguousarray(image[:, ::-1]) if flip else image,
                "label": element["label"]}


class _Batcher:
    """Stacks records and reports how many were dropped since the previous batch."""

    def __init__(self, drop: _DropUnreadable):
        self.drop = drop
        self.shared_memory = False

    def enable_shared_memory_output(self):
        self.shared_memory = True

    def __call__(self, values):
        batch = make_batch(values, output_to_shared_memory=self.shared_memory)
        batch["num_skipped"] = np.int64(self.drop.pending)
        self.drop.pending = 0
        return batch


class TrainIterator(grain.DataLoaderIterator):
    """A DataLoaderIterator that moves each batch's skip count onto its loader and counts
    the batches of its stream (`batches`), so its position is process-independent."""

    def __init__(self, loader: TrainLoader):
        super().__init__(loader, state=None)
        self._loader = loader
        self.batches = 0  # local batches since the stream's start = global batches

    def __next__(self):
        batch = super().__next__()
        self.batches += 1
        self._loader.num_skipped += int(batch.pop("num_skipped"))
        return batch

    def position(self) -> dict:
        """The process-independent position (`data/position.py`) after `batches`."""
        return position_lib.position_record(
            batches=self.batches, global_batch=self._loader.global_batch,
            sampler=repr(self._loader.sampler), data_source=repr(self._loader.source))

    def accepts_state(self, raw: bytes | str) -> bool:
        """Whether grain's per-process `raw` state is one of this loader's streams (same
        worker count, sampler and source), so `set_state` restores it exactly."""
        state = position_lib.parse_state(raw)
        return (state["worker_count"] == self._loader.worker_count
                and state["sampler"] == repr(self._loader.sampler)
                and state["data_source"] == repr(self._loader.source))

    def restore_state(self, raw: bytes | str, batches: int) -> None:
        """grain's per-process state (exact, also after dropped records) at `batches`."""
        self.set_state(raw if isinstance(raw, bytes) else raw.encode())
        self.batches = int(batches)

    def check(self, record) -> None:
        """DataPositionError (one line) unless the `position()` record continues this
        stream: same global batch and sampler (a moved source is only logged)."""
        loader = self._loader
        position_lib.check_position(record, global_batch=loader.global_batch,
                                    sampler=repr(loader.sampler))
        if record["data_source"] != repr(loader.source):
            log.warning("data position saved for %s, continuing on %s (same records and "
                        "order)", record["data_source"], repr(loader.source))

    def seek(self, record) -> None:
        """Move to a `position()` record of any process or worker count (DataPositionError,
        one line, when it cannot continue this stream)."""
        self.check(record)
        loader = self._loader
        template = json.loads(self.get_state())
        state = position_lib.grain_state_at(
            template, int(record["batches"]), process_index=loader.process_index,
            process_count=loader.process_count, local_batch=loader.local_batch)
        self.set_state(json.dumps(state).encode())
        self.batches = int(record["batches"])


class TrainLoader(grain.DataLoader):
    """grain.DataLoader plus `num_skipped` (unreadable images dropped by its iterators) and
    the stream's geometry (global batch, process shard, workers) its positions need."""

    def __init__(self, *, global_batch: int, process_index: int, process_count: int,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_skipped = 0
        self.global_batch, self.process_index, self.process_count = (
            int(global_batch), int(process_index), int(process_count))
        self.local_batch = self.global_batch // self.process_count
        self.worker_count = int(kwargs.get("worker_count", 0))
        self.sampler, self.source = kwargs["sampler"], kwargs["data_source"]

    def __iter__(self) -> TrainIterator:
        return TrainIterator(self)


def make_train_loader(data_cfg, *, global_batch: int, seed: int, process_index=None,
                      process_count=None, num_epochs: int | None = None) -> TrainLoader:
    """The training stream of host-local batches `{"image": uint8 (b, S, S, C), "label": int32}`
    (latent caches: `{"latents", "cls", "label"}`), b = global_batch / process_count.

    Infinite unless `num_epochs`; incomplete batches are dropped. Deterministic for a seed
    and a step, and resumable from `iterator.get_state()`.
    """
    process_index, process_count = _process(process_index, process_count)
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by the "
                         f"{process_count} processes")
    source = make_source(data_cfg)
    num_workers = int(data_cfg.num_workers)
    _allow_worker_processes(num_workers)
    drop = _DropUnreadable()
    return TrainLoader(
        global_batch=global_batch, process_index=process_index, process_count=process_count,
        data_source=source,
        sampler=FlipSampler(len(source), seed=int(seed), num_epochs=num_epochs,
                            local_batch=global_batch // process_count,
                            process_count=process_count, workers=num_workers),
        operations=[drop, _Flip(bool(data_cfg.random_flip)),
                    grain.transforms.Batch(global_batch // process_count, drop_remainder=True,
                                           batch_fn=_Batcher(drop))],
        worker_count=num_workers,
        worker_buffer_size=max(1, int(data_cfg.prefetch)),
        shard_options=grain.sharding.ShardOptions(process_index, process_count,
                                                  drop_remainder=True),
        read_options=grain.ReadOptions(num_threads=int(_get(data_cfg, "read_threads", 16)),
                                       prefetch_buffer_size=int(
                                           _get(data_cfg, "read_buffer", 256))),
    )


class _EvalRecord:
    """Position in this process's stream -> record (or padding), with index and mask."""

    def __init__(self, source: DecodedSource, process_index: int, local_batch: int,
                 global_batch: int):
        self.source, self.p, self.b, self.g = source, process_index, local_batch, global_batch

    def __call__(self, position: int) -> dict:
        step, row = divmod(int(position), self.b)
        key = step * self.g + self.p * self.b + row
        s, c = self.source.image_size, self.source.channels
        if key >= len(self.source):
            return {"image": np.zeros((s, s, c), np.uint8), "label": np.int32(-1),
                    "index": np.int64(-1), "mask": np.bool_(False)}
        rec = self.source[key]
        ok = rec["image"] is not None
        return {"image": rec["image"] if ok else np.zeros((s, s, c), np.uint8),
                "label": rec["label"], "index": rec["index"], "mask": np.bool_(ok)}


class EvalLoader:
    """Iterable over `len(self)` host-local batches `{"image", "label", "index", "mask"}`.

    `mask` is False for padding rows (index -1) and for unreadable images (real index).
    """

    def __init__(self, dataset, num_batches: int, num_records: int, local_batch: int):
        self._dataset = dataset
        self.num_batches, self.num_records, self.local_batch = num_batches, num_records, \
            local_batch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        return iter(self._dataset)


def make_eval_loader(data_cfg, *, global_batch: int, image_size: int | None = None,
                     process_index=None, process_count=None,
                     num_workers: int | None = None) -> EvalLoader:
    """One ordered pass over every record, centre-cropped to `image_size` (default
    data.image_size; MM-FM's GMM scripts use 224), no flip, sharded by process."""
    process_index, process_count = _process(process_index, process_count)
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by the "
                         f"{process_count} processes")
    if data_cfg.kind == "latent_cache":
        raise ValueError("make_eval_loader reads images; data.kind='latent_cache' has none")
    source = make_source(data_cfg, image_size)
    local = global_batch // process_count
    num_batches = math.ceil(len(source) / global_batch)
    workers = int(data_cfg.num_workers if num_workers is None else num_workers)
    _allow_worker_processes(workers)
    threads = int(_get(data_cfg, "read_threads", 16))  # each thread reads whole batches
    ds = (grain.MapDataset.range(num_batches * local)
          .map(_EvalRecord(source, process_index, local, global_batch))
          .batch(local)
          .to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)))
    if workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(1, int(data_cfg.prefetch))))
    return EvalLoader(ds, num_batches, len(source), local)
