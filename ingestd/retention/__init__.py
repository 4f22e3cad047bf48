"""Retention: what ingestd is done with leaves the state directory after the days `retention:` sets.

`plan` decides from the journal's rows and a time (pure), `store` reads and writes the journal, `files` measures and
removes, `run` makes one pass (`purge`) or shows one (`preview`, `retention_summary`). The daemon runs it
periodically (`ingestd.pipeline.retention`); `ingestd purge` runs it by hand.
"""

from ingestd.retention.plan import KINDS
from ingestd.retention.run import Failure, Outcome, preview, purge, retention_summary
from ingestd.retention.store import purged_quarantine

__all__ = ["KINDS", "Failure", "Outcome", "preview", "purge", "purged_quarantine", "retention_summary"]
