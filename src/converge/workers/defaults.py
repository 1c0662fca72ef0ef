"""The embedded default: built-in models approved, built and deployed, so a new user can chat.

Runs once after the catalogue is seeded: ensures a `default` project, queues a `cpu` build
of each built-in version, and deploys each one whose build succeeded. Every step goes through
the same admission (policies, quota, zones) as a user's request, and is idempotent.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.config import Settings
from converge.control.builds import repository as builds_repo
from converge.control.builds import service as builds
from converge.control.builds.schemas import FINAL, BuildCreate, BuildState
from converge.control.deployments import repository as deployments_repo
from converge.control.deployments import service as deployments
from converge.control.deployments.schemas import DeploymentCreate, ResourcesIn
from converge.control.library import repository as library_repo
from converge.control.projects import repository as projects_repo
from converge.control.projects.schemas import ProjectCreate
from converge.control.projects.service import create_project
from converge.core.lifecycle import SERVABLE
from converge.kit.service import Service
from converge.models import Build, Project
from converge.runtime.base import RuntimeBackend
from converge.storage.db import transaction

log = structlog.get_logger(__name__)
DEFAULT_PROJECT = "default"


@dataclass(frozen=True)
class DefaultDeployment:
    deployment: str
    model: str
    memory_bytes: int


DEFAULTS = (
    DefaultDeployment(deployment="smollm2", model="smollm2-135m-instruct", memory_bytes=2 << 30),
    DefaultDeployment(deployment="minilm", model="all-minilm-l6-v2", memory_bytes=2 << 30),
)


class DefaultDeployer(Service):
    name = "default-deployments"

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        runtime: RuntimeBackend,
        after: asyncio.Task | None = None,
    ) -> None:
        super().__init__()
        self._sessions, self._settings, self._runtime, self._after = sessions, settings, runtime, after
        self.error: str | None = None

    @property
    def healthy(self) -> bool:  # a one-shot: done is fine, failed is not
        return self.error is None

    async def _run(self) -> None:
        try:
            if self._after is not None:
                await self._after
            project = await self._project()
            for item in DEFAULTS:
                await self._ensure(project, item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = str(exc)
            log.exception("default_deployments_failed")

    async def _project(self) -> Project:
        async with transaction(self._sessions) as session:
            project = await projects_repo.project_by_name(session, DEFAULT_PROJECT)
            if project is None:
                project = await create_project(
                    session,
                    None,
                    body=ProjectCreate(
                        name=DEFAULT_PROJECT, description="Created on first start for the built-in models"
                    ),
                )
            return project

    async def _ensure(self, project: Project, item: DefaultDeployment) -> None:
        async with self._sessions() as session:
            if await deployments_repo.by_name(session, project.id, item.deployment) is not None:
                return
            model = await library_repo.model_by_name(session, item.model)
            versions = await library_repo.list_versions(session, model.id, limit=100) if model else []
        servable = [v for v in versions if v.state in SERVABLE]
        if not servable:
            log.info("default_deployment_skipped", model=item.model, reason="no approved version")
            return
        version = servable[-1]
        build = await self._build(project, version.id)
        if build.state != BuildState.SUCCEEDED:
            log.warning(
                "default_deployment_skipped", model=item.model, reason=f"build {build.state}: {build.reason}"
            )
            return
        async with transaction(self._sessions) as session:
            body = DeploymentCreate(
                name=item.deployment,
                model_version_id=version.id,
                resources=ResourcesIn(cpu=1.0, memory_bytes=item.memory_bytes),
            )
            await deployments.create(
                session,
                None,
                project=project,
                body=body,
                zones=await self._runtime.zones(),
                settings=self._settings,
            )
        log.info("default_deployment_created", deployment=item.deployment, model=item.model)

    async def _build(self, project: Project, version_id: uuid.UUID) -> Build:
        async with transaction(self._sessions) as session:
            existing = [
                b
                for b in await builds_repo.for_version(session, version_id, profile="cpu")
                if b.state != BuildState.FAILED
            ]
            build = (
                existing[-1]
                if existing
                else await builds.create(
                    session,
                    None,
                    body=BuildCreate(project_id=project.id, model_version_id=version_id, profile="cpu"),
                )
            )
            build_id = build.id
        while True:
            async with self._sessions() as session:
                current = await builds_repo.get(session, build_id)
            assert current is not None
            if current.state in FINAL:
                return current
            await asyncio.sleep(1.0)
