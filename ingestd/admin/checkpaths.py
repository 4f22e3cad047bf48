"""What `check-config` checks on disk and in the environment: the files and folders the configuration names, and
where each XNAT server's credentials come from. Each check returns its problems; none prints a secret.

The checks are made as the user running them: run `check-config` as the user the daemon runs as (`sudo -u
ingestd ingestd check-config ...`), or its answers on permissions are the current user's.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ingestd.config import Config, Credentials, XnatServer
from ingestd.xnat.credentials import load_credentials
from ingestd.xnat.errors import XnatLoginError

__all__ = ["Finding", "Who", "check_paths"]

Loc = tuple[Any, ...]

SYSTEMD_CREDENTIALS = Path("/run/credentials")  # where systemd puts a service's LoadCredential= files


@dataclass(frozen=True)
class Finding:
    """One problem with the configuration: at the key `loc`, an error (refuses to run) or a warning."""

    level: Literal["error", "warning"]
    loc: Loc
    message: str


@dataclass(frozen=True)
class Who:
    """Who the checks are made for: the user (uid) and the environment the daemon would have."""

    uid: int
    environ: Mapping[str, str]

    @property
    def name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"


def _error(loc: Loc, message: str) -> Finding:
    return Finding("error", loc, message)


def _warning(loc: Loc, message: str) -> Finding:
    return Finding("warning", loc, message)


def _access(path: Path, mode: int) -> bool:
    return os.access(path, mode)


def _state_dir(path: Path, who: Who) -> Iterator[Finding]:
    loc = ("state_dir",)
    if path.exists():
        if not path.is_dir():
            yield _error(loc, f"{path} is not a folder")
        elif not _access(path, os.W_OK | os.X_OK):
            yield _error(loc, f"{path} is not writable by {who.name}: chown {who.name} {path}")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not _access(parent, os.W_OK | os.X_OK):
        yield _error(loc, f"{path} does not exist and {who.name} cannot create it ({parent} is not writable)")


def _folder(path: Path, loc: Loc, what: str, who: Who) -> Iterator[Finding]:
    if not path.exists():
        yield _error(loc, f"{what} {path} does not exist: create it (mkdir -p {path}), writable by {who.name}")
    elif not path.is_dir():
        yield _error(loc, f"{what} {path} is not a folder")
    elif not _access(path, os.R_OK | os.W_OK | os.X_OK):
        yield _error(
            loc,
            f"{what} {path} must be readable and writable by {who.name} (taken files are removed from it): "
            f"chown or chmod it",
        )


def _file(path: Path, loc: Loc, what: str) -> Iterator[Finding]:
    """A file that must exist, be a regular file and readable."""
    if not path.exists():
        yield _error(loc, f"{what} {path} does not exist")
    elif not path.is_file():
        yield _error(loc, f"{what} {path} is not a regular file")
    elif not _access(path, os.R_OK):
        yield _error(loc, f"{what} {path} is not readable by this user")


def _private_file(path: Path, loc: Loc, what: str, who: Who) -> Iterator[Finding]:
    """A file holding a secret: it exists, is a regular file, belongs to the user, and only they may read it."""
    found = list(_file(path, loc, what))
    if found:
        yield from found
        return
    info = path.stat()
    if who.uid not in (info.st_uid, 0):  # root checks for someone else
        owner = _user_name(info.st_uid)
        yield _error(loc, f"{what} {path} belongs to {owner}, not to {who.name}: chown {who.name} {path}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        yield _error(loc, f"{what} {path} is readable by others (mode {mode:04o}): chmod 600 {path}")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _from_systemd(path: Path, who: Who) -> bool:
    """Whether `path` is one of the credentials systemd hands the service (LoadCredential=)."""
    directory = who.environ.get("CREDENTIALS_DIRECTORY")
    return path.is_relative_to(directory or SYSTEMD_CREDENTIALS)


def _credentials(name: str, server: XnatServer, who: Who) -> Iterator[Finding]:
    loc: Loc = ("xnat", "servers", name, "credentials")
    credentials: Credentials = server.credentials
    if credentials.env_username is not None and credentials.env_password is not None:
        for key in ("env_username", "env_password"):
            variable = getattr(credentials, key)
            if not who.environ.get(variable):
                yield _error(
                    (*loc, key),
                    f"environment variable {variable} is not set (or empty): set it where the daemon runs "
                    "(EnvironmentFile= of its systemd unit, or the container's environment), and here to check it",
                )
        return
    key, path, what = (
        ("netrc", credentials.netrc, ".netrc file")
        if credentials.netrc is not None
        else ("file", credentials.file, "credentials file")
    )
    assert path is not None  # noqa: S101 - the model holds exactly one source
    if _from_systemd(path, who):
        if not path.exists():
            yield _warning(
                (*loc, key),
                f"{what} {path} is handed over by systemd (LoadCredential=) when the service starts: "
                "`ingestd run` checks it then",
            )
            return
        found = list(_file(path, (*loc, key), what))  # systemd makes it readable by the service's user alone
    else:
        found = list(_private_file(path, (*loc, key), what, who))
    yield from found
    if not found:
        try:
            load_credentials(credentials, server.url)  # what the daemon reads at each login; never printed
        except (XnatLoginError, OSError, UnicodeDecodeError) as exc:
            text = str(exc) if isinstance(exc, XnatLoginError) else f"cannot read {path}: {type(exc).__name__}"
            yield _error((*loc, key), text)


def check_paths(config: Config, who: Who) -> list[Finding]:
    """Every problem with the files, folders and credential sources `config` names (rules paths resolved)."""
    found: list[Finding] = list(_state_dir(config.state_dir, who))
    for index, folder in enumerate(config.drop_folders):
        found += _folder(folder.path, ("drop_folders", index, "path"), "drop folder", who)
        if folder.after == "move" and folder.done_folder is not None:
            found += _folder(folder.done_folder, ("drop_folders", index, "done_folder"), "done folder", who)
    for index, rules in enumerate(config.rules):
        found += _file(rules, ("rules", index), "rules file")
    tls = config.listener.tls
    if config.listener.enabled and tls is not None:
        found += _file(tls.certificate, ("listener", "tls", "certificate"), "TLS certificate")
        key = list(_file(tls.key, ("listener", "tls", "key"), "TLS key"))
        found += key
        if not key and stat.S_IMODE(tls.key.stat().st_mode) & 0o077:
            found.append(_warning(("listener", "tls", "key"), f"TLS key {tls.key} is readable by others: chmod 600"))
        if tls.ca_certificates is not None:
            found += _file(tls.ca_certificates, ("listener", "tls", "ca_certificates"), "CA certificates file")
    ui = config.ui
    if config.metrics.enabled and ui.enabled and ui.token_file is not None:  # the web page's login token
        found += _private_file(ui.token_file, ("ui", "token_file"), "ui token file", who)
    if config.metrics.enabled and ui.enabled and ui.password_file is not None:  # the web page's users
        found += _private_file(ui.password_file, ("ui", "password_file"), "ui password file", who)
    for name, server in config.xnat.servers.items():
        found += _credentials(name, server, who)
        if server.ca_bundle is not None:
            found += _file(server.ca_bundle, ("xnat", "servers", name, "ca_bundle"), "CA bundle")
    return found
