"""The model-objects worker against the fake Kubernetes API and the real library: approved
versions appear as `Model` objects in the namespaces of the projects that may use them, and go
when they stop being approved or their project goes; what Converge did not write is left alone;
a pass the API cut short is finished by the next one; one leader writes, woken by library events.

The library is driven through the HTTP API in a transaction that is rolled back; the worker reads
it through sessions on the same connection.
"""

from __future__ import annotations

import copy
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import psycopg
import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from support import ADMIN, eventually, make_project

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime" / "kubernetes"))
from fake_api import Actor, FakeKubeApi  # noqa: E402
from kube_support import fast_config  # noqa: E402

from converge.models import Event  # noqa: E402
from converge.runtime.kubernetes.client import KubeClient, ObjectRef, TransientApiError  # noqa: E402
from converge.runtime.kubernetes.labels import project_labels  # noqa: E402
from converge.runtime.kubernetes.manifests import namespace_name  # noqa: E402
from converge.runtime.kubernetes.model_cr import model_object_name  # noqa: E402
from converge.runtime.kubernetes.specs import ClusterProfile, ProjectRef  # noqa: E402
from converge.workers.model_objects import ModelObjects  # noqa: E402

CLUSTER = ClusterProfile(namespace_prefix="converge-")
BASE_URI = "s3://converge-artifacts/library"
MODEL = ("converge.dev/v1alpha1", "Model")
CRD_PATH = Path(__file__).resolve().parents[2] / "deploy" / "crds" / "models.converge.dev.yaml"
Headers = dict[str, str]


@dataclass
class World:
    client: httpx.AsyncClient
    sessions: async_sessionmaker[AsyncSession]
    api: FakeKubeApi
    kube: KubeClient
    conninfo: str
    uploader: Headers
    approver: Headers

    def worker(self, **overrides: Any) -> ModelObjects:
        values: dict[str, Any] = {
            "sessions": self.sessions,
            "kube": self.kube,
            "cluster": CLUSTER,
            "conninfo": self.conninfo,
            "artifact_base_uri": BASE_URI,
            **overrides,
        }
        return ModelObjects(**values)

    async def project(self, *, namespace: bool = True) -> dict[str, Any]:
        """A project, and its namespace as the deployment backend applies it (its labels)."""
        project = await make_project(self.client)
        if namespace:
            ref = ProjectRef(project_id=uuid.UUID(project["id"]), name=project["name"])
            meta = {"name": ns(project), "labels": project_labels(ref)}
            await self.kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
        return project

    async def model(self, **fields: Any) -> dict[str, Any]:
        body = {"name": f"mo-{uuid.uuid4().hex[:10]}", **fields}
        resp = await self.client.post("/models", json=body, headers=ADMIN)
        assert resp.status_code == 201, resp.text
        return resp.json()

    async def approved(self, model: dict[str, Any], version: str = "v1") -> dict[str, Any]:
        resp = await self.client.post(
            f"/models/{model['id']}/versions/upload",
            params={"version": version, "filename": "weights.dat"},
            content=b"no model format, only bytes: " + uuid.uuid4().bytes,
            headers={**self.uploader, "Content-Type": "application/octet-stream"},
        )
        assert resp.status_code == 201 and resp.json()["state"] == "pending_approval", resp.text
        approved = await self.verdict(resp.json(), "approve", note="scan clean")
        assert approved["state"] == "approved"
        return approved

    async def verdict(
        self, version: dict[str, Any], action: str, note: str = "by the test"
    ) -> dict[str, Any]:
        path = f"/models/{version['model_id']}/versions/{version['id']}/{action}"
        resp = await self.client.post(path, json={"note": note}, headers=self.approver)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def models_in(self, namespace: str) -> dict[str, dict[str, Any]]:
        return {o["metadata"]["name"]: o for o in self.api.objects(*MODEL, namespace)}


def ns(project: dict[str, Any]) -> str:
    return namespace_name(
        ProjectRef(project_id=uuid.UUID(project["id"]), name=project["name"]), cluster=CLUSTER
    )


def mine(refs: list[ObjectRef], model: dict[str, Any]) -> list[ObjectRef]:
    """The objects of this test's model (the database may hold other tests' committed ones)."""
    return [r for r in refs if r.name.startswith(model["name"])]


def name_of(model: dict[str, Any], version: dict[str, Any]) -> str:
    return model_object_name(model["name"], version["version"])


