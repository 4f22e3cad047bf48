"""`ingestd check-xnat`: what a lab admin runs before the first scan, and after any change on the XNAT side.

For each configured XNAT server (or one), `check_xnat` logs in and out as the daemon would and returns one
`Finding` per check: the credentials, the login, XNAT's version and which version-specific behaviours apply, for
every project the rules route there whether the account may write to it, its prearchive code against the rules'
`archive:` setting and its anonymisation script, the site-wide script, the credential (alias token or password),
and on request a dry import of a tiny generated study, deleted afterwards. What each finding is based on:
docs/xnat.md (§6 lists the checks). Every XNAT request goes through `XnatClient`; no secret is ever part of a
finding.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ingestd.check_xnat.findings import Finding
from ingestd.check_xnat.write_test import _write_test
from ingestd.config import Config, XnatServer
from ingestd.errors import ConfigError
from ingestd.rules import RuleSet
from ingestd.xnat import XnatClient, XnatError, XnatLoginError, is_alias_token, load_credentials

__all__ = ["check_xnat", "parse_version"]


# XNAT's idle build: a RECEIVING row idle for `sessionXmlRebuilderInterval` whole minutes (5) is built by the next
# pass of `sessionXmlRebuilderRepeat` (60 s): 5-6 minutes after the last file (docs/xnat.md §1.5).
IDLE_BUILD_SECONDS = 300.0
PREARCHIVE_CODES = {
    0: "manual (0): sessions wait in the prearchive",
    4: "auto-archive (4): XNAT archives a session after its idle build, merging without overwriting files",
    5: "auto-archive with overwrite (5): XNAT archives a session after its idle build, overwriting files",
}


def parse_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a version such as `1.8.10`, `1.8.11-SNAPSHOT`, `1.8.9.1`; None if it is not one."""
    parts = text.strip().split("-", 1)[0].split(".")
    numbers = []
    for part in parts[:3]:
        if not part.isdigit():
            return None
        numbers.append(int(part))
    if len(numbers) < 2:
        return None
    while len(numbers) < 3:
        numbers.append(0)
    return numbers[0], numbers[1], numbers[2]


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _routed_projects(rules: RuleSet | None, server: str) -> tuple[dict[str, list[bool]], list[str], Finding | None]:
    """The projects the rules route to `server`, each with the `archive:` setting of every rule that does; the
    rules whose project is a template (decided per study); or a finding that there is nothing to look at."""
    if rules is None:
        return (
            {},
            [],
            Finding(
                "warning",
                server,
                "the configuration names no rules file: there is no project to check",
                "add `rules:` to the configuration (see docs/rules.md), or name a project with --write-test",
            ),
        )
    projects: dict[str, list[bool]] = {}
    templated: list[str] = []
    for rule in rules.rules:
        if rule.route.server != server:
            continue
        if rule.route.project.is_literal:
            projects.setdefault(rule.route.project.text, []).append(rule.route.archive)
        else:
            templated.append(rule.name)
    if not projects and not templated:
        return {}, [], Finding("warning", server, "no rule routes to this server", "check the rules' route.server")
    return projects, templated, None


def check_xnat(
    config: Config,
    server: str | None = None,
    *,
    write_test: str | None = None,
    now: Callable[[], float] = time.time,
) -> list[Finding]:
    """Check every XNAT server of `config` (or only `server`); see the module docstring. Raises ConfigError for an
    unknown server name or rules that do not load."""
    servers = config.xnat.servers
    if server is not None and server not in servers:
        known = ", ".join(sorted(servers)) or "none"
        raise ConfigError("xnat", [f"no XNAT server named {server} under xnat.servers (configured: {known})"])
    if not servers:
        return [Finding("error", "xnat", "no XNAT server is configured", "add one under xnat.servers")]
    from ingestd.pipeline.build import load_rules_for  # noqa: PLC0415 - the rules compiler is only needed here

    rules = load_rules_for(config)  # before any request: rules that do not load are a configuration error
    findings: list[Finding] = []
    for name in [server] if server is not None else sorted(servers):
        findings += _check_server(rules, name, servers[name], write_test, now)
    return findings


