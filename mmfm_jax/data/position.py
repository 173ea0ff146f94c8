"""The training stream's position as a process-independent record, and grain states from it.

Why: grain checkpoints one JSON per process (`process_{i}-of-{n}.json`), keyed by that
process's shard of the index space, so a checkpoint written by 2 processes cannot be read by
1 (grain raises "File .../process_0-of-1.json does not exist"), nor by a run with another
number of data workers. The stream itself does not depend on either: `FlipSampler` gives
process p's k-th local batch the p-th contiguous block of the k-th global batch, whatever
the process and worker counts. So the position of the whole stream is one number, the
global batches consumed, and every process can rebuild its own grain state from it.

* `position_record(...)` is that number with what fixes the order (global batch, the
  sampler's repr: records, seed, epochs) and the source it was read from; the checkpoint
  stores it once (not per process).
* `check_position(record, ...)` says in one line why a record cannot continue this stream
  (`DataPositionError`): a changed global batch, record count, seed or format.
* `grain_state_at(template, batches, ...)` is the DataLoader state (grain's JSON, the
  fields `last_seen_indices` / `last_worker_index`) of a process that has produced `batches`
  local batches, `template` being any state of the same loader (it supplies the version,
  sampler, source and worker count that grain validates).

Records dropped as unreadable shift a process's own stream by one each; the rebuilt state
starts at the global batch boundary, so those few records are read again after an elastic
resume (a same-topology resume restores the per-process state and repeats nothing).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

FORMAT = "mmfm-data-position-1"


class DataPositionError(ValueError):
    """A saved data position that cannot continue this stream (one line)."""


def position_record(*, batches: int, global_batch: int, sampler: str, data_source: str) -> dict:
    """The process-independent position after `batches` global batches."""
    return {"format": FORMAT, "batches": int(batches), "global_batch": int(global_batch),
            "samples": int(batches) * int(global_batch), "sampler": sampler,
            "data_source": data_source}


def check_position(record: Mapping, *, global_batch: int, sampler: str) -> None:
    """Raise DataPositionError unless `record` continues a stream of `global_batch` rows
    drawn by `sampler` (its repr: record count, shuffle seed, epochs)."""
    if record.get("format") != FORMAT:
        raise DataPositionError(f"data position format {record.get('format')!r}; expected "
                                f"{FORMAT!r}")
    if int(record["global_batch"]) != int(global_batch):
        raise DataPositionError(
            f"the checkpoint consumed {record['batches']} global batches of "
            f"{record['global_batch']} samples and this run's global batch is {global_batch}: "
            "a changed global batch cannot continue the same data order; set "
            f"config.train.batch_size={record['global_batch']}")
    if record["sampler"] != sampler:
        raise DataPositionError(
            f"the checkpoint's sampler was {record['sampler']} and this run's is {sampler}: "
            "the data order differs (record count, config.seed or epochs changed)")


def worker_batches(batches: int, workers: int) -> list[int]:
    """Local batches each of `workers` worker processes produced after `batches` in all
    (grain interleaves its workers' batches round robin, starting at worker 0)."""
    return [(batches - i + workers - 1) // workers for i in range(workers)]


def grain_state_at(template: Mapping, batches: int, *, process_index: int,
                   process_count: int, local_batch: int) -> dict:
    """grain's DataLoader state of process `process_index` after `batches` local batches of
    `local_batch` records each (no record dropped), for the worker count of `template`.

    grain's convention (DataLoader `get_state`): worker i of shard p reads the indices
    p + i*n + j*n*W (n shards, W workers) and `last_seen_indices[i]` is the last index it
    handed out, `p - n*W + i*n + next_index*n*W` with `next_index` records read; without
    worker processes W counts as 1 and `last_worker_index` is -1."""
    if batches < 0:
        raise DataPositionError(f"data position {batches} batches is negative")
    state = dict(template)
    workers = int(state["worker_count"])
    p, n = int(process_index), int(process_count)
    if workers == 0:
        state["last_seen_indices"] = {"0": p - n + batches * local_batch * n}
        state["last_worker_index"] = -1
        return state
    stride = workers * n
    counts = worker_batches(batches, workers)
    state["last_seen_indices"] = {str(i): p - stride + i * n + counts[i] * local_batch * stride
                                  for i in range(workers)}
    state["last_worker_index"] = batches % workers - 1
    return state


def parse_state(raw: bytes | str) -> dict:
    """A grain DataLoader state (JSON) as a dict; DataPositionError if it is not one."""
    try:
        state = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise DataPositionError(f"not a grain iterator state ({e})") from None
    missing = [k for k in ("last_seen_indices", "worker_count", "sampler", "data_source")
               if k not in state]
    if missing:
        raise DataPositionError(f"grain iterator state without {', '.join(missing)}")
    return state
