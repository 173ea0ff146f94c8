"""Atomic JSON writes for every job's outputs (config.json, eval.json, metrics.json, ...).

The file is written under a temporary name and renamed into place, so a reader never sees a
half-written file; paths go through etils.epath, so gs:// works too.
"""

from __future__ import annotations

import json

from etils import epath


def write_json(path, obj, **dump_kwargs) -> None:
    """Write `json.dumps(obj, **dump_kwargs)` to `path` atomically, creating its folder."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(obj, **dump_kwargs))
    tmp.replace(path)
