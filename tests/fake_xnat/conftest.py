"""What the XNAT stand-in's own tests share: servers with known users and projects, and a logged-in client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from ingestd.testing.xnat import FakeXnat

Factory = Callable[..., FakeXnat]


@pytest.fixture
def make_xnat() -> Iterator[Factory]:
    """Start stand-ins whose idle builder never fires on its own, with users admin (site admin), alice (owns PROJ),
    bob (owns OTHER) and carol (reads PROJ); all are stopped at the end of the test."""
    started: list[FakeXnat] = []

    def make(**kwargs: Any) -> FakeXnat:
        xnat = FakeXnat(**kwargs).start()
        started.append(xnat)
        xnat.add_user("admin", "admin-pw", admin=True)
        xnat.add_user("alice", "alice-pw")
        xnat.add_user("bob", "bob-pw")
        xnat.add_user("carol", "carol-pw")
        xnat.add_project("PROJ", owners=["alice"], collaborators=["carol"], aliases=["PROJ_ALIAS"])
        xnat.add_project("OTHER", owners=["bob"])
        return xnat

    yield make
    for xnat in started:
        xnat.stop()


@pytest.fixture
def xnat(make_xnat: Factory) -> FakeXnat:
    """XNAT 1.8.10 whose idle builder never fires on its own."""
    return make_xnat()


@pytest.fixture
def alice() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.auth = ("alice", "alice-pw")
        yield session
