"""The library's layout: no module of `thinkrec/` takes part in an import circle, counting the imports
inside functions too (a function-level import only hides a circle until the function runs)."""

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "thinkrec"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The `thinkrec` modules that `path` imports anywhere in its body; `from package import name` counts
    as the submodule `package.name` when there is one, else as `package`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of `graph` as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        stack.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state:
                cycle = visit(other)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = "done"
        return []

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return []


def test_the_cycle_finder_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_sees_function_level_and_submodule_imports():
    graph = import_graph()
    assert "thinkrec.utils.errors" in graph["thinkrec.data.keywords"]  # a module-level import
    assert "thinkrec.reasons.judge" in graph["thinkrec.data.keywords"]  # an import inside a function
    assert "thinkrec.training.loading" in graph["thinkrec.reasons.local_teacher"]  # `from thinkrec.training import loading`


def test_no_module_of_the_library_takes_part_in_an_import_circle():
    cycle = find_cycle(import_graph())
    assert not cycle, f"thinkrec/ has an import circle: {' -> '.join(cycle)}; move what both need into a module lower down."
