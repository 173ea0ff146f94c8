"""metrics.jsonl + TensorBoard events without TensorFlow, and the progress line."""

import io
import json
import os
import sys

from mmfm_jax import metrics


def test_writer_jsonl_and_tensorboard(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write(10, {"loss": 0.5, "lr": 2e-4, "mfu": None})
    writer.write(20, {"loss": 0.25, "lr": 2e-4, "mfu": None})
    writer.close()
    records = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [10, 20]
    assert records[1]["loss"] == 0.25
    events = [f for f in os.listdir(tmp_path / "tensorboard") if "tfevents" in f]
    assert events and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0
    assert "tensorflow" not in sys.modules
    json.dumps(records)


def test_progress_line_has_rate_and_eta():
    stream = io.StringIO()
    progress = metrics.Progress(100, "sampling", unit="img", stream=stream, min_interval=0)
    progress.update(25)
    line = stream.getvalue().strip()
    assert line.startswith("sampling: 25/100 img ( 25.0%)")
    assert "img/s" in line and "ETA" in line


def test_format_seconds():
    assert metrics.format_seconds(59) == "0:59"
    assert metrics.format_seconds(3661) == "1:01:01"
    assert metrics.format_seconds(float("inf")) == "?"
