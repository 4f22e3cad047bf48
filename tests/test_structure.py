"""The shape of the package: no import cycles, no module importing upward, no module over MAX_LINES lines.

Every module of `ingestd` is parsed with `ast` (not imported); every import counts, also those inside functions
and under `if TYPE_CHECKING:`. The layers below are the data flow read bottom-up; a module may import from its
own layer and the layers below it, never from a layer above. To add a module, add its name (or its package's) to
the layer it belongs to; a name that does not exist (yet) is simply unused.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ingestd

# -- the declared structure (edit here) -------------------------------------------------------------------------

# Bottom to top. Names are module paths below `ingestd` ("receive" covers ingestd/receive/ and all in it;
# "__init__" is the package root, `ingestd/__init__.py`); the longest name that matches a module places it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("__init__", "states", "errors")),
    (
        "pure helpers",
        (
            "patterns",
            "header",
            "dicomfile",
            "digestkey",
            "fsmodes",
            "deadline",
            "walk",
            "wakeup",
            "notify",
            "synthetic",
            "progress",
            "eventbuffer",
        ),
    ),
    # Below rules/: rules/load.py reads its YAML through config's readers (read_yaml, validate_document).
    ("configuration", ("configwords", "uiconfig", "config")),
    # logs redacts log values with the de-identification table (deid/table.py).
    ("pure rules and de-identification", ("rules", "deid", "logs")),
    # status: the journal's read model (the `status` command, the systemd STATUS line, metrics' counts).
    (
        "journal and spool",
        (
            "durable",
            "journal",
            "quarantined",
            "spool",
            "attachspool",
            "retention",
            "status",
            "metrics",
            "statedir",
            "importprogress",
        ),
    ),
    ("receive", ("receive",)),
    # Below the pipeline: the deliver stage is its user.
    ("xnat client", ("xnat",)),
    (
        "pipeline",
        ("pipeline", "breaker"),
    ),
    # Imported only by entry points (demo) and by tests: see TESTING_IMPORTERS.
    ("testing stand-ins", ("testing",)),
    # What a person does by hand (retry, release, resend, purge, check-config): the CLI's work, below it.
    ("admin commands", ("admin",)),
    # The web page: the read model and status's filters, served by the daemon through the metrics endpoint.
    ("web page", ("ui",)),
    ("entry points", ("cli", "__main__", "daemon", "bulk", "offline", "demo", "demo_ui", "check_xnat")),
]
ENTRY_POINTS = LAYERS[-1][1]
# Entry points do not import each other, except these (importer -> the entry points it may import).
ENTRY_POINT_IMPORTS: dict[str, tuple[str, ...]] = {
    "cli": ENTRY_POINTS,
    "__main__": ("cli",),
    "demo": ("daemon",),  # the demo runs the real daemon (listener, watcher, pipeline) against the stand-in
    "demo_ui": ("daemon", "demo"),  # the web page's walk-through: the real daemon as `run` runs it, the demo's study
}
TESTING = "testing"
TESTING_IMPORTERS = (*ENTRY_POINTS, TESTING)

MAX_LINES = 600

# Known violations on the way out, each with the change that removes it (none today). Keys: (importing module,
# imported module) and module names. The test fails when one no longer occurs, so that the lists only ever shrink.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
KNOWN_LONG: dict[str, str] = {}

# -- reading the package ----------------------------------------------------------------------------------------

PACKAGE = Path(ingestd.__file__).parent


def _modules() -> dict[str, Path]:
    """Every module of the package by its name below `ingestd` (a package by its own name; the root: __init__)."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(dotted: str) -> str | None:
    """The module an absolute `ingestd...` name means (the longest that exists), None outside the package."""
    parts = dotted.split(".")
    if parts[0] != "ingestd":
        return None
    parts = parts[1:]
    while parts:
        name = ".".join(parts)
        if name in MODULES:
            return name
        parts.pop()
    return "__init__"


