"""The one strict check of named arrays against the names and shapes a reader expects.

Every reader of named arrays refuses a mismatch the same way: model directories of every
network (`model_dir`), the in-memory loaders (`state_arrays.module_from_arrays`) and the
converters' upstream state-dict mapping (`convert.common.KeyConsumer`). The error is one
line that names the source and everything wrong at once (missing, mis-shaped and
unexpected keys), so a corrupted or mismatched file is diagnosed in one run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Shape = tuple[int, ...]


def check_keys(expected: Mapping[str, Shape | None], arrays: Mapping[str, Any], source: str,
               *, ignore: Iterable[str] = (), misshaped: Iterable[str] = (),
               error: type[Exception] = ValueError) -> None:
    """Raise `error` unless `arrays` holds exactly the keys of `expected` with their shapes.

    An expected shape of None accepts any shape. Keys in `ignore` may be present without
    being expected; `misshaped` adds problems the caller found itself (a layout it could
    not interpret). The message lists missing keys in `expected` order, then mis-shaped,
    then unexpected keys in `arrays` order.
    """
    ignore = set(ignore)
    missing = [key + ("" if shape is None else f" (expected shape {tuple(shape)})")
               for key, shape in expected.items() if key not in arrays]
    wrong = [f"{key}: shape {tuple(arrays[key].shape)}, expected {tuple(shape)}"
             for key, shape in expected.items()
             if shape is not None and key in arrays
             and tuple(arrays[key].shape) != tuple(shape)]
    wrong += list(misshaped)
    unexpected = [f"{key} {tuple(value.shape)}" for key, value in arrays.items()
                  if key not in expected and key not in ignore]
    problems = [f"{label}: {sep.join(items)}" for label, sep, items in
                (("missing keys", ", ", missing), ("mis-shaped keys", "; ", wrong),
                 ("unexpected keys", ", ", unexpected)) if items]
    if problems:
        raise error(f"{source}: " + " | ".join(problems))