async def _org_key(client: httpx.AsyncClient, role: str) -> Headers:
    resp = await client.post("/keys", json={"name": f"{role}-key", "role": role}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


@pytest.fixture
async def world(app: Any) -> AsyncIterator[World]:
    state = app.state.converge
    api = FakeKubeApi(kserve=False, bookmark_interval_s=0.05)
    await api.start()
    kube = KubeClient(fast_config(api))
    async with state.engine.connect() as conn:
        outer = await conn.begin()
        sessions = async_sessionmaker(
            bind=conn, expire_on_commit=False, join_transaction_mode="create_savepoint"
        )
        state.session_factory = sessions
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
                yield World(
                    client=c,
                    sessions=sessions,
                    api=api,
                    kube=kube,
                    conninfo=state.database.url.replace("postgresql+psycopg://", "postgresql://"),
                    uploader=await _org_key(c, "admin"),  # not the approver: separation of duties
                    approver=await _org_key(c, "library-approver"),
                )
        finally:
            state.session_factory = None
            await outer.rollback()
            await kube.close()
            await api.stop()


@pytest.fixture(scope="module")
def model_schema() -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    (version,) = crd["spec"]["versions"]
    return jsonschema.Draft202012Validator(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


# --- publishing --------------------------------------------------------------------------------


async def test_an_approved_public_version_appears_in_every_project_namespace(
    world: World, model_schema: jsonschema.Draft202012Validator
) -> None:
    a, b = await world.project(), await world.project()
    later = await world.project(namespace=False)  # no deployment yet: no namespace yet
    model = await world.model()
    version = await world.approved(model)
    worker = world.worker()

    result = await worker.sync()

    name = name_of(model, version)
    for project in (a, b):
        obj = world.models_in(ns(project))[name]
        assert not list(model_schema.iter_errors(obj))
        assert obj["spec"]["versionId"] == version["id"]
        assert obj["spec"]["visibility"] == "public" and obj["spec"]["projects"] == []
        assert obj["spec"]["approvals"][0]["note"] == "scan clean"
        assert obj["metadata"]["labels"]["converge.dev/version-id"] == version["id"]
    assert ns(later) in result.waiting
    assert ObjectRef(api_version=MODEL[0], kind=MODEL[1], namespace=ns(a), name=name) in result.applied


async def test_a_second_pass_writes_nothing_but_undoes_a_hand_edit(world: World) -> None:
    a = await world.project()
    model = await world.model()
    version = await world.approved(model)
    worker = world.worker()
    await worker.sync()
    rv = world.api.resource_version

    again = await worker.sync()

    assert again.applied == again.deleted == [] and again.unchanged >= 1
    assert world.api.resource_version == rv  # not even a no-op apply was sent
    name = name_of(model, version)
    obj = world.models_in(ns(a))[name]
    async with Actor(world.api, "kubectl-edit") as person:
        await person.merge(obj, {"spec": {"format": "onnx"}})

    healed = await worker.sync()

    assert [r.name for r in mine(healed.applied, model)] == [name]
    assert world.models_in(ns(a))[name]["spec"]["format"] == obj["spec"]["format"]


async def test_a_restricted_version_appears_only_for_its_projects_and_names_only_that_project(
    world: World,
) -> None:
    a, b, c = await world.project(), await world.project(), await world.project()
    model = await world.model(visibility="restricted", projects=[a["id"], b["id"]])
    version = await world.approved(model)

    await world.worker().sync()

    name = name_of(model, version)
    assert world.models_in(ns(a))[name]["spec"]["projects"] == [a["id"]]
    assert world.models_in(ns(b))[name]["spec"]["projects"] == [b["id"]]
    assert name not in world.models_in(ns(c))


async def test_versions_that_are_not_approved_get_no_object(world: World) -> None:
    a = await world.project()
    model = await world.model()
    resp = await world.client.post(
        f"/models/{model['id']}/versions/upload",
        params={"version": "pending", "filename": "weights.dat"},
        content=b"bytes " + uuid.uuid4().bytes,
        headers={**world.uploader, "Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 201 and resp.json()["state"] == "pending_approval"

    await world.worker().sync()

    assert model_object_name(model["name"], "pending") not in world.models_in(ns(a))


# --- removing ----------------------------------------------------------------------------------


async def test_revoked_and_deprecated_versions_are_removed(world: World) -> None:
    a, b = await world.project(), await world.project()
    model = await world.model()
    revoked, deprecated, kept = [await world.approved(model, v) for v in ("v1", "v2", "v3")]
    worker = world.worker()
    await worker.sync()
    assert {name_of(model, v) for v in (revoked, deprecated, kept)} <= set(world.models_in(ns(a)))

    await world.verdict(revoked, "revoke", note="licence withdrawn")
    await world.verdict(deprecated, "deprecate")
    result = await worker.sync()

    for project in (a, b):
        names = set(world.models_in(ns(project)))
        assert name_of(model, kept) in names
        assert not names & {name_of(model, revoked), name_of(model, deprecated)}
    assert len(mine(result.deleted, model)) == 4


async def test_a_model_restricted_away_from_a_project_leaves_its_namespace(world: World) -> None:
    a, b = await world.project(), await world.project()
    model = await world.model()
    version = await world.approved(model)
    worker = world.worker()
    await worker.sync()
    assert name_of(model, version) in world.models_in(ns(b))

    resp = await world.client.patch(
        f"/models/{model['id']}", json={"visibility": "restricted", "projects": [a["id"]]}, headers=ADMIN
    )
    assert resp.status_code == 200, resp.text
    await worker.sync()

    assert name_of(model, version) in world.models_in(ns(a))
    assert name_of(model, version) not in world.models_in(ns(b))


async def test_the_objects_of_a_deleted_project_are_removed(world: World) -> None:
    a, gone = await world.project(), await world.project()
    model = await world.model()
    version = await world.approved(model)
    worker = world.worker()
    await worker.sync()
    assert name_of(model, version) in world.models_in(ns(gone))

    assert (await world.client.delete(f"/projects/{gone['id']}", headers=ADMIN)).status_code == 204
    await worker.sync()

    assert world.models_in(ns(gone)) == {}
    assert name_of(model, version) in world.models_in(ns(a))


async def test_models_converge_did_not_write_are_never_touched(world: World) -> None:
    a = await world.project()
    model = await world.model()
    version, revoked = await world.approved(model, "v1"), await world.approved(model, "v2")
    await world.verdict(revoked, "revoke", note="unsafe")
    # A person's objects: one that carries Converge's labels for a revoked version (it must not
    # be pruned), and one with the very name Converge would write (it must not be taken over).
    labels = {
        "app.kubernetes.io/managed-by": "converge",
        "converge.dev/version-id": revoked["id"],
    }
    theirs = {"apiVersion": MODEL[0], "kind": MODEL[1], "spec": {"modelName": "hand-made"}}
    async with Actor(world.api, "kubectl-client-side-apply") as person:
        lookalike = await person.create(
            {**theirs, "metadata": {"name": "lookalike", "namespace": ns(a), "labels": labels}}
        )
        squatter = await person.create(
            {**theirs, "metadata": {"name": name_of(model, version), "namespace": ns(a)}}
        )

    result = await world.worker().sync()

    now = world.models_in(ns(a))
    assert now["lookalike"] == lookalike
    assert now[name_of(model, version)] == squatter
    assert [r.name for r in result.foreign] == [name_of(model, version)]
    assert mine(result.deleted, model) == mine(result.applied, model) == []


# --- failures ----------------------------------------------------------------------------------


async def test_an_api_outage_mid_pass_is_finished_by_the_next_pass(world: World) -> None:
    a, b = await world.project(), await world.project()
    model = await world.model()
    version = await world.approved(model)
    worker = world.worker()
    name = name_of(model, version)
    first, second = sorted([ns(a), ns(b)])
    # Every try of the second namespace's apply fails; the first was already written.
    world.api.faults.fail(503, count=3, method="PATCH", path=f"/namespaces/{second}/models/")

    with pytest.raises(TransientApiError):
        await worker.sync()

    assert name in world.models_in(first) and name not in world.models_in(second)
    assert await worker._pass() is True  # the next pass: the API answers again
    assert name in world.models_in(second) and worker.error is None


async def test_a_pass_during_an_outage_fails_and_says_why(world: World) -> None:
    await world.project()
    model = await world.model()
    await world.approved(model)
    worker = world.worker()
    world.api.faults.down(drop=False)

    assert await worker._pass() is False
    assert worker.error is not None and "503" in worker.error

    world.api.faults.up()
    assert await worker._pass() is True and worker.error is None


async def test_a_namespace_that_vanishes_mid_pass_does_not_break_the_pass(world: World) -> None:
    a, b = await world.project(), await world.project()
    model = await world.model()
    version = await world.approved(model)
    first, second = sorted([ns(a), ns(b)])
    # The namespace is listed, then gone when its object is applied.
    world.api.faults.fail(404, count=1, method="PATCH", path=f"/namespaces/{first}/models/")

    result = await world.worker().sync()

    assert first in result.waiting
    assert name_of(model, version) in world.models_in(second)


async def test_a_cluster_without_the_model_crd_is_skipped_not_failed(world: World) -> None:
    await world.project()
    await world.approved(await world.model())
    del world.api.kinds[("converge.dev", "v1alpha1", "models")]  # the CRD is not installed

    assert await world.worker()._pass() is True


# --- leadership and wakes ----------------------------------------------------------------------


async def test_one_leader_publishes_and_a_library_event_wakes_it(world: World) -> None:
    a = await world.project()
    model = await world.model()
    version = await world.approved(model)
    name = name_of(model, version)
    # A long interval: anything after the first pass is the wake's doing.
    workers = [world.worker(interval_s=600), world.worker(interval_s=600)]
    for worker in workers:
        await worker.start()
    try:
        await eventually(lambda: name in world.models_in(ns(a)))
        await eventually(lambda: any(w.passes for w in workers))
        leader = next(w for w in workers if w.is_leader)
        assert [w.is_leader for w in workers].count(True) == 1
        passes = leader.passes

        await world.verdict(version, "revoke", note="licence withdrawn")
        # The revocation's event is in the rolled-back transaction; its NOTIFY would come at
        # commit, which never happens here, so the test sends it as the commit would.
        async with world.sessions() as session:
            event_id = await session.scalar(
                select(Event.id).where(
                    Event.object_id == version["id"], Event.kind == "model_version.revoked"
                )
            )
        assert event_id is not None
        async with await psycopg.AsyncConnection.connect(world.conninfo, autocommit=True) as conn:
            await conn.execute("SELECT pg_notify('converge_events', %s)", (str(event_id),))

        await eventually(lambda: name not in world.models_in(ns(a)))
        assert leader.passes > passes
        assert all(w.healthy for w in workers)
    finally:
        for worker in workers:
            await worker.stop()
