"""Rules that can never match: an earlier rule's `when` holds for every study a later rule's `when` holds for.

Pure. The first rule whose `when` holds decides, so such a later rule is never reached (only a command that names
it, as `ingestd anonymize --rule`, uses it). `shadowed_rules` finds them, conservatively: it warns only where it
can prove, condition by condition, that the later `when` implies the earlier one; a rule it cannot prove
shadowed is not reported, so every warning is true. What it proves:

* an earlier `when: {}` holds for every study;
* a condition implies one on the same field when every value the first accepts is accepted by the second:
  `Modality: MR` implies `Modality: {in: [MR, CT]}` (the listed values are tested, so `{in: [T1a, T1b]}` implies
  `{matches: '^T1'}`), the same pattern or glob, a pattern such as `.*` that finds every value, `lt: 3`
  implies `lt: 5`; `present: true` is implied by any condition but `missing`; a drop folder's path implies its
  name (`drop_folder: /srv/drop/legacy` implies `drop_folder: legacy`);
* a mapping implies each of its own conditions and groups; `all` is its mappings together; an `any` is implied
  when one of its branches is, and implies what each of its branches implies; `not: X` implies `not: Y` when Y
  implies X.

A rule that can route files without DICOM (`Rule.files_only`) is reached by such uploads past every earlier rule
that cannot: it is shadowed only by an earlier files-only rule (which then takes its studies and its uploads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

import structlog

from ingestd.rules.conditions import Condition, ValueTest
from ingestd.rules.match import Rule, RuleSet
from ingestd.rules.when import When

__all__ = ["Shadowed", "implies", "log_shadowed", "shadowed_rules"]

log = structlog.get_logger("ingestd.rules")

# A pattern that `matches` every value (a search finds it, empty, at the start of any text).
_EVERY_VALUE = frozenset({"", ".*", "^", "^.*", "(?s).*", "(?s)^.*", ".*?", "^.*?"})
_BUDGET = 20_000  # steps of one proof: a rule with many nested `any` groups is given up on (no warning), not slow
_MAX_REASONS = 3


@dataclass(frozen=True, slots=True)
class Shadowed:
    """A rule no study reaches, the earlier rule that takes its studies, and why."""

    rule: Rule
    earlier: Rule
    why: str

    @property
    def _uploads(self) -> str:
        return " and every upload without DICOM" if self.rule.files_only else ""

    @property
    def message(self) -> str:
        """`file:line: warning: ...`, for `check-rules`."""
        return (
            f"{self.rule.origin}: warning: rule '{self.rule.name}' can never match: the earlier rule "
            f"'{self.earlier.name}' ({self.earlier.origin}) matches every study{self._uploads} it matches "
            f"({self.why}); move '{self.rule.name}' above '{self.earlier.name}', or remove it"
        )


@dataclass(frozen=True, slots=True)
class _Any:
    branches: tuple[When, ...]


@dataclass(frozen=True, slots=True)
class _Not:
    negated: When


_Atom = Condition | _Any | _Not


class _BudgetExhaustedError(Exception):
    """The proof took too many steps: give up, warning about nothing."""


def shadowed_rules(rules: RuleSet) -> list[Shadowed]:
    """Each rule that an earlier rule shadows, with the first such earlier rule, in the rules' order."""
    found: list[Shadowed] = []
    for position, rule in enumerate(rules.rules):
        for earlier in rules.rules[:position]:
            if rule.files_only and not earlier.files_only:
                continue  # an upload without DICOM passes it by (ingestd.rules.attach.files_only_decision)
            why = implies(rule.when, earlier.when)
            if why is not None:
                found.append(Shadowed(rule, earlier, why))
                break
    return found


def log_shadowed(rules: RuleSet | None) -> None:
    """Log `rules.shadowed` for each rule an earlier one shadows (the daemon, at load and reload). Names rules and
    lines only: the conditions, with their values, are for `ingestd check-rules`."""
    for found in shadowed_rules(rules) if rules is not None else ():
        log.warning(
            "rules.shadowed",
            rule=found.rule.name,
            at=found.rule.origin,
            earlier=found.earlier.name,
            earlier_at=found.earlier.origin,
            detail="never reached: the earlier rule matches every study it matches (ingestd check-rules says why)",
        )


def implies(later: When, earlier: When) -> str | None:
    """Why every study `later` holds for is one `earlier` holds for, or None when that cannot be shown."""
    if earlier.is_empty:
        return "when: {} matches every study"
    try:
        return _implies(_atoms(later), earlier, [_BUDGET])
    except _BudgetExhaustedError:
        return None


def _atoms(when: When) -> list[_Atom]:
    """The conjunction a `when` stands for, `all` mappings and one-branch `any` flattened, `not: {not: X}` as X."""
    atoms: list[_Atom] = list(when.conditions)
    for part in when.all_of or ():
        atoms += _atoms(part)
    if when.any_of is not None:
        if len(when.any_of) == 1:
            atoms += _atoms(when.any_of[0])
        else:
            atoms.append(_Any(when.any_of))
    negated = when.none_of
    if negated is not None:
        inner = negated.none_of
        if inner is not None and not negated.conditions and negated.any_of is None and negated.all_of is None:
            atoms += _atoms(inner)
        else:
            atoms.append(_Not(negated))
    return atoms


