"""The layout's rules, checked on the import graph (DESIGN.md, "Where things live").

* No import cycle between modules of ``pop3d`` (``TYPE_CHECKING`` imports count: a cycle
  of types is still two modules that cannot be read apart).
* The core (``pop3d.protocol``) imports nothing of pop3d outside it, and importing it
  loads nothing but the standard library and itself.
* The backends (``auth``, ``storage``) do not import each other, and the transports
  (``server``, ``lmtp``) reach them only through their interfaces (``*.base``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("pop3d", include_external_packages=False)


def _imports(graph: grimp.ImportGraph, prefix: str) -> Iterator[tuple[str, str]]:
    for module in sorted(graph.modules):
        if module == prefix or module.startswith(prefix + "."):
            for imported in sorted(graph.find_modules_directly_imported_by(module)):
                yield module, imported


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                nxt = edges[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(name)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.z", imported="a.x")
    assert _cycles(graph) == [["a.x", "a.y"]]


def test_no_import_cycle(graph: grimp.ImportGraph) -> None:
    assert _cycles(graph) == []


def test_core_imports_only_itself(graph: grimp.ImportGraph) -> None:
    outside = [
        (m, i) for m, i in _imports(graph, "pop3d.protocol")
        if not i.startswith("pop3d.protocol")
    ]
    assert outside == []


def test_backends_do_not_import_each_other(graph: grimp.ImportGraph) -> None:
    crossing = [
        (m, i)
        for a, b in (("pop3d.auth", "pop3d.storage"), ("pop3d.storage", "pop3d.auth"))
        for m, i in _imports(graph, a)
        if i.startswith(b)
    ]
    assert crossing == []


@pytest.mark.parametrize("transport", ["pop3d.server", "pop3d.lmtp"])
def test_transports_use_only_backend_interfaces(
    graph: grimp.ImportGraph, transport: str
) -> None:
    internals = [
        (m, i) for m, i in _imports(graph, transport)
        if i.startswith(("pop3d.auth.", "pop3d.storage.")) and not i.endswith(".base")
    ]
    assert internals == []


def _loaded(code: str) -> list[str]:
    """The modules ``python -X importtime -c code`` imports, in order.

    Names the standard library only probes for (``copy`` tries ``org.python.core``) are
    in the timing list but never in ``sys.modules``: they are left out.
    """
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c",
         f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    )
    present = set(done.stdout.split())
    timed = [
        line.rpartition("|")[2].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and not line.rstrip().endswith("imported package")
    ]
    return [m for m in timed if m in present]


def test_importing_the_core_loads_only_the_standard_library() -> None:
    before = set(_loaded("pass"))  # the interpreter's start-up (site, .pth hooks)
    loaded = [m for m in _loaded("import pop3d.protocol") if m not in before]
    assert "pop3d.protocol.pop3" in loaded  # the parse found what it looks for
    foreign = [
        m for m in loaded
        if m.partition(".")[0] not in sys.stdlib_module_names
        and m != "pop3d" and not m.startswith("pop3d.protocol")
    ]
    assert foreign == []
