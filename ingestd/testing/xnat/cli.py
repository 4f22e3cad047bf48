"""Command line: `python -m ingestd.testing.xnat` runs the stand-in in the foreground."""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Sequence

from ingestd.testing.xnat.server import FakeXnat
from ingestd.wakeup import Wakeup

LOG = logging.getLogger("ingestd.testing.xnat")

# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _credentials(value: str) -> tuple[str, str]:
    username, sep, password = value.partition(":")
    if not sep or not username:
        raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD, got {value!r}")
    return username, password


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingestd.testing.xnat", description="Run a fake XNAT 1.8 server in the foreground."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--version", default="1.8.10", help="XNAT version to emulate (1.8.9 vs 1.8.10 behaviour)")
    parser.add_argument(
        "--user", action="append", type=_credentials, default=[], metavar="NAME:PASSWORD", help="a site admin"
    )
    parser.add_argument(
        "--member", action="append", type=_credentials, default=[], metavar="NAME:PASSWORD",
        help="a non-admin user who owns every --project",
    )  # fmt: skip
    parser.add_argument("--project", action="append", default=[], metavar="ID")
    parser.add_argument("--prearchive-code", type=int, default=0, choices=(0, 4, 5), help="for every --project")
    parser.add_argument("--idle-build-seconds", type=float, default=300.0)
    parser.add_argument("--rebuild-repeat-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    xnat = FakeXnat(
        version=args.version,
        host=args.host,
        port=args.port,
        idle_build_seconds=args.idle_build_seconds,
        rebuild_repeat_seconds=args.rebuild_repeat_seconds,
    )
    for username, password in args.user:
        xnat.add_user(username, password, admin=True)
    for username, password in args.member:
        xnat.add_user(username, password)
    for project_id in args.project:
        xnat.add_project(project_id, owners=[u for u, _ in args.member], prearchive_code=args.prearchive_code)
    stop = Wakeup()  # not a threading.Event: its set() in a signal handler can deadlock (ingestd/wakeup.py)
    signal.signal(signal.SIGTERM, lambda *_: stop.notify())
    with xnat:
        LOG.info("fake XNAT %s listening on %s (Ctrl-C stops)", args.version, xnat.url)
        try:
            stop.wait()
        except KeyboardInterrupt:
            LOG.info("stopping")
    return 0
