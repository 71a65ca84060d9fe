"""The package's floor plan: imports point one way, and only laziness hides one in a function.

Every module is parsed (not imported); an import of a keras_transfer module
is an edge of the graph, wherever it is written (module level or inside a
function). Any import written inside a function says why it is lazy.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_transfer"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")

# Modules whose imports of other keras_transfer modules stay inside functions, and why.
LAZY = {
    # The command imports what each subcommand needs when it runs, so that
    # `keras-transfer --help` and `list-backbones` answer without TensorFlow.
    "cli": "the command imports a subcommand's modules when it runs",
    "demo": "the offline demo, run by the command; checks what is installed first",
    # The registry lists names without Keras; its builders import it.
    "backbones": "the registry lists backbones without importing Keras",
    # Subcommands of the command line, imported by it when they run.
    "lr_find_command": "a subcommand: imports the model's modules when it runs",
    "generate_command": "a subcommand: imports KerasHub and the GGUF reader when it runs",
}



def imports_of(module: str) -> list[tuple[str, bool, int]]:
    """`(imported keras_transfer module, inside a function, line)` for every import."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name.split(".")[1] for a in child.names
                         if a.name.startswith("keras_transfer.")]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                parts = child.module.split(".")
                if parts[0] == "keras_transfer":
                    names = [parts[1]] if len(parts) > 1 else [
                        a.name for a in child.names if a.name in MODULES]
            found.extend((name, in_function, child.lineno) for name in names)
            visit(child, inner)

    visit(tree, False)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_the_parser_finds_imports_at_both_levels():
    model = {name for name, _, _ in GRAPH["model"]}
    assert {"trainer", "heads", "distribute"} <= model
    assert any(inside for _, inside, _ in GRAPH["cli"])


def test_no_import_cycle():
    edges = {m: {name for name, _, _ in GRAPH[m] if name != m} for m in MODULES}
    state = {}

    def cycle_from(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = cycle_from(target, path + [target])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in MODULES:
        if module not in state:
            cycle = cycle_from(module, [module])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_function_local_imports_of_the_package_only_where_lazy():
    local = [f"{m}.py:{line} imports {name}" for m in MODULES if m not in LAZY
             for name, inside, line in GRAPH[m] if inside]
    assert not local, ("Import keras_transfer modules at module level (or add the module to "
                       "LAZY with the reason): " + "; ".join(local))


def test_the_trainer_sits_between_the_phases_and_the_model():
    def imports(module):
        return {name for name, _, _ in GRAPH[module]}

    assert "trainer" in imports("model")
    assert not {"model", "image", "text"} & imports("trainer")
    for low in ("training", "phases", "memory", "backup", "contracts"):
        assert not {"trainer", "model"} & imports(low), low


@pytest.mark.parametrize("module", ["model", "trainer", "training", "phases", "memory",
                                    "backup", "contracts"])
def test_modules_stay_small(module):
    lines = (PACKAGE / f"{module}.py").read_text(encoding="utf-8").count("\n")
    # model.py: the Keras model only (issue 19 aims at about 450 lines).
    assert lines <= (500 if module == "model" else 700), (module, lines)


def local_imports(source: str) -> list[tuple[int, bool]]:
    """`(line, says why)` for every import written inside a function (nested ones included).

    An import says why it is lazy when a comment on its own lines, or the
    comment lines directly above its block, has the word "lazy". A block is
    the imports that follow one another in the same function body (blank
    lines allowed); a comment line starts a new one.
    """
    lines = source.splitlines()

    def comments(first, last):  # what follows "#" on lines first..last (an import has no string)
        return " ".join(line.partition("#")[2] for line in lines[first - 1:last])

    def comment_above(line):
        first = line
        while first > 1 and lines[first - 2].lstrip().startswith("#"):
            first -= 1
        return comments(first, line - 1)

    found = []

    def visit(node, in_function):
        for _, body in ast.iter_fields(node):
            if not (isinstance(body, list) and body and isinstance(body[0], ast.stmt)):
                continue
            block = ""
            for previous, statement in zip([None, *body], body):
                if not isinstance(statement, (ast.Import, ast.ImportFrom)):
                    continue
                above = comment_above(statement.lineno)
                if above.strip() or not isinstance(previous, (ast.Import, ast.ImportFrom)):
                    block = above  # a block starts after another statement or a comment
                if in_function:
                    why = comments(statement.lineno, statement.end_lineno) + " " + block
                    found.append((statement.lineno, "lazy" in why.lower()))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(child, (ast.FunctionDef,
                                                           ast.AsyncFunctionDef)))

    visit(ast.parse(source), False)
    return found


def test_local_imports_finds_each_import_once_and_its_comment():
    source = """
import os


def f():
    import csv  # lazy: on its line
    value = 1

    # lazy: above the block, blank lines allowed within it
    import json

    from keras_transfer import errors
    value = 2
    import io  # lazy: on its line; the next line starts a new block
    # a comment that does not say why
    import re
    # lazy: a new block
    import abc  # noqa: F401
    import ast

    def inner():
        try:
            import tensorflow as tf  # lazy: optional
        except ImportError:
            import textwrap
    # lazy:
    # the last lines of a longer comment
    from keras_transfer.backend import (
        tensorflow,
    )
"""
    assert local_imports(source) == [(6, True), (10, True), (12, True), (14, True),
                                     (16, False), (18, True), (19, True), (28, True),
                                     (23, True), (25, False)]


def test_function_local_imports_say_why_they_are_lazy():
    silent = [f"{m}.py:{line}" for m in MODULES
              for line, says in local_imports((PACKAGE / f"{m}.py").read_text(encoding="utf-8"))
              if not says]
    assert not silent, (
        "An import inside a function is there only for laziness (TensorFlow, an optional "
        "package, a command line that answers --help without Keras): move it to the top of "
        "the module, or say why on its line or above its block ('# lazy: ...'): "
        + ", ".join(silent))
