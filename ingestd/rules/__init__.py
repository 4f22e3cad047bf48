"""The rule language: which studies go where, with which de-identification profile, and which series are left out.

`load_rules` reads rules files into a `RuleSet`; `decide` routes a study (pure); `explain_match` says why.
See docs/rules.md for the language.
"""

from __future__ import annotations

from ingestd.rules.labels import LabelError, Template, TemplateError, label_hash, parse_template, sanitize_label
from ingestd.rules.load import load_rules, rules_version
from ingestd.rules.match import (
    Condition,
    Held,
    Route,
    Routed,
    Rule,
    RuleSet,
    SeriesFacts,
    StudyFacts,
    When,
    decide,
    explain_match,
    identifying_labels,
)
from ingestd.rules.sources import NewKeyError, write_new_key

__all__ = [
    "Condition",
    "Held",
    "LabelError",
    "NewKeyError",
    "Route",
    "Routed",
    "Rule",
    "RuleSet",
    "SeriesFacts",
    "StudyFacts",
    "Template",
    "TemplateError",
    "When",
    "decide",
    "explain_match",
    "identifying_labels",
    "label_hash",
    "load_rules",
    "parse_template",
    "rules_version",
    "sanitize_label",
    "write_new_key",
]
