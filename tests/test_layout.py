"""The house (issue 20): no import cycles among fenfa's modules, rooms of a readable size.

Read from the source with ``ast``, not by importing: every import statement
counts, at the top of a module, inside a function, or under
``if TYPE_CHECKING:``, because each says which module leans on which. A
lower module never imports a higher one, lazily or not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fenfa

SOURCE = Path(fenfa.__file__).parent
#: The size the style guide names: a module a reader can hold at once.
MOST_LINES = 400


def _modules() -> dict[str, Path]:
    names = {}
    for path in SOURCE.rglob("*.py"):
        parts = ["fenfa", *path.relative_to(SOURCE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the fenfa modules it imports (``from . import x``: the submodule x)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                origin = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = parts[: len(parts) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{origin}.{alias.name}"
                    targets.add(sub if sub in modules else origin)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``a -> b -> ... -> a``, or None."""
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        path = [root]
        on_path = {root}
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
                continue
            nxt = todo.pop()
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                stack.append((nxt, sorted(graph[nxt])))
                path.append(nxt)
                on_path.add(nxt)
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _a_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_one_that_imports_it_back() -> None:
    modules = _modules()
    graph = _imports(modules)
    assert len(modules) > 40  # (the parse saw fenfa)
    assert sum(map(len, graph.values())) > 150
    cycle = _a_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_is_a_readable_size() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    over = {name: lines for name, lines in sizes.items() if lines > MOST_LINES}
    assert over == {}
