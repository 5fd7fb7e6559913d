"""The package's shape: no private name crosses a package boundary, no import cycles, no giants.

Walks every module of ``ckptconv`` with ``ast``:

- a private name (a ``_``-prefixed module or attribute) imported from another sub-package
  (``convert`` importing ``io._format``) is an error: export it, or move the code;
- the imports that run (at module level or inside functions; ``TYPE_CHECKING`` blocks
  excluded) must form no cycle between modules;
- no module over 600 lines.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "ckptconv"


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = modules()


def package(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and name not in _TOP_MODULES) else ""


_TOP_MODULES = {m for m, f in MODULES.items() if f.parent == ROOT and f.name != "__init__.py"}


def absolute(module: str, node: ast.ImportFrom) -> str:
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module or ""


def imports(module: str, *, running_only: bool):
    """(imported module or module.name, line) for every ``from ... import`` of ckptconv."""
    tree = ast.parse(MODULES[module].read_text())
    skipped: set[int] = set()
    if running_only:  # imports that run: all but those under `if TYPE_CHECKING:`
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(n) for n in ast.walk(node))
    nodes = [n for n in ast.walk(tree) if id(n) not in skipped]
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            target = absolute(module, node)
            if target.startswith("ckptconv"):
                for alias in node.names:
                    yield target, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ckptconv"):
                    yield alias.name, None, node.lineno


def test_no_private_names_cross_a_package_boundary():
    bad = []
    for module in MODULES:
        for target, name, line in imports(module, running_only=False):
            full = target if name is None else f"{target}.{name}"
            private = any(part.startswith("_") for part in full.split(".")[1:])
            if private and package(target) and package(target) != package(module):
                bad.append(f"{MODULES[module].relative_to(ROOT.parent)}:{line} imports {full}")
    assert bad == []


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, name, _ in imports(module, running_only=True):
            full = f"{target}.{name}" if name else target
            dep = full if full in MODULES else target
            if dep in MODULES and dep != module:
                graph[module].add(dep)
    # A package's __init__ importing its own submodules is how Python loads packages, not a
    # cycle between modules; the edge back from a submodule to its package's __init__ is.
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if dep.startswith(m + "."):
                continue  # a package importing its own submodule
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []


def test_modules_stay_small():
    big = {
        str(f.relative_to(ROOT.parent)): n
        for f in MODULES.values()
        if (n := len(f.read_text().splitlines())) > 600
    }
    assert big == {}
