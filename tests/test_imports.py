"""The source tree's import graph, read with ``ast`` (function-local imports included, relative imports
resolved): no cycle anywhere, and the bottom layer (``flax_narrow/modeling``, ``flax_narrow/ops``,
``flax_narrow/config.py``) never imports ``train/`` or ``convert/``.

Files map to the modules they install as (pyproject's ``package-dir``): ``train/x.py`` is
``flax_narrow.train.x``, ``convert/x.py`` is ``flax_narrow.convert.x``. An ``import a.b`` or ``from a import b``
is an edge to the module ``a.b`` when that is a module of the tree, else to the package ``a``; a parent
package's ``__init__`` is not counted as imported by its children (Python runs it first, but it is not a
dependency of the child's code).
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"flax_narrow": "flax_narrow", "train": "flax_narrow.train", "convert": "flax_narrow.convert"}
BOTTOM = ("flax_narrow.modeling", "flax_narrow.ops", "flax_narrow.config")
UPPER = ("flax_narrow.train", "flax_narrow.convert")


def source_modules(root: str = ROOT) -> dict[str, tuple[str, bool]]:
    """Module name -> (file, is_package) for every .py file of flax_narrow/, train/ and convert/."""
    out: dict[str, tuple[str, bool]] = {}
    for folder, package in PACKAGES.items():
        base = os.path.join(root, folder)
        for directory, _, files in os.walk(base):
            rel = os.path.relpath(directory, base)
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for f in files:
                if not f.endswith(".py"):
                    continue
                if f == "__init__.py":
                    out[".".join(parts)] = (os.path.join(directory, f), True)
                else:
                    out[".".join([*parts, f[:-3]])] = (os.path.join(directory, f), False)
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def import_graph(modules: dict[str, tuple[str, bool]]) -> dict[str, dict[str, int]]:
    """module -> {imported module of the tree: first line number}, from every import statement in the file."""

    def target(name: str) -> str | None:
        while name and name not in modules:  # an attribute of a module: the module itself
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for module, (path, is_package) in modules.items():
        edges: dict[str, int] = {}
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = module if is_package else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{node.module}" if node.module else package
                else:
                    base = node.module or ""
                names = [f"{base}.{a.name}" for a in node.names]
            for name in names:
                t = target(name)
                if t is not None and t != module:
                    edges.setdefault(t, node.lineno)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _describe(graph: dict[str, dict[str, int]], modules: dict[str, tuple[str, bool]], cycle: list[str]) -> str:
    steps = [f"{os.path.relpath(modules[a][0], ROOT)}:{graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:])]
    return "import cycle: " + "; ".join(steps)


@pytest.fixture(scope="module")
def tree():
    modules = source_modules()
    return modules, import_graph(modules)


def test_the_tree_is_read(tree):
    """The walk sees every package, relative and function-local imports alike (a test that can fail)."""
    modules, graph = tree
    assert {"flax_narrow.modeling.bert", "flax_narrow.train.step", "flax_narrow.convert.keymap"} <= set(modules)
    assert "flax_narrow.convert.readers" in graph["flax_narrow.convert.sources"]  # `from . import readers`
    assert "flax_narrow.train.sharding" in graph["flax_narrow.train.step"]  # `from . import sharding as shd`
    assert "flax_narrow.pretrained" in graph["flax_narrow.modeling.base"]  # a function-local import


def test_no_import_cycle(tree):
    modules, graph = tree
    cycle = find_cycle(graph)
    assert cycle is None, _describe(graph, modules, cycle)


def test_bottom_layer_never_imports_train_or_convert(tree):
    modules, graph = tree
    bad = [
        f"{os.path.relpath(modules[m][0], ROOT)}:{line} imports {t}"
        for m, edges in graph.items()
        if any(_within(m, b) for b in BOTTOM)
        for t, line in edges.items()
        if any(_within(t, u) for u in UPPER)
    ]
    assert not bad, bad


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    """The checks above would catch a cycle hidden in a function body, and an upward import from modeling."""
    for folder in ("flax_narrow/modeling", "convert", "train"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "flax_narrow" / "__init__.py").write_text("")
    (tmp_path / "flax_narrow" / "modeling" / "__init__.py").write_text("")
    (tmp_path / "flax_narrow" / "modeling" / "base.py").write_text(
        "def f():\n    from flax_narrow.convert.sources import x\n"
    )
    (tmp_path / "convert" / "__init__.py").write_text("")
    (tmp_path / "convert" / "sources.py").write_text("from ..modeling import base\nx = 1\n")
    (tmp_path / "train" / "__init__.py").write_text("")
    modules = source_modules(str(tmp_path))
    graph = import_graph(modules)
    assert graph["flax_narrow.convert.sources"] == {"flax_narrow.modeling.base": 1}
    assert find_cycle(graph) == [
        "flax_narrow.convert.sources",
        "flax_narrow.modeling.base",
        "flax_narrow.convert.sources",
    ]
