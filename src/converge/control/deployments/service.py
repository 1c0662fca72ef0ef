"""Deployments: admission, revisions, redeploy, rollback. The controller does the rest."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import Settings
from converge.control.deployments import admission, repository
from converge.control.deployments.schemas import DeploymentCreate, DeploymentSpecIn, DeploymentUpdate
from converge.control.events.service import record
from converge.control.projects.principal import Principal
from converge.control.projects.service import visible_project
from converge.errors import Conflict, NotFound
from converge.kit.unique import flush_or_conflict
from converge.models import Deployment, DeploymentRevision, Project
from converge.runtime.base import Zone

SPEC_FIELDS = set(DeploymentSpecIn.model_fields)


async def visible_deployment(
    session: AsyncSession,
    principal: Principal,
    deployment_id: uuid.UUID,
    *,
    permission: str,
    lock: bool = False,
) -> tuple[Project, Deployment]:
    deployment = await repository.get(session, deployment_id, lock=lock)
    if deployment is None or not principal.sees(deployment.project_id):
        raise NotFound(f"Deployment {deployment_id} not found")
    project = await visible_project(session, principal, deployment.project_id, permission=permission)
    return project, deployment


async def _admit(
    session: AsyncSession,
    principal: Principal | None,
    *,
    project: Project,
    spec: DeploymentSpecIn,
    zones: list[Zone],
    settings: Settings,
    exclude: uuid.UUID | None,
) -> dict[str, Any]:
    model, version = await admission.load_version(session, project, spec)
    server = admission.server_for(version, spec.server)
    admission.check_server(server, spec)
    admission.check_zones(spec, zones)
    await admission.check_policies(
        session, principal, project=project, model=model, version=version, spec=spec, settings=settings
    )
    await admission.check_quota(session, project=project, spec=spec, exclude=exclude)
    return {
        **spec.model_dump(mode="json"),
        "server": server.value,
        "model_name": model.name,
        "version": version.version,
    }


async def create(
    session: AsyncSession,
    principal: Principal | None,
    *,
    project: Project,
    body: DeploymentCreate,
    zones: list[Zone],
    settings: Settings,
) -> Deployment:
    spec_in = DeploymentSpecIn.model_validate(body.model_dump(include=SPEC_FIELDS))
    spec = await _admit(
        session, principal, project=project, spec=spec_in, zones=zones, settings=settings, exclude=None
    )
    actor = principal.subject if principal else "system"
    deployment = Deployment(
        project_id=project.id,
        name=body.name,
        aliases=body.aliases,
        model_version_id=body.model_version_id,
        revision=1,
        desired_replicas=max(body.replicas.min, 1 if body.autoscaling.scale_to_zero_after_s is None else 0),
        phase="Pending",
        status={},
        created_by=actor,
    )
    session.add(deployment)
    await flush_or_conflict(session, f"Project '{project.name}' already has a deployment named '{body.name}'")
    session.add(
        DeploymentRevision(
            deployment_id=deployment.id, revision=1, spec=spec, reason="created", created_by=actor
        )
    )
    await record(
        session,
        principal,
        action="deployment.created",
        project_id=project.id,
        object_type="deployment",
        object_id=deployment.id,
        changes={"name": body.name, "revision": 1, "model": spec["model_name"], "version": spec["version"]},
    )
    return deployment


async def _new_revision(
    session: AsyncSession,
    principal: Principal,
    *,
    project: Project,
    deployment: Deployment,
    spec_in: DeploymentSpecIn,
    zones: list[Zone],
    settings: Settings,
    reason: str,
) -> Deployment:
    spec = await _admit(
        session,
        principal,
        project=project,
        spec=spec_in,
        zones=zones,
        settings=settings,
        exclude=deployment.id,
    )
    number = await repository.latest_revision_number(session, deployment.id) + 1
    session.add(
        DeploymentRevision(
            deployment_id=deployment.id,
            revision=number,
            spec=spec,
            reason=reason,
            created_by=principal.subject,
        )
    )
    deployment.revision = number
    deployment.model_version_id = spec_in.model_version_id
    deployment.desired_replicas = min(
        max(deployment.desired_replicas, spec_in.replicas.min), spec_in.replicas.max
    )
    await session.flush()
    await record(
        session,
        principal,
        action="deployment.revised",
        project_id=project.id,
        object_type="deployment",
        object_id=deployment.id,
        changes={"revision": number, "reason": reason},
    )
    return deployment


async def current_spec(session: AsyncSession, deployment: Deployment) -> dict[str, Any]:
    rev = await repository.revision(session, deployment.id, deployment.revision)
    return dict(rev.spec) if rev else {}


async def update(
    session: AsyncSession,
    principal: Principal,
    *,
    deployment_id: uuid.UUID,
    body: DeploymentUpdate,
    zones: list[Zone],
    settings: Settings,
) -> Deployment:
    project, deployment = await visible_deployment(
        session, principal, deployment_id, permission="deployments:write", lock=True
    )
    changes = body.model_dump(exclude_unset=True, exclude_none=True, mode="json")
    if "aliases" in changes:
        deployment.aliases = changes.pop("aliases")
    if not changes:
        await session.flush()
        return deployment
    merged = {k: v for k, v in (await current_spec(session, deployment)).items() if k in SPEC_FIELDS}
    merged.update(changes)
    spec_in = DeploymentSpecIn.model_validate(merged)
    return await _new_revision(
        session,
        principal,
        project=project,
        deployment=deployment,
        spec_in=spec_in,
        zones=zones,
        settings=settings,
        reason="changed: " + ", ".join(sorted(changes)),
    )


async def rollback(
    session: AsyncSession,
    principal: Principal,
    *,
    deployment_id: uuid.UUID,
    revision: int,
    zones: list[Zone],
    settings: Settings,
) -> Deployment:
    project, deployment = await visible_deployment(
        session, principal, deployment_id, permission="deployments:write", lock=True
    )
    old = await repository.revision(session, deployment.id, revision)
    if old is None:
        raise NotFound(f"Deployment '{deployment.name}' has no revision {revision}")
    spec_in = DeploymentSpecIn.model_validate({k: v for k, v in old.spec.items() if k in SPEC_FIELDS})
    return await _new_revision(
        session,
        principal,
        project=project,
        deployment=deployment,
        spec_in=spec_in,
        zones=zones,
        settings=settings,
        reason=f"rollback to revision {revision}",
    )


async def redeploy(session: AsyncSession, principal: Principal, *, deployment_id: uuid.UUID) -> Deployment:
    """Restart every replica of the current revision (one at a time, like a rollout)."""
    project, deployment = await visible_deployment(
        session, principal, deployment_id, permission="deployments:write", lock=True
    )
    deployment.restart_generation += 1
    await session.flush()
    await record(
        session,
        principal,
        action="deployment.redeployed",
        project_id=project.id,
        object_type="deployment",
        object_id=deployment.id,
        changes={"revision": deployment.revision, "generation": deployment.restart_generation},
    )
    return deployment


async def delete(session: AsyncSession, principal: Principal, *, deployment_id: uuid.UUID) -> Deployment:
    """Mark for deletion; the controller stops the replicas and removes the row."""
    project, deployment = await visible_deployment(
        session, principal, deployment_id, permission="deployments:write", lock=True
    )
    deployment.deleting = True
    await session.flush()
    await record(
        session,
        principal,
        action="deployment.deleting",
        project_id=project.id,
        object_type="deployment",
        object_id=deployment.id,
        changes={"name": deployment.name},
    )
    return deployment


async def wake(session: AsyncSession, principal: Principal, *, deployment_id: uuid.UUID) -> Deployment:
    """Scale a deployment that scaled to zero back up (the gateway asks the controller for it)."""
    _, deployment = await visible_deployment(
        session, principal, deployment_id, permission="inference:use", lock=True
    )
    await wake_deployment(session, principal, deployment=deployment)
    return deployment


async def wake_deployment(
    session: AsyncSession, principal: Principal | None, *, deployment: Deployment
) -> None:
    """Mark a (locked) deployment active now and give it replicas again if it has none."""
    spec = await current_spec(session, deployment)
    deployment.last_active_at = datetime.now(UTC)
    if deployment.desired_replicas == 0:
        deployment.desired_replicas = max(1, spec.get("replicas", {}).get("min", 1))
        await record(
            session,
            principal,
            action="deployment.woken",
            project_id=deployment.project_id,
            object_type="deployment",
            object_id=deployment.id,
            changes={"replicas": deployment.desired_replicas},
        )
    await session.flush()


async def promote(session: AsyncSession, principal: Principal, *, deployment_id: uuid.UUID) -> Deployment:
    """Let a paused canary finish: the current revision replaces the old ones as a rolling update."""
    project, deployment = await visible_deployment(
        session, principal, deployment_id, permission="deployments:write", lock=True
    )
    weight = (await current_spec(session, deployment)).get("rollout", {}).get("canary_weight")
    if weight is None or not 0 < weight < 100:  # 0 and 100 run no canary either (see the controller)
        raise Conflict(f"Revision {deployment.revision} of '{deployment.name}' has no canary to promote")
    deployment.promoted_revision = deployment.revision
    await session.flush()
    await record(
        session,
        principal,
        action="deployment.promoted",
        project_id=project.id,
        object_type="deployment",
        object_id=deployment.id,
        changes={"revision": deployment.revision, "canary_weight": weight},
    )
    return deployment
