"""The package-internal import graph of merge/, training/, serving/ and mergeserve/ has no new cycle.

Every ``import`` statement counts, at module level and inside functions alike: a lazy import only hides a
circle until the function runs. Imports under ``if TYPE_CHECKING:`` do not (they never run). Parsed with
:mod:`ast`, so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("merge", "training", "serving", "mergeserve")

# Known cycles, each the set of modules of one strongly connected component: a new cycle fails the test, and so
# would a listed one that disappears (so the list stays exact). None today; do not add to it.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative levels resolved against ``mod``)."""
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports for annotations."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def _imports(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Package-internal modules that ``mod`` imports anywhere in its file (at run time)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, is_pkg, node)
            # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the package itself
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            out.update(subs)
            if len(subs) < len(node.names):
                out.add(target)
    return {_nearest(m, known) for m in out if m.split(".")[0] in PACKAGES} - {mod, ""}


def _nearest(name: str, known: dict[str, Path]) -> str:
    """``name`` or its closest enclosing module that is a file of the tree (``import a.b.c`` of a name)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """Module -> the package-internal modules it imports."""
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _edges(graph: dict[str, set[str]], comp: frozenset[str]) -> list[str]:
    return [f"{a} -> {b}" for a in sorted(comp) for b in sorted(graph[a] & comp)]


def test_no_new_import_cycles() -> None:
    graph = import_graph()
    found = {frozenset(c) for c in cycles(graph)}
    new = [(sorted(c), _edges(graph, c)) for c in found - KNOWN_CYCLES]
    gone = [sorted(c) for c in KNOWN_CYCLES - found]
    assert not new, f"import cycles (modules, then the imports between them): {new}"
    assert not gone, f"listed cycles that no longer exist (remove them from KNOWN_CYCLES): {gone}"


def test_cycles_are_strongly_connected_components() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert not cycles({"a": {"b"}, "b": set()})


def test_loaders_never_import_a_recipe() -> None:
    graph = import_graph()
    loaders = ["training.backbones", "training.tasks.vilt", "training.tasks.film_scenes", "training.tasks.vqa"]
    assert not {m for loader in loaders for m in graph[loader] if m.startswith("training.recipes")}
    assert "training.backbones" in graph["training.recipes.backbone"]  # the recipe sits above its loader
