"""The package's shape: no import cycles (a module never reaches back up the data path), and
commands that do not send anything stay light to start."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import runner

PACKAGE = Path(runner.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every runner module -> the runner modules it imports, anywhere in its body (imports
    inside functions count: a lazy import is still a dependency), TYPE_CHECKING blocks aside."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        skipped = {
            id(node)
            for n in ast.walk(tree)
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
            for node in ast.walk(n)
        }
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walk_sees_the_imports_it_checks() -> None:
    graph = _imports()
    assert "runner.store" in graph["runner.engine._books"]
    assert "runner.engine" in graph["runner.backends.sync"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_itself_back_through_another() -> None:
    assert _cycle(_imports()) is None


def test_the_plan_and_the_reports_never_import_the_engine_or_the_network() -> None:
    heavy = {"openai", "aiohttp", "sqlalchemy", "alembic", "runner.engine", "runner.transport"}
    heavy |= {"asyncio", "tqdm"}  # what `price` would pay for its reading progress
    code = (
        "import sys, runner.cli, runner.plan, runner.report, runner.store, runner.settings, "
        "runner.progress; "
        f"print(sorted(m for m in sys.modules if m in {sorted(heavy)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
