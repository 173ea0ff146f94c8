"""Scalars to `metrics.jsonl` and TensorBoard event files, and the progress line.

TensorBoard files are written with tensorboardX (protobuf only), so TensorFlow stays out
of the base install; `clu.metrics` does the on-device aggregation in the train loop.
Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import numpy as np

# Dense bf16 peak TFLOP/s per device, for MFU (matched as substrings of device_kind).
PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("v5p", 459.0),
               ("v5 lite", 197.0), ("v5e", 197.0), ("v4", 275.0))


def peak_tflops(override: float | None = None) -> float | None:
    """Per-device dense bf16 peak for MFU: `override` when > 0 (config.train.peak_tflops
    is -1 for "look it up"), else the device-kind table (None on CPU and unknown devices,
    where MFU is not reported)."""
    if override is not None and override > 0:
        return float(override)
    kind = jax.devices()[0].device_kind.lower()
    for name, value in PEAK_TFLOPS:
        if name.lower() in kind:
            return value
    return None


class MetricWriter:
    """Append one JSON record per call to `<workdir>/metrics.jsonl` and mirror the scalars
    to TensorBoard under `<workdir>/tensorboard`."""

    def __init__(self, workdir: str, *, filename: str = "metrics.jsonl",
                 tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, filename)
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _to_python(v) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str, filename: str = "metrics.jsonl") -> list[dict]:
    path = os.path.join(workdir, filename)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _to_python(v):
    if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def format_seconds(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """A progress line with rate and ETA for every long job (process 0 only).

    `update(n)` advances by n units and prints at most every `min_interval` seconds;
    the line goes to stderr and to the logging module.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, start: int = 0,
                 min_interval: float = 5.0, stream=None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = int(start)
        self.start_count = int(start)
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.min_interval = min_interval
        self.stream = stream or sys.stderr
        self.enabled = jax.process_index() == 0

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return (self.done - self.start_count) / elapsed if elapsed > 0 else 0.0

    def line(self, extra: str = "") -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = (f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:5.1f}%) "
                f"{rate:.2f} {self.unit}/s, elapsed "
                f"{format_seconds(time.perf_counter() - self.t0)}, ETA {format_seconds(eta)}")
        return text + (f" | {extra}" if extra else "")

    def update(self, n: int = 1, extra: str = "", force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (force or self.done >= self.total
                             or now - self.last >= self.min_interval):
            self.last = now
            text = self.line(extra)
            print(text, file=self.stream, flush=True)
            logging.debug(text)
