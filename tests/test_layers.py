"""The layers hold: base < catalog < model < stages < pipelines (catalog and model side by side: model imports no
catalog), `base` (errors, the registry shape, markdown escaping) importing nothing of the project, `infra`
(settings, server launchers, clusters) read at the edges only (pipelines), and no two modules importing each
other. Imports are read from the source (AST), those inside functions included, so a cycle or an upward import
cannot hide behind a deferred import."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("base", "infra", "catalog", "model", "stages", "pipelines")
BASE = ("base",)
"""The package every layer may import: it imports nothing of the project."""
ALLOWED: dict[str, tuple[str, ...]] = {
    "base": (),
    "catalog": (),
    "model": (),
    "stages": ("catalog", "model"),
    "pipelines": ("catalog", "model", "stages", "infra"),
    "infra": (),
}
"""What each package may import besides itself and the base modules."""


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of a source file under `root` (a package's __init__ is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path, root: Path, known: set[str]) -> Iterator[tuple[int, str]]:
    """(line, module) for every import of a project module in the file, at any depth (functions included).
    `from pkg import name` counts as an import of `pkg.name` when that is a module, else of `pkg`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = module_name(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield node.lineno, full if full in known else base


def scan(root: Path) -> dict[str, list[tuple[int, str]]]:
    """Every project module under `root` with the project modules it imports."""
    files = [p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")]
    known = {module_name(p, root) for p in files}
    return {module_name(p, root): list(project_imports(p, root, known)) for p in files}


def violations(root: Path) -> list[str]:
    """Upward or sideways imports, settings read below the edges, and import cycles, one line each."""
    graph = scan(root)
    problems = []
    for module, imports in sorted(graph.items()):
        layer = module.split(".")[0]
        for line, target in imports:
            target_layer = target.split(".")[0]
            if target_layer == layer and layer != "infra":
                continue
            if any(target == b or target.startswith(b + ".") for b in BASE):
                continue
            if layer == "infra" and target_layer == "infra":
                continue
            if target_layer not in ALLOWED[layer]:
                problems.append(f"{module}:{line} imports {target} ({layer} may import "
                                f"{', '.join(ALLOWED[layer] + BASE) or 'only the base modules'})")
    edges = {m: {t for _, t in imports if t in graph and t != m} for m, imports in graph.items()}
    # a package's __init__ importing its own submodules is how packages expose them; cycles through it are real
    for a in sorted(edges):
        for b in sorted(edges[a]):
            if a < b and a in edges.get(b, set()):
                problems.append(f"import cycle: {a} <-> {b}")
    problems += longer_cycles(edges)
    return problems


def longer_cycles(edges: dict[str, set[str]]) -> list[str]:
    """Cycles of three or more modules (strongly connected components), found with Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[str] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 2:
                found.append("import cycle: " + " -> ".join(sorted(component)))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_layers_hold_on_main() -> None:
    problems = violations(REPO)
    assert not problems, "\n".join(problems)


def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    """A tiny tree with the project's packages and the given files."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "expected"), [
    ({"catalog/a.py": "from stages.b import x\n", "stages/b.py": "x = 1\n"}, "catalog.a:1 imports stages.b"),
    ({"model/a.py": "def f():\n    from catalog import b\n", "catalog/b.py": ""}, "model.a:2 imports catalog.b"),
    ({"stages/a.py": "from infra.settings import get_settings\n", "infra/settings.py": ""},
     "stages.a:1 imports infra.settings"),
    ({"stages/a.py": "import pipelines.flows\n", "pipelines/flows.py": ""}, "stages.a:1 imports pipelines.flows"),
    ({"infra/a.py": "from stages import b\n", "stages/b.py": ""}, "infra.a:1 imports stages.b"),
    ({"model/a.py": "from infra.settings import s\n", "infra/settings.py": ""}, "model.a:1 imports infra.settings"),
    ({"base/a.py": "from catalog import b\n", "catalog/b.py": ""}, "base.a:1 imports catalog.b"),
    ({"model/a.py": "from model import b\n", "model/b.py": "def f():\n    from model.a import g\n"},
     "import cycle: model.a <-> model.b"),
])
def test_a_planted_violation_fails(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    problems = violations(plant(tmp_path, files))
    assert any(p.startswith(expected) for p in problems), problems


def test_base_modules_and_downward_imports_pass(tmp_path: Path) -> None:
    root = plant(tmp_path, {"base/errors.py": "", "base/registry.py": "",
                            "catalog/a.py": "from base.errors import InputError\n",
                            "model/a.py": "from base.registry import Registry\n",
                            "stages/a.py": "from catalog.a import x\nfrom model import a\n",
                            "pipelines/a.py": "from stages.a import y\nfrom infra import settings\n",
                            "infra/settings.py": ""})
    assert violations(root) == []
