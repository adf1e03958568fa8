"""No import circles: every diffsynth module imports downward. The graph is read from the source (every
`from diffsynth… import` / `from .… import`, at the top of a module or inside a function: a lazy import only hides
a circle until the day both ends are imported), so a new circle fails here before it fails someone's render."""

import ast
import importlib
from pathlib import Path

import diffsynth

PACKAGE = Path(diffsynth.__file__).parent


def module_names():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imported_modules(name, path, known):
    """The diffsynth modules `name` imports (a package's `__init__` only when nothing more precise is named)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import diffsynth.models.loader as x` and the like
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def import_graph():
    modules = dict(module_names())
    return {name: set(imported_modules(name, path, modules)) for name, path in modules.items()}


def find_cycle(graph):
    """One import circle as a list of module names, or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 40 and "diffsynth.render" in graph["diffsynth.cli"]  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_every_module_imports():
    for name, _ in module_names():
        if not name.endswith(".__main__"):  # `python -m diffsynth`: running it is the CLI
            importlib.import_module(name)
