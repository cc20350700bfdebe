"""The package's shape: no import cycles between its modules, and a cheap ``import springfield``."""

from __future__ import annotations

import ast
import re
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


def test_source_files_stay_short_and_the_switches_are_config_fields():
    # A reader meets small modules; kernel choices are config fields (--kernels), not
    # environment variables (only user settings such as the cache folder and the token).
    sources = [p for p in SRC.rglob("*") if p.suffix in (".py", ".cc", ".h")]
    assert len(sources) > 50
    long = {
        str(p.relative_to(SRC)): n for p in sources if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}
    names = set()
    for p in SRC.rglob("*.py"):
        names |= set(re.findall(r"SPRINGFIELD_[A-Z0-9_]+", p.read_text()))
    assert len(names) <= 4, sorted(names)


def test_the_command_reaches_the_train_step_in_three_calls(tiny_folder, tmp_path):
    # `springfield train` is the Python API: cli.main -> api.train -> loop.train -> the step.
    # Counted on the real call stack when the jitted step first traces its Python function.
    from springfield.cli import main

    stacks: list[list[str]] = []

    def profile(frame, event, arg):
        code = frame.f_code
        if (
            event == "call"
            and code.co_name == "train_step"
            and code.co_filename.endswith("steps.py")
        ):
            names, f = [], frame.f_back
            while f is not None and f.f_code.co_name != "main":
                if "/jax/" not in f.f_code.co_filename:  # jit's own frames do not count
                    names.append(f"{Path(f.f_code.co_filename).stem}.{f.f_code.co_name}")
                f = f.f_back
            stacks.append(names[::-1])

    argv = ["train", "--data", str(tiny_folder), "--workdir", str(tmp_path / "r"), "--epochs", "1"]
    sys.setprofile(profile)
    try:
        code = main([*argv, "--image-size", "32", "32", "--batch-size", "8", "--workers", "0"])
    finally:
        sys.setprofile(None)
    assert code == 0 and stacks, "the train step was never traced"
    # Calls from main: api.train, loop.train, and loop.train's call of the step.
    assert stacks[0] == ["api.train", "loop.train"], stacks[0]
