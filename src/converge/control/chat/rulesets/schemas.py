"""Rulesets over HTTP: system instructions and guardrails, versioned (see core/guardrails.py)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from converge.control.deployments.schemas import DeploymentName
from converge.core import guardrails
from converge.kit.schemas import Input, Output

RulesetName = DeploymentName  # a DNS label, like deployments and knowledge bases
Description = Annotated[str, StringConstraints(max_length=4096)]
Term = Annotated[str, StringConstraints(min_length=1, max_length=guardrails.MAX_TERM)]
Redactable = guardrails.REDACTABLE


class PatternIn(Input):
    name: str = Field(pattern=guardrails.NAME.pattern, description="The rule's name in refusals and hits")
    regex: str = Field(
        min_length=1, max_length=guardrails.MAX_PATTERN, description="A Python regular expression"
    )


Pattern = Annotated[str, StringConstraints(min_length=1, max_length=guardrails.MAX_PATTERN)] | PatternIn


class InputRules(Input):
    blocked_terms: list[Term] = Field(
        default_factory=list,
        max_length=guardrails.MAX_RULES,
        description="Refused when a user message holds one (case-insensitive, whole words); rule `term:<term>`",
    )
    patterns: list[Pattern] = Field(
        default_factory=list,
        max_length=guardrails.MAX_RULES,
        description="Regular expressions that refuse a user message; rule `pattern:<name>` "
        "(a bare string is named pattern-<n>)",
    )
    redact: list[Annotated[str, Field(pattern="^(email|phone|card)$")]] = Field(
        default_factory=list, description="Replaced by [REDACTED:<kind>] before the model sees them"
    )


class OutputRules(InputRules):
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1 << 20,
        description="Cap on completion tokens (the smaller of this and the request's)",
    )


class RulesetSpec(Input):
    system: str = Field(
        default="",
        max_length=guardrails.MAX_SYSTEM,
        description="Prepended to every chat as a system message",
    )
    input: InputRules = InputRules()
    output: OutputRules = OutputRules()


class RulesetCreate(Input):
    name: RulesetName
    description: Description = ""
    spec: RulesetSpec = RulesetSpec()


class RulesetUpdate(Input):
    """A new `spec` makes a new version; the description changes in place."""

    description: Description | None = None
    spec: RulesetSpec | None = None


class RulesetRead(Output):
    id: uuid.UUID
    project_id: uuid.UUID
    name: str
    description: str
    version: int = Field(description="The current version")
    spec: dict[str, Any] = Field(description="The current version's spec, every field present")
    deployments: list[uuid.UUID] = Field(default_factory=list, description="Deployments it is the default of")
    created_by: str
    created_at: datetime
    updated_at: datetime


class RulesetVersionRead(Output):
    version: int
    spec: dict[str, Any]
    author: str
    created_at: datetime


class AttachmentRead(Output):
    ruleset_id: uuid.UUID
    deployment_id: uuid.UUID
    deployment: str = Field(description="The deployment's name")
    created_by: str
    created_at: datetime