def _check_server(
    rules: RuleSet | None, name: str, server: XnatServer, write_test: str | None, now: Callable[[], float]
) -> list[Finding]:
    findings: list[Finding] = []
    try:
        secret = load_credentials(server.credentials, server.url)
    except XnatError as exc:
        return [Finding("error", name, f"credentials: {exc}", "fix the credentials the configuration names")]
    findings.append(Finding("ok", name, "credentials readable"))
    client = XnatClient(name, server)
    try:
        try:
            client.login()
        except XnatLoginError as exc:
            return [*findings, Finding("error", name, str(exc), "fix the account or the credentials, then run again")]
        except XnatError as exc:
            return [
                *findings,
                Finding(
                    "error",
                    name,
                    f"cannot log in at {server.url}: {exc}",
                    "check the url (http or https, the context path such as /xnat), the network, any proxy, and"
                    " that XNAT is running",
                ),
            ]
        findings.append(Finding("ok", name, f"logged in at {server.url}"))
        version = _check_version(client, name, server, findings)
        findings += _check_credential(client, name, server, is_alias_token(secret.username), now)
        findings += _check_site_anon(client, name)
        projects, templated, nothing = _routed_projects(rules, name)
        if nothing is not None:
            findings.append(nothing)
        if templated:
            findings.append(
                Finding(
                    "warning",
                    name,
                    f"rule(s) {', '.join(templated)} take the project from the study: it cannot be checked here",
                    "run again with --write-test PROJECT for each project those rules may route to",
                )
            )
        for project, archives in sorted(projects.items()):
            findings += _check_project(client, name, server, project, archives, version)
        if write_test is not None:
            findings += _write_test(client, name, server, write_test)
    finally:
        client.close()
    return findings


# -- version ----------------------------------------------------------------------------------------------------


def _check_version(
    client: XnatClient, name: str, server: XnatServer, findings: list[Finding]
) -> tuple[int, int, int] | None:
    try:
        text = client.version()
    except XnatError as exc:
        text, why = "", str(exc)
    else:
        why = "XNAT did not state its version (GET /xapi/siteConfig/buildInfo)"
    version = parse_version(text) if text else None
    if version is None:
        findings.append(
            Finding(
                "warning",
                name,
                f"{why if not text else f'XNAT states its version as {text!r}, not a version number'}",
                "ingestd still works with any 1.8 version (it sends dataType and asks for builds itself); check"
                " the version on XNAT's About page",
            )
        )
        return None
    build = f"{server.build_wait_seconds:g} s"
    notes = []
    if version >= (1, 8, 9):
        notes.append("the permissions listing needs dataType (ingestd sends it)")
    else:
        notes.append("the permissions listing works with or without dataType (ingestd sends it)")
    if version >= (1, 8, 10):
        notes.append(
            "the import builds synchronously and honours dest: sessions are READY when the import answers"
            " (keep read_timeout_seconds and the proxy's read timeout above the time your largest study takes to"
            " build)"
        )
    else:
        notes.append(
            "the import leaves sessions RECEIVING and XNAT builds them only after 5-6 minutes idle: ingestd asks"
            f" for a build after build_wait_seconds ({build})"
        )
    if version < (1, 8, 0):
        findings.append(
            Finding(
                "warning",
                name,
                f"XNAT {text}: older than 1.8, which ingestd was not written for",
                "upgrade XNAT to 1.8.8 or later",
            )
        )
    else:
        findings.append(Finding("ok", name, f"XNAT {text}: " + "; ".join(notes)))
    if version < (1, 8, 10) and server.build_wait_seconds >= IDLE_BUILD_SECONDS:
        findings.append(
            Finding(
                "warning",
                name,
                f"build_wait_seconds ({build}) is not below XNAT's idle build (5 min): on XNAT {text} the idle"
                " build comes first, and archives sessions of auto-archive projects",
                "lower build_wait_seconds (default 60)",
            )
        )
    return version


# -- credential -------------------------------------------------------------------------------------------------


