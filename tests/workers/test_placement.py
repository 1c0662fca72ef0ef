"""workers/placement.py: a deployment revision's placement on a cluster, read from the database: the
project (namespace name and quota), the revision's artifact at its content address in the library's
store, and the tier; cached per revision, refused clearly for what is not there."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from support import ADMIN, make_project

from converge.config import LibrarySettings, Settings
from converge.control.builds.schemas import BuildState
from converge.models import Build, ModelVersion
from converge.runtime.base import DeploymentSpec, ReplicaTemplate, Resources, ServerKind
from converge.runtime.kubernetes.specs import GpuPlacement, PriorityTier, ProjectQuota
from converge.workers.placement import DatabasePlacements, PlacementUnavailable, artifact_base_uri


class _Counting:
    """A session factory that counts the sessions opened (the database reads)."""

    def __init__(self, factory: Any) -> None:
        self.factory, self.opened = factory, 0

    def __call__(self) -> AsyncSession:
        self.opened += 1
        return self.factory()


async def _version(app: Any, client: Any, *, fmt: str = "gguf") -> dict[str, Any]:
    model = (await client.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)).json()
    version = (
        await client.post(
            f"/models/{model['id']}/versions/upload",
            params={"version": f"v-{uuid.uuid4().hex[:6]}", "filename": "weights.bin"},
            content=b"weights " + uuid.uuid4().bytes * 16,
            headers={**ADMIN, "content-type": "application/octet-stream"},
        )
    ).json()
    resp = await client.post("/keys", json={"name": "approver", "role": "library-approver"}, headers=ADMIN)
    approver = {"Authorization": f"Bearer {resp.json()['token']}"}
    async with app.state.converge.session_factory() as session, session.begin():
        (await session.get(ModelVersion, uuid.UUID(version["id"]))).format = fmt
    approved = await client.post(
        f"/models/{model['id']}/versions/{version['id']}/approve", json={}, headers=approver
    )
    assert approved.status_code == 200, approved.text
    return approved.json()


async def _built(app: Any, project: dict[str, Any], version: dict[str, Any]) -> None:
    async with app.state.converge.session_factory() as session, session.begin():
        session.add(
            Build(
                project_id=uuid.UUID(project["id"]),
                model_version_id=uuid.UUID(version["id"]),
                profile="cpu",
                server="llama-cpp",
                state=BuildState.SUCCEEDED,
                results={},
                created_by="test",
            )
        )


def _spec(deployment: dict[str, Any], *, revision: int | None = None) -> DeploymentSpec:
    return DeploymentSpec(
        deployment_id=uuid.UUID(deployment["id"]),
        name=deployment["name"],
        revision=revision or deployment["revision"],
        template=ReplicaTemplate(
            server=ServerKind.LLAMA_CPP, model_name="m", artifact_path="/models/x", resources=Resources()
        ),
        replicas=1,
    )


@pytest.fixture
async def deployed(app: Any, client: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    project = await make_project(client)
    quotas = {"cpu": 8, "memory_bytes": 16 << 30, "gpus": 2}
    patched = await client.patch(f"/projects/{project['id']}", json={"quotas": quotas}, headers=ADMIN)
    assert patched.status_code == 200, patched.text
    version = await _version(app, client)
    await _built(app, project, version)
    body = {"name": "chat", "model_version_id": version["id"], "server": "llama-cpp"}
    resp = await client.post("/deployments", params={"project": project["id"]}, json=body, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return project, version, resp.json()


async def test_a_placement_names_the_project_its_quota_and_the_versions_artifact(
    app: Any, deployed: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
) -> None:
    project, version, deployment = deployed
    state = app.state.converge
    placements = DatabasePlacements(sessions=state.session_factory, settings=state.settings)

    placement = await placements(_spec(deployment))

    assert (placement.project.project_id, placement.project.name) == (
        uuid.UUID(project["id"]),
        project["name"],
    )
    assert placement.quota == ProjectQuota(cpu=8, memory_bytes=16 << 30, gpus=2)
    sha = version["artifact_sha256"]
    assert placement.artifact.sha256 == sha and placement.artifact.format == "gguf"
    assert (
        placement.artifact.uri == f"{state.settings.artifacts_dir.resolve().as_uri()}/sha256/{sha[:2]}/{sha}"
    )
    assert placement.tier is PriorityTier.PRODUCTION
    assert placement.autoscaling is None  # the controller scales
    assert placement.gpu == GpuPlacement() and placement.runtime is None


async def test_a_development_projects_pods_take_the_development_priority_tier(
    app: Any, client: Any, deployed: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
) -> None:
    project, _, deployment = deployed
    state = app.state.converge
    tiers = {}
    for environment in ("staging", "development", "production"):
        marked = await client.patch(
            f"/projects/{project['id']}", json={"environment": environment}, headers=ADMIN
        )
        assert marked.status_code == 200, marked.text
        placements = DatabasePlacements(sessions=state.session_factory, settings=state.settings)  # no cache
        tiers[environment] = (await placements(_spec(deployment))).tier
    assert tiers == {
        "staging": PriorityTier.PRODUCTION,
        "development": PriorityTier.DEVELOPMENT,  # yields to production and builds, preempts nobody
        "production": PriorityTier.PRODUCTION,
    }


async def test_each_revision_gets_its_own_versions_artifact(
    app: Any, client: Any, deployed: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
) -> None:
    project, first, deployment = deployed
    second = await _version(app, client)
    await _built(app, project, second)
    patched = await client.patch(
        f"/deployments/{deployment['id']}", json={"model_version_id": second["id"]}, headers=ADMIN
    )
    assert patched.json()["revision"] == 2, patched.text
    state = app.state.converge
    placements = DatabasePlacements(sessions=state.session_factory, settings=state.settings)

    old = await placements(_spec(deployment, revision=1))
    new = await placements(_spec(deployment, revision=2))

    assert old.artifact.sha256 == first["artifact_sha256"]
    assert new.artifact.sha256 == second["artifact_sha256"]


async def test_a_revisions_placement_is_read_once_while_it_is_fresh(
    app: Any, deployed: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
) -> None:
    _, _, deployment = deployed
    state = app.state.converge
    sessions = _Counting(state.session_factory)
    cached = DatabasePlacements(sessions=sessions, settings=state.settings)
    uncached = DatabasePlacements(sessions=sessions, settings=state.settings, cache_s=0)

    for _ in range(3):
        await cached(_spec(deployment))
    assert sessions.opened == 1
    for _ in range(2):
        await uncached(_spec(deployment))
    assert sessions.opened == 3


async def test_what_is_not_in_the_database_is_refused_with_what_is_missing(
    app: Any, deployed: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]
) -> None:
    _, _, deployment = deployed
    state = app.state.converge
    placements = DatabasePlacements(sessions=state.session_factory, settings=state.settings)

    with pytest.raises(PlacementUnavailable, match="has no revision 7"):
        await placements(_spec(deployment, revision=7))
    gone = {**deployment, "id": str(uuid.uuid4())}
    with pytest.raises(PlacementUnavailable, match="not in the database"):
        await placements(_spec(gone))


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        ("s3://bucket/library", "s3://bucket/library"),
        ("file:///srv/artifacts", "file:///srv/artifacts"),
        ("/srv/artifacts", "file:///srv/artifacts"),
        (None, "file:///data/artifacts"),
    ],
)
def test_the_artifact_base_is_the_library_stores_uri(store: str | None, expected: str) -> None:
    settings = Settings(data_dir=Path("/data"), library=LibrarySettings(artifact_store_url=store))
    assert artifact_base_uri(settings) == expected
