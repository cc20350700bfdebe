"""The package's shape: no import cycles between its modules, and a cheap ``import springfield``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import springfield

SRC = Path(springfield.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """springfield modules that ``path`` imports, at the top or inside functions (a lazy
    import still closes a cycle), leaving out ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules}


def test_no_import_cycles():
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    # A module's own packages are imported before it anyway: no edge to them.
    graph = {
        m: {d for d in _imports(p, set(files)) if d != m and not m.startswith(d + ".")}
        for m, p in files.items()
    }
    cycles = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d) :], d])
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert graph["springfield.training.loop"]  # the walk did see imports
    assert cycles == []


def test_import_springfield_stays_cheap_and_documents_train():
    code = (
        "import sys, springfield\n"
        "heavy = [m for m in ('jax', 'flax', 'optax', 'grain', 'matplotlib') if m in sys.modules]\n"
        "print(heavy)\n"
        "help(springfield.train)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[0] == "[]"
    assert "Train a classifier" in out and "Run" in out


def test_no_submodule_shadows_an_api_name():
    # Importing springfield.<name> sets that attribute on the package, replacing the lazy
    # export: springfield.compare would become a module once anything imported it.
    for name in springfield.__all__:
        assert not (SRC / f"{name}.py").exists() and not (SRC / name).is_dir(), name
        assert callable(getattr(springfield, name)) or isinstance(
            getattr(springfield, name), dict
        ), name
