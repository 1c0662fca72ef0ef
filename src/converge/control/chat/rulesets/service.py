"""Rulesets: versioned system instructions and guardrails, and the deployments they are the
default of. The gateway compiles the current version of each (its snapshot reloads on the
events recorded here) and applies it; specs are compiled here first, so a stored spec always
compiles. Services flush, never commit."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.chat import refs
from converge.control.chat.rulesets import repository
from converge.control.chat.rulesets.schemas import (
    AttachmentRead,
    RulesetCreate,
    RulesetRead,
    RulesetSpec,
    RulesetUpdate,
)
from converge.control.deployments.service import visible_deployment
from converge.control.events.service import record
from converge.control.projects.principal import Principal
from converge.control.projects.service import visible_project
from converge.core import guardrails
from converge.errors import Conflict, NotFound, Unprocessable
from converge.kit.unique import flush_or_conflict
from converge.models import DeploymentRuleset, Project, Ruleset, RulesetVersion


def invalid(field: str, message: str) -> Unprocessable:
    """A 422 naming the field, shaped like a request-validation error."""
    return Unprocessable(
        f"{field}: {message}",
        extra={"field": field, "errors": [{"field": field, "message": message, "type": "value_error"}]},
    )


def compiled_spec(spec: RulesetSpec, *, name: str) -> dict[str, Any]:
    """The stored form of a spec, once it compiles (patterns, nesting); 422 naming the field."""
    raw = spec.model_dump(mode="json")
    try:
        guardrails.compile_spec(raw, id_=None, name=name, version=0)
        return guardrails.normalize(raw)
    except guardrails.InvalidSpec as exc:
        raise invalid(f"spec.{exc.field}", exc.message) from None


async def visible_ruleset(
    session: AsyncSession, principal: Principal, *, ruleset_id: uuid.UUID, permission: str, lock: bool = False
) -> Ruleset:
    """The ruleset if the caller sees its project (else 404, like a missing one) and holds
    `permission` there (else 403)."""
    ruleset = await refs.get(session, Ruleset, object_id=ruleset_id, lock=lock)
    if ruleset is None or not principal.sees(ruleset.project_id):
        raise NotFound(f"Ruleset {ruleset_id} not found")
    await visible_project(session, principal, ruleset.project_id, permission=permission)
    return ruleset


async def read_many(session: AsyncSession, rulesets: list[Ruleset]) -> list[RulesetRead]:
    attached: dict[uuid.UUID, list[uuid.UUID]] = {}
    for row, _ in await repository.attachments(session, [r.id for r in rulesets]):
        attached.setdefault(row.ruleset_id, []).append(row.deployment_id)
    return [
        RulesetRead.model_validate(
            {
                **{name: getattr(r, name) for name in RulesetRead.model_fields if name != "deployments"},
                "deployments": attached.get(r.id, []),
            }
        )
        for r in rulesets
    ]


def _version(ruleset: Ruleset, author: str) -> RulesetVersion:
    return RulesetVersion(ruleset_id=ruleset.id, version=ruleset.version, spec=ruleset.spec, author=author)


async def create(
    session: AsyncSession, principal: Principal, *, project: Project, body: RulesetCreate
) -> Ruleset:
    spec = compiled_spec(body.spec, name=body.name)
    ruleset = Ruleset(
        project_id=project.id,
        name=body.name,
        description=body.description,
        version=1,
        spec=spec,
        created_by=principal.subject,
    )
    session.add(ruleset)
    await flush_or_conflict(session, f"Project '{project.name}' already has a ruleset named '{body.name}'")
    session.add(_version(ruleset, principal.subject))
    await session.flush()
    await record(
        session,
        principal,
        action="ruleset.created",
        project_id=project.id,
        object_type="ruleset",
        object_id=ruleset.id,
        changes={"name": ruleset.name, "version": 1, "spec": spec},
    )
    return ruleset


async def update(
    session: AsyncSession, principal: Principal, *, ruleset_id: uuid.UUID, body: RulesetUpdate
) -> Ruleset:
    ruleset = await visible_ruleset(
        session, principal, ruleset_id=ruleset_id, permission="rulesets:write", lock=True
    )
    changes: dict[str, Any] = {}
    if body.description is not None and body.description != ruleset.description:
        ruleset.description = changes["description"] = body.description
    if body.spec is not None:
        spec = compiled_spec(body.spec, name=ruleset.name)
        if spec != ruleset.spec:  # an identical spec is not a new version
            ruleset.spec, ruleset.version = spec, ruleset.version + 1
            session.add(_version(ruleset, principal.subject))
            changes |= {"version": ruleset.version, "spec": spec}
    if not changes:
        return ruleset
    await session.flush()
    await record(
        session,
        principal,
        action="ruleset.updated",
        project_id=ruleset.project_id,
        object_type="ruleset",
        object_id=ruleset.id,
        changes=changes,
    )
    return ruleset


async def delete(session: AsyncSession, principal: Principal, *, ruleset_id: uuid.UUID) -> None:
    ruleset = await visible_ruleset(
        session, principal, ruleset_id=ruleset_id, permission="rulesets:write", lock=True
    )
    attached = [f"deployment '{name}'" for _, name in await repository.attachments(session, [ruleset.id])]
    used = attached + await repository.users(session, ruleset.id)
    if used:
        raise Conflict(
            f"Ruleset '{ruleset.name}' is in use by {', '.join(used)}: detach it (or change them) first",
            extra={"used_by": used},
        )
    await record(
        session,
        principal,
        action="ruleset.deleted",
        project_id=ruleset.project_id,
        object_type="ruleset",
        object_id=ruleset.id,
        changes={"name": ruleset.name, "version": ruleset.version},
    )
    await session.delete(ruleset)
    await session.flush()


async def attach(
    session: AsyncSession, principal: Principal, *, ruleset_id: uuid.UUID, deployment_id: uuid.UUID
) -> AttachmentRead:
    """Make the ruleset the deployment's default (replacing another one); same project only."""
    ruleset = await visible_ruleset(session, principal, ruleset_id=ruleset_id, permission="rulesets:write")
    deployment = await _deployment_of(session, principal, ruleset=ruleset, deployment_id=deployment_id)
    row = await repository.attachment(session, deployment.id)
    replaced = row.ruleset_id if row is not None else None
    if row is None:
        row = DeploymentRuleset(
            deployment_id=deployment.id,
            ruleset_id=ruleset.id,
            project_id=ruleset.project_id,
            created_by=principal.subject,
        )
        session.add(row)
    elif row.ruleset_id != ruleset.id:
        row.ruleset_id, row.created_by = ruleset.id, principal.subject
    await session.flush()
    if replaced != ruleset.id:
        await record(
            session,
            principal,
            action="ruleset.attached",
            project_id=ruleset.project_id,
            object_type="ruleset",
            object_id=ruleset.id,
            changes={
                "deployment_id": str(deployment.id),
                "deployment": deployment.name,
                "replaced": str(replaced) if replaced else None,
            },
        )
    await session.refresh(row)
    return AttachmentRead(
        ruleset_id=ruleset.id,
        deployment_id=deployment.id,
        deployment=deployment.name,
        created_by=row.created_by,
        created_at=row.created_at,
    )


