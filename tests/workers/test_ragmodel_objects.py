"""The RAGModel reconciler against the fake Kubernetes API and the real RAG models service: an
object a person applies in a project's namespace becomes the project's RAG model, with the spec
the API would store, and says so in its status; what admission refuses says why and writes
nothing; an API-made RAG model is never taken over; a deleted object's RAG model goes; a pass over
nothing new writes no status; a namespace that is not a project's is left alone.

The project data is made in a transaction that is rolled back; the worker reads and writes it
through sessions on the same connection (savepoints).
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
import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from support import ADMIN, eventually, make_project

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime" / "kubernetes"))
from fake_api import Actor, FakeKubeApi  # noqa: E402
from kube_support import fast_config  # noqa: E402

from converge.models import (  # noqa: E402
    Artifact,
    Deployment,
    DeploymentRevision,
    KnowledgeBase,
    LibraryModel,
    ModelVersion,
    RagModel,
    RagModelRevision,
)
from converge.runtime.kubernetes.client import KubeClient, TransientApiError  # noqa: E402
from converge.runtime.kubernetes.labels import project_labels  # noqa: E402
from converge.runtime.kubernetes.manifests import namespace_name  # noqa: E402
from converge.runtime.kubernetes.specs import ClusterProfile, ProjectRef  # noqa: E402
from converge.workers.ragmodel_objects import RagModelObjects, subject_for  # noqa: E402

CLUSTER = ClusterProfile(namespace_prefix="converge-")
RAGMODEL = ("converge.dev/v1alpha1", "RAGModel")
CRD_PATH = Path(__file__).resolve().parents[2] / "deploy" / "crds" / "ragmodels.converge.dev.yaml"
Obj = dict[str, Any]


@dataclass
class Project:
    id: uuid.UUID
    name: str
    namespace: str
    chat: str  # a chat deployment's name
    kb: str  # a knowledge base's name


@dataclass
class World:
    client: httpx.AsyncClient
    sessions: async_sessionmaker[AsyncSession]
    api: FakeKubeApi
    kube: KubeClient
    conninfo: str

    def worker(self, **overrides: Any) -> RagModelObjects:
        values: dict[str, Any] = {
            "sessions": self.sessions,
            "kube": self.kube,
            "cluster": CLUSTER,
            "conninfo": self.conninfo,
            **overrides,
        }
        return RagModelObjects(**values)

    async def project(self, *, labelled: bool = True) -> Project:
        """A project with a chat deployment and a knowledge base, and its namespace as the
        deployment backend applies it (with Converge's labels), or a bare one of that name."""
        made = await make_project(self.client)
        ref = ProjectRef(project_id=uuid.UUID(made["id"]), name=made["name"])
        namespace = namespace_name(ref, cluster=CLUSTER)
        meta: Obj = {"name": namespace, **({"labels": project_labels(ref)} if labelled else {})}
        await self.kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
        chat, kb = f"chat-{uuid.uuid4().hex[:6]}", f"kb-{uuid.uuid4().hex[:6]}"
        await self.deployment(ref.project_id, name=chat)
        async with self.sessions() as session, session.begin():
            session.add(
                KnowledgeBase(
                    project_id=ref.project_id,
                    name=kb,
                    dimension=384,
                    max_tokens=256,
                    metadata_keys=["topic"],
                    created_by="test",
                )
            )
        return Project(id=ref.project_id, name=ref.name, namespace=namespace, chat=chat, kb=kb)

    async def deployment(self, project_id: uuid.UUID, *, name: str) -> None:
        sha = uuid.uuid4().hex * 2
        model_id, version_id, deployment_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        async with self.sessions() as session, session.begin():
            session.add(Artifact(sha256=sha, size_bytes=1))
            session.add(LibraryModel(id=model_id, name=f"m-{uuid.uuid4().hex[:8]}", created_by="test"))
            await session.flush()
            session.add(
                ModelVersion(
                    id=version_id,
                    model_id=model_id,
                    version="v1",
                    state="approved",
                    artifact_sha256=sha,
                    submitted_by="test",
                )
            )
            await session.flush()
            session.add(
                Deployment(
                    id=deployment_id,
                    project_id=project_id,
                    name=name,
                    model_version_id=version_id,
                    created_by="test",
                )
            )
            await session.flush()
            session.add(
                DeploymentRevision(
                    deployment_id=deployment_id, revision=1, spec={"server": "llama-cpp"}, created_by="test"
                )
            )

    async def rag_model(self, project: Project, name: str) -> RagModel | None:
        async with self.sessions() as session:
            return await session.scalar(
                select(RagModel).where(RagModel.project_id == project.id, RagModel.name == name)
            )

    async def revisions(self, row: RagModel) -> list[RagModelRevision]:
        async with self.sessions() as session:
            q = select(RagModelRevision).where(RagModelRevision.rag_model_id == row.id)
            return list(await session.scalars(q.order_by(RagModelRevision.revision)))

    def get(self, project: Project, name: str) -> Obj:
        obj = self.api.get(*RAGMODEL, name, project.namespace)
        assert obj is not None
        return obj

    def status_writes(self) -> list[str]:
        return [r.path for r in self.api.requests if r.method == "PATCH" and r.path.endswith("/status")]


def ragmodel(project: Project, name: str, **spec: Any) -> Obj:
    return {
        "apiVersion": RAGMODEL[0],
        "kind": RAGMODEL[1],
        "metadata": {"name": name, "namespace": project.namespace},
        "spec": {"chatDeployment": project.chat, "knowledgeBases": [project.kb], **spec},
    }


def accepted(obj: Obj) -> Obj:
    (condition,) = [c for c in obj["status"]["conditions"] if c["type"] == "Accepted"]
    return dict(condition)


async def kubectl_apply(api: FakeKubeApi, obj: Obj) -> Obj:
    async with Actor(api, "kubectl") as person:
        code, body = await person.apply(obj)
    assert code in (200, 201), body
    return body


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
                )
        finally:
            state.session_factory = None
            await outer.rollback()
            await kube.close()
            await api.stop()


