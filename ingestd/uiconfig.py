"""The `ui:` section of ingestd.yaml: the web page under `/ui/` of the metrics endpoint (`ingestd.ui`).

Every page needs a login: with the token held in `token_file`, or a user's password from `password_file` (both
0600, like a credentials file; one or the other), or with `http_basic: true` the browser's HTTP Basic login against
`password_file` at every request (for a reverse proxy with TLS in front). `public_read: true` opens the read-only
pages without a login, which is allowed only while the endpoint listens on loopback (a page readable without a
login must never be served to the network) and not with `http_basic` (which asks every request for a password).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = ["Ui", "checked_public_read", "is_loopback", "public_read_problem"]


class Ui(BaseModel):
    """The web page: on by default (with the metrics endpoint), locked until a token or password file is configured."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = True
    public_read: bool = False  # the read-only pages without a login; only with metrics.host on loopback
    token_file: Path | None = None  # a 0600 file holding the login token (at least 16 characters)
    password_file: Path | None = None  # a 0600 file of `user:scrypt$...` lines (`ingestd ui-password`)
    http_basic: bool = False  # every request logs in with HTTP Basic against password_file (behind a TLS proxy)
    session_hours: Annotated[float, Field(gt=0, le=7 * 24)] = 12.0  # a login lasts this long

    # Checked at the key that contradicts an earlier one, so that the error names its file and line.
    @field_validator("password_file")
    @classmethod
    def _one_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("token_file") is not None:
            raise ValueError("ui.token_file is set too: the login takes a token or passwords, not both; remove one")
        return value

    @field_validator("http_basic")
    @classmethod
    def _basic_needs_passwords(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("password_file") is None:
            raise ValueError("true checks the passwords of ui.password_file: set it (and not ui.token_file)")
        if value and info.data.get("public_read"):
            raise ValueError(
                "true asks every request for a password, ui.public_read: true opens pages without one: remove one"
            )
        return value


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) reaches this machine only."""
    if host.strip().lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def public_read_problem(ui: Ui, metrics_host: str) -> str | None:
    """Why `ui.public_read` cannot be allowed with this metrics host, or None."""
    if ui.enabled and ui.public_read and not is_loopback(metrics_host):
        return (
            f"true serves the pages without a login, which is allowed only on loopback, and "
            f"metrics.host is {metrics_host}: set metrics.host to 127.0.0.1 (and put a reverse proxy with its own "
            "login in front), or remove ui.public_read and give ui.token_file"
        )
    return None


def checked_public_read(ui: Ui, metrics_host: str) -> Ui:
    """`ui`, or a ValidationError at `public_read` (so that the configuration's error names the file and the line of
    `ui.public_read`, as every other key's does) when `public_read_problem` says it cannot be allowed."""
    problem = public_read_problem(ui, metrics_host)
    if problem is None:
        return ui
    error = PydanticCustomError("value_error", "{problem}", {"problem": problem})
    raise ValidationError.from_exception_data("Ui", [InitErrorDetails(type=error, loc=("public_read",), input=True)])
