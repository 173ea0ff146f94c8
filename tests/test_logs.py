"""The console/log-file split (`mmfm_jax/logs.py`) and the progress bar that goes with it."""

import io
import logging
import os

import pytest

from mmfm_jax import logs, metrics, parallel

SITE = os.path.join(os.sep, "venv", "site-packages", "orbax", "checkpoint_manager.py")
OWN = os.path.join(logs.PACKAGE_DIRS[0], "train.py")


def record(level, msg, pathname=OWN, **extra):
    rec = logging.LogRecord("absl" if pathname == SITE else "root", level, pathname, 1, msg,
                            (), None)
    rec.__dict__.update(extra)
    return rec


def test_console_filter_keeps_own_info_and_every_warning():
    quiet, loud = logs.ConsoleFilter(), logs.ConsoleFilter(verbose=True)
    cases = [  # (record, on the console by default)
        (record(logging.INFO, "checkpoint: saving step 5"), True),
        (record(logging.INFO, "EM iteration 3", **logs.FILE_ONLY), False),
        (record(logging.DEBUG, "detail"), False),
        (record(logging.INFO, "CheckpointManager created", SITE), False),
        (record(logging.WARNING, "disk almost full", SITE), True),
        (record(logging.WARNING, "CheckpointManagerOptions.read_only=True, setting create=False.",
                SITE), False),
        (record(logging.ERROR, "error: x", **logs.FILE_ONLY), False),
    ]
    for rec, shown in cases:
        assert quiet.filter(rec) is shown, rec.getMessage()
        assert loud.filter(rec)  # --verbosity=1: everything


def test_console_format_is_plain_and_multi_line_records_are_cut():
    fmt = logs.ConsoleFormatter()
    assert fmt.format(record(logging.INFO, "table:\n  a\n  b")) == \
        "table: [+2 lines in the log file]"
    assert fmt.format(record(logging.WARNING, "careful", SITE)) == "warning: careful"


@pytest.fixture
def routed_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logs.teardown()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_setup_sends_third_party_info_to_the_file_only(tmp_path, capsys, routed_logging):
    logs.setup()
    logging.getLogger("orbax").info("handler registry internals")  # not this package
    parallel.log_topology()  # this package's INFO, logged before the file is known
    path = logs.attach_file(logs.log_path(str(tmp_path)))
    logging.getLogger("jax._src.xla_bridge").info("backend internals")
    logging.getLogger("grain").warning("a real warning")
    console = capsys.readouterr().err.splitlines()
    assert path == str(tmp_path / "log.txt")
    assert any(line.startswith("process 0/1") for line in console)
    assert "warning: a real warning" in console
    assert not any("internals" in line for line in console)
    with open(path) as f:
        log = f.read()
    for text in ("handler registry internals", "process 0/1", "backend internals",
                 "a real warning"):
        assert text in log, text
    assert logs.log_path("gs://bucket/run", 3).endswith("mmfm_jax_run_log.p3.txt")


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_prints_sparse_lines_off_a_terminal(caplog):
    stream = io.StringIO()
    progress = metrics.Progress(100, "sample", "img", stream=stream, min_interval=0)
    with caplog.at_level(logging.INFO):
        for _ in range(100):
            progress.update(1)
    lines = stream.getvalue().splitlines()
    assert [line.split(" img")[0] for line in lines] == [
        "sample: 25/100", "sample: 50/100", "sample: 75/100", "sample: 100/100"]
    logged = [r for r in caplog.records if r.getMessage().startswith("sample: ")]
    assert logged and all(r.console is False for r in logged)  # the log file's copy
    assert logged[-1].getMessage().startswith("sample: 100/100")


def test_progress_redraws_one_line_on_a_terminal():
    stream = Tty()
    progress = metrics.Progress(10, "train", "steps", stream=stream, redraw=0)
    for _ in range(10):
        progress.update(1)
    text = stream.getvalue()
    assert text.count("\r") == 10 and text.count("\n") == 1 and text.endswith("\n")
    assert "train: 10/10 steps" in text.splitlines()[-1].split("\r")[-1]


def test_progress_finish_reports_a_loop_that_stopped_early():
    stream = io.StringIO()
    progress = metrics.Progress(100, "fit_gmm EM", "iterations", stream=stream)
    progress.update(7)
    progress.finish()
    progress.finish()  # once
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fit_gmm EM: 7/100 iterations")
