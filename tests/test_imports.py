"""The package's import graph has no cycle, and every function-local import says why.

The graph is built with ``ast`` from ``src/nbia_retriever``: one node per module, one
edge per import statement, module-level AND function-level (an import inside a function
runs when the function does, and a cycle through it is a cycle all the same); imports
under ``if TYPE_CHECKING:`` are left out (they never run). ``from X import n`` is an edge
to ``X.n`` when that is a module, else to ``X`` and to the module that defines ``n`` (a
lazily exporting package such as ``nbia_retriever.engine`` imports it on first use). The
implicit import of a module's parent packages is not an edge: every module would then
sit in a cycle with ``nbia_retriever/__init__.py``, which is how packages work.

An import inside a function is allowed only where it buys start-up time (``nbia-retriever
--help``, a worker process) or loads an optional dependency; it carries a comment saying
so, on its line or the line above (one comment may cover a run of such imports).
"""

from __future__ import annotations

import ast
import importlib
import types
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import nbia_retriever

PACKAGE = "nbia_retriever"
ROOT = Path(nbia_retriever.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement that can run, and whether it sits inside a function."""

    def walk(node: ast.AST, in_function: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom,
                                                                   bool]]:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, in_function
            yield from walk(child, in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    yield from walk(tree, False)


def _defining_module(package: str, name: str) -> str | None:
    """The module that defines ``package.name`` (imported, as the import would)."""
    try:
        value = getattr(importlib.import_module(package), name)
    except (ImportError, AttributeError):
        return None
    if isinstance(value, types.ModuleType):
        return value.__name__
    owner = getattr(value, "__module__", None)
    return owner if isinstance(owner, str) and owner in MODULES else None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    if node.level:
        base = module.split(".")
        if MODULES[module].name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source not in MODULES:
        return set()
    found = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in MODULES:
            found.add(sub)
            continue
        found.add(source)
        owner = _defining_module(source, alias.name)
        if owner is not None:
            found.add(owner)
    found.discard(module)
    return found


def _graph(*, function_level: bool = True) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for node, in_function in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if in_function and not function_level:
                continue
            graph[module] |= _targets(module, node)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _function_local_imports() -> list[tuple[str, int, str, bool]]:
    """(module, line, statement, commented) for every import inside a function."""
    found = []
    for module, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node, in_function in _imports(ast.parse("\n".join(lines))):
            if not in_function:
                continue
            # A run of imports shares one comment: on the first's line or the one above.
            first = node.lineno - 1
            while first > 0 and lines[first - 1].strip().startswith(("from ", "import ")):
                first -= 1
            run = lines[first:node.end_lineno or node.lineno]
            above = lines[first - 1].strip() if first > 0 else ""
            commented = any("#" in line for line in [*run, above])
            found.append((module, node.lineno, ast.unparse(node), commented))
    return found


def test_the_graph_sees_the_edges_it_should() -> None:
    """The scan is not vacuous: known edges, lazy exports and function-level ones."""
    graph = _graph()
    assert "nbia_retriever.errors" in graph["nbia_retriever.engine.staging"]
    assert "nbia_retriever.engine.run" in graph["nbia_retriever.search"]  # engine's lazy shard_of
    assert "nbia_retriever.models" in graph["nbia_retriever.retry"]
    assert len(MODULES) > 50


def test_no_import_cycle_at_module_level() -> None:
    assert _cycles(_graph(function_level=False)) == []


def test_no_import_cycle_counting_function_level_imports() -> None:
    assert _cycles(_graph()) == []


def test_a_cycle_would_be_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_every_function_local_import_says_why() -> None:
    bare = [f"{module}:{line}: {statement}"
            for module, line, statement, commented in _function_local_imports()
            if not commented]
    assert bare == [], "\n".join(bare)


# ------------------------------------------------------------------------------ LazyGroup


def test_a_command_whose_module_fails_to_import_raises_not_no_such_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbia_retriever import cli

    (tmp_path / "nbia_broken_command.py").write_text(
        "import nbia_no_such_dependency  # what a broken install looks like\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.LAZY_COMMANDS, "broken", ("nbia_broken_command", "broken"))
    result = CliRunner().invoke(cli.main, ["broken"])
    assert isinstance(result.exception, ImportError), result.output
    assert "nbia_no_such_dependency" in str(result.exception)
    assert "No such command" not in result.output


def test_an_unknown_command_is_still_no_such_command() -> None:
    from nbia_retriever import cli

    result = CliRunner().invoke(cli.main, ["no-such-command"])
    assert result.exit_code == 2 and "No such command" in result.output


def test_every_lazy_command_loads() -> None:
    from nbia_retriever import cli

    group = cli.main
    assert isinstance(group, click.Group)
    for name in cli.LAZY_COMMANDS:
        assert isinstance(group.get_command(click.Context(group), name), click.Command), name