def _imports(name: str) -> set[str]:
    """The modules of the package that `name` imports, anywhere in it."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))
    package = name.split(".") if _is_package(name) else name.split(".")[:-1]
    if name == "__init__":
        package = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [_resolve(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(["ingestd", *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # `from ingestd.receive import dataphase` imports the module dataphase; `from x import name`, x.
            targets = [
                _resolve(f"{module}.{alias.name}")
                if f"{module}.{alias.name}".removeprefix("ingestd.") in MODULES
                else _resolve(module)
                for alias in node.names
            ]
        else:
            continue
        found.update(target for target in targets if target is not None and target != name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _layer_entry(name: str) -> tuple[int, str]:
    """(layer index, the table's name that places the module); raises if the table does not place it."""
    best: tuple[int, str] | None = None
    for index, (_, names) in enumerate(LAYERS):
        for entry in names:
            placed = name == entry or name.startswith(f"{entry}.")
            if placed and (best is None or len(entry) > len(best[1])):
                best = (index, entry)
    if best is None:
        raise AssertionError(f"ingestd.{name} is in no layer: add it to LAYERS in {__file__}")
    return best


def _find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path back to its start) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan; the package is small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a component always has one


def _violations() -> dict[tuple[str, str], str]:
    """Every import against the layers: (importer, imported) -> why it is not allowed."""
    found: dict[tuple[str, str], str] = {}
    for importer, imported in sorted((a, b) for a, targets in GRAPH.items() for b in targets):
        (low, low_entry), (high, high_entry) = _layer_entry(imported), _layer_entry(importer)
        if low > high:
            found[(importer, imported)] = (
                f"ingestd.{importer} ({LAYERS[high][0]}) imports ingestd.{imported}, a layer above ({LAYERS[low][0]})"
            )
        elif low_entry == TESTING and high_entry not in TESTING_IMPORTERS:
            found[(importer, imported)] = f"ingestd.{importer} imports ingestd.{imported}: testing/ is for tests"
        elif (
            low_entry in ENTRY_POINTS
            and high_entry in ENTRY_POINTS
            and low_entry != high_entry
            and low_entry not in ENTRY_POINT_IMPORTS.get(high_entry, ())
        ):
            found[(importer, imported)] = f"entry point ingestd.{importer} imports entry point ingestd.{imported}"
    return found


# -- the tests ----------------------------------------------------------------------------------------------------


def test_every_module_is_in_a_layer() -> None:
    for name in MODULES:
        _layer_entry(name)


def test_no_import_cycles() -> None:
    cycles = _find_cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(f"ingestd.{m}" for m in c) for c in cycles)


def test_no_module_imports_upward() -> None:
    violations = _violations()
    new = [why for pair, why in violations.items() if pair not in KNOWN_UPWARD]
    assert not new, "imports against the layers (see LAYERS in tests/test_structure.py):\n" + "\n".join(new)
    gone = [f"{a} -> {b}" for a, b in KNOWN_UPWARD if (a, b) not in violations]
    assert not gone, f"no longer happen, remove them from KNOWN_UPWARD: {gone}"


def test_no_module_is_too_long() -> None:
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    long = [f"ingestd.{name}: {lines} lines" for name, lines in sorted(lengths.items()) if lines > MAX_LINES]
    new = [line for line in long if line.split(":")[0].removeprefix("ingestd.") not in KNOWN_LONG]
    assert not new, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(new)
    gone = [name for name in KNOWN_LONG if lengths.get(name, 0) <= MAX_LINES]
    assert not gone, f"no longer over {MAX_LINES} lines (or gone), remove them from KNOWN_LONG: {gone}"


def test_the_checks_see_what_they_must() -> None:
    """The reading itself: a function-level import counts, a cycle is found and named, an upward import too."""
    assert "pipeline.build" in GRAPH["check_xnat.checks"]  # imported inside check_xnat()
    assert "receive.dataphase" in GRAPH["receive.listener"]  # `from ingestd.receive import dataphase`
    assert _find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert LAYERS[_layer_entry("receive.listener")[0]][0] == "receive"
    assert _layer_entry("check_xnat.write_test")[1] == "check_xnat"
