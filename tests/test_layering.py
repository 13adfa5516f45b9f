"""The layering of ``src/capsock``, checked from the source (no imports run).

Generalises the sans-IO import check of ``test_quality``: it builds the import
graph of every module of the package from the AST and checks that

- the graph has no cycle at run time (imports under ``if TYPE_CHECKING:``
  excluded), and none at the type level either, apart from the few listed in
  :data:`KNOWN_TYPE_CYCLES` with the reason each still exists (the list must
  shrink: a listed cycle that is gone fails too, so it is taken off);
- the sans-IO core imports nothing of the anyio layer above it, and no I/O or
  event-loop library (``anyio``, ``asyncio``, ``trio``, sockets, ...);
- no module is longer than :data:`MAX_LINES`, apart from
  :data:`LONG_MODULES`, each with its reason (also a list that must shrink).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "capsock"

MAX_LINES = 600

LONG_MODULES: dict[str, str] = {
    "capsock.core.mux": "the mux engine (h-eng, issue 15 items 1-3 move its rules into tables)",
    "capsock.net.session": (
        "the anyio driver of _session_engine plus the stream-facing half Stream calls "
        "(send, credit, open, close); splitting that off goes with the session-stream cycle"
    ),
    "capsock.rpc.connection": "one msgpack-RPC connection; rpc was not part of issue 15's split",
}

KNOWN_TYPE_CYCLES: dict[frozenset[str], str] = {
    frozenset({"capsock.net.session", "capsock.net.stream"}): (
        "Stream and Session call each other's private methods (h-eng, issue 15 item 1)"
    ),
    frozenset(
        {
            "capsock.rpc.connection",
            "capsock.rpc.exports",
            "capsock.rpc.remote",
            "capsock.rpc.service",
        }
    ): "rpc's connection, exports, service and remote objects name each other's types",
}

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # (layer, the modules in it: a name or a package prefix ending in "."), lowest first
    ("core", ("capsock.errors", "capsock.config", "capsock.keys", "capsock._logs",
              "capsock.uri", "capsock.uri.", "capsock.core", "capsock.core.")),
    ("net", ("capsock.net", "capsock.net.", "capsock.store", "capsock.statedir",
             "capsock.messages")),
    ("node", ("capsock.node", "capsock.node.")),
    ("adapters", ("capsock.services", "capsock.sockets", "capsock.transfer",
                  "capsock.transfer.", "capsock.aio", "capsock.http", "capsock.http.",
                  "capsock.testing",
                  "capsock.rpc", "capsock.rpc.")),
    ("cli", ("capsock.cli", "capsock.cli.", "capsock.__main__")),
    ("facade", ("capsock",)),
)  # fmt: skip
"""Imports run from a layer to itself or below, never up (``tests`` of that below)."""


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of ``module``'s layer (every module has one)."""
    for i, (_, members) in enumerate(LAYERS):
        for member in members:
            if module == member or (member.endswith(".") and module.startswith(member)):
                return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