def _check_credential(  # noqa: PLR0911 - one return per kind of credential
    client: XnatClient, name: str, server: XnatServer, alias: bool, now: Callable[[], float]
) -> list[Finding]:
    if not alias:
        return [
            Finding(
                "ok",
                name,
                "the credential is a password: XNAT expires passwords after a year (passwordExpirationInterval)"
                " unless the account has the non_expiring role",
                "give the service account the non_expiring role (an XNAT admin: Administer > Users)",
            )
        ]
    try:
        info = client.token_info()
    except XnatError as exc:
        return [Finding("warning", name, f"the credential is an alias token; when it expires is unknown: {exc}")]
    renewable = server.credentials.file is not None
    source = "the credentials file" if renewable else ".netrc" if server.credentials.netrc else "the environment"
    if info is None or info.expires_at is None:
        return [
            Finding(
                "warning",
                name,
                "the credential is an alias token, and XNAT does not say when it expires",
                "renew it by hand before it expires (2 days after issue by default)",
            )
        ]
    left = info.expires_at - now()
    if left <= 0:
        return [
            Finding(
                "error",
                name,
                f"the alias token expired {_age(-left)} ago (XNAT removes it within the hour)",
                "issue a new one in XNAT (My Account > Manage alias tokens) and update " + source,
            )
        ]
    if renewable:
        return [
            Finding(
                "ok",
                name,
                f"the credential is an alias token from {server.credentials.file}, expiring in {_age(left)}: renewed"
                f" by ingestd before it expires ({_age(server.token_renew_seconds)} before)",
                "keep the file writable by the ingestd user (not under /run/credentials)",
            )
        ]
    if left < server.token_renew_seconds:
        return [
            Finding(
                "warning",
                name,
                f"the alias token from {source} expires in {_age(left)}, and ingestd cannot renew a token read from"
                f" {source}",
                f"issue a new one in XNAT (My Account > Manage alias tokens) and update {source}; or use"
                " credentials: {file: ...}, which ingestd renews",
            )
        ]
    return [
        Finding(
            "ok",
            name,
            f"the credential is an alias token from {source}, expiring in {_age(left)}; ingestd cannot renew it",
            "replace it before then, or use credentials: {file: ...}, which ingestd renews",
        )
    ]


# -- anonymisation scripts --------------------------------------------------------------------------------------

_ANON_EFFECT = (
    "it may change the files ingestd verifies (UIDs, headers) or reject some; ingestd recognises each file by its"
    " name <SOP Instance UID>.dcm and resends what is missing, then holds the study as incomplete"
)


def _enabled(client: XnatClient, path: str, doing: str) -> bool | str:
    """Whether XNAT says the script at `path` is enabled; a reason string when it cannot tell."""
    try:
        response = client.request("GET", path, doing, allow=(403, 404))
    except XnatError as exc:
        return str(exc)
    if response.status_code in (403, 404):
        return f"XNAT answered {response.status_code} to GET {path}"
    text = response.text.strip().strip('"').lower()
    if text in ("true", "false"):
        return text == "true"
    return f"XNAT answered GET {path} with {text[:40]!r}"


def _check_site_anon(client: XnatClient, name: str) -> list[Finding]:
    enabled = _enabled(client, "/xapi/anonymize/site/enabled", "read whether the site anonymisation script is on")
    if isinstance(enabled, str):
        return [
            Finding(
                "warning",
                name,
                f"cannot tell whether a site-wide anonymisation script is enabled: {enabled}",
                "ask an XNAT admin (Administer > Site Administration > Anonymization)",
            )
        ]
    if enabled:
        return [
            Finding(
                "warning",
                name,
                f"a site-wide anonymisation script is enabled (applied to every file as it is stored): {_ANON_EFFECT}",
                "make sure it keeps SOP Instance UIDs and never rejects files, or disable it (XNAT's default"
                " script only rewrites the project, subject and session fields)",
            )
        ]
    return [Finding("ok", name, "no site-wide anonymisation script is enabled")]


# -- projects ---------------------------------------------------------------------------------------------------


