"""What the study page shows beside `ingestd status`'s row: the batch's recent log events and links to XNAT.

The events come from the daemon's bounded buffer (`ingestd.eventbuffer`, filled after the log's redaction: the
page shows what the log line says); a page served without one (not by a daemon) says so. The links open the
delivered session in the XNAT server's web pages: the server's url and the archive URI as `ingestd status` shows it
(`?format=html`: XNAT's page of the experiment), and XNAT's prearchive page. A URI is linked only when none of the
route's labels is shown as a digest: a link carries no label the page hides.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ingestd.config import Config
from ingestd.eventbuffer import EventBuffer

__all__ = ["study_extras"]

_PATH = re.compile(r"/[A-Za-z0-9/._~%+-]*")
_PREARCHIVE_PAGE = "/app/template/XDATScreen_prearchives.vm"


def _server_url(config: Config, name: str) -> str | None:
    server = config.xnat.servers.get(name)
    if server is None:
        return None
    parts = urlsplit(str(server.url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    netloc = parts.netloc.rpartition("@")[2]  # never a user name or password the url might carry
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _links(config: Config, study: dict[str, Any]) -> dict[str, str]:
    route, delivery = study.get("route"), study.get("delivery")
    if not route or not delivery or study.get("hidden_labels"):
        return {}
    base = _server_url(config, str(route.get("server")))
    if base is None:
        return {}
    links: dict[str, str] = {}
    archive = str(delivery.get("archive_uri") or "")
    if _PATH.fullmatch(archive) and "sha256:" not in archive:
        links["archive"] = f"{base}{archive}?format=html"
    if delivery.get("prearchive_url"):
        links["prearchive"] = f"{base}{_PREARCHIVE_PAGE}"
    return links


def study_extras(config: Config, study: dict[str, Any], events: EventBuffer | None) -> dict[str, Any]:
    """The study page's events (newest first; None: no buffer here) and its XNAT links."""
    return {
        "events": None if events is None else events.events(int(study["batch_id"])),
        "links": _links(config, study),
    }
