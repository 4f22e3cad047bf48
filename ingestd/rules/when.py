"""A rule's `when`: conditions that must all hold, with `any`, `all` and `not` groups, and its explanation.

Pure. A `When` is one `when` mapping as the rules file wrote it: its plain keys (conditions, ANDed), and the
groups beside them, ANDed with them: `any` (at least one of its mappings holds), `all` (every one holds) and
`not` (its mapping does not hold). Groups nest up to MAX_DEPTH levels. `explain_when` says, with the values
seen, which condition held or failed and which branch of an `any` matched: for the operator only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ingestd.rules.conditions import Condition, StudyFacts, condition_holds, series_values, source_values

__all__ = ["MAX_DEPTH", "When", "explain_when", "when_holds"]

MAX_DEPTH = 8  # `any`/`all`/`not` inside one another: far more than a readable rule needs


@dataclass(frozen=True, slots=True)
class When:
    """A `when` mapping: every condition, every `all_of` mapping and (if given) one `any_of` mapping must hold, and
    `none_of` (`not`) must not. An empty `When` holds for every study."""

    conditions: tuple[Condition, ...] = ()
    any_of: tuple[When, ...] | None = None  # None: no `any` key (the loader refuses an empty list)
    all_of: tuple[When, ...] | None = None
    none_of: When | None = None  # `not`

    @property
    def is_empty(self) -> bool:
        return not self.conditions and self.any_of is None and self.all_of is None and self.none_of is None

    @property
    def depth(self) -> int:
        """How many groups nest here: 0 for plain conditions."""
        children = [*(self.any_of or ()), *(self.all_of or ()), *((self.none_of,) if self.none_of else ())]
        return 1 + max(child.depth for child in children) if children else 0


def when_holds(when: When, study: StudyFacts) -> bool:
    """Whether the `when` holds for the study."""
    return (
        all(condition_holds(condition, study) for condition in when.conditions)
        and (when.all_of is None or all(when_holds(part, study) for part in when.all_of))
        and (when.any_of is None or any(when_holds(part, study) for part in when.any_of))
        and (when.none_of is None or not when_holds(when.none_of, study))
    )


# --- explanation (shows values: for the operator only) -------------------------------------------------------


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 or word.endswith('s') else 's'}"


def _shown(values: tuple[str, ...]) -> str:
    return "\\".join(values) if values else "(missing)"


def observed(condition: Condition, study: StudyFacts) -> str:
    """The values a condition saw: a source field's, or each distinct header value with its number of series."""
    if not condition.per_series:
        return _shown(source_values(condition.field, study))
    counts = Counter(_shown(series_values(condition, series)) for series in study.series)
    return ", ".join(
        f"{value!r}" + (f" ({_plural(count, 'series')})" if len(study.series) > 1 else "")
        for value, count in counts.items()
    )


def _verdict(ok: bool) -> str:
    return "holds" if ok else "fails"


def _branches(count: int, outcomes: list[bool], key: str) -> str:
    """Which branches of an `any` or `all` decided it, by their index in the list (as `when.any.1` names them)."""
    matching = [str(index) for index, ok in enumerate(outcomes) if ok]
    failing = [str(index) for index, ok in enumerate(outcomes) if not ok]
    if key == "any" and matching:
        one = len(matching) == 1
        return f"branch{'' if one else 'es'} {', '.join(matching)} of {count} match{'es' if one else ''}"
    if key == "any":
        return "its only branch does not match" if count == 1 else f"none of its {count} branches matches"
    if failing:
        one = len(failing) == 1
        return f"branch{'' if one else 'es'} {', '.join(failing)} of {count} {'does' if one else 'do'} not match"
    return "its only branch matches" if count == 1 else f"all {count} branches match"


def explain_when(when: When, study: StudyFacts, *, path: str = "when", indent: str = "  ") -> tuple[bool, list[str]]:
    """Whether the `when` holds, and a line per condition and group with its outcome (and the values seen).

    Every branch is looked at (the decision stops at the first that settles it; the outcome is the same), so that
    the operator sees why each did or did not match. Lines name the key as written: `when.any.1.calling_aet`.
    """
    lines: list[str] = []
    results: list[bool] = []
    for condition in when.conditions:
        ok = condition_holds(condition, study)
        results.append(ok)
        lines.append(
            f"{indent}{path}.{condition.field} {condition.text}: {_verdict(ok)} (seen: {observed(condition, study)})"
        )
    for key, parts in (("all", when.all_of), ("any", when.any_of)):
        if parts is None:
            continue
        explained = [
            explain_when(part, study, path=f"{path}.{key}.{index}", indent=indent + "  ")
            for index, part in enumerate(parts)
        ]
        outcomes = [ok for ok, _ in explained]
        ok = any(outcomes) if key == "any" else all(outcomes)
        results.append(ok)
        lines.append(f"{indent}{path}.{key}: {_verdict(ok)} ({_branches(len(parts), outcomes, key)})")
        for _ok, sub in explained:
            lines += sub
    if when.none_of is not None:
        negated, sub = explain_when(when.none_of, study, path=f"{path}.not", indent=indent + "  ")
        results.append(not negated)
        why = "what it negates does not hold" if not negated else "what it negates holds"
        lines.append(f"{indent}{path}.not: {_verdict(not negated)} ({why})")
        lines += sub
    return all(results), lines
