"""Where a deployment runs on a cluster: the Kubernetes backend's `PlacementSource`, from the database.

A `DeploymentSpec` says what every replica runs; a cluster also needs the project it runs in
(its namespace and quota), the artifact's digest, address in the object store and format, and
the priority tier (from the project's environment). The runtime may not read the control plane's tables (an import-linter
contract), so the control plane hands it this callable. It lives with the workers because it
reads three domains' repositories, which only their own domain and the workers may import.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import Settings
from converge.control.deployments import repository
from converge.control.library import repository as library_repo
from converge.control.projects import repository as projects_repo
from converge.runtime.base import DeploymentSpec
from converge.runtime.kubernetes.backend import Placement
from converge.runtime.kubernetes.specs import (
    Artifact,
    GpuPlacement,
    PriorityTier,
    ProjectQuota,
    ProjectRef,
)

# The backend asks on every controller pass (about once a second per deployment); a revision's
# placement only changes with its project's quota, which may take this long to reach the cluster.
CACHE_S = 30.0


def tier_of(environment: str) -> PriorityTier:
    """A development project's pods yield to production inference and to builds when the
    cluster is full (and preempt nobody); production and staging serve as production."""
    return PriorityTier.DEVELOPMENT if environment == "development" else PriorityTier.PRODUCTION


class PlacementUnavailable(LookupError):
    """The deployment, its revision, project or model version is not in the database (any more)."""


def artifact_base_uri(settings: Settings) -> str:
    """The library's object store as a URI the pods' fetch step reads: s3://bucket/prefix, or a
    file:// URI of the local artifacts folder (which the nodes must then mount at the same path)."""
    url = settings.library.artifact_store_url
    if url and "://" in url:
        return url
    return Path(url or settings.artifacts_dir).resolve().as_uri()


class DatabasePlacements:
    """`PlacementSource`: a deployment revision's project, quota and artifact, read from the database."""

    def __init__(
        self, *, sessions: Callable[[], AsyncSession], settings: Settings, cache_s: float = CACHE_S
    ) -> None:
        self._sessions, self._settings, self._cache_s = sessions, settings, cache_s
        self._cache: dict[tuple[uuid.UUID, int], tuple[float, Placement]] = {}

    async def __call__(self, spec: DeploymentSpec) -> Placement:
        key = (spec.deployment_id, spec.revision)
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < self._cache_s:
            return cached[1]
        placement = await self._load(spec)
        # One entry per deployment: an older revision's placement is not asked for again.
        self._cache = {k: v for k, v in self._cache.items() if k[0] != spec.deployment_id}
        self._cache[key] = (time.monotonic(), placement)
        return placement

    async def _load(self, spec: DeploymentSpec) -> Placement:
        async with self._sessions() as session:
            deployment = await repository.get(session, spec.deployment_id)
            if deployment is None:
                raise PlacementUnavailable(f"deployment {spec.deployment_id} is not in the database")
            revision = await repository.revision(session, deployment.id, spec.revision)
            if revision is None:
                raise PlacementUnavailable(f"deployment {spec.name} has no revision {spec.revision}")
            project = await projects_repo.get_project(session, deployment.project_id)
            version_id = uuid.UUID(str(revision.spec.get("model_version_id") or deployment.model_version_id))
            version = await library_repo.get_version(session, version_id)
            if project is None or version is None:
                raise PlacementUnavailable(f"the project or model version of {spec.name} is gone")
            return Placement(
                project=ProjectRef(project_id=project.id, name=project.name),
                artifact=Artifact.in_store(
                    base_uri=artifact_base_uri(self._settings),
                    sha256=version.artifact_sha256,
                    format=version.format,
                ),
                quota=ProjectQuota.from_stored(project.quotas or {}),
                # gpus, gpu_type and mig_profile travel in the spec's resources, which the
                # renderers read; no deployment field asks for time-slicing or a memory floor yet.
                gpu=GpuPlacement(),
                autoscaling=None,  # the controller's autoscaler sets spec.replicas
                tier=tier_of(project.environment),
            )
