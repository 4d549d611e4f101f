"""The package's shape, checked so it cannot rot silently: the layer contracts in
pyproject.toml (lint-imports), no import circles counting imports inside functions, no
private name imported across modules, small modules and functions, every tlearn import
in the tests, benchmarks and docs resolving, and a torch-free `import tlearn`."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tlearn"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 120


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_import_contracts_hold():
    """The one-way layers and the torch-free packages of pyproject.toml [tool.importlinter]."""
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "importlinter.cli"]
    out = subprocess.run(
        [*cmd, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        component.append(m)
                        if m == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_circles_even_inside_functions():
    graph = grimp.build_graph("tlearn")  # grimp records imports inside functions too
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    graph = grimp.ImportGraph()
    for a, b in (("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("folder", ["tlearn", "tests", "benchmarks", "docs"])
def test_no_private_name_is_imported_from_another_module(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlearn"):
                bad += [
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and a.name != "__version__"
                ]
    assert bad == []


def test_modules_and_functions_are_small():
    too_long = []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert too_long == []


def test_imports_inside_functions_say_why():
    """An import inside a function points down and keeps torch/timm/matplotlib (or another
    cost) off a fast path; a comment on it (or on the line above) says so."""
    missing = []
    for path in _modules():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                here = lines[node.lineno - 1]
                above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                # one comment may head a group of consecutive imports
                k = node.lineno - 2
                while k >= 0 and lines[k].strip().startswith(("import ", "from ")):
                    k -= 1
                head = lines[k].strip() if k >= 0 else ""
                if "#" not in here and not above.startswith("#") and not head.startswith("#"):
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {here.strip()}")
    assert missing == []


def _tlearn_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlearn"):
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("tlearn"):
                    yield node.lineno, a.name, []


def test_every_tlearn_import_outside_the_package_resolves():
    """Tests, benchmarks and docs import names that exist (benchmarks import inside
    functions, so a moved name would otherwise only fail when someone runs them)."""
    broken = []
    for folder in ("tests", "benchmarks", "docs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, module, names in _tlearn_imports(path):
                try:
                    mod = importlib.import_module(module)
                except ImportError as e:
                    broken.append(f"{path.relative_to(ROOT)}:{line} {module} ({e})")
                    continue
                for name in names:
                    if not hasattr(mod, name):
                        try:
                            importlib.import_module(f"{module}.{name}")
                        except ImportError:
                            broken.append(f"{path.relative_to(ROOT)}:{line} {module}.{name}")
    assert broken == []


def test_public_api_is_lazy_and_complete():
    code = (
        "import sys, tlearn; "
        "heavy = [m for m in ('torch', 'timm', 'torchvision', 'sklearn', 'typer') "
        "if m in sys.modules]; "
        "missing = [n for n in tlearn.__all__ if getattr(tlearn, n, None) is None]; "
        "print(heavy, missing)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"
