"""The code is layered one way, and stays so: the library (`rlhf_engine`) knows nothing of the service,
the service (`service`) nothing of the workers, the inference worker nothing of the training worker,
and no module imports itself back through others — lazy imports inside functions included (a cycle
hidden in a function is still a cycle: it breaks the moment someone moves the import to the top)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf_engine", "service", "workers")
# (importer prefix, imported prefix): never
FORBIDDEN = [
    ("rlhf_engine", "service"),
    ("rlhf_engine", "workers"),
    ("service", "workers"),
    ("workers.inference", "workers.training"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if "gen" in rel.parts:  # generated gRPC code
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(name: str, source: str, known: set[str], *, package: bool = False) -> set[str]:
    """The modules of `known` that the module `name` (whose text is `source`) imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    out = set()
    for m in found:
        while m and m not in known:
            m = m.rpartition(".")[0]
        if m and m != name:
            out.add(m)
    return out


def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: imports_of(n, p.read_text(), known, package=p.name == "__init__.py") for n, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g.get(w, ())))))
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
                        out.append(sorted(comp))
    return out


def test_layers_are_imported_one_way() -> None:
    wrong = [
        f"{importer} imports {imported}"
        for importer, deps in sorted(graph().items())
        for imported in sorted(deps)
        for low, high in FORBIDDEN
        if (importer == low or importer.startswith(low + "."))
        and (imported == high or imported.startswith(high + "."))
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


@pytest.mark.parametrize(
    ("g", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(g: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(g) == expected


def test_lazy_and_relative_imports_count() -> None:
    known = {"service.api.app", "service.limits", "service.api"}
    lazy = "def f():\n    from service.api.app import _envelope\n"
    assert imports_of("service.limits", lazy, known) == {"service.api.app"}
    assert imports_of("service.api.app", "from ..limits import Counter\n", known) == {"service.limits"}
