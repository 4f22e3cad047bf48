"""The web page's rules page (`/ui/rules`): the rules the daemon routes with, and what a spooled study would get.

The rules are the daemon's own, as loaded now (`UiApp.rules_in_force`, the router's rule set across reloads); a page
served without a daemon (or before its router is built) loads the configuration's rules files as `ingestd explain
--config` does. Each rule is shown as `ingestd check-rules` knows it: its file and line, its `when`, its route's
templates, its profile (name and options: never a key, nor where the key is read from), archive, drop_series and
attach. The journal's record of the daemon's rule set (`ingestd.journal.retries.daemon_rules`: its version, the
outcome of the last reload) is shown beside, and whether the files on disk have changed since they were loaded.

The explain form (`?study=<batch id or study digest as the studies page shows it>`, a GET: it changes nothing) runs
the router's decision (`ingestd.rules.verdict`) on the spooled study, read as `ingestd explain --config BATCH` reads
it (`ingestd.offline.spooled_study`), with those rules, and shows it as the study page shows a study: each rule
tried, with each condition's outcome but never the value it saw; the series by digest, kept or dropped; the labels,
those a rule builds from raw identifying values as digests (as `ingestd status`, `ingestd.status.LabelPolicy`); the
profile; or the hold that would result. Nothing is written: the journal is opened read-only, headers are read with
Pixel Data left on disk, a deflated instance inflated into a scratch folder.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from ingestd.config import Config
from ingestd.deid.engine import DeidError
from ingestd.errors import ConfigError, IngestdError
from ingestd.journal import BatchInstance, BatchRow, Journal
from ingestd.logs import path_digest, uid_digest
from ingestd.rules import Held, Routed, Rule, RuleSet, StudyFacts, When, load_rules, rules_version
from ingestd.rules.conditions import condition_holds
from ingestd.rules.verdict import Screened, verdict
from ingestd.states import BatchKind, StudyState

__all__ = ["RulesInForce", "explain_reference", "page", "rules_view", "when_text"]

RulesInForce = Callable[[], RuleSet | None]
# What the form takes: a batch id, or a study as the studies page names it (a digest `sha256:...`, or a de-identified
# study's outgoing UID). Nothing longer, nothing else: the field never carries a header value.
_REFERENCE = re.compile(r"#?[0-9]{1,12}|sha256:[0-9a-f]{6,64}|[0-9.]{1,64}")
_GONE = (StudyState.DELIVERED, StudyState.RELEASED)  # their spooled files are removed
_MAX_EXPLAINED = 5  # batches of one study explained at once (a study digest names every batch of the study)
_LABELS = ("project", "subject", "session")


# -- the rules ------------------------------------------------------------------------------------------------


def when_text(when: When) -> str:
    """A `when` in one line, as written: `calling_aet: SCANNER, any[Modality in [MR], not(...)]`; `{}` for none."""
    parts = [f"{condition.field} {condition.text}" for condition in when.conditions]
    if when.all_of is not None:
        parts.append("all[" + "; ".join(when_text(part) for part in when.all_of) + "]")
    if when.any_of is not None:
        parts.append("any[" + "; ".join(when_text(part) for part in when.any_of) + "]")
    if when.none_of is not None:
        parts.append(f"not({when_text(when.none_of)})")
    return ", ".join(parts) or "{} (every study)"


def _identifying(rule: Rule) -> list[str]:
    """The labels a rule without a profile builds from raw identifying values, each with them: `session (PatientID,
    StudyDate)`."""
    fields: dict[str, list[str]] = {}
    for label, field in rule.identifying_labels:
        fields.setdefault(label, []).append(field)
    return [f"{label} ({', '.join(dict.fromkeys(names))})" for label, names in fields.items()]


def _rule_view(rule: Rule, rules: RuleSet) -> dict[str, Any]:
    profile = rules.profiles.get(rule.anonymize) if rule.anonymize else None
    return {
        "name": rule.name,
        "origin": rule.origin,
        "when": when_text(rule.when),
        "server": rule.route.server,
        "project": rule.route.project.text,
        "subject": rule.route.subject.text,
        "session": rule.route.session.text,
        "archive": rule.route.archive,
        "profile": rule.anonymize,
        "options": sorted(profile.options) if profile is not None else [],
        "identifying": _identifying(rule),
        "drop_series": [", ".join(f"{c.field} {c.text}" for c in entry) for entry in rule.drop_series],
        "attach": [
            f"{item.match_text} -> {item.level}"
            + (f" scan {item.scan.text}" if item.scan is not None else "")
            + f" resource {item.resource.text}"
            for item in rule.attach
        ],
        "files_only": rule.files_only,
    }


def _daemon_record(config: Config) -> dict[str, Any] | None:
    """What the daemon last recorded about its rule set: version, outcome (`started`, `applied`, `refused`), when."""
    from ingestd.journal.retries import daemon_rules  # noqa: PLC0415 - only for this page

    if not config.journal_path.exists():
        return None
    journal = Journal(config.journal_path, read_only=True)
    try:
        record = daemon_rules(journal)
    finally:
        journal.close()
    if record is None:
        return None
    return {"version": record.version, "outcome": record.outcome, "at": record.at, "problems": len(record.problems)}


def _version_on_disk(sources: Sequence[Path]) -> str | None:
    """The version the rules files have now (as `load_rules` computes it), None when one cannot be read."""
    try:
        return rules_version([path.read_bytes() for path in sources])
    except OSError:
        return None


def rules_in_use(config: Config, in_force: RulesInForce | None) -> tuple[RuleSet | None, str, str]:
    """The rule set to show and explain with, where it came from (`daemon`, `files`, `none`), and why it is
    missing (a problem an admin can act on, empty otherwise)."""
    rules = in_force() if in_force is not None else None
    if rules is not None:
        return rules, "daemon", ""
    if not config.rules:
        return None, "none", "the configuration names no rules files (rules:): nothing is routed"
    try:
        return load_rules(config.rules), "files", ""
    except ConfigError as exc:
        return None, "files", f"the rules files do not load ({len(exc.problems)} problem(s)): ingestd check-rules says"
    except (IngestdError, OSError, ValueError) as exc:
        return None, "files", f"the rules files do not load ({type(exc).__name__}): ingestd check-rules says why"


def rules_view(config: Config, rules: RuleSet | None, origin: str, problem: str) -> dict[str, Any]:
    """The page's rules section: the files, the version, each rule, and the daemon's record."""
    if rules is None:
        return {"rules": None, "origin": origin, "problem": problem, "record": _daemon_record(config)}
    on_disk = _version_on_disk(rules.sources)
    profiles = [
        {"name": name, "options": sorted(profile.options), "source": str(rules.profile_sources.get(name, ""))}
        for name, profile in sorted(rules.profiles.items())
    ]
    return {
        "rules": [_rule_view(rule, rules) for rule in rules.rules],
        "files": [str(path) for path in rules.sources],
        "version": rules.version,
        "changed_on_disk": on_disk is not None and on_disk != rules.version,
        "profiles": profiles,
        "origin": origin,
        "problem": problem,
        "record": _daemon_record(config),
    }


# -- explain --------------------------------------------------------------------------------------------------


def _why(when: When, study: StudyFacts, path: str = "when", depth: int = 0) -> Iterator[dict[str, Any]]:
    """Each condition and group of a `when` with its outcome, without the values it saw (`explain_when`'s rows)."""
    for condition in when.conditions:
        ok = condition_holds(condition, study)
        yield {"key": f"{path}.{condition.field}", "text": condition.text, "ok": ok, "depth": depth}
    for key, parts in (("all", when.all_of), ("any", when.any_of)):
        if parts is None:
            continue
        rows = [list(_why(part, study, f"{path}.{key}.{index}", depth + 1)) for index, part in enumerate(parts)]
        outcomes = [all(row["ok"] for row in sub if row["depth"] == depth + 1) for sub in rows]
        ok = any(outcomes) if key == "any" else all(outcomes)
        yield {"key": f"{path}.{key}", "text": f"{len(parts)} branch(es)", "ok": ok, "depth": depth}
        for sub in rows:
            yield from sub
    if when.none_of is not None:
        sub = list(_why(when.none_of, study, f"{path}.not", depth + 1))
        negated = all(row["ok"] for row in sub if row["depth"] == depth + 1)
        yield {"key": f"{path}.not", "text": "", "ok": not negated, "depth": depth}
        yield from sub


def _tried(rules: RuleSet, study: StudyFacts, forced: str | None) -> list[dict[str, Any]]:
    """The rules tried in order, up to the first that matches (or the one chosen by hand)."""
    from ingestd.rules.when import when_holds  # noqa: PLC0415

    tried = []
    for rule in rules.rules:
        if forced is not None and rule.name != forced:
            continue
        holds = forced is not None or when_holds(rule.when, study)
        rows = [] if forced is not None else list(_why(rule.when, study))
        tried.append({"name": rule.name, "origin": rule.origin, "matches": holds, "conditions": rows})
        if holds:
            break
    return tried


def _labels(rules: RuleSet, decision: Routed) -> tuple[dict[str, str], list[str]]:
    """The labels as `ingestd status` would show them once routed: those built from raw identifying values as
    digests (`identifying_labels` of a rule without a profile; a de-identified route's labels are safe)."""
    rule = next((candidate for candidate in rules.rules if candidate.name == decision.rule), None)
    hidden = set(_LABELS) if rule is None else {label for label, _field in rule.identifying_labels}
    if decision.profile:
        hidden = set()
    values = {"project": decision.project, "subject": decision.subject, "session": decision.session}
    return {name: path_digest(value) if name in hidden else value for name, value in values.items()}, sorted(hidden)


def _decision_view(rules: RuleSet, decision: Routed | Held) -> dict[str, Any]:
    if isinstance(decision, Held):
        return {"held": True, "code": str(decision.code), "reason": decision.reason, "rule": decision.rule}
    labels, hidden = _labels(rules, decision)
    profile = rules.profiles.get(decision.profile) if decision.profile else None
    return {
        "held": False,
        "rule": decision.rule,
        "server": decision.server,
        "labels": labels,
        "hidden_labels": hidden,
        "archive": decision.archive,
        "profile": decision.profile,
        "options": sorted(profile.options) if profile is not None else [],
        "kept": len(decision.kept_series),
        "dropped": [
            {"series": uid_digest(series), "instances": count, "reason": reason}
            for series, count, reason in decision.dropped_series
        ],
    }


def _spooled_facts(spool_dir: Path, batch: BatchRow, instances: Sequence[BatchInstance], scratch: Path) -> StudyFacts:
    """What the rules see of a spooled batch, read as the router reads it (`ingestd.offline.spooled_study`): one
    header per series from its spooled file (Pixel Data left on disk), the sources from the journal's rows.
    Raises OSError when a file cannot be read, DeidError when it cannot be parsed."""
    from ingestd.deid.stream import open_instance  # noqa: PLC0415 - pydicom, only to explain
    from ingestd.pipeline.route import header_facts, study_facts  # noqa: PLC0415

    headers: dict[str, dict[str, str | tuple[str, ...]]] = {}
    for instance in instances:
        if instance.series_uid not in headers:
            with open_instance(spool_dir / instance.spool_path, scratch) as opened:
                headers[instance.series_uid] = header_facts(opened.dataset)
    return study_facts(batch.study_uid, list(instances), headers)


def _explain_batch(config: Config, journal: Journal, batch: BatchRow, rules: RuleSet) -> dict[str, Any]:
    """One spooled batch: the rules tried, the series and the decision (`ingestd.rules.verdict`, the router's);
    `note` instead when it cannot be."""
    view: dict[str, Any] = {
        "batch_id": batch.id,
        "state": batch.state,
        "hold_code": batch.hold_code,
        "note": "",
        "forced_rule": batch.forced_rule,
        "tried": [],
        "series": [],
        "decision": None,
    }
    if batch.kind == BatchKind.FILES:
        return view | {"note": "an attachment set: it follows the route of the study in its upload"}
    instances = journal.batch_instances(batch.id)
    spool_dir = config.state_dir / "spool"
    missing = sum(not (spool_dir / instance.spool_path).is_file() for instance in instances)
    if missing or not instances:
        gone = "delivered or released, its spooled files removed" if batch.state in _GONE else "not in the spool"
        return view | {"note": f"{missing} of {len(instances)} instance(s) {gone}: nothing to explain"}
    with tempfile.TemporaryDirectory(prefix="ingestd-ui-explain-") as scratch:
        try:
            facts = _spooled_facts(spool_dir, batch, instances, Path(scratch))
        except OSError:
            return view | {"note": "a spooled instance cannot be read: ingestd explain --config says which"}
        except DeidError as exc:
            return view | {"decision": {"held": True, "code": str(exc.code), "reason": exc.reason, "rule": None}}
    screened = [Screened(item.series_uid, item.sop_class_uid, item.modality) for item in instances]
    decision = verdict(rules, facts, screened, rule=batch.forced_rule)
    series = [
        {
            "series": uid_digest(item.series_uid),
            "modality": str(item.headers.get("Modality") or "-"),
            "instances": item.instance_count,
        }
        for item in facts.series
    ]
    return view | {
        "tried": _tried(rules, facts, batch.forced_rule),
        "series": series,
        "decision": _decision_view(rules, decision),
    }


def explain_reference(
    config: Config, rules: RuleSet, reference: str, studies: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], str]:
    """The explanations of the batches `reference` names among `studies` (`ingestd status`'s rows: by batch id,
    or by the study as status shows it), and a message when there is nothing to explain."""
    wanted = reference.strip().removeprefix("#")
    if not _REFERENCE.fullmatch(reference.strip()):
        return [], "give a batch id or a study as the studies page shows it (sha256:...)"
    ids = [
        int(row["batch_id"])
        for row in studies
        if str(row.get("batch_id")) == wanted or (not wanted.isdigit() and row.get("study") == wanted)
    ][:_MAX_EXPLAINED]
    if not ids:
        return [], "no batch is that: see the studies page for batch ids and studies"
    journal = Journal(config.journal_path, read_only=True)
    try:
        rows = {batch.id: batch for batch in journal.batches() if batch.id in ids}
        return [_explain_batch(config, journal, rows[batch_id], rules) for batch_id in sorted(rows)], ""
    finally:
        journal.close()