IO_LIBRARIES = {
    "anyio", "asyncio", "trio", "sniffio", "socket", "selectors", "ssl", "sqlite3",
    "subprocess", "threading",
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def is_core(module: str) -> bool:
    """Whether ``module`` belongs to the sans-IO core (private ``_`` names included)."""
    return layer_of(module) == 0


def _is_type_checking(test: ast.expr) -> bool:
    return ast.unparse(test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}


def _imports(module: str, *, type_level: bool) -> Iterator[tuple[str, int]]:
    """``(imported name, line)`` for every import in ``module``, absolute names."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(node: ast.AST) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test) and not type_level:
                for stmt in child.orelse:
                    yield from walk_one(stmt)
                continue
            yield from walk_one(child)

    def walk_one(node: ast.AST) -> Iterator[tuple[str, int]]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in MODULES else target), node.lineno
        yield from walk(node)

    yield from walk(ast.parse(path.read_text("utf-8")))


def graph(*, type_level: bool) -> dict[str, set[str]]:
    return {
        module: {
            name
            for name, _ in _imports(module, type_level=type_level)
            if name in MODULES and name != module
        }
        for module in MODULES
    }


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_package() -> None:
    """Guards the checks below against passing vacuously."""
    assert (
        layer_of("capsock.core.mux")
        < layer_of("capsock.net.session")
        < layer_of("capsock.node._opens")
        < layer_of("capsock.http")
        < layer_of("capsock.cli.app")
    )
    edges = graph(type_level=True)
    assert "capsock.node" in edges and "capsock.core.noise" in edges
    assert "capsock.errors" in edges["capsock.uri"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_no_import_cycle_at_run_time() -> None:
    found = cycles(graph(type_level=False))
    assert found == [], f"import cycles: {[sorted(c) for c in found]}"


def test_type_level_cycles_are_only_the_known_ones() -> None:
    found = set(cycles(graph(type_level=True)))
    new = found - set(KNOWN_TYPE_CYCLES)
    assert not new, f"new import cycles (TYPE_CHECKING included): {[sorted(c) for c in new]}"
    gone = set(KNOWN_TYPE_CYCLES) - found
    assert not gone, f"take these off KNOWN_TYPE_CYCLES, they are gone: {[sorted(c) for c in gone]}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if is_core(m)))
def test_the_sans_io_core_imports_only_the_core(module: str) -> None:
    for name, line in _imports(module, type_level=True):
        top = name.split(".")[0]
        assert top not in IO_LIBRARIES, f"{module}:{line} imports {name} (the core does no I/O)"
        if top == "capsock":
            assert is_core(name), f"{module}:{line} imports {name}, which is above the core"


def test_the_core_is_what_the_docs_say() -> None:
    core = {m for m in MODULES if is_core(m)}
    for expected in ("errors", "keys", "uri", "core.noise", "core.frames", "core.mux",
                     "core.handshake", "core.records", "core._session_engine"):  # fmt: skip
        assert f"capsock.{expected}" in core
    assert "capsock.net.session" not in core and "capsock.node" not in core


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)  # raises for a module nobody placed
    with pytest.raises(AssertionError):
        layer_of("capsock.somewhere_new")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_never_go_up_a_layer(module: str) -> None:
    """A module imports from its own layer or the ones below, also under TYPE_CHECKING."""
    mine = layer_of(module)
    for name, line in _imports(module, type_level=True):
        if name in MODULES and name != "capsock":
            theirs = layer_of(name)
            assert theirs <= mine, (
                f"{module}:{line} ({LAYERS[mine][0]}) imports {name} ({LAYERS[theirs][0]}): "
                "imports run from the CLI down to the core, never up"
            )


def _lines(module: str) -> int:
    return len(MODULES[module].read_text("utf-8").splitlines())


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_the_size_limit(module: str) -> None:
    if module in LONG_MODULES:
        assert _lines(module) > MAX_LINES, f"{module} fits now: take it off LONG_MODULES"
    else:
        assert _lines(module) <= MAX_LINES, (
            f"{module} has {_lines(module)} lines (limit {MAX_LINES}): split it by concern"
        )


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("capsock.cli")))
def test_the_cli_uses_public_names_only(module: str) -> None:
    """The command line sits on the public API: no private module or name of capsock
    (its own siblings in capsock.cli are its business)."""
    tree = ast.parse(MODULES[module].read_text("utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level == 1:
            continue
        if node.level == 0 and not (node.module or "").startswith("capsock"):
            continue
        target = node.module or ""
        assert not any(p.startswith("_") for p in target.split(".")), (
            f"{module}:{node.lineno} imports the private module {target}"
        )
        for alias in node.names:
            dunder = alias.name.startswith("__") and alias.name.endswith("__")
            assert dunder or not alias.name.startswith("_"), (
                f"{module}:{node.lineno} imports the private name {alias.name} from {target}"
            )
