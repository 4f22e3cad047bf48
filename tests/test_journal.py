"""The journal's schema: every older version migrates to exactly the tables a new journal has."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from ingestd.journal import SCHEMA_VERSION, Journal, JournalVersionError
from ingestd.journal.schema import MIGRATIONS

DATA = Path(__file__).parent / "data"


def _tables(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Each table's columns (name, type, not null, default, primary key) and each index's columns."""
    with closing(sqlite3.connect(path)) as db:
        names = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        tables = {name: [tuple(col[1:]) for col in db.execute(f"PRAGMA table_info({name})")] for name in names}
        indexes = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name")]
        for index in indexes:
            tables[f"index {index}"] = [tuple(col[1:]) for col in db.execute(f"PRAGMA index_info('{index}')")]
    return tables


@pytest.mark.parametrize("version", [2, 3])
def test_an_older_journal_migrates_to_the_tables_of_a_new_one(tmp_path: Path, version: int) -> None:
    """Columns compared by name and type only: a column added by ALTER TABLE sits last, wherever the DDL has it."""
    fresh = tmp_path / "fresh.sqlite"
    Journal(fresh).close()
    old = tmp_path / "old.sqlite"
    with closing(sqlite3.connect(old)) as db:
        db.executescript((DATA / f"journal-schema-v{version}.sql").read_text())
        db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
        db.commit()
    journal = Journal(old)
    assert journal.schema_version() == SCHEMA_VERSION
    journal.close()
    assert {name: sorted(map(str, cols)) for name, cols in _tables(old).items()} == {
        name: sorted(map(str, cols)) for name, cols in _tables(fresh).items()
    }


def test_the_migrations_reach_the_current_version_and_none_goes_beyond() -> None:
    assert max(MIGRATIONS) == SCHEMA_VERSION
    assert all(2 <= version <= SCHEMA_VERSION for version in MIGRATIONS)


def test_a_journal_of_a_newer_ingestd_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    Journal(path).close()
    with closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
        db.commit()
    with pytest.raises(JournalVersionError, match="newer ingestd"):
        Journal(path)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION + 1),
        )


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    from ingestd.journal import Source  # noqa: PLC0415

    journal = Journal(tmp_path / "journal.sqlite")
    with pytest.raises(RuntimeError), journal.transaction() as tx:
        tx.receiving_batch("1.2.3", Source("dicom", "S"), 0.0)
        raise RuntimeError("interrupted")
    assert journal.batches() == []
    journal.close()
