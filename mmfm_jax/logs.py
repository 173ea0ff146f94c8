"""Where a run's messages go: the console keeps what a person reads, the log file keeps all.

A training run's console used to be mostly orbax/absl bookkeeping (handler registries,
async-save threads) around the few lines that matter. `setup` splits the stream in two:

* the console (stderr) shows warnings and errors from any library, the INFO lines of this
  package (the stage, results; a multi-line record shows its first line and says how many
  more the log file holds) and the progress bars of `metrics.Progress`;
* the log file (`<workdir>/log.txt`; process i > 0 writes `log.p{i}.txt`) gets every
  record at INFO and above, in absl's format: the third-party INFO (orbax, absl, jax,
  grain) that never reaches the console, the details logged with `extra=FILE_ONLY`
  (EM iterations, dense progress lines) and the traceback behind a one-line error.

`--verbosity=1` (absl's flag) puts everything on the console as well. Records logged
before the file is known (the distributed start-up) are buffered and written into it
when `attach_file` opens it. A workdir on `gs://` keeps its log in the local temp dir.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import tempfile

FILE_ONLY = {"console": False}  # `logging.info(..., extra=FILE_ONLY)`: log file only
PACKAGE_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), name) + os.sep for name in ("mmfm_jax", "convert"))

# Third-party warnings that are bookkeeping, not advice: orbax warns about the options of
# the read-only manager that `checkpoint.restore_subset` opens on purpose. Log file only.
QUIET_WARNINGS = ("CheckpointManagerOptions.read_only=True, setting",
                  "Given directory is read only=")

_state: dict = {"handlers": [], "partial_line": False}


def _own(record: logging.LogRecord) -> bool:
    return os.path.abspath(record.pathname).startswith(PACKAGE_DIRS)


class ConsoleFilter(logging.Filter):
    """Everything when verbose; else a record's own `console` choice (FILE_ONLY), else
    warnings and errors from anyone (but QUIET_WARNINGS) and this package's INFO."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if getattr(record, "console", None) is not None:  # an explicit choice wins
            return bool(record.console)
        if record.levelno >= logging.WARNING:
            return _own(record) or not str(record.msg).startswith(QUIET_WARNINGS)
        return record.levelno >= logging.INFO and _own(record)


class ConsoleFormatter(logging.Formatter):
    """`message` for INFO (first line only), `warning: message` / `error: message` above."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            if record.exc_info:
                text += "\n" + self.formatException(record.exc_info)
            return f"{record.levelname.lower()}: {text}"
        first, *rest = text.splitlines() or [""]
        return first + (f" [+{len(rest)} lines in the log file]" if rest else "")


class _ConsoleHandler(logging.Handler):
    """Writes to the current sys.stderr (so capture and redirection see it) and ends an
    open progress-bar line first."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if _state["partial_line"]:
                sys.stderr.write("\n")
                _state["partial_line"] = False
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def partial_line(is_open: bool) -> None:
    """A progress bar says whether it left the terminal's cursor mid-line."""
    _state["partial_line"] = is_open


def _file_formatter() -> logging.Formatter:
    try:
        from absl.logging import PythonFormatter
        return PythonFormatter()
    except ImportError:  # pragma: no cover - absl is a base requirement
        return logging.Formatter("%(levelname).1s%(asctime)s %(filename)s:%(lineno)d] "
                                 "%(message)s")


def setup(verbose: bool = False) -> None:
    """Route the root logger: console as above, the rest buffered until `attach_file`.

    Replaces absl's stderr handler (and any earlier `setup`); the root level is at most
    INFO, so the log file always gets INFO."""
    teardown()
    root = logging.getLogger()
    try:
        from absl import logging as absl_logging
        root.removeHandler(absl_logging.get_absl_handler())
    except ImportError:  # pragma: no cover
        pass
    console = _ConsoleHandler()
    console.addFilter(ConsoleFilter(verbose))
    console.setFormatter(_file_formatter() if verbose else ConsoleFormatter())
    buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    buffer.setLevel(logging.INFO)
    for handler in (console, buffer):
        root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    _state["handlers"] = [console, buffer]


def log_path(workdir: str, process_index: int = 0) -> str:
    """`<workdir>/log.txt` (`log.p{i}.txt` for process i > 0); a remote workdir's log is
    kept in the local temp dir."""
    name = "log.txt" if process_index == 0 else f"log.p{process_index}.txt"
    if "://" in str(workdir):
        tag = str(workdir).rstrip("/").split("/")[-1] or "run"
        return os.path.join(tempfile.gettempdir(), f"mmfm_jax_{tag}_{name}")
    return os.path.join(workdir, name)


def attach_file(path: str) -> str:
    """Open the log file (appending: a resumed run continues it), write the buffered
    records into it and send every later INFO+ record there. Returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(_file_formatter())
    root = logging.getLogger()
    for handler in list(_state["handlers"]):
        if isinstance(handler, logging.handlers.MemoryHandler):
            for record in handler.buffer:
                if record.levelno >= file_handler.level:
                    file_handler.handle(record)
            handler.buffer.clear()
            root.removeHandler(handler)
            _state["handlers"].remove(handler)
    root.addHandler(file_handler)
    _state["handlers"].append(file_handler)
    return path


def teardown() -> None:
    """Remove and close the handlers of `setup`/`attach_file` (absl's is not restored)."""
    root = logging.getLogger()
    for handler in _state["handlers"]:
        root.removeHandler(handler)
        handler.close()
    _state["handlers"] = []
    _state["partial_line"] = False
