"""Builds: queue, cancel, and the state transitions the runner reports."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.builds import repository
from converge.control.builds.schemas import FINAL, BuildCreate, BuildState
from converge.control.deployments.admission import server_for
from converge.control.events.service import record
from converge.control.library import repository as library_repo
from converge.control.projects.principal import Principal
from converge.control.projects.service import visible_project
from converge.core.lifecycle import SERVABLE
from converge.errors import Conflict, NotFound, Unprocessable
from converge.models import Build


async def create(session: AsyncSession, principal: Principal | None, *, body: BuildCreate) -> Build:
    if principal is not None:
        await visible_project(session, principal, body.project_id, permission="builds:write")
    version = await library_repo.get_version(session, body.model_version_id)
    model = await library_repo.get_model(session, version.model_id) if version else None
    if (
        version is None
        or model is None
        or (model.visibility != "public" and body.project_id not in model.projects)
    ):
        raise Unprocessable(
            f"model_version_id: no model version {body.model_version_id} is visible",
            extra={"field": "model_version_id"},
        )
    if version.state not in SERVABLE:
        raise Conflict(
            f"Only approved versions are built; '{model.name}:{version.version}' is '{version.state}'"
        )
    build = Build(
        project_id=body.project_id,
        model_version_id=version.id,
        profile=body.profile,
        server=server_for(version, body.server).value,
        state=BuildState.QUEUED,
        results={},
        created_by=principal.subject if principal else "system",
    )
    session.add(build)
    await session.flush()
    await _event(session, principal, build, BuildState.QUEUED, model=model.name, version=version.version)
    return build


async def _event(
    session: AsyncSession, principal: Principal | None, build: Build, state: BuildState, **extra: Any
) -> None:
    await record(
        session,
        principal,
        action=f"build.{state.value}",
        project_id=build.project_id,
        object_type="build",
        object_id=build.id,
        changes={"version_id": str(build.model_version_id), "profile": build.profile, **extra},
    )


async def get(session: AsyncSession, build_id: uuid.UUID) -> Build | None:
    return await repository.get(session, build_id)


async def page(
    session: AsyncSession,
    principal: Principal,
    *,
    limit: int,
    state: BuildState | None,
    after: uuid.UUID | None,
) -> list[Build]:
    """The builds the principal sees, in id order after `after`."""
    return await repository.page(
        session, limit=limit, projects=principal.visible_projects, state=state, after=after
    )


async def visible_build(
    session: AsyncSession, principal: Principal, build_id: uuid.UUID, *, permission: str
) -> Build:
    build = await repository.get(session, build_id)
    if build is None or not principal.sees(build.project_id):
        raise NotFound(f"Build {build_id} not found")
    await visible_project(session, principal, build.project_id, permission=permission)
    return build


async def cancel(session: AsyncSession, principal: Principal, *, build_id: uuid.UUID) -> Build:
    build = await visible_build(session, principal, build_id, permission="builds:write")
    if build.state in FINAL:
        raise Conflict(f"Build already {build.state}")
    build.cancel_requested = True
    if build.state == BuildState.QUEUED:
        await finish(session, build, BuildState.CANCELLED, reason=f"cancelled by {principal.subject}")
    await session.flush()
    return build


async def claim_next(session: AsyncSession) -> Build | None:
    """Take the oldest queued build; SKIP LOCKED lets several runners share the queue."""
    build = await repository.lock_oldest_queued(session)
    if build is None:
        return None
    build.state = BuildState.RUNNING
    build.started_at = datetime.now(UTC)
    await session.flush()
    await _event(session, None, build, BuildState.RUNNING)
    return build


async def finish(
    session: AsyncSession,
    build: Build,
    state: BuildState,
    *,
    reason: str = "",
    results: dict[str, Any] | None = None,
) -> None:
    build.state = state
    build.reason = reason
    build.finished_at = datetime.now(UTC)
    if results is not None:
        build.results = results
    await session.flush()
    await _event(session, None, build, state, reason=reason)
    if state == BuildState.SUCCEEDED and results:
        version = await library_repo.get_version(session, build.model_version_id, lock=True)
        if version is not None:  # the latest figures, where deployment policies read them
            figures = {k: v for k, v in results.items() if not k.startswith("mlflow_")}  # the build's own
            version.benchmarks = {**version.benchmarks, **figures, "profile": build.profile}
            await session.flush()


async def running(session: AsyncSession) -> list[Build]:
    """The builds a runner has claimed and not finished (a Kubernetes runner adopts them)."""
    return await repository.running(session)


async def requeue_interrupted(session: AsyncSession) -> int:
    """Builds left running by a runner that died go back to the queue."""
    return await repository.requeue_running(session)