@pytest.fixture(scope="module")
def status_schema() -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    return jsonschema.Draft202012Validator(copy.deepcopy(schema))


# --- accepted objects ----------------------------------------------------------------------------


async def test_a_valid_object_becomes_the_rag_model_the_api_would_store(
    world: World, status_schema: jsonschema.Draft202012Validator
) -> None:
    p = await world.project()
    spec = {"retrieval": {"k": 3, "mode": "vector", "minScore": 0.25, "filters": {"topic": "ops"}}}
    await kubectl_apply(world.api, ragmodel(p, "support", **spec))

    result = await world.worker().sync()

    row = await world.rag_model(p, "support")
    assert row is not None and row.revision == 1
    assert row.created_by == subject_for(namespace=p.namespace, name="support")
    twin = await world.client.post(
        "/rag/models",
        params={"project": str(p.id)},
        json={
            "name": "api-twin",
            "chat_deployment": p.chat,
            "knowledge_bases": [p.kb],
            "retrieval": {"k": 3, "mode": "vector", "min_score": 0.25, "filters": {"topic": "ops"}},
        },
        headers=ADMIN,
    )
    assert twin.status_code == 201, twin.text
    assert row.spec == twin.json()["spec"]  # the same desired state, ids and names resolved
    obj = world.get(p, "support")
    assert not list(status_schema.iter_errors(obj["status"]))
    condition = accepted(obj)
    assert condition["status"] == "True" and condition["reason"] == "Applied"
    assert "revision 1" in condition["message"] and condition["observedGeneration"] == 1
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] == 1
    assert [r.name for r in result.applied] == ["support"] and result.statuses_written == 1
    # Converge owns the status, the person the spec.
    managers = {(f["manager"], f.get("subresource", "")) for f in obj["metadata"]["managedFields"]}
    assert {("kubectl", ""), ("converge", "status")} <= managers


async def test_a_change_to_the_object_is_a_new_revision(world: World) -> None:
    p = await world.project()
    obj = ragmodel(p, "support")
    await kubectl_apply(world.api, obj)
    worker = world.worker()
    await worker.sync()
    before = accepted(world.get(p, "support"))

    obj["spec"]["retrieval"] = {"k": 9}
    await kubectl_apply(world.api, obj)
    await worker.sync()

    row = await world.rag_model(p, "support")
    assert row is not None and row.revision == 2 and row.spec["retrieval"]["k"] == 9
    assert [r.revision for r in await world.revisions(row)] == [1, 2]
    after = world.get(p, "support")
    assert after["status"]["observedGeneration"] == 2
    condition = accepted(after)
    assert "revision 2" in condition["message"] and condition["observedGeneration"] == 2
    assert condition["lastTransitionTime"] == before["lastTransitionTime"]  # still True


