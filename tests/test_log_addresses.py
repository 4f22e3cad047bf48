"""Addresses in log lines are shown as they are: `host=0.0.0.0` looked like a UID to the redaction and became a
digest, so the admin could not see where the daemon listens. UIDs stay digests, person names stay blanked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ingestd.logs import REDACTED, redact, uid_digest


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("host", "0.0.0.0"),
        ("host", "::"),
        ("host", "127.0.0.1"),
        ("host", "pacs.lab.example.org"),
        ("peer", "2.1.0.7"),  # an IPv4 address that is also a valid UID
        ("address", "fe80::1%eth0"),
    ],
)
def test_addresses_are_logged_as_they_are(key: str, value: str) -> None:
    event = {"event": "receive.listener_started", key: value, "port": 104}
    assert redact(None, "info", dict(event)) == event


def test_an_address_and_port_in_a_message_is_kept_and_uids_are_still_digests() -> None:
    event = {
        "event": "daemon.failed",
        "error": "cannot listen on 0.0.0.0:104 (Address already in use); study 1.2.3.4.5 of DOE^JOHN",
    }
    out = redact(None, "error", event)
    assert out["error"] == (
        f"cannot listen on 0.0.0.0:104 (Address already in use); study {uid_digest('1.2.3.4.5')} of {REDACTED}"
    )


@pytest.mark.parametrize("value", ["1.2.840.113619.2.55.3.604688119", "1.2.3.4.5.6", "DOE^JOHN"])
def test_a_host_key_does_not_let_a_uid_or_name_through(value: str) -> None:
    out = redact(None, "info", {"event": "x", "host": value})
    assert out["host"] != value


def test_the_json_log_line_shows_the_listener_host() -> None:
    """Through the pipeline the daemon configures: one JSON line on stderr."""
    code = (
        "import structlog\n"
        "from ingestd.logs import configure_logging\n"
        "configure_logging('info', 'json')\n"
        "structlog.get_logger('ingestd.listener').info('receive.listener_started', ae_title='INGESTD',"
        " host='0.0.0.0', port=104, tls=False, data_phase='ingestd')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    (line,) = [json.loads(text) for text in result.stderr.splitlines() if text.startswith("{")]
    assert (line["event"], line["host"], line["port"]) == ("receive.listener_started", "0.0.0.0", 104)