async def detach(
    session: AsyncSession, principal: Principal, *, ruleset_id: uuid.UUID, deployment_id: uuid.UUID
) -> None:
    ruleset = await visible_ruleset(session, principal, ruleset_id=ruleset_id, permission="rulesets:write")
    deployment = await _deployment_of(session, principal, ruleset=ruleset, deployment_id=deployment_id)
    row = await repository.attachment(session, deployment.id)
    if row is None or row.ruleset_id != ruleset.id:
        raise NotFound(f"Ruleset '{ruleset.name}' is not the default of deployment '{deployment.name}'")
    await repository.detach(session, deployment.id)
    await record(
        session,
        principal,
        action="ruleset.detached",
        project_id=ruleset.project_id,
        object_type="ruleset",
        object_id=ruleset.id,
        changes={"deployment_id": str(deployment.id), "deployment": deployment.name},
    )


async def _deployment_of(
    session: AsyncSession, principal: Principal, *, ruleset: Ruleset, deployment_id: uuid.UUID
) -> Any:
    """The deployment, in the ruleset's project: another project's answers 404 like a missing one."""
    try:
        _, deployment = await visible_deployment(
            session, principal, deployment_id, permission="rulesets:write"
        )
    except NotFound:
        deployment = None
    if deployment is None or deployment.project_id != ruleset.project_id or deployment.deleting:
        raise NotFound(f"Deployment {deployment_id} not found")
    return deployment