async def test_a_second_pass_over_nothing_new_writes_no_status_and_no_revision(world: World) -> None:
    p = await world.project()
    await kubectl_apply(world.api, ragmodel(p, "support"))
    await kubectl_apply(world.api, ragmodel(p, "broken", retrieval={"k": 0}))
    worker = world.worker()
    await worker.sync()
    assert len(world.status_writes()) == 2
    rv = world.api.resource_version

    again = await worker.sync()

    assert again.statuses_written == 0 and len(world.status_writes()) == 2
    assert world.api.resource_version == rv
    row = await world.rag_model(p, "support")
    assert row is not None and row.revision == 1


# --- refused objects -----------------------------------------------------------------------------


async def test_an_unknown_knowledge_base_is_refused_with_the_reason_and_writes_nothing(
    world: World, status_schema: jsonschema.Draft202012Validator
) -> None:
    p = await world.project()
    await kubectl_apply(world.api, ragmodel(p, "support", knowledgeBases=["nowhere"]))

    result = await world.worker().sync()

    assert await world.rag_model(p, "support") is None
    obj = world.get(p, "support")
    assert not list(status_schema.iter_errors(obj["status"]))
    condition = accepted(obj)
    assert condition["status"] == "False" and condition["reason"] == "NotFound"
    assert "no knowledge base 'nowhere'" in condition["message"]
    assert obj["status"]["observedGeneration"] == 1
    assert list(result.refused.values()) == ["NotFound"]


async def test_a_refused_object_is_accepted_once_what_it_names_exists(world: World) -> None:
    p = await world.project()
    obj = ragmodel(p, "support", knowledgeBases=["later"])
    await kubectl_apply(world.api, obj)
    worker = world.worker()
    await worker.sync()
    assert accepted(world.get(p, "support"))["status"] == "False"

    async with world.sessions() as session, session.begin():
        session.add(
            KnowledgeBase(project_id=p.id, name="later", dimension=384, max_tokens=256, created_by="t")
        )
    await worker.sync()

    assert accepted(world.get(p, "support"))["reason"] == "Applied"
    assert await world.rag_model(p, "support") is not None


async def test_an_invalid_spec_is_refused_with_every_reason(world: World) -> None:
    p = await world.project()
    await kubectl_apply(world.api, ragmodel(p, "parser", retrieval={"k": 0, "mode": "fuzzy"}))
    await kubectl_apply(world.api, ragmodel(p, "schema", promptTemplate="Answer: {question}"))

    result = await world.worker().sync()

    parser = accepted(world.get(p, "parser"))
    assert parser["status"] == "False" and parser["reason"] == "InvalidSpec"
    assert "spec.retrieval.k" in parser["message"] and "spec.retrieval.mode" in parser["message"]
    schema = accepted(world.get(p, "schema"))  # the API's own rule: both placeholders
    assert schema["reason"] == "InvalidSpec"
    assert "spec.promptTemplate" in schema["message"] and "{context}" in schema["message"]
    assert await world.rag_model(p, "parser") is None and await world.rag_model(p, "schema") is None
    assert sorted(r.name for r in result.refused) == ["parser", "schema"]


async def test_a_name_a_deployment_answers_to_is_a_conflict(world: World) -> None:
    p = await world.project()
    await kubectl_apply(world.api, ragmodel(p, p.chat))

    await world.worker().sync()

    condition = accepted(world.get(p, p.chat))
    assert condition["status"] == "False" and condition["reason"] == "Conflict"
    assert f"deployment '{p.chat}'" in condition["message"]


async def test_an_api_made_rag_model_of_the_same_name_is_not_taken_over(world: World) -> None:
    p = await world.project()
    made = await world.client.post(
        "/rag/models",
        params={"project": str(p.id)},
        json={"name": "support", "chat_deployment": p.chat, "knowledge_bases": [p.kb]},
        headers=ADMIN,
    )
    assert made.status_code == 201, made.text
    await kubectl_apply(world.api, ragmodel(p, "support", retrieval={"k": 7}))
    worker = world.worker()

    await worker.sync()
    await worker.sync()  # and again: still not

    row = await world.rag_model(p, "support")
    assert row is not None and row.revision == 1 and row.spec["retrieval"]["k"] == 5
    assert row.created_by == "bootstrap"
    condition = accepted(world.get(p, "support"))
    assert condition["status"] == "False" and condition["reason"] == "NameTaken"
    assert "made through the API" in condition["message"]


# --- deletion and scope --------------------------------------------------------------------------


