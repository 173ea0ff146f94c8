"""Scalars to `metrics.jsonl` and TensorBoard event files, and the progress line.

TensorBoard files are written with tensorboardX (protobuf only), so TensorFlow stays out
of the base install; `clu.metrics` does the on-device aggregation in the train loop.
Only process 0 writes. The progress bar redraws one line on a terminal and prints sparse
lines elsewhere; its dense record goes to the log file (`logs.py`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import numpy as np

from mmfm_jax import logs

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
    """A progress bar with rate and ETA for every long loop (process 0 only).

    On a terminal it is one line redrawn in place (`\r`, at most every `redraw` seconds).
    Elsewhere (a log, a pipe, CI) it prints sparse lines: one when each `1/milestones` of
    the way is passed, at least `min_interval` seconds after the previous line, and the
    last one. The log file gets a line every `log_interval` seconds and the last one
    (`logs.FILE_ONLY`), so the console stays short and the dense record is kept.
    `update(n)` advances by n units; `finish()` prints the final state of a loop that
    ended early (an EM that converged).
    """

    def __init__(self, total: int, desc: str, unit: str = "it", *, start: int = 0,
                 min_interval: float = 10.0, stream=None, milestones: int = 4,
                 redraw: float = 0.25, log_interval: float = 5.0):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = int(start)
        self.start_count = int(start)
        self.t0 = time.perf_counter()
        self.last = self.last_log = self.t0
        self.min_interval, self.milestones = min_interval, max(int(milestones), 1)
        self.redraw, self.log_interval = redraw, log_interval
        self.milestone = self._milestone()
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = jax.process_index() == 0
        self.finished = False
        self._width = 0

    def _milestone(self) -> int:
        return self.done * self.milestones // self.total if self.total > 0 else 0

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
        if not self.enabled or self.finished:
            return
        now = time.perf_counter()
        last = self.done >= self.total
        if last or force or now - self.last_log >= self.log_interval:
            self.last_log = now
            logging.info(self.line(extra), extra=logs.FILE_ONLY)
        if self.tty:
            if last or force or now - self.last >= self.redraw:
                self._draw(self.line(extra), end=last)
        else:
            milestone = self._milestone()
            if last or force or (milestone > self.milestone
                                 and now - self.last >= self.min_interval):
                self.milestone = milestone
                print(self.line(extra), file=self.stream, flush=True)
                self.last = now
        self.finished = last

    def finish(self, extra: str = "") -> None:
        """Print (and log) the final line once, wherever the loop stopped."""
        if not self.enabled or self.finished:
            return
        self.finished = True
        text = self.line(extra)
        logging.info(text, extra=logs.FILE_ONLY)
        if self.tty:
            self._draw(text, end=True)
        else:
            print(text, file=self.stream, flush=True)

    def _draw(self, text: str, end: bool) -> None:
        pad = " " * max(self._width - len(text), 0)
        self._width = len(text)
        self.stream.write("\r" + text + pad + ("\n" if end else ""))
        self.stream.flush()
        self.last = time.perf_counter()
        logs.partial_line(not end)