# -- the page -------------------------------------------------------------------------------------------------


def page(
    config: Config, in_force: RulesInForce | None, query_string: str, studies: Callable[[], list[dict[str, Any]]]
) -> tuple[int, dict[str, Any]]:
    """`/ui/rules` (GET; a login or `public_read`, checked by the caller as for every read-only page): its status
    code and its template's context. `studies`: `ingestd status`'s rows, read only when a study is asked about."""
    query = parse_qs(query_string, max_num_fields=5)
    reference = (query.get("study") or [""])[0].strip()[:100]
    rules, origin, problem = rules_in_use(config, in_force)
    context = rules_view(config, rules, origin, problem)
    explained: list[dict[str, Any]] = []
    message, code = "", 200
    if reference:
        if rules is None:
            message, code = problem or "no rules are loaded", 400
        elif not config.journal_path.exists():
            message, code = "nothing was received yet", 404
        else:
            explained, message = explain_reference(config, rules, reference, studies())
            code = 200 if explained else 404
    # The field is shown again only when it names what the page shows (a batch id, a digest, a study explained).
    shown = reference if explained or re.fullmatch(r"#?[0-9]{1,12}|sha256:[0-9a-f]{6,64}", reference) else ""
    return code, context | {"reference": shown, "explained": explained, "message": message}
