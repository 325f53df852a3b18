"""The shape of the package: its units import each other without cycles, and only tasks branch on a task's name.

A unit is a top-level module or package of llmrec (`data`, `eval`, `tasks`, `run`, ...). Every import statement
counts, wherever it is (module top, inside a function, under `if TYPE_CHECKING:`), since each is a dependency a
reader must follow; registry strings ("module:attr", resolved at run time) are not imports.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmrec"


def _module_name(path: Path) -> tuple[str, bool]:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "llmrec"


def import_graph() -> dict[str, dict[str, list[str]]]:
    """{unit: {imported unit: ["file:line", ...]}} over every llmrec module."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(PACKAGE.rglob("*.py")):
        module, is_package = _module_name(path)
        package = module if is_package else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    targets = [".".join(base + ([node.module] if node.module else []))]
                else:
                    targets = [node.module or ""]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "llmrec" and _unit(target) != _unit(module):
                    graph[_unit(module)][_unit(target)].append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of units (first unit repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = 1
        path.append(unit)
        for other in sorted(graph.get(unit, {})):
            if state.get(other) == 1:
                return path[path.index(other):] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        path.pop()
        state[unit] = 2
        return None

    for unit in sorted(graph):
        if unit not in state and (cycle := visit(unit)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}, "c": {"a": []}}) is None


def test_the_units_of_llmrec_import_each_other_without_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    where = [f"{a} -> {b} at {', '.join(graph[a][b][:3])}" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, "import cycle between units: " + "; ".join(where)


def test_layers_that_must_stay_apart():
    graph = import_graph()
    assert "eval" not in graph["data"], f"data imports eval: {graph['data']['eval']}"
    assert "tasks" not in graph["eval"] and "tasks" not in graph["data"]
    for unit in ("data", "eval", "tasks", "trainers", "adapters", "models", "recipe"):
        assert "run" not in graph[unit], f"{unit} imports run.py: {graph[unit]['run']}"
    # merging makes a run like `llmrec train` does (it ends with run.finish: predictions, metrics, curves, card)
    commands = {"cli", "__main__", "merging"}
    importers = {unit for unit, imported in graph.items() if "run" in imported}
    assert importers <= commands, f"only the commands import run.py, not {importers - commands}"


def test_only_tasks_branch_on_a_tasks_name():
    pattern = re.compile(r"task ?(==|in) ?[\"'(]|\.task\.(kind|name) ?==")
    found = [f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if "tasks" not in path.relative_to(PACKAGE).parts
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not found, "branches on a task's name outside llmrec/tasks/:\n" + "\n".join(found)