async def test_deleting_the_object_deletes_its_rag_model_and_only_its(world: World) -> None:
    p = await world.project()
    api_made = await world.client.post(
        "/rag/models",
        params={"project": str(p.id)},
        json={"name": "by-hand", "chat_deployment": p.chat, "knowledge_bases": [p.kb]},
        headers=ADMIN,
    )
    assert api_made.status_code == 201, api_made.text
    obj = await kubectl_apply(world.api, ragmodel(p, "support"))
    worker = world.worker()
    await worker.sync()
    assert await world.rag_model(p, "support") is not None

    async with Actor(world.api, "kubectl") as person:
        await person.delete(obj)
    result = await worker.sync()

    assert await world.rag_model(p, "support") is None
    assert await world.rag_model(p, "by-hand") is not None
    assert result.deleted == [f"{p.id}/support"]


async def test_a_namespace_without_converges_label_is_ignored(world: World) -> None:
    p = await world.project(labelled=False)
    await kubectl_apply(world.api, ragmodel(p, "support"))

    result = await world.worker().sync()

    assert await world.rag_model(p, "support") is None
    assert "status" not in world.get(p, "support")
    assert [r.name for r in result.ignored] == ["support"] and not world.status_writes()


async def test_a_project_label_copied_onto_another_namespace_names_no_project(world: World) -> None:
    p = await world.project()
    ref = ProjectRef(project_id=p.id, name=p.name)
    meta = {"name": "someone-else", "labels": project_labels(ref)}
    await world.kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
    await kubectl_apply(
        world.api, {**ragmodel(p, "support"), "metadata": {"name": "support", "namespace": "someone-else"}}
    )

    result = await world.worker().sync()

    assert await world.rag_model(p, "support") is None
    assert [r.namespace for r in result.ignored] == ["someone-else"]


# --- failures ------------------------------------------------------------------------------------


async def test_a_pass_during_an_outage_fails_and_the_next_one_finishes(world: World) -> None:
    p = await world.project()
    await kubectl_apply(world.api, ragmodel(p, "support"))
    worker = world.worker()
    world.api.faults.down(drop=False)

    with pytest.raises(TransientApiError):
        await worker.sync()
    assert await worker._pass() is False and worker.error

    world.api.faults.up()
    assert await worker._pass() is True and worker.error is None
    assert accepted(world.get(p, "support"))["reason"] == "Applied"


async def test_a_status_write_cut_short_is_written_by_the_next_pass(world: World) -> None:
    p = await world.project()
    await kubectl_apply(world.api, ragmodel(p, "support"))
    worker = world.worker()
    world.api.faults.fail(503, count=3, method="PATCH", path="/status")  # every attempt of one pass

    assert await worker._pass() is False

    assert await worker._pass() is True
    assert accepted(world.get(p, "support"))["reason"] == "Applied"
    row = await world.rag_model(p, "support")
    assert row is not None and row.revision == 1  # the RAG model was written once


async def test_a_cluster_without_the_crd_is_skipped_not_failed(world: World) -> None:
    del world.api.kinds[("converge.dev", "v1alpha1", "ragmodels")]
    worker = world.worker()

    assert await worker._pass() is True and worker.served is False


# --- leadership and the watch --------------------------------------------------------------------


async def test_the_leader_is_woken_by_a_new_object(world: World) -> None:
    p = await world.project()
    workers = [world.worker(interval_s=600), world.worker(interval_s=600)]
    for worker in workers:
        await worker.start()
    try:
        # The leader's first pass has ended before the object exists (a follower's pass is not
        # enough: the leader's could still be to come, and would find the object by itself).
        await eventually(lambda: any(w.is_leader and w.passes for w in workers))
        leader = next(w for w in workers if w.is_leader)
        assert [w.is_leader for w in workers].count(True) == 1
        before = leader.passes

        # A long interval: what follows is the watch's doing.
        await kubectl_apply(world.api, ragmodel(p, "support"))

        def status() -> Obj | None:
            obj = world.get(p, "support")
            return obj.get("status")

        await eventually(status)
        assert accepted(world.get(p, "support"))["reason"] == "Applied"
        # The pass that wrote the status is counted once it has finished collecting.
        await eventually(lambda: leader.passes > before)
        assert all(w.healthy for w in workers)
    finally:
        for worker in workers:
            await worker.stop()


async def test_a_status_the_api_refuses_does_not_stop_the_other_objects(world: World) -> None:
    p = await world.project()
    await kubectl_apply(world.api, ragmodel(p, "first"))
    await kubectl_apply(world.api, ragmodel(p, "second"))
    world.api.faults.fail(422, count=1, method="PATCH", path="first/status")
    worker = world.worker()

    assert await worker._pass() is True

    assert "status" not in world.get(p, "first")
    assert accepted(world.get(p, "second"))["reason"] == "Applied"
    await worker.sync()  # the next pass tries again
    assert accepted(world.get(p, "first"))["reason"] == "Applied"
