"""What ``pip install .`` (no extras) gives is enough to run the product: every third-party module the product
packages import belongs to a distribution named in ``[project.dependencies]``. (The slow, real proof, a
fresh venv with ``pip install .`` serving a request, is in ``tests/acceptance``.)"""

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PRODUCT = ("merge", "training", "serving", "mergeserve", "benchmarks")
#: the benchmark scripts' own helpers, imported with their folder on ``sys.path`` (run from a checkout, never from
#: an install): benchmarks/<name>.py, or tests/serving/<name>.py for console_shots.py's browser (dev only)
LOCAL_HELPERS = {"_local_serve": "benchmarks", "paired": "benchmarks", "_browser": "tests/serving"}


def _imports() -> dict[str, set[str]]:
    """Top-level module imported → product files importing it (absolute imports only)."""
    out: dict[str, set[str]] = {}
    for pkg in PRODUCT:
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                         else [])
                for n in names:
                    out.setdefault(n.split(".")[0], set()).add(str(f.relative_to(ROOT)))
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_distribution_is_a_declared_runtime_dependency():
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S).group(1)
    declared = {_norm(re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0]) for d in re.findall(r'^\s*"([^"]+)"', block, re.M)}
    dists = md.packages_distributions()
    missing = {}
    for mod, files in _imports().items():
        if mod in sys.stdlib_module_names or mod in PRODUCT or mod == "__future__":
            continue
        if mod in LOCAL_HELPERS and all(f.startswith("benchmarks/") for f in files):
            assert (ROOT / LOCAL_HELPERS[mod] / f"{mod}.py").is_file(), mod
            continue
        owners = {_norm(d) for d in dists.get(mod, [mod])}
        if not owners & declared:
            missing[mod] = sorted(files)[:3]
    assert not missing, f"imported but not declared in [project.dependencies]: {missing}"


def test_the_scan_sees_imports_inside_functions():
    """Lazy imports count: ``httpx`` was imported inside ``serving/app.py: direct_ports`` only, and ``pip
    install .`` crashed after "ready" because of it; bench-serve still imports it in functions only."""
    assert "benchmarks/serve/server.py" in _imports()["httpx"]


def test_every_console_file_is_package_data():
    """``make serve`` installs with ``pip install .`` (not editable): a console file no package-data glob names
    is missing from the product, and ``GET /ui`` would serve a page whose script 404s."""
    import fnmatch

    line = re.search(r"^serving = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    globs = re.findall(r'"([^"]+)"', line)
    ui = sorted(p.relative_to(ROOT / "serving").as_posix() for p in (ROOT / "serving" / "ui").iterdir())
    assert "ui/index.html" in ui and "ui/console.js" in ui
    assert [f for f in ui if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
    from serving.console import files

    assert sorted(f"ui/{name}" for name in files()) == ui  # and the server serves every one of them
