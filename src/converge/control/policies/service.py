"""Policies: versioned CEL rules, validated before they are stored, and dry runs."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import Settings
from converge.control.events.service import record
from converge.control.policies import repository
from converge.control.policies.schemas import (
    DryRunRequest,
    DryRunResult,
    DryRunRow,
    PolicyCreate,
    PolicyUpdate,
)
from converge.control.projects.principal import Principal
from converge.core.policy import (
    InvalidRuleError,
    PolicySyntaxError,
    Rule,
    build_facts,
    compile_expression,
    evaluate,
    version_facts,
)
from converge.errors import NotFound, Unprocessable
from converge.kit.unique import flush_or_conflict
from converge.models import Policy, PolicyRevision


def check_expression(expression: str) -> None:
    """Syntax errors and references to facts that do not exist are caught before storing."""
    try:
        compiled = compile_expression(expression)
    except PolicySyntaxError as exc:
        raise Unprocessable(
            f"CEL syntax error at line {exc.line}, column {exc.column}: {exc.message}",
            extra={"line": exc.line, "column": exc.column, "field": "expression"},
        ) from exc
    try:
        compiled.evaluate(build_facts())
    except Exception as exc:
        text = str(exc)
        if "undeclared" in text.lower() or "undefined" in text.lower() or "no such" in text.lower():
            raise Unprocessable(
                f"Expression refers to something that is not a fact: {text}", extra={"field": "expression"}
            ) from exc
        # Other errors on the all-defaults facts (e.g. comparing null) are fine: real facts differ.


async def rules_for(session: AsyncSession, scope: str) -> list[Rule]:
    """The enabled rules of one scope, in name order: what registration, approval and admission evaluate."""
    return await repository.rules_for(session, scope)


async def get(session: AsyncSession, policy_id: uuid.UUID) -> Policy:
    policy = await repository.get(session, policy_id)
    if policy is None:
        raise NotFound(f"Policy {policy_id} not found")
    return policy


def _revision(policy: Policy, author: str) -> PolicyRevision:
    return PolicyRevision(
        policy_id=policy.id,
        revision=policy.revision,
        expression=policy.expression,
        message=policy.message,
        effect=policy.effect,
        scope=policy.scope,
        enabled=policy.enabled,
        author=author,
    )


async def create(session: AsyncSession, principal: Principal, *, body: PolicyCreate) -> Policy:
    check_expression(body.expression)
    try:
        Rule(
            name=body.name,
            expression=body.expression,
            message=body.message,
            effect=body.effect,
            scope=body.scope,
        )
    except InvalidRuleError as exc:
        raise Unprocessable(str(exc)) from exc
    policy = Policy(
        name=body.name,
        expression=body.expression,
        message=body.message,
        effect=body.effect,
        scope=body.scope,
        enabled=body.enabled,
        revision=1,
        updated_by=principal.subject,
    )
    session.add(policy)
    await flush_or_conflict(session, f"A policy named '{body.name}' already exists")
    session.add(_revision(policy, principal.subject))
    await record(
        session,
        principal,
        action="policy.created",
        project_id=None,
        object_type="policy",
        object_id=policy.id,
        changes=body.model_dump(mode="json"),
    )
    return policy


async def update(
    session: AsyncSession, principal: Principal, *, policy_id: uuid.UUID, body: PolicyUpdate
) -> Policy:
    policy = await get(session, policy_id)
    changes = body.model_dump(exclude_none=True, mode="json")
    if "expression" in changes:
        check_expression(changes["expression"])
    for field, value in changes.items():
        setattr(policy, field, value)
    try:
        repository.to_rule(policy)
    except ValueError as exc:
        raise Unprocessable(str(exc)) from exc
    policy.revision += 1
    policy.updated_by = principal.subject
    session.add(_revision(policy, principal.subject))
    await session.flush()
    await record(
        session,
        principal,
        action="policy.updated",
        project_id=None,
        object_type="policy",
        object_id=policy.id,
        changes={**changes, "revision": policy.revision},
    )
    return policy


async def delete(session: AsyncSession, principal: Principal, *, policy_id: uuid.UUID) -> None:
    policy = await get(session, policy_id)
    await record(
        session,
        principal,
        action="policy.deleted",
        project_id=None,
        object_type="policy",
        object_id=policy.id,
        changes={"name": policy.name},
    )
    await session.delete(policy)
    await session.flush()


async def dry_run(
    session: AsyncSession, *, policy_id: uuid.UUID, body: DryRunRequest, settings: Settings
) -> DryRunResult:
    """Evaluate the policy (or a draft of it) against existing versions; nothing is stored."""
    policy = await get(session, policy_id)
    draft = {k: v for k, v in body.model_dump(exclude_none=True, exclude={"limit"}).items()}
    if "expression" in draft:
        check_expression(draft["expression"])
    try:
        rule = repository.to_rule(policy, enabled=True, **draft)
    except InvalidRuleError as exc:
        raise Unprocessable(str(exc)) from exc
    results = []
    for version, model, approvers in await repository.latest_versions(session, limit=body.limit):
        facts = version_facts(
            model, version, approvers=approvers, required=settings.library.approvals_required
        )
        outcome = evaluate([rule], facts, scope=rule.scope).outcomes[0]
        results.append(
            DryRunRow(
                model=model.name,
                version=version.version,
                version_id=version.id,
                state=version.state,
                outcome=outcome.outcome,
                message=outcome.message,
            )
        )
    count = {o: sum(r.outcome == o for r in results) for o in ("pass", "fail", "error")}
    return DryRunResult(
        policy=policy.name,
        evaluated=len(results),
        passed=count["pass"],
        failed=count["fail"],
        errors=count["error"],
        results=results,
    )
