"""What the router does with a study, decided once: the rules' route and labels, then the profile's screening.

`verdict` is pure. It is what the daemon's Router decides before it writes anything, and what `ingestd explain`,
`ingestd anonymize` and `ingestd import --dry-run` report, so that they predict the daemon exactly:

1. the rules (`decide`): no series (`empty`), no rule matches (`unrouted`), every series dropped
   (`all-series-dropped`), a label the route cannot make (`label`);
2. the profile's screening of every kept instance, in the order the study holds them (`ingestd.deid.engine.screen`):
   Burned In Annotation, SOP classes with text in the pixels (`burned-in`), structured content (`structured-content`).

`label_clashes` then looks at the studies of one run together: a study routed to a session label that an earlier
study of the run takes in XNAT first (it archives there) is held by the deliverer's pre-flight (`label-taken`).

The screening reads three attributes of each instance (`Screened`): its SOP Class UID and Modality, as the journal
holds them for every instance, and Burned In Annotation, as the header of its series says; and, for a profile's
pixel regions, the device and image size its series' header says (each instance is checked again when cleaned).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from ingestd.deid.engine import DeidError, screen
from ingestd.deid.pixels import REGION_KEYWORDS
from ingestd.rules.match import Held, Routed, RuleSet, StudyFacts, decide
from ingestd.states import HoldCode

__all__ = ["Screened", "label_clashes", "verdict"]


@dataclass(frozen=True, slots=True)
class Screened:
    """What the profile's screening reads of one instance."""

    series_uid: str
    sop_class_uid: str
    modality: str


def _screen_dataset(item: Screened, headers: Mapping[str, str | tuple[str, ...]]) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = item.sop_class_uid
    ds.Modality = item.modality
    burned_in = headers.get("BurnedInAnnotation", "")
    if isinstance(burned_in, str) and burned_in:
        ds.BurnedInAnnotation = burned_in
    for keyword in REGION_KEYWORDS:  # what a profile's pixel regions match on (ingestd.deid.pixels)
        value = headers.get(keyword)
        if keyword in ds or value is None or value == "":
            continue
        if keyword in ("Rows", "Columns"):
            if isinstance(value, str) and value.strip().isdigit():
                setattr(ds, keyword, int(value))
        else:
            setattr(ds, keyword, list(value) if isinstance(value, tuple) else value)
    return ds


def verdict(
    rules: RuleSet, study: StudyFacts, instances: Iterable[Screened], *, rule: str | None = None
) -> Routed | Held:
    """Route the study, or hold it with the code and reason the daemon's router would give.

    `instances` are the study's instances in the order the router takes them; `rule` names a rule to apply as if its
    `when` held (`ingestd anonymize --rule`).
    """
    decision = decide(rules, study, rule=rule)
    if isinstance(decision, Held) or decision.profile is None:
        return decision
    profile = rules.profiles[decision.profile]
    kept = set(decision.kept_series)
    headers = {series.series_uid: series.headers for series in study.series}
    for item in instances:
        if item.series_uid not in kept:
            continue
        try:
            screen(_screen_dataset(item, headers.get(item.series_uid, {})), profile)
        except DeidError as exc:
            return Held(reason=exc.reason, code=exc.code, rule=decision.rule)
    return decision


def label_clashes(decisions: Sequence[tuple[str, Routed | Held]]) -> dict[str, Held]:
    """The studies of one run held because an earlier one of the run takes their session label (`label-taken`).

    `decisions` are (Study Instance UID, verdict) in the order the daemon takes the studies (the order their first
    instance arrives). XNAT keeps a session label unique in a project: once an earlier study is archived under it,
    the deliverer's pre-flight holds every later study routed there. A label taken by a study delivered before
    this run is not known here.
    """
    taken: dict[tuple[str, str, str], str] = {}  # (server, project, session) -> the study archived there
    clashes: dict[str, Held] = {}
    for uid, decision in decisions:
        if not isinstance(decision, Routed):
            continue
        where = (decision.server, decision.project, decision.session)
        earlier = taken.get(where)
        if earlier is None:
            if decision.archive:
                taken[where] = uid
        elif earlier != uid:
            # The words of the deliverer's pre-flight (ingestd.deliver), which makes this check against XNAT.
            reason = (
                f"XNAT already has {decision.project}/{decision.subject}/{decision.session} for another study: "
                "change the rule's session label template so that each study gets its own"
            )
            clashes[uid] = Held(reason=reason, code=HoldCode.LABEL_TAKEN, rule=decision.rule)
    return clashes
