"""The controller's reconcile scenarios of tests/control/deployments/test_deployments_api.py, with the
Controller driving a real KubernetesBackend against the fake Kubernetes API and the placement read
from the database (`DatabasePlacements`): a rollout reaches Ready with its conditions, a revoked
version stops serving, deleting removes the objects and the row, a scaled-to-zero deployment wakes,
and a canary holds beside the stable revision until promoted. The test plays the cluster's
Deployment controller and kubelet; nothing sleeps on a guess.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from support import ADMIN, eventually, make_key, make_project

# The fake API and its helpers live with the backend's own tests; they are plain modules there.
sys.path.append(str(Path(__file__).resolve().parents[1] / "runtime" / "kubernetes"))

from fake_api import FakeKubeApi  # noqa: E402
from kube_support import Cluster, fast_config, node  # noqa: E402

from converge.control.builds.schemas import BuildState  # noqa: E402
from converge.models import Build, Deployment, ModelVersion  # noqa: E402
from converge.runtime.kubernetes.backend import KubernetesBackend  # noqa: E402
from converge.runtime.kubernetes.config import KServeMode  # noqa: E402
from converge.runtime.kubernetes.manifests import LABEL_TRACK  # noqa: E402
from converge.workers.controller import Controller  # noqa: E402
from converge.workers.placement import DatabasePlacements, artifact_base_uri  # noqa: E402

Obj = dict[str, Any]
REVISION = "converge.dev/revision"


class _TakingTurns:
    """Sessions that take turns on the test's one connection: the backend's reconcile task
    reads placements while the controller writes status, and one connection runs one statement
    (and one savepoint stack) at a time."""

    def __init__(self, factory: Callable[[], AsyncSession]) -> None:
        self._factory, self._lock = factory, asyncio.Lock()

    def __call__(self) -> _Turn:
        return _Turn(self._factory(), self._lock)


class _Turn:
    def __init__(self, session: AsyncSession, lock: asyncio.Lock) -> None:
        self._session, self._lock = session, lock

    async def __aenter__(self) -> AsyncSession:
        await self._lock.acquire()
        return await self._session.__aenter__()

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._session.__aexit__(*exc)
        finally:
            self._lock.release()


class _NoDownloads:
    """The artifact store, as far as a controller on Kubernetes may use it: not at all."""

    async def fetch_to(self, sha256: str, dest_dir: object) -> Path:
        raise AssertionError(f"the controller fetched {sha256}: on Kubernetes the pods fetch it")


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeKubeApi]:
    api = FakeKubeApi(kserve=False, bookmark_interval_s=0.05)  # no KServe: Deployments
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def cluster(fake_api: FakeKubeApi) -> AsyncIterator[Cluster]:
    async with Cluster(fake_api) as c:
        await c.add_node(node("node-a", zone="zone-1"))
        yield c


@pytest.fixture
async def k8s(app: Any, client: Any, fake_api: FakeKubeApi) -> AsyncIterator[Kube]:
    state = app.state.converge
    sessions = _TakingTurns(state.session_factory)
    placements = DatabasePlacements(sessions=sessions, settings=state.settings)
    backend = KubernetesBackend(fast_config(fake_api, kserve=KServeMode.AUTO), placements=placements)
    await backend.start()
    controller = Controller(
        sessions=sessions,  # type: ignore[arg-type]  # a session factory, as the controller uses it
        settings=state.settings,
        store=_NoDownloads(),  # type: ignore[arg-type]
        runtime=backend,
        conninfo="unused",
    )
    try:
        yield Kube(client=client, backend=backend, controller=controller, api=fake_api)
    finally:
        await backend.stop()


class Kube:
    """The controller and the backend it drives, and ways to wait for what they report."""

    def __init__(
        self, *, client: Any, backend: KubernetesBackend, controller: Controller, api: FakeKubeApi
    ) -> None:
        self.client, self.backend, self.controller, self.api = client, backend, controller, api

    async def get(self, deployment_id: str) -> Obj:
        resp = await self.client.get(f"/deployments/{deployment_id}", headers=ADMIN)
        assert resp.status_code == 200, resp.text
        return resp.json()

    async def applied(self, deployment_id: str) -> None:
        """Until the backend applied the spec the controller handed it last."""

        async def done() -> bool:
            obs = await self.backend.observe(deployment_id=uuid.UUID(deployment_id))
            applied = obs.condition("Applied")
            return applied is not None and applied.status

        await eventually(done)

    async def reconciled(self, deployment_id: str, check: Callable[[Obj], bool]) -> Obj:
        """Reconcile (and let the backend apply) until the deployment as the API shows it passes
        `check`; the last answer is returned."""

        async def probe() -> Obj | None:
            await self.controller.reconcile(uuid.UUID(deployment_id))
            await self.applied(deployment_id)
            got = await self.get(deployment_id)
            return got if check(got) else None

        return await eventually(probe)

    def workload(self, name: str, namespace: str) -> Awaitable[Obj]:
        async def found() -> Obj | None:
            return self.api.get("apps/v1", "Deployment", name, namespace)

        return eventually(found)


async def run_pods(cluster: Cluster, dep: Obj) -> None:
    """What the Deployment and ReplicaSet controllers and the kubelet do for `dep`: its pods of
    another template go, `replicas` ready pods of its template run, and its status says so."""
    meta = dep["metadata"]
    template = dep["spec"]["template"]
    revision = template["metadata"]["labels"][REVISION]
    owned = [
        p
        for p in cluster.pods(meta["namespace"])
        if any(ref["name"] == meta["name"] for ref in p["metadata"].get("ownerReferences", []))
    ]
    current = [p for p in owned if p["metadata"]["labels"][REVISION] == revision]
    for pod in [p for p in owned if p not in current] + current[dep["spec"]["replicas"] :]:
        await cluster.controllers.delete(pod)
    for i in range(len(current), dep["spec"]["replicas"]):
        pod = await cluster.start_pod(dep, template=template, suffix=f"r{revision}-{i}")
        await cluster.pod_ready(pod)
    await cluster.deployment_status(dep, available=dep["spec"]["replicas"])


# --- the database side: what test_deployments_api.py sets up, with a GGUF artifact ---------------


async def _library_approver(client: Any) -> dict[str, str]:
    resp = await client.post("/keys", json={"name": "approver", "role": "library-approver"}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


async def _gguf_version(app: Any, client: Any) -> dict[str, Any]:
    """An approved version whose artifact the llama.cpp runtime serves (format gguf)."""
    model = (await client.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)).json()
    version = (
        await client.post(
            f"/models/{model['id']}/versions/upload",
            params={"version": "v1", "filename": "weights.bin"},
            content=b"weights " + os.urandom(248),
            headers={**ADMIN, "content-type": "application/octet-stream"},
        )
    ).json()
    async with app.state.converge.session_factory() as session, session.begin():
        row = await session.get(ModelVersion, uuid.UUID(version["id"]))
        row.format = "gguf"
    approved = await client.post(
        f"/models/{model['id']}/versions/{version['id']}/approve",
        json={},
        headers=await _library_approver(client),
    )
    assert approved.status_code == 200 and approved.json()["state"] == "approved", approved.text
    return approved.json()


@pytest.fixture
async def ready_version(app: Any, client: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    project = await make_project(client)
    version = await _gguf_version(app, client)
    async with app.state.converge.session_factory() as session, session.begin():
        session.add(
            Build(
                project_id=uuid.UUID(project["id"]),
                model_version_id=uuid.UUID(version["id"]),
                profile="cpu",
                server="llama-cpp",
                state=BuildState.SUCCEEDED,
                results={"tokens_per_s": 42.0},
                created_by="test",
            )
        )
    return project, version


async def _create(client: Any, project: dict[str, Any], version: dict[str, Any], **overrides: Any) -> Obj:
    body = {
        "name": "chat",
        "model_version_id": version["id"],
        "server": "llama-cpp",
        "resources": {"cpu": 1, "memory_bytes": 1 << 30},
        **overrides,
    }
    resp = await client.post("/deployments", params={"project": project["id"]}, json=body, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return resp.json()


def _namespace(project: dict[str, Any]) -> str:
    return f"converge-{project['name']}"


async def _events(client: Any, project: dict[str, Any]) -> list[str]:
    resp = await client.get("/events", params={"project": project["id"]}, headers=ADMIN)
    return [e["kind"] for e in resp.json()["items"]]


def _condition(got: Obj, type_: str) -> Obj:
    found = next((c for c in got["status"].get("conditions", []) if c["type"] == type_), None)
    assert found is not None, f"no {type_} condition in {got['status']}"
    return found


def _phase(phase: str) -> Callable[[Obj], bool]:
    return lambda got: got["phase"] == phase


async def _rolled_out(k8s: Kube, cluster: Cluster, d: Obj, namespace: str) -> Obj:
    await k8s.controller.reconcile(uuid.UUID(d["id"]))
    await k8s.applied(d["id"])
    await run_pods(cluster, await k8s.workload("chat", namespace))
    return await k8s.reconciled(d["id"], _phase("Ready"))


# --- the scenarios -------------------------------------------------------------------------------


async def test_the_controller_rolls_out_to_ready_in_the_projects_namespace(
    app: Any, k8s: Kube, cluster: Cluster, ready_version: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    project, version = ready_version
    namespace = _namespace(project)
    d = await _create(k8s.client, project, version, replicas={"min": 2, "max": 2})

    got = await _rolled_out(k8s, cluster, d, namespace)

    assert got["status"]["ready_replicas"] == 2 and got["status"]["target_replicas"] == 2
    assert {r["revision"] for r in got["status"]["replicas"]} == {1}
    conditions = {c["type"]: c for c in got["status"]["conditions"]}
    assert conditions["Ready"]["status"] is True
    assert conditions["Applied"]["message"] == f"revision 1 applied to namespace {namespace}"
    assert conditions["Observed"]["status"] is True and conditions["Admitted"]["status"] is True
    # The placement came from the database: the project's namespace, the version's artifact.
    sha = version["artifact_sha256"]
    dep = k8s.api.get("apps/v1", "Deployment", "chat", namespace)
    assert dep is not None and dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    uri = f"{artifact_base_uri(app.state.converge.settings)}/sha256/{sha[:2]}/{sha}"
    assert fetch["args"][fetch["args"].index("--uri") + 1] == uri
    assert f"/models/{sha}" in pod["containers"][0]["args"]
    assert k8s.api.get("v1", "ResourceQuota", "converge-quota", namespace) is not None


async def test_a_revoked_version_scales_the_workload_to_zero(
    k8s: Kube, cluster: Cluster, ready_version: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    project, version = ready_version
    namespace = _namespace(project)
    d = await _create(k8s.client, project, version)
    await _rolled_out(k8s, cluster, d, namespace)

    revoked = await k8s.client.post(
        f"/models/{version['model_id']}/versions/{version['id']}/revoke",
        json={"reason": "licence problem"},
        headers=await _library_approver(k8s.client),
    )
    assert revoked.json()["state"] == "revoked"
    await k8s.reconciled(d["id"], _phase("Revoked"))
    dep = await eventually(
        lambda: (
            (o := k8s.api.get("apps/v1", "Deployment", "chat", namespace))
            and (o if o["spec"]["replicas"] == 0 else None)
        )
    )
    await run_pods(cluster, dep)

    got = await k8s.reconciled(d["id"], lambda got: got["status"]["replicas"] == [])
    assert got["phase"] == "Revoked" and got["status"]["target_replicas"] == 0
    degraded = _condition(got, "Degraded")
    assert degraded["status"] is True and degraded["reason"] == "ModelVersionRevoked"
    assert cluster.pods(namespace) == []


async def test_deleting_removes_the_workload_objects_and_the_row(
    k8s: Kube, cluster: Cluster, ready_version: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    project, version = ready_version
    namespace = _namespace(project)
    d = await _create(k8s.client, project, version)
    await _rolled_out(k8s, cluster, d, namespace)

    assert (await k8s.client.delete(f"/deployments/{d['id']}", headers=ADMIN)).status_code == 202
    await k8s.controller.reconcile(uuid.UUID(d["id"]))

    assert (await k8s.client.get(f"/deployments/{d['id']}", headers=ADMIN)).status_code == 404
    for api_version, kind in (
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("policy/v1", "PodDisruptionBudget"),
    ):
        assert k8s.api.get(api_version, kind, "chat", namespace) is None, kind
    assert cluster.pods(namespace) == []
    assert k8s.api.get("v1", "Namespace", namespace) is not None  # the project's, not the deployment's
    obs = await k8s.backend.observe(deployment_id=uuid.UUID(d["id"]))
    assert obs.replicas == [] and obs.conditions == []


async def test_wake_brings_a_scaled_to_zero_deployment_back(
    app: Any, k8s: Kube, cluster: Cluster, ready_version: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    project, version = ready_version
    namespace = _namespace(project)
    d = await _create(
        k8s.client,
        project,
        version,
        autoscaling={"scale_to_zero_after_s": 60},
        replicas={"min": 1, "max": 2},
    )
    async with app.state.converge.session_factory() as session, session.begin():
        row = await session.get(Deployment, uuid.UUID(d["id"]))
        row.desired_replicas = 0  # as the autoscaler leaves it after a minute without requests
    asleep = await k8s.reconciled(d["id"], _phase("ScaledToZero"))
    assert asleep["status"]["target_replicas"] == 0
    assert (await k8s.workload("chat", namespace))["spec"]["replicas"] == 0

    viewer = await make_key(k8s.client, project["id"], "viewer")
    woken = await k8s.client.post(f"/deployments/{d['id']}/wake", headers=viewer)
    assert woken.status_code == 200 and woken.json()["desired_replicas"] == 1
    await k8s.controller.reconcile(uuid.UUID(d["id"]))
    await k8s.applied(d["id"])
    dep = await k8s.workload("chat", namespace)
    assert dep["spec"]["replicas"] == 1
    await run_pods(cluster, dep)

    got = await k8s.reconciled(d["id"], _phase("Ready"))
    assert got["status"]["ready_replicas"] == 1
    assert "deployment.woken" in await _events(k8s.client, project)


async def test_a_canary_runs_beside_the_stable_revision_until_promoted(
    k8s: Kube, cluster: Cluster, ready_version: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    project, version = ready_version
    namespace = _namespace(project)
    d = await _create(k8s.client, project, version, replicas={"min": 2, "max": 2})
    await _rolled_out(k8s, cluster, d, namespace)

    patched = await k8s.client.patch(
        f"/deployments/{d['id']}", json={"rollout": {"canary_weight": 50}}, headers=ADMIN
    )
    assert patched.json()["revision"] == 2
    await k8s.controller.reconcile(uuid.UUID(d["id"]))
    await k8s.applied(d["id"])
    deployments = k8s.api.objects("apps/v1", "Deployment", namespace)
    (canary,) = [o for o in deployments if o["metadata"]["name"] != "chat"]
    stable = k8s.api.get("apps/v1", "Deployment", "chat", namespace)
    assert stable is not None
    # The stable Deployment keeps serving revision 1 with every replica; the canary runs one of 2.
    assert (stable["spec"]["template"]["metadata"]["labels"][REVISION], stable["spec"]["replicas"]) == (
        "1",
        2,
    )
    assert (canary["spec"]["template"]["metadata"]["labels"][REVISION], canary["spec"]["replicas"]) == (
        "2",
        1,
    )
    assert canary["spec"]["selector"]["matchLabels"][LABEL_TRACK] == "canary"
    await run_pods(cluster, canary)

    got = await k8s.reconciled(
        d["id"], lambda got: _condition(got, "Progressing")["reason"] == "CanaryPaused"
    )
    replicas = got["status"]["replicas"]
    assert sorted(r["revision"] for r in replicas) == [1, 1, 2]
    assert all(r["phase"] == "ready" for r in replicas)
    # One Service in front of both revisions: its selector matches every pod of the deployment.
    service = k8s.api.get("v1", "Service", "chat", namespace)
    assert service is not None
    selector = service["spec"]["selector"].items()
    assert all(selector <= p["metadata"]["labels"].items() for p in cluster.pods(namespace))
    assert len(cluster.pods(namespace)) == 3

    promoted = await k8s.client.post(f"/deployments/{d['id']}/promote", headers=ADMIN)
    assert promoted.status_code == 200 and promoted.json()["promoted_revision"] == 2
    await k8s.controller.reconcile(uuid.UUID(d["id"]))
    await k8s.applied(d["id"])
    # Promoted: the stable Deployment takes revision 2, the canary is pruned with its pods.
    assert k8s.api.get("apps/v1", "Deployment", canary["metadata"]["name"], namespace) is None
    stable = k8s.api.get("apps/v1", "Deployment", "chat", namespace)
    assert stable is not None and stable["spec"]["template"]["metadata"]["labels"][REVISION] == "2"
    await run_pods(cluster, stable)

    got = await k8s.reconciled(d["id"], _phase("Ready"))
    assert [r["revision"] for r in got["status"]["replicas"]] == [2, 2]
    assert "deployment.promoted" in await _events(k8s.client, project)
