from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from converge.core.policy import Effect, Scope
from converge.kit.schemas import Input, Output

Expression = Annotated[str, StringConstraints(min_length=1, max_length=10_000)]


class PolicyCreate(Input):
    name: Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    expression: Expression = Field(description="CEL; true means the rule passes. See GET /policies/facts")
    message: Annotated[str, StringConstraints(min_length=1, max_length=1000)]
    effect: Effect
    scope: Scope
    enabled: bool = True


class PolicyUpdate(Input):
    expression: Expression | None = None
    message: Annotated[str, StringConstraints(min_length=1, max_length=1000)] | None = None
    effect: Effect | None = None
    enabled: bool | None = None


class PolicyRead(Output):
    id: uuid.UUID
    name: str
    expression: str
    message: str
    effect: Effect
    scope: Scope
    enabled: bool
    revision: int
    builtin: bool
    updated_by: str
    created_at: datetime


class PolicyRevisionRead(Output):
    revision: int
    expression: str
    message: str
    effect: Effect
    scope: Scope
    enabled: bool
    author: str
    created_at: datetime


class DryRunRequest(Input):
    expression: Expression | None = Field(
        default=None, description="Draft expression; default: the current one"
    )
    message: Annotated[str, StringConstraints(min_length=1, max_length=1000)] | None = None
    effect: Effect | None = None
    limit: int = Field(default=100, ge=1, le=1000, description="How many of the newest versions to evaluate")


class DryRunRow(Output):
    model: str
    version: str
    version_id: uuid.UUID
    state: str
    outcome: str
    message: str | None


class DryRunResult(Output):
    policy: str
    evaluated: int
    passed: int
    failed: int
    errors: int
    results: list[DryRunRow]


FactsDoc = dict[str, Any]