def _implies(premises: list[_Atom], goal: When, budget: list[int]) -> str | None:
    reasons: list[str] = []
    for atom in _atoms(goal):
        reason = _implies_atom(premises, atom, budget)
        if reason is None:
            return None
        reasons.append(reason)
    if not reasons:
        return "an empty mapping holds for every study"
    shown = list(dict.fromkeys(reasons))
    more = len(shown) - _MAX_REASONS
    return "; ".join(shown[:_MAX_REASONS]) + (f"; and {more} more" if more > 0 else "")


def _implies_atom(premises: list[_Atom], goal: _Atom, budget: list[int]) -> str | None:
    budget[0] -= 1
    if budget[0] < 0:
        raise _BudgetExhaustedError
    direct = _directly(premises, goal, budget)
    if direct is not None:
        return direct
    for premise in premises:  # an `any` among the premises: the goal must follow from each of its branches
        if isinstance(premise, _Any):
            rest = [other for other in premises if other is not premise]
            reasons = [_implies_atom(rest + _atoms(branch), goal, budget) for branch in premise.branches]
            if all(reason is not None for reason in reasons):
                return f"each branch of its any: {' / '.join(str(reason) for reason in reasons)}"
    return None


def _directly(premises: list[_Atom], goal: _Atom, budget: list[int]) -> str | None:
    """Why the goal follows from one premise (or one branch of the goal's `any`), or None."""
    if goal in premises:
        return f"both require {_describe(goal)}"
    if isinstance(goal, Condition):
        for premise in premises:
            if isinstance(premise, Condition) and premise.field == goal.field and _condition_implies(premise, goal):
                return f"{goal.field} {premise.text} is within {goal.field} {goal.text}"
    elif isinstance(goal, _Any):
        for index, branch in enumerate(goal.branches):
            reason = _implies(premises, branch, budget)
            if reason is not None:
                return f"its branch any.{index} holds: {reason}"
    else:
        for premise in premises:
            if isinstance(premise, _Not) and _implies(_atoms(goal.negated), premise.negated, budget) is not None:
                return f"{_describe(premise)} is within {_describe(goal)}"
    return None


def _describe(atom: _Atom) -> str:
    if isinstance(atom, Condition):
        return f"{atom.field} {atom.text}"
    if isinstance(atom, _Not):
        return f"not {_describe(_Any((atom.negated,)))}"
    parts = [" and ".join(_describe(inner) for inner in _atoms(branch)) for branch in atom.branches]
    return parts[0] if len(parts) == 1 else "any of (" + "; ".join(parts) + ")"


# --- one condition implying another on the same field ------------------------------------------------------------

_NUMERIC = ("lt", "le", "gt", "ge")


def _condition_implies(premise: Condition, goal: Condition) -> bool:
    """Whether every value list `premise` holds for, `goal` holds for (same field; see `Condition.holds`).

    Each of the goal's operators must follow from one operator of the premise: the premise holds only with a value
    passing that operator, which then passes the goal's. A premise that holds has a value (unless it is
    `missing`), so `present` and a pattern finding every value follow from any premise.
    """
    if goal.missing or premise.missing:
        return goal.missing and premise.missing
    folder = goal.field == "drop_folder"
    return all(
        _every_value(wanted) or any(_test_implies(given, wanted, folder=folder) for given in premise.tests)
        for wanted in goal.tests
    )


def _every_value(test: ValueTest) -> bool:
    return test.kind == "matches" and test.text in _EVERY_VALUE


def _test_implies(given: ValueTest, wanted: ValueTest, *, folder: bool = False) -> bool:
    """Whether every value that passes the operator `given` passes `wanted`. For `drop_folder` (`folder`), a study's
    values are the folder's path and its name: a value with a '/' is the path, so its name is a value too."""
    if given.kind == "values":  # a finite set: try each of its values, as the router would
        return all(
            wanted.check(value) or (folder and "/" in value and wanted.check(PurePosixPath(value).name))
            for value in given.values
        )
    if given.kind == wanted.kind and given.kind in ("matches", "glob"):
        return given.text == wanted.text
    if given.kind in _NUMERIC and wanted.kind in _NUMERIC:
        return _bound_implies(given.kind, given.bound, wanted.kind, wanted.bound)
    return False


def _bound_implies(given: str, given_bound: float, wanted: str, bound: float) -> bool:
    """Whether `x given given_bound` implies `x wanted bound` for every number x (NaN bounds imply nothing)."""
    if given[0] != wanted[0]:  # an upper bound never implies a lower one
        return False
    if given[0] == "l":
        return given_bound < bound or (given_bound == bound and (wanted == "le" or given == "lt"))
    return given_bound > bound or (given_bound == bound and (wanted == "ge" or given == "gt"))
