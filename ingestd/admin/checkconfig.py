"""`ingestd check-config`: everything wrong with a configuration, at once, as `file:line: key: problem`.

Beyond the model (ingestd/config.py): keys given twice, the files, folders and credential sources the configuration
names (ingestd/admin/checkpaths.py), the XNAT servers its rules route to, and numbers that are valid but absurd.
`ingestd run` refuses to start on any error found here (`check_config` is the one source of truth for both);
warnings are printed (logged by `run`) and do not refuse.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml
from pydantic import BaseModel

from ingestd.admin.checkpaths import Finding, Who, check_paths
from ingestd.admin.checkrefs import rules_references, where
from ingestd.config import Config, YamlDocument, read_yaml, read_yaml_file, resolve_rules, validate_document
from ingestd.configwords import repeated_keys
from ingestd.errors import ConfigError
from ingestd.uiconfig import is_loopback

__all__ = ["Report", "check_config", "duplicate_keys", "log_warnings", "numbers", "print_report"]

log = structlog.get_logger("ingestd.checkconfig")

LONGEST_SECONDS = 30 * 86400.0  # a duration above this is more likely a typo (minutes for seconds) than meant


@dataclass
class Report:
    """The problems found: errors (the daemon refuses to run) and warnings, each `file:line: key: problem`."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: Config | None = None


def duplicate_keys(node: yaml.Node | None, source: str) -> Iterator[str]:
    """A key given twice in one mapping: YAML keeps the last silently, so the first would be ignored."""
    for twice in repeated_keys(node):
        yield (
            f"{source}:{twice.line}: {twice.dotted}: given twice, on lines {twice.first_line} and {twice.line}"
            " (YAML would keep only this one): remove one"
        )


def _durations(model: BaseModel, loc: tuple[Any, ...]) -> Iterator[Finding]:
    for name, value in model:
        if isinstance(value, BaseModel):
            yield from _durations(value, (*loc, name))
        elif isinstance(value, tuple):
            for index, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _durations(item, (*loc, name, index))
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    yield from _durations(item, (*loc, name, key))
        elif name.endswith("_seconds") and isinstance(value, float | int) and value > LONGEST_SECONDS:
            yield Finding(
                "warning", (*loc, name), f"{value:g} seconds is {value / 86400:.0f} days: seconds were meant?"
            )


def numbers(config: Config, uid: int) -> list[Finding]:
    """Numbers the model accepts but that are absurd (warnings) or cannot work together (errors)."""
    found: list[Finding] = list(_durations(config, ()))
    listener, metrics = config.listener, config.metrics
    if listener.enabled and listener.port == 0:
        found.append(Finding("warning", ("listener", "port"), "0 takes any free port: scanners cannot find it"))
    elif listener.enabled and listener.port < 1024 and uid != 0:
        found.append(
            Finding(
                "warning",
                ("listener", "port"),
                f"port {listener.port} is below 1024: the daemon needs CAP_NET_BIND_SERVICE (AmbientCapabilities= in "
                "its systemd unit) to listen on it",
            )
        )
    wildcard = ("0.0.0.0", "::", "")  # noqa: S104 - compared, not bound
    same_host = listener.host == metrics.host or listener.host in wildcard or metrics.host in wildcard
    if listener.enabled and metrics.enabled and listener.port and listener.port == metrics.port and same_host:
        found.append(
            Finding("error", ("metrics", "port"), f"port {metrics.port} is the DICOM listener's too: choose another")
        )
    if metrics.enabled and config.ui.enabled and config.ui.http_basic and not is_loopback(metrics.host):
        found.append(
            Finding(
                "warning",
                ("ui", "http_basic"),
                f"metrics.host is {metrics.host}, but HTTP Basic is refused from other machines over plain HTTP: keep"
                " metrics.host on 127.0.0.1 and the lab's reverse proxy (TLS) on this machine",
            )
        )
    return found


def check_config(
    path: Path, *, uid: int | None = None, environ: Mapping[str, str] | None = None, keys: bool = True
) -> Report:
    """Every problem with the configuration file at `path`, checked for user `uid` with environment `environ`
    (default: this process's); `keys`: also the de-identification keys its rules files name (which loading the
    rules checks too)."""
    source = str(path)
    report = Report()
    try:
        text = read_yaml_file(path)
        duplicates: list[str] = []
        document: YamlDocument = read_yaml(
            text, source, inspect=lambda node: duplicates.extend(duplicate_keys(node, source))
        )
    except ConfigError as exc:
        report.errors += exc.problems
        return report
    report.errors += duplicates
    try:
        config = resolve_rules(validate_document(document, source, Config, plain=True), path)
    except ConfigError as exc:
        report.errors += exc.problems
        return _sorted(report)
    who = Who(os.geteuid() if uid is None else uid, os.environ if environ is None else environ)
    for finding in check_paths(config, who) + numbers(config, who.uid):
        text = f"{where(source, document.lines, finding.loc)}: {finding.message}"
        (report.errors if finding.level == "error" else report.warnings).append(text)
    report = _sorted(report)
    errors, warnings = rules_references(config, source, keys=keys)
    report.errors += errors
    report.warnings += warnings
    report.config = config
    return report


def _line_key(problem: str) -> tuple[str, int]:
    source, _, rest = problem.partition(":")
    line = rest.partition(":")[0]
    return source, int(line) if line.isdigit() else 0


def _sorted(report: Report) -> Report:
    report.errors.sort(key=_line_key)
    report.warnings.sort(key=_line_key)
    return report


def print_report(path: Path, check_rules: Callable[[list[Path]], int] | None = None) -> int:
    """`ingestd check-config FILE [--rules]`: print every problem (errors and warnings to stderr); the exit
    status: 2 on any error, else 0. `check_rules` (the `check-rules` command) is run on the rules it names."""
    report = check_config(path, keys=check_rules is None)  # else the rules check reports them
    for problem in report.errors:
        print(problem, file=sys.stderr)
    for problem in report.warnings:
        source, line = _line_key(problem)
        print(f"{source}:{line}: warning: {problem.split(': ', 1)[1]}", file=sys.stderr)
    status = 2 if report.errors else 0
    config = report.config
    if config is not None and not report.errors:
        warned = (
            f", {len(report.warnings)} warning{'s' if len(report.warnings) != 1 else ''}" if report.warnings else ""
        )
        print(f"{path}: OK (state_dir {config.state_dir}{warned})")
    if config is None or check_rules is None:
        return status
    if not config.rules:
        print(f"{path}: no rules files configured: nothing is routed", file=sys.stderr)
    elif all(rules.is_file() for rules in config.rules):  # a missing one is reported above
        try:
            status = max(status, check_rules(list(config.rules)))
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            status = 2
    return status


def log_warnings(warnings: list[str]) -> None:
    """What `run` does with the warnings `check-config` prints: log them, and start."""
    for warning in warnings:
        log.warning("config.warning", problem=warning)