def _check_project(
    client: XnatClient,
    name: str,
    server: XnatServer,
    project: str,
    archives: list[bool],
    version: tuple[int, int, int] | None,
) -> list[Finding]:
    subject = f"{name}/{project}"
    try:
        client.check_project(project)
    except XnatError as exc:
        advice = (
            "create the project or fix the rule's project"
            if exc.status == 404
            else "add the account as a member or owner of the project"
            if not exc.retryable
            else "check that XNAT is up, then run again"
        )
        return [Finding("error", subject, str(exc), advice)]
    findings = [Finding("ok", subject, "the account can write to the project")]
    findings += _check_prearchive_code(client, subject, server, project, archives, version)
    enabled = _enabled(
        client, f"/xapi/anonymize/projects/{project}/enabled", f"read whether {project}'s anonymisation script is on"
    )
    if isinstance(enabled, str):
        findings.append(
            Finding(
                "warning",
                subject,
                f"cannot tell whether a project anonymisation script is enabled: {enabled}",
                "ask the project owner (Project > Manage > Anonymization)",
            )
        )
    elif enabled:
        findings.append(
            Finding(
                "warning",
                subject,
                f"a project anonymisation script is enabled (applied when a session is archived): {_ANON_EFFECT}",
                "make sure it keeps SOP Instance UIDs and never rejects files, or disable it",
            )
        )
    else:
        findings.append(Finding("ok", subject, "no project anonymisation script is enabled"))
    return findings


def _check_prearchive_code(
    client: XnatClient,
    subject: str,
    server: XnatServer,
    project: str,
    archives: list[bool],
    version: tuple[int, int, int] | None,
) -> list[Finding]:
    path = f"/data/projects/{project}/prearchive_code"
    try:
        response = client.request("GET", path, f"read {project}'s prearchive code", allow=(403, 404))
    except XnatError as exc:
        return [Finding("warning", subject, f"cannot read the prearchive setting: {exc}", "")]
    text = response.text.strip()
    if response.status_code in (403, 404) or not text.lstrip("-").isdigit():
        return [
            Finding(
                "warning",
                subject,
                f"cannot tell the prearchive setting (GET {path} answered {response.status_code} {text[:40]!r})",
                "look at it in XNAT: Project > Manage > Prearchive",
            )
        ]
    code = int(text)
    if code not in PREARCHIVE_CODES:
        return [
            Finding(
                "warning",
                subject,
                f"unknown prearchive code {code}",
                "set it in XNAT (Project > Manage > Prearchive) to manual (0) or auto-archive (4)",
            )
        ]
    meaning = PREARCHIVE_CODES[code]
    findings = []
    if code == 0:
        what = []
        if True in archives:
            what.append("rules with archive: true: ingestd archives each session itself")
        if False in archives:
            what.append("rules with archive: false: sessions stay READY in the prearchive")
        findings.append(Finding("ok", subject, f"prearchive {meaning}; " + "; ".join(what)))
    else:
        if True in archives:
            findings.append(
                Finding(
                    "ok",
                    subject,
                    f"prearchive {meaning}; rules with archive: true: ingestd archives each session itself (XNAT"
                    " answers 303)",
                )
            )
        if False in archives:
            findings.append(_auto_archive_without_archive(subject, meaning, server, version))
    if code == 5:
        findings.append(
            Finding(
                "warning",
                subject,
                "auto-archive with overwrite (5): a later session with the same label overwrites the archived"
                " session's files instead of being refused",
                "set the project to auto-archive (4) or manual (0) in XNAT (Project > Manage > Prearchive) unless"
                " you want that",
            )
        )
    return findings


def _auto_archive_without_archive(
    subject: str, meaning: str, server: XnatServer, version: tuple[int, int, int] | None
) -> Finding:
    """docs/xnat.md §1.7: `archive: false` on an auto-archive project. The session is usually not archived at all:
    1.8.10+'s synchronous build and ingestd's `action=build` never auto-archive, so it stays READY; only XNAT's own
    idle build archives it, i.e. when ingestd did not build first (daemon stopped, 409)."""
    if version is not None and version >= (1, 8, 10):
        when = (
            f"on XNAT {'.'.join(map(str, version))} the import's synchronous build never auto-archives, so sessions"
            " usually stay READY in the prearchive; XNAT's own idle build archives one only when that build did not"
            " happen"
        )
    else:
        when = (
            f"ingestd asks for a build after build_wait_seconds ({server.build_wait_seconds:g} s), which never"
            " auto-archives, so sessions usually stay READY; but XNAT's own idle build (5-6 min) archives a session"
            " whenever ingestd did not build it first (daemon stopped, a 409)"
        )
    return Finding(
        "warning",
        subject,
        f"prearchive {meaning}, and rules with archive: false route here: {when}. Whether a session ends in the"
        " archive or the prearchive is then up to chance",
        "set the project to manual (0) in XNAT (Project > Manage > Prearchive), or make those rules archive: true",
    )


# -- write test -------------------------------------------------------------------------------------------------
