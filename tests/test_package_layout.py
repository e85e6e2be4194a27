"""The package reads as the pipeline: layers import only downward, no import circles, small modules."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ner_compress")
# lowest first: a module may import its own layer and the layers before it, never a later one
LAYERS = ["core", "data", "models", "compress", "deploy", "serve", "measure", "commands"]
MAX_LINES = 400


def modules():
    """{dotted name: path} of every module in the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, name)
    return found


def imported(path, name, known):
    """Package modules ``name`` imports anywhere in its file (at the top or inside functions)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def layer(name):
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def graph():
    known = modules()
    return {name: imported(path, name, known) for name, path in known.items()}


def test_every_module_sits_in_a_layer_and_every_layer_says_what_it_is():
    stray = [n for n in modules() if n.count(".") == 1 and n.split(".")[1] not in LAYERS]
    assert stray == [], f"modules outside the layers {LAYERS}: {stray}"
    for name in LAYERS:
        doc = ast.get_docstring(ast.parse(open(os.path.join(PACKAGE, name, "__init__.py")).read()))
        assert doc and len(doc) > 40, f"ner_compress/{name}/__init__.py needs a docstring saying what the part is"


def test_no_module_imports_a_later_layer():
    upward = [f"{a} -> {b}" for a, deps in graph().items() for b in deps
              if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert upward == []


def find_cycle(edges):
    """One import circle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_one_and_only_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle_between_modules():
    edges = {a: {b for b in deps if b != "ner_compress"} for a, deps in graph().items() if a != "ner_compress"}
    assert find_cycle(edges) is None


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_small(name):
    with open(modules()[name], encoding="utf-8") as fh:
        assert sum(1 for _ in fh) <= MAX_LINES, f"{name}: split it (at most {MAX_LINES} lines)"



def test_the_library_never_starts_a_tools_script():
    """Command lines call the library, not the other way round (the server child runs ``-m ner_compress.serve``)."""
    found = [name for name, path in modules().items()
             for node in ast.walk(ast.parse(open(path, encoding="utf-8").read()))
             if isinstance(node, ast.Constant) and node.value == "tools"]
    assert found == []
