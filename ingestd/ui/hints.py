"""What a held study asks of a person, by hold code, for the study page: the "what to do" column of docs/xnat.md
§5 and of the hold reasons in docs/rules.md, in a line each; attachment sets' codes come from
`ingestd.admin.statusview.HOLD_HINTS`, which `ingestd status` prints."""

from __future__ import annotations

from ingestd.admin.statusview import HOLD_HINTS

__all__ = ["hold_hint"]

_RULES = (
    "fix the rules (`ingestd explain` shows what a study gets), then Retry: it is routed with the rules as they are"
    " then"
)
_STEP = "read the last error and the log; fix the cause (disk, permissions), then Retry; report bugs"

STUDY_HINTS = {
    "unrouted": f"no rule matches: {_RULES}; or Release it to deal with it by hand",
    "all-series-dropped": f"the rule drops every series: {_RULES}",
    "label": f"a label cannot be made from the study's headers: {_RULES}",
    "empty": "the study has no series: Release it",
    "label-taken": "change the rule's session template so each study gets its own label, then Retry; or rename or"
    " remove the other experiment in XNAT and `ingestd retry --keep-route`",
    "xnat-conflict": "in XNAT (Upload > Prearchive) read the session's log and fix the cause, then Retry",
    "incomplete": "check XNAT's anonymisation scripts and import filters and the prearchive log, then Retry",
    "not-ready": "in XNAT's Prearchive page rebuild or reset the stuck session; check XNAT's disk, then Retry",
    "xnat-refused": "act on XNAT's message (create the project, fix the rule's project, add the account as"
    " member), then Retry",
    "xnat-unreachable": "bring XNAT or the network back, check the proxy timeouts, then Retry",
    "xnat-misfiled": "in XNAT move or delete that prearchive session, check the project membership, then Retry",
    "xnat-split": "check XNAT's routing rules and scripts, merge or delete the extra sessions, then Retry",
    "xnat-redirect": "the server's url is likely wrong (http/https, /xnat): fix it, reload, then Retry",
    "no-server": "add the server to xnat.servers or fix the rule, reload, then Retry",
    "nothing-to-send": "should not happen: report it with `ingestd status --json`, and Release it",
    "package-failed": _STEP,
    "deliver-failed": _STEP,
    "assemble-failed": _STEP,
    "route-failed": _STEP,
}


def hold_hint(code: str | None) -> str:
    """What to do about a hold with `code` (empty when there is nothing specific to say: see docs/xnat.md §5)."""
    if code is None:
        return ""
    text = STUDY_HINTS.get(code) or HOLD_HINTS.get(code, "").removeprefix("what to do: ")
    return text or "see docs/xnat.md §5 and docs/rules.md (hold reasons); once the cause is fixed, Retry"
