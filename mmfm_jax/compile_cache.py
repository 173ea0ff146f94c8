"""The persistent XLA compilation cache of a run (`config.compile_cache`).

Why: a DiTDH-XL train step takes minutes to compile on an accelerator (more unscanned), and
a preemptible pod recompiles it on every restart and requeue, and the sampling stage
compiles its own programs again. JAX can keep compiled executables on disk, keyed by the
program, the devices and the compiler version; a run that meets a program it compiled
before (same workdir, or a shared cache folder) loads it instead of compiling.

* `config.compile_cache` is the folder: "{workdir}/compile_cache" by default (the
  placeholder is the run's workdir, so restarts and requeues of that run share it; any
  other path, gs:// included, can be shared by several runs); "" disables it.
* `enable(directory)` sets it once per process through `jax.config`
  (jax_compilation_cache_dir) with no minimum compile time and no minimum entry size, so
  that CPU compiles (often under JAX's 1 s default threshold) are cached too; only
  process 0 writes entries (JAX's rule), every process reads them.
* JAX's own monitoring events count hits, misses and the compile seconds the hits saved;
  `summary()` is one line of them, which the trainer logs after its first step.
"""

from __future__ import annotations

import logging
import os
import threading

import jax

DEFAULT = "{workdir}/compile_cache"
_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"

_lock = threading.Lock()
_state = {"directory": "", "listening": False, "hits": 0, "misses": 0, "saved_s": 0.0}


def resolve(setting: str | None, workdir: str) -> str:
    """The cache folder of `setting` ("{workdir}" is replaced by the run's workdir; "" or
    None: no cache)."""
    if not setting:
        return ""
    return str(setting).replace("{workdir}", str(workdir).rstrip("/"))


def _on_event(event: str, **_) -> None:
    if event in (_HIT, _MISS):
        with _lock:
            _state["hits" if event == _HIT else "misses"] += 1


def _on_duration(event: str, duration: float, **_) -> None:
    if event == _SAVED:
        with _lock:
            _state["saved_s"] += float(duration)


def enable(directory: str) -> str:
    """Use `directory` as this process's persistent compilation cache (created if local).

    Once per process: a second call with another folder keeps the first (logged), since
    executables already loaded came from it. Returns the folder in use ("" for none)."""
    if not directory:
        return _state["directory"]
    if _state["directory"]:
        if os.path.normpath(directory) != os.path.normpath(_state["directory"]):
            logging.warning("compile cache: already using %s in this process; not switching "
                            "to %s", _state["directory"], directory)
        return _state["directory"]
    if "://" not in directory:
        os.makedirs(directory, exist_ok=True)
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()  # a compile before this call had found the cache off
    if not _state["listening"]:
        jax.monitoring.register_event_listener(_on_event)
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _state["listening"] = True
    _state["directory"] = directory
    logging.info("compile cache: %s (persistent; shared by restarts of this run)", directory)
    return directory


def setup(cfg, workdir: str) -> str:
    """`enable` the folder of `config.compile_cache` for the run in `workdir`."""
    return enable(resolve(cfg.get("compile_cache", DEFAULT), workdir))


def stats() -> dict:
    """Cache hits, misses and the compile seconds hits saved, in this process so far."""
    with _lock:
        return {k: _state[k] for k in ("hits", "misses", "saved_s")}


def summary() -> str:
    """One line: the folder and this process's hits and misses ("" when there is no cache)."""
    if not _state["directory"]:
        return ""
    s = stats()
    return (f"compile cache {_state['directory']}: {s['hits']} hit(s) "
            f"({s['saved_s']:.1f} s of compiling saved), {s['misses']} miss(es)")


def log_summary() -> None:
    """Log `summary()` (logging.info) when a cache is in use."""
    line = summary()
    if line:
        logging.info("%s", line)
