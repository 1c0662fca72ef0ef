"""Evaluate rules against facts and explain the result.

The engine fails closed: a deny rule that cannot be evaluated (bad expression, missing
key, type mismatch, non-bool result) blocks the action just as a failing one does, while a
broken approve rule simply does not approve. ``evaluate`` never raises for bad rules or odd
facts; every evaluated rule leaves exactly one outcome, in rule order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from converge.core.policy.expressions import PolicyError, compile_expression
from converge.core.policy.rules import Effect, Rule, Scope


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleOutcome:
    rule: str
    effect: Effect
    outcome: Outcome
    # The rule's message on fail, "evaluation error: ..." on error, None on pass.
    message: str | None = None

    @property
    def failed(self) -> bool:
        """Did not pass; for deny rules both fail and error block (fail closed)."""
        return self.outcome is not Outcome.PASS

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "effect": self.effect.value,
            "outcome": self.outcome.value,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    scope: Scope
    allowed: bool
    approve: bool
    outcomes: list[RuleOutcome] = field(default_factory=list)

    @property
    def denials(self) -> list[RuleOutcome]:
        return self._not_passed(Effect.DENY)

    @property
    def warnings(self) -> list[RuleOutcome]:
        return self._not_passed(Effect.WARN)

    @property
    def reasons(self) -> list[str]:
        """Why the action is blocked, in words a person can act on."""
        return [outcome.message or outcome.rule for outcome in self.denials]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope.value,
            "allowed": self.allowed,
            "approve": self.approve,
            "reasons": self.reasons,
            "outcomes": [outcome.to_dict() for outcome in self.outcomes],
        }

    def _not_passed(self, effect: Effect) -> list[RuleOutcome]:
        return [o for o in self.outcomes if o.effect is effect and o.failed]


def evaluate(rules: Iterable[Rule], facts: Mapping[str, Any], *, scope: Scope | str) -> Decision:
    """Decide ``scope`` for ``facts`` using the enabled rules of that scope."""
    scope = Scope(scope)
    outcomes = [_run(rule, facts) for rule in rules if rule.enabled and rule.scope is scope]
    allowed = not any(o.failed for o in outcomes if o.effect is Effect.DENY)
    approved = any(o.outcome is Outcome.PASS for o in outcomes if o.effect is Effect.APPROVE)
    # An approval by policy never outranks a denial by policy.
    return Decision(scope=scope, allowed=allowed, approve=allowed and approved, outcomes=outcomes)


def dry_run(rule: Rule, facts_list: Sequence[Mapping[str, Any]]) -> list[Decision]:
    """Show what ``rule`` alone would decide for each facts mapping, e.g. before saving it."""
    # A rule is usually tried out before it is switched on, so ignore its enabled flag here.
    trial = dataclasses.replace(rule, enabled=True)
    return [evaluate([trial], facts, scope=trial.scope) for facts in facts_list]


def _run(rule: Rule, facts: Mapping[str, Any]) -> RuleOutcome:
    try:
        passed = compile_expression(rule.expression).evaluate(facts)
    except PolicyError as exc:
        # A stored rule may predate a stricter parser, so a syntax error is also an outcome.
        return _outcome(rule, Outcome.ERROR, f"evaluation error: {exc}")
    if passed:
        return _outcome(rule, Outcome.PASS, None)
    return _outcome(rule, Outcome.FAIL, rule.message)


def _outcome(rule: Rule, outcome: Outcome, message: str | None) -> RuleOutcome:
    return RuleOutcome(rule=rule.name, effect=rule.effect, outcome=outcome, message=message)
