"""The house rule, read from the code's imports (inside functions too).

No module under `mmfm_jax/` imports `convert/`, `tests/` or `configs/` (the library must work
without the converters' torch, the test helpers or the experiment files), and no two of its
modules import each other, directly or through a cycle (a reader can follow the wiring one
way). Edges between a package and its own submodules do not count: `models/__init__.py`
re-exporting `models/ditdh.py` is the package's public surface, not a cycle.
"""

from __future__ import annotations

import ast
import os
import textwrap

from tests.conftest import REPO

OUTSIDE = ("convert", "tests", "configs")


def _modules(root: str, package: str) -> dict[str, str]:
    """{"mmfm_jax.models.ditdh": path} for every .py file under `root/package`."""
    found = {}
    for folder, _, files in os.walk(os.path.join(root, package)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, root)[:-3]
                found[rel.replace(os.sep, ".").removesuffix(".__init__")] = path
    return found


def _imported_names(module: str, path: str) -> list[tuple[str, bool]]:
    """(dotted name, is the statement's own module) for every name an import statement of
    `path` can bind, relative ones resolved: `from a.b import c` gives a.b and a.b.c."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    names = []
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(a.name, True) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names += [(base, True)] + [(f"{base}.{a.name}", False) for a in node.names]
    return names


def _owner(name: str, modules: dict[str, str]) -> str | None:
    """The module a dotted import name lands in (`mmfm_jax.parallel.round_up` -> parallel)."""
    while name and name not in modules:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name or None


def import_graph(root: str, package: str = "mmfm_jax") -> tuple[dict, list[str]]:
    """(graph {module: imported modules}, imports of convert/tests/configs)."""
    modules = _modules(root, package)
    graph, outside = {m: set() for m in modules}, []
    for m, path in modules.items():
        for name, own in _imported_names(m, path):
            if own and name.split(".")[0] in OUTSIDE:
                outside.append(f"{os.path.relpath(path, root)} imports {name}")
            n = _owner(name, modules)
            if n and n != m and not m.startswith(n + ".") and not n.startswith(m + "."):
                graph[m].add(n)
    return graph, sorted(set(outside))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index, low, on, stack, found, counter = {}, {}, set(), [], [], 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_library_imports_no_converter_tests_or_configs():
    _, outside = import_graph(REPO)
    assert outside == []


def test_library_has_no_import_cycles():
    graph, _ = import_graph(REPO)
    assert len(graph) > 20  # the walk found the library
    assert cycles(graph) == []


def _write(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))


def test_checker_finds_cycles_and_outside_imports(tmp_path):
    """The rule can fail: a planted 3-cycle, a direct pair, and forbidden imports (one of
    them inside a function) are all reported; a package importing its submodule is not."""
    _write(tmp_path, {
        "mmfm_jax/__init__.py": "",
        "mmfm_jax/a.py": "from mmfm_jax import b\n",
        "mmfm_jax/b.py": "def f():\n    from mmfm_jax.c import g\n",
        "mmfm_jax/c.py": "import mmfm_jax.a\ndef g():\n    import configs.base\n",
        "mmfm_jax/d.py": "from . import e\nfrom convert.common import x\n",
        "mmfm_jax/e.py": "from mmfm_jax.d import y\nfrom tests import conftest\n",
        "mmfm_jax/pkg/__init__.py": "from mmfm_jax.pkg.mod import z\n",
        "mmfm_jax/pkg/mod.py": "from mmfm_jax.pkg import other\n",
        "mmfm_jax/pkg/other.py": "",
    })
    graph, outside = import_graph(str(tmp_path))
    assert cycles(graph) == [["mmfm_jax.a", "mmfm_jax.b", "mmfm_jax.c"],
                             ["mmfm_jax.d", "mmfm_jax.e"]]
    assert outside == ["mmfm_jax/c.py imports configs.base",
                       "mmfm_jax/d.py imports convert.common",
                       "mmfm_jax/e.py imports tests"]
