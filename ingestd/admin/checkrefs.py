"""What `check-config` checks in the rules files a configuration names, without validating them (`check-config
--rules` and `check-rules` do that): every XNAT server a rule routes to is in `xnat.servers`, and the
de-identification keys the rules name can be read (read as the rules loader reads them; never printed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ingestd.admin.checkpaths import SYSTEMD_CREDENTIALS
from ingestd.config import Config, YamlDocument, _line_of, read_yaml, read_yaml_file
from ingestd.configwords import did_you_mean
from ingestd.errors import ConfigError
from ingestd.rules.sources import read_env_key, read_key_file

__all__ = ["rules_references", "where"]


def where(source: str, lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> str:
    """`source:line: dotted.key` of the key at `loc`."""
    key = ".".join(str(part) for part in loc) or "(top level)"
    return f"{source}:{_line_of(loc, lines) or 1}: {key}"


def _servers(document: YamlDocument, source: str, known: list[str], config_source: str) -> tuple[list[str], set[str]]:
    """(errors, the servers named) for each rule's `route.server`."""
    errors: list[str] = []
    named: set[str] = set()
    rules = document.data.get("rules") if isinstance(document.data, dict) else None
    for index, rule in enumerate(rules if isinstance(rules, list) else []):
        route = rule.get("route") if isinstance(rule, dict) else None
        server = route.get("server") if isinstance(route, dict) else None
        if not isinstance(server, str):
            continue
        named.add(server)
        if known and server not in known:
            errors.append(
                f"{where(source, document.lines, ('rules', index, 'route', 'server'))}: no XNAT server '{server}' in "
                f"xnat.servers of {config_source}{did_you_mean(server, known)} (the servers are: {', '.join(known)})"
            )
    return errors, named


def _key_locations(data: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """(loc, value) of every `key:` of a profile or of a rule's route."""
    found: list[tuple[tuple[Any, ...], Any]] = []
    if not isinstance(data, dict):
        return found
    profiles = data.get("profiles")
    for name, profile in profiles.items() if isinstance(profiles, dict) else ():
        if isinstance(profile, dict) and "key" in profile:
            found.append((("profiles", name, "key"), profile["key"]))
    rules = data.get("rules")
    for index, rule in enumerate(rules if isinstance(rules, list) else []):
        route = rule.get("route") if isinstance(rule, dict) else None
        if isinstance(route, dict) and route.get("key") is not None:
            found.append((("rules", index, "route", "key"), route["key"]))
    return found


def _keys(document: YamlDocument, path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) for the keys a rules file names, read as the rules loader reads them."""
    errors: list[str] = []
    warnings: list[str] = []
    for loc, key in _key_locations(document.data):
        if not isinstance(key, dict):
            continue  # not {env: ...} or {file: ...}: the rules check says so
        at = where(str(path), document.lines, loc)
        try:
            if isinstance(key.get("env"), str):
                read_env_key(key["env"])
            elif isinstance(key.get("file"), str):
                file = path.parent / key["file"]
                if file.is_relative_to(SYSTEMD_CREDENTIALS) and not file.exists():
                    warnings.append(f"{at}: key file {file} is handed over by systemd (LoadCredential=) at start")
                else:
                    read_key_file(file)
        except ValueError as exc:
            errors.append(f"{at}: {exc}")
    return errors, warnings


def rules_references(config: Config, config_source: str, *, keys: bool = True) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the servers and (`keys`) the keys the rules files of `config` name; each read as
    YAML alone, so that this runs whatever else is wrong with them."""
    errors: list[str] = []
    warnings: list[str] = []
    named: set[str] = set()
    known = sorted(config.xnat.servers)
    for path in config.rules:
        try:
            document = read_yaml(read_yaml_file(path, "rules file"), str(path), what="rules file")
        except ConfigError:
            continue  # unreadable or not YAML: reported by the file check and by the rules check
        server_errors, servers = _servers(document, str(path), known, config_source)
        errors += server_errors
        named |= servers
        if keys:
            key_errors, key_warnings = _keys(document, path)
            errors += key_errors
            warnings += key_warnings
    if named and not known:
        warnings.append(
            f"{config_source}:1: xnat.servers: none configured, but rules route to {', '.join(sorted(named))}: "
            "routed studies wait and nothing is sent"
        )
    return errors, warnings
