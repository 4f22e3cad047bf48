"""The `ui:` section of ingestd.yaml: the web page under `/ui/` of the metrics endpoint (`ingestd.ui`).

Every page needs a login with the token held in `token_file` (0600, like a credentials file), unless the operator
sets `public_read: true`, which is allowed only while the endpoint listens on loopback: a page readable without a
login must never be served to the network.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = ["Ui", "checked_public_read", "is_loopback", "public_read_problem"]


class Ui(BaseModel):
    """The web page: on by default (with the metrics endpoint), locked until a token file is configured."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = True
    public_read: bool = False  # the read-only pages without a login; only with metrics.host on loopback
    token_file: Path | None = None  # a 0600 file holding the login token (at least 16 characters)
    session_hours: Annotated[float, Field(gt=0, le=7 * 24)] = 12.0  # a login lasts this long


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
