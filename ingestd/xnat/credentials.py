"""The credentials the XNAT client logs in with: read from a .netrc, a credentials file or the environment.

They are read again at every login (a rotated password or a renewed alias token is taken up without a restart),
kept out of every message and `repr` (`_Secret`), and refused if the file is readable by others. A credentials
file is replaced atomically (`save_credentials_file`). Unreadable credentials are an `XnatLoginError`: like a
refused login, they hold up every delivery to the server until fixed.
"""

from __future__ import annotations

import netrc
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ingestd.config import Credentials
from ingestd.xnat.errors import XnatLoginError

_ALIAS = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)


def is_alias_token(username: str) -> bool:
    """Whether a login name is an XNAT alias token (a UUID: xdat AliasToken.isAliasFormat)."""
    return bool(_ALIAS.match(username))


@dataclass(frozen=True)
class _Secret:
    username: str
    password: str = field(repr=False)


def _check_private(path: Path, what: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise XnatLoginError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise XnatLoginError(f"the {what} {path} is readable by others: chmod 600 {path}")


def load_credentials(credentials: Credentials, url: str) -> _Secret:
    """Read the credentials for `url` from where the configuration says; raise XnatLoginError (never the secret):
    like a refused login, credentials ingestd cannot read hold up every delivery to the server until fixed."""
    if credentials.netrc is not None:
        _check_private(credentials.netrc, ".netrc file")
        host = urlsplit(url).hostname or ""
        try:
            entry = netrc.netrc(str(credentials.netrc)).authenticators(host)
        except (netrc.NetrcParseError, OSError, UnicodeDecodeError) as exc:
            raise XnatLoginError(f"cannot parse {credentials.netrc}: {type(exc).__name__}") from None
        if entry is None or not entry[0] or entry[2] is None:
            raise XnatLoginError(f"{credentials.netrc} has no login and password for machine {host}")
        return _Secret(entry[0], entry[2])
    if credentials.file is not None:
        _check_private(credentials.file, "credentials file")
        try:
            text = credentials.file.read_text(encoding="utf-8").strip()
        except OSError as exc:  # not readable by this user, a folder...: the server pauses, no batch is held
            raise XnatLoginError(f"cannot read the credentials file {credentials.file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise XnatLoginError(
                f"{credentials.file} is not text (UTF-8): it must hold one line username:password"
            ) from None
        username, sep, password = text.partition(":")
        if not sep or not username or not password or "\n" in text:
            raise XnatLoginError(f"{credentials.file} must hold one line username:password (or alias:secret)")
        return _Secret(username, password)
    assert credentials.env_username is not None and credentials.env_password is not None  # noqa: S101 - validated
    username = os.environ.get(credentials.env_username, "")
    password = os.environ.get(credentials.env_password, "")
    if not username or not password:
        raise XnatLoginError(
            f"environment variables {credentials.env_username} and {credentials.env_password} must be set"
        )
    return _Secret(username, password)


def save_credentials_file(path: Path, username: str, password: str) -> None:
    """Replace a credentials file (`username:password`, mode 0600) atomically: written beside it, synced, renamed
    over it, so that a crash leaves the old or the new credentials, never half of either."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.new")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(f"{username}:{password}\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
