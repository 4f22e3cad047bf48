"""The states of a batch and the steps of its delivery, declared as data: every module takes them from here.

A batch (one delivery of a study: the instances that arrived before it went quiet) moves through `StudyState`;
while it is `routed`, its delivery moves through `Step`. Each table below lists, for every state or step, the ones
it may move to. The journal checks every change against them and raises `UndeclaredTransitionError` for any other: a
change nobody declared is a bug, and fails loudly (in tests first) instead of leaving a batch somewhere no code
expects it. As pynetdicom declares its association state machine, the tables are the reference; the code follows.

    receiving -> complete -> routed -> delivered
        |            |          |
        +------------+----------+--> held --(retry)--> complete | routed
                                       +--(release)--> released --(unrelease)--> held

    package -> preflight -> import -> importing -> wait -> verify -> done
       ^                       ^          |         |        |  |
       |                       |          |         +--------|--+--> archive -> archiving -> verify
       |                       |          +-----> verify     |
       +-----------------------+------------------(resend)---+

An attachment set (a batch of kind `files`: non-DICOM files attached to a session as resources) goes through the
same states; its delivery takes steps of its own, `check` deciding as `verify` does:

    locate -> check -> upload -> uploading -> check -> done
                ^                               |
                +------- what is missing -------+

A held batch carries a `HoldCode`: why it stopped, and so what a person must do (docs/xnat.md and docs/rules.md
say it for each).

`importing` and `archiving` are committed *before* their request goes out: finding one means the request may or
may not have reached XNAT, so the next step looks (`verify`) instead of asking again blindly. `verify` is where
every decision is made, from what XNAT holds: done, send what is missing again, archive, or wait.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

__all__ = [
    "BATCH_TRANSITIONS",
    "FAILED_HOLD",
    "RETRY_STEP",
    "STEP_TRANSITIONS",
    "BatchKind",
    "HoldCode",
    "Stage",
    "Step",
    "StudyState",
    "UndeclaredTransitionError",
    "check_batch_transition",
    "check_step_transition",
]


class StudyState(StrEnum):
    """Where a batch of a study is. The values are stored in the journal: never rename them."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    ROUTED = "routed"  # a rule decided the labels; the outgoing (de-identified) instances are written
    DELIVERED = "delivered"  # XNAT verifiably holds every outgoing instance where the rule says
    RELEASED = "released"  # a person took a held batch over (`ingestd release`); ingestd does nothing more with it
    # (until `ingestd unrelease` puts it back to `held`); a copy of it received later opens a new batch
    HELD = "held"


class Step(StrEnum):
    """Where a routed batch's delivery is. The values are stored in the journal: never rename them."""

    PACKAGE = "package"  # zip the outgoing instances XNAT does not hold yet
    PREFLIGHT = "preflight"  # the project is writable, the session label is not another study's
    IMPORT = "import"  # send the zip to the import service
    IMPORTING = "importing"  # committed before the upload: it may or may not have reached XNAT
    WAIT = "wait"  # XNAT is building (or receiving into) a prearchive session of ours
    VERIFY = "verify"  # compare what XNAT holds, by SOP Instance UID, with what the batch sends; decide
    ARCHIVE = "archive"  # archive the READY prearchive session holding instances of ours
    ARCHIVING = "archiving"  # committed before the archive request: it may or may not have been carried out
    # The steps of an attachment set's delivery (a batch of kind `files`: ingestd.pipeline.attach):
    LOCATE = "locate"  # find the XNAT session (archived experiment, or our READY prearchive session) it goes to
    UPLOAD = "upload"  # zip and send what XNAT does not hold yet, one resource at a time
    UPLOADING = "uploading"  # committed before an upload: it may or may not have reached XNAT
    CHECK = "check"  # list each resource and compare names, sizes and MD5 digests with what the set sends
    DONE = "done"


class HoldCode(StrEnum):
    """Why a batch is held. The values are stored in the journal and shown by `ingestd status`: never rename them.

    Codes are declared here whichever module raises them: the rules (`ingestd.rules.decide`), the
    de-identification (`DeidError.code`), the XNAT client (`XnatError.code`) and the pipeline's own stages.
    """

    # A stage failed `batch_failures.max_attempts` times with an error no code expected.
    ASSEMBLE_FAILED = "assemble-failed"
    ROUTE_FAILED = "route-failed"
    PACKAGE_FAILED = "package-failed"
    DELIVER_FAILED = "deliver-failed"
    # Routing: the rules (ingestd.rules.match).
    EMPTY = "empty"  # the study has no series
    UNROUTED = "unrouted"  # no rule matches (or the named rule does not exist)
    ALL_SERIES_DROPPED = "all-series-dropped"
    LABEL = "label"  # a label template cannot be filled from the study's headers
    # Routing: reading the spool, writing the outbox.
    SPOOL = "spool"
    OUTBOX = "outbox"
    # Routing: the profile's screening and de-identification (ingestd.deid).
    BURNED_IN = "burned-in"
    PIXEL_DATA = "pixel-data"  # Pixel Data to clean that cannot be decoded, or is too large to clean in memory
    STRUCTURED_CONTENT = "structured-content"
    UNREADABLE = "unreadable"
    ENCODE = "encode"
    ENGINE = "engine"
    OVERRIDE = "override"
    LOOKUP = "lookup"
    DATE = "date"
    # Delivery: the configuration, and what XNAT holds or answered.
    NO_SERVER = "no-server"
    NOTHING_TO_SEND = "nothing-to-send"
    LABEL_TAKEN = "label-taken"
    NOT_READY = "not-ready"
    INCOMPLETE = "incomplete"
    XNAT_SPLIT = "xnat-split"
    XNAT_MISFILED = "xnat-misfiled"
    XNAT_CONFLICT = "xnat-conflict"
    XNAT_UNREACHABLE = "xnat-unreachable"
    # Delivery: XnatError.code (ingestd.xnat).
    XNAT_REFUSED = "xnat-refused"
    XNAT_LOGIN_REFUSED = "xnat-login-refused"
    XNAT_REDIRECT = "xnat-redirect"
    # Attachment sets (non-DICOM files attached to a session as resources: ingestd.pipeline.attach).
    NO_SESSION = "no-session"  # the XNAT session its files go to does not exist (yet): looked for again
    STUDY_HELD = "study-held"  # the study it belongs to is held or released: it follows once that study is routed
    ATTACH_AMBIGUOUS = "attach-ambiguous"  # a file lies as close to two studies of its upload: which session?
    ATTACH_CONFLICT = "attach-conflict"  # XNAT holds a file of that name in the resource with other content


