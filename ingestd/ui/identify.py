"""The study page's "Show identifiers": what `ingestd status --show-uids --show-paths` shows of one batch.

For a logged-in user only (never a `public_read` visitor), by a form posted with a CSRF token as the actions are
(`ingestd.ui.app`), answered by the same study page showing the original Study Instance UID, the labels as XNAT has
them (those shown as digests otherwise), the source's path where status has one (an `import` folder, an attachment
set's upload) and the reason and XNAT URIs with their labels. Each time is logged as `ui.identifiers_shown` (who,
which batch; never the values). Nothing is kept: the page's next GET shows digests again, and every answer of the
page is `Cache-Control: no-store`.
"""

from __future__ import annotations

from typing import Any

from ingestd.config import Config
from ingestd.journal import Journal
from ingestd.ui import views

__all__ = ["IDENTIFIERS", "identified_study"]

IDENTIFIERS = "identifiers"  # the last part of the toggle's URL: /ui/studies/<batch id>/identifiers


def _original_study_uid(config: Config, batch_id: int) -> str | None:
    """The batch's Study Instance UID as received (status shows a de-identified study's outgoing UID instead)."""
    journal = Journal(config.journal_path, read_only=True)
    try:
        return next((batch.study_uid for batch in journal.batches() if batch.id == batch_id), None)
    finally:
        journal.close()


def identified_study(config: Config, batch_id: int, *, running: bool) -> dict[str, Any] | None:
    """The study page's data of `batch_id` with its identifiers (None for an unknown batch)."""
    from ingestd.status import status_data  # noqa: PLC0415 - the read model, per request, as the page reads it

    study = views.study(status_data(config, running=running, show_uids=True, show_paths=True), batch_id)
    if study is None or not config.journal_path.exists():
        return None
    source = str(study["source_name"])
    paths = [source.removeprefix("import:")] if source.startswith("import:") else []
    if study.get("upload"):
        paths.append(str(study["upload"]))
    return dict(study, original_study_uid=_original_study_uid(config, batch_id), source_paths=paths)
