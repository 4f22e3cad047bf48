"""The log events are an interface: the code logs exactly the events docs/logging.md lists, with its keys.

Dashboards, alerts and journald queries match on event names and keys, so a rename or a new key is a
documented change. The check reads the source (every `log.<level>("name", key=...)` call in the package).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import ingestd
from ingestd.logs import _phi_keys

PACKAGE = Path(ingestd.__file__).parent
CATALOGUE = PACKAGE.parent / "docs" / "logging.md"
_LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
_NAME = re.compile(r"[a-z]+\.[a-z][a-z_]*")
_ROW = re.compile(r"^\| `([a-z_.]+)` \| ([\w/]+) \| (.*?) \|")


def _logged() -> dict[str, set[str]]:
    """Event name -> keys, from every structlog call on a module's `log` in the package (tests excluded)."""
    events: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "testing" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _LEVELS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
            ):
                continue
            assert node.args and isinstance(node.args[0], ast.Constant), f"{path}:{node.lineno}: a constant event name"
            name = str(node.args[0].value)
            keys = {keyword.arg for keyword in node.keywords}
            assert None not in keys, f"{path}:{node.lineno}: no **fields: keys are fixed"
            events.setdefault(name, set()).update(str(key) for key in keys)
    return events


def _documented() -> dict[str, set[str]]:
    documented: dict[str, set[str]] = {}
    for line in CATALOGUE.read_text(encoding="utf-8").splitlines():
        match = _ROW.match(line)
        if match:
            keys = set(re.findall(r"`([a-z_]+)`", match.group(3)))
            documented[match.group(1)] = keys
    return documented


def test_every_event_is_named_step_dot_noun() -> None:
    bad = sorted(name for name in _logged() if not _NAME.fullmatch(name))
    assert bad == []


def test_the_code_logs_exactly_the_documented_events_and_keys() -> None:
    logged, documented = _logged(), _documented()
    assert sorted(set(logged) - set(documented)) == [], "events logged but not in docs/logging.md"
    assert sorted(set(documented) - set(logged)) == [], "events in docs/logging.md that nothing logs"
    undocumented = {name: sorted(keys - documented[name]) for name, keys in logged.items() if keys - documented[name]}
    assert undocumented == {}, "keys logged but not documented"


def test_no_event_key_is_named_like_a_phi_attribute() -> None:
    """The redaction processor would blank such a key; a key named like one is a design error."""
    clashes = {
        name: sorted(key for key in keys if key.replace("_", "").lower() in _phi_keys())
        for name, keys in _logged().items()
    }
    assert {name: keys for name, keys in clashes.items() if keys} == {}