class BatchKind(StrEnum):
    """What a batch holds. The values are stored in the journal: never rename them."""

    DICOM = "dicom"  # instances of one study
    FILES = "files"  # an attachment set: non-DICOM files of one upload, attached to a session as resources


class Stage(StrEnum):
    """A stage of the pipeline that works on batches: the `stage` of its failure log events and metrics."""

    ASSEMBLE = "assemble"
    ROUTE = "route"
    PACKAGE = "package"  # the delivery's `package` step, counted apart: a full disk is not XNAT's fault
    DELIVER = "deliver"


# The hold code of a stage's repeated unexpected failure.
FAILED_HOLD: Mapping[Stage, HoldCode] = {
    Stage.ASSEMBLE: HoldCode.ASSEMBLE_FAILED,
    Stage.ROUTE: HoldCode.ROUTE_FAILED,
    Stage.PACKAGE: HoldCode.PACKAGE_FAILED,
    Stage.DELIVER: HoldCode.DELIVER_FAILED,
}


BATCH_TRANSITIONS: Mapping[StudyState, frozenset[StudyState]] = {
    StudyState.RECEIVING: frozenset({StudyState.COMPLETE, StudyState.HELD}),
    StudyState.COMPLETE: frozenset({StudyState.ROUTED, StudyState.HELD}),
    StudyState.ROUTED: frozenset({StudyState.DELIVERED, StudyState.HELD}),
    StudyState.HELD: frozenset({StudyState.COMPLETE, StudyState.ROUTED, StudyState.RELEASED}),  # retry, release
    StudyState.DELIVERED: frozenset(),
    StudyState.RELEASED: frozenset({StudyState.HELD}),  # unrelease: held again, with the reason it had
}

STEP_TRANSITIONS: Mapping[Step, frozenset[Step]] = {
    Step.PACKAGE: frozenset({Step.PREFLIGHT, Step.IMPORT}),  # a resend skips the pre-flight it passed before
    Step.PREFLIGHT: frozenset({Step.IMPORT}),
    Step.IMPORT: frozenset({Step.IMPORTING}),
    Step.IMPORTING: frozenset({Step.WAIT, Step.VERIFY}),  # answered | interrupted: look before sending again
    Step.WAIT: frozenset({Step.VERIFY, Step.ARCHIVE}),  # archive at once: XNAT answered the import, the rule archives
    Step.VERIFY: frozenset({Step.DONE, Step.PACKAGE, Step.ARCHIVE, Step.WAIT}),
    Step.ARCHIVE: frozenset({Step.ARCHIVING}),
    Step.ARCHIVING: frozenset({Step.VERIFY}),
    # An attachment set's delivery: locate -> upload -> uploading -> check -> done (check decides, as verify does).
    Step.LOCATE: frozenset({Step.UPLOAD, Step.CHECK}),
    Step.UPLOAD: frozenset({Step.UPLOADING, Step.CHECK, Step.LOCATE}),
    Step.UPLOADING: frozenset({Step.CHECK}),
    Step.CHECK: frozenset({Step.DONE, Step.UPLOAD, Step.LOCATE}),
    Step.DONE: frozenset(),
}

# Where `ingestd retry` puts a held delivery: the step that can make progress from what XNAT holds now. Before
# anything was sent the step itself runs again; after, `verify` looks at XNAT and decides.
RETRY_STEP: Mapping[Step, Step] = {
    Step.PACKAGE: Step.PACKAGE,
    Step.PREFLIGHT: Step.PREFLIGHT,
    **{step: Step.VERIFY for step in (Step.IMPORT, Step.IMPORTING, Step.WAIT, Step.VERIFY)},
    **{step: Step.VERIFY for step in (Step.ARCHIVE, Step.ARCHIVING, Step.DONE)},
    # an attachment set looks for its session again, then at what XNAT holds
    Step.LOCATE: Step.LOCATE,
    **{step: Step.LOCATE for step in (Step.UPLOAD, Step.UPLOADING, Step.CHECK)},
}


class UndeclaredTransitionError(AssertionError):
    """A change of state or step that the tables above do not declare: a bug in ingestd, never an input error."""


def check_batch_transition(batch_id: int, old: str, new: str) -> None:
    if StudyState(new) not in BATCH_TRANSITIONS[StudyState(old)]:
        raise UndeclaredTransitionError(f"batch {batch_id}: {old} -> {new} is not a declared transition")


def check_step_transition(batch_id: int, old: str, new: str) -> None:
    if old != new and Step(new) not in STEP_TRANSITIONS[Step(old)]:
        raise UndeclaredTransitionError(f"batch {batch_id}: delivery step {old} -> {new} is not a declared transition")
