"""Shared fixtures: a real journal, spool and listener under tmp_path, on 127.0.0.1 and a free port."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings
from pynetdicom.transport import AssociationSocket

from ingestd.config import Config, parse_config
from ingestd.journal import Journal
from ingestd.receive.listener import DicomListener
from ingestd.spool import Quarantine, Spool
from ingestd.testing.xnat import FakeXnat

if TYPE_CHECKING:
    from playwright.sync_api import Browser

    from tests.browser import Pages

settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _shutdown_and_close(self: AssociationSocket) -> None:
    sock = self.socket
    if sock is None:
        return
    with suppress(OSError):  # never connected, refused or reset: nothing to shut down
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture(autouse=True, scope="session")
def _pynetdicom_closes_its_sockets() -> Iterator[None]:
    """pynetdicom 3.0 closes a socket only when shutdown() succeeds: the tests' SCUs (AE.associate) would leave
    a socket whose connection was refused or reset to the garbage collector, and a ResourceWarning in some later
    test. The daemon's own acceptor sockets do this themselves (`_ReplaySocket` in ingestd.receive)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AssociationSocket, "_shutdown_socket", _shutdown_and_close)
        yield


@dataclass
class Receiver:
    config: Config
    journal: Journal
    spool: Spool
    quarantine: Quarantine
    listener: DicomListener

    @property
    def port(self) -> int:
        return self.listener.port


def make_config(tmp_path: Path, extra: str = "") -> Config:
    return parse_config(
        f"state_dir: {tmp_path / 'state'}\n"
        "listener: {host: 127.0.0.1, port: 0, ae_title: INGESTD}\n"
        "spool: {min_free_mb: 0}\n" + extra
    )


def start_receiver(config: Config) -> Receiver:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(config.journal_path)
    spool = Spool(config.spool_dir, journal, min_free_bytes=config.spool.min_free_mb * 2**20)
    quarantine = Quarantine(config.quarantine_dir, journal)
    listener = DicomListener(config.listener, spool)
    listener.start()
    return Receiver(config, journal, spool, quarantine, listener)


@contextmanager
def running_receiver(config: Config) -> Iterator[Receiver]:
    """A started receiver for `config`, stopped (and its journal closed) at the end."""
    running = start_receiver(config)
    try:
        yield running
    finally:
        running.listener.stop(grace_seconds=2)
        running.journal.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A listener on a free port writing into a spool and journal under tmp_path."""
    with running_receiver(make_config(tmp_path)) as running:
        yield running


@pytest.fixture(scope="session")
def dcmtk() -> None:
    """Skip locally when DCMTK is missing; .ci/run installs it, so CI never skips."""
    if shutil.which("storescu") is None:
        if os.environ.get("CI"):
            pytest.fail("DCMTK is not installed: .ci/run must apt-get install dcmtk")
        pytest.skip("DCMTK is not installed (apt-get install dcmtk)")


@pytest.fixture
def xnat(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeXnat]:
    """An XNAT 1.8.10 stand-in on 127.0.0.1 with user `ingestd` (credentials in the environment) in project PROJ.

    The environment also holds INGESTD_TEST_KEY, the key of the test rules' anonymization profiles.
    """
    monkeypatch.setenv("INGESTD_TEST_KEY", "t" * 40)
    monkeypatch.setenv("XNAT_TEST_USER", "ingestd")
    monkeypatch.setenv("XNAT_TEST_PASSWORD", "pw-for-tests")
    with FakeXnat(version="1.8.10") as server:
        server.add_user("ingestd", "pw-for-tests")
        server.add_project("PROJ", members=["ingestd"])
        yield server


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET: (the socket, its path)."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(0.2)
        yield sock, path


@pytest.fixture(scope="session")
def chromium() -> Iterator[Browser]:
    """Debian's headless Chromium, once per session (tests/browser.py). Skipped locally when /usr/bin/chromium is
    missing; .ci/run installs it, so CI fails instead."""
    from tests import browser  # noqa: PLC0415 - Playwright only for the browser tests

    missing = browser.chromium_missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}: .ci/run must apt-get install chromium")
        pytest.skip(missing)
    with browser.launch() as launched:
        yield launched


@pytest.fixture
def browser_pages(chromium: Browser, request: pytest.FixtureRequest) -> Iterator[Pages]:
    """A fresh browser context and page for one test; its screenshots go to build/screenshots/<test>/."""
    from tests.browser import Pages  # noqa: PLC0415 - Playwright only for the browser tests

    pages = Pages.open(chromium, request.node.name)
    _screenshot_folders.append(pages.folder)
    try:
        yield pages
    finally:
        with suppress(Exception):  # what the page showed at the end, failed or not (best effort)
            pages.shot("last")
        pages.close()


_screenshot_folders: list[Path] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say where the browser tests' screenshots are, for a person to look at."""
    for folder in _screenshot_folders:
        shots = sorted(folder.glob("*.png"))
        if shots:
            terminalreporter.write_line(f"screenshots: {len(shots)} in {folder}")
