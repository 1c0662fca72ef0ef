"""Policy rules and the defaults the library seeds on first start.

Semantics follow Kubernetes ValidatingAdmissionPolicy: an expression that evaluates to
``true`` means the rule PASSES. What a failing rule does depends on its effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from converge.core.policy.expressions import PolicyError


class Effect(StrEnum):
    DENY = "deny"  # failing (or erroring) blocks the action
    WARN = "warn"  # failing is reported, never blocks
    APPROVE = "approve"  # passing counts as an approval by policy


class Scope(StrEnum):
    REGISTRATION = "registration"
    APPROVAL = "approval"
    DEPLOYMENT = "deployment"


# Approval is a property of a version; at deployment time there is nothing left to approve.
_APPROVE_SCOPES = frozenset({Scope.REGISTRATION, Scope.APPROVAL})


class InvalidRuleError(PolicyError):
    """A rule's fields (not its expression) are unusable."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    name: str
    expression: str
    message: str
    effect: Effect
    scope: Scope
    enabled: bool = True

    def __post_init__(self) -> None:
        # Accept plain strings from the database or an API body, but store the enums so a
        # misspelt effect fails here rather than silently never matching in evaluate().
        object.__setattr__(self, "effect", _coerce(Effect, self.effect, field="effect"))
        object.__setattr__(self, "scope", _coerce(Scope, self.scope, field="scope"))
        if not self.name.strip():
            raise InvalidRuleError("rule name must not be empty")
        if self.effect is Effect.APPROVE and self.scope not in _APPROVE_SCOPES:
            raise InvalidRuleError("approve rules only apply at scope 'registration' or 'approval'")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "expression": self.expression,
            "message": self.message,
            "effect": self.effect.value,
            "scope": self.scope.value,
            "enabled": self.enabled,
        }


_E = TypeVar("_E", bound=StrEnum)


def _coerce(kind: type[_E], value: object, *, field: str) -> _E:
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    allowed = ", ".join(member.value for member in kind)
    raise InvalidRuleError(f"{field} must be one of {allowed}, got {value!r}")


# A tuple of frozen rules, so no caller can edit the seed in place by accident.
DEFAULT_POLICIES: tuple[Rule, ...] = (
    Rule(
        name="deny-unsafe-pickles",
        # Fail closed: a pickle that could not be scanned is as untrusted as an unsafe one.
        expression='scan.status != "unsafe" && scan.status != "error"',
        message="artifact contains unsafe pickle code or could not be scanned",
        effect=Effect.DENY,
        scope=Scope.REGISTRATION,
    ),
    Rule(
        name="deny-unknown-sources",
        expression="source.known",
        message="artifact does not come from a registered source; register the source first",
        effect=Effect.DENY,
        scope=Scope.REGISTRATION,
    ),
    Rule(
        name="warn-missing-license",
        expression='inspection.license != null && inspection.license != ""',
        message="model declares no license",
        effect=Effect.WARN,
        scope=Scope.REGISTRATION,
    ),
    Rule(
        # Built-in GGUF/safetensors files hold no pickles, so their scan is "not_applicable"
        # rather than "clean"; requiring "clean" would never auto-approve them.
        name="auto-approve-builtin-catalogue",
        expression='source.kind == "builtin" && scan.status != "unsafe"',
        message="not from the built-in catalogue; needs a manual approval",
        effect=Effect.APPROVE,
        scope=Scope.REGISTRATION,
    ),
    Rule(
        name="deployment-requires-approved",
        expression='version.state == "approved"',
        message="only approved model versions can be deployed",
        effect=Effect.DENY,
        scope=Scope.DEPLOYMENT,
    ),
    Rule(
        name="deployment-requires-build",
        expression="has(request.build_succeeded) && request.build_succeeded",
        message="no successful build of this version for the requested profile; build it first",
        effect=Effect.DENY,
        scope=Scope.DEPLOYMENT,
    ),
)
