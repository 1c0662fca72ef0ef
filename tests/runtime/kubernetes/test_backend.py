"""KubernetesBackend against a fake API at the HTTP boundary: apply renders and applies the
namespace bundle and the workload, observe turns what the cluster's controllers and kubelet
report into replicas and conditions, a rollout survives an API outage, zones come from nodes,
logs from pods. The test plays the cluster's controllers (`Cluster`); nothing sleeps on a guess."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from fake_api import FakeKubeApi
from kube_support import NAMESPACE, Cluster, Placements, fast_config, make_spec, node
from support import eventually, free_port

from converge.runtime.base import Condition, DeploymentSpec, EngineStats, Observation, ReplicaPhase, Zone
from converge.runtime.kubernetes import observed as observed_mod
from converge.runtime.kubernetes.backend import KubernetesBackend
from converge.runtime.kubernetes.config import KServeMode
from converge.runtime.kubernetes.specs import Autoscaling

P = ReplicaPhase


@pytest.fixture
async def cluster(fake_api: FakeKubeApi) -> AsyncIterator[Cluster]:
    async with Cluster(fake_api) as c:
        await c.add_node(node("node-a", zone="zone-1"))
        yield c


@pytest.fixture
def placements() -> Placements:
    return Placements()


@pytest.fixture
async def backend(fake_api: FakeKubeApi, placements: Placements) -> AsyncIterator[KubernetesBackend]:
    runtime = KubernetesBackend(fast_config(fake_api), placements=placements)
    await runtime.start()
    yield runtime
    await runtime.stop()


def condition(obs: Observation, type_: str) -> Condition:
    found = obs.condition(type_)
    assert found is not None, f"no {type_} condition in {obs.conditions}"
    return found


def observed(
    backend: KubernetesBackend, spec: DeploymentSpec, check: Callable[[Observation], bool]
) -> Callable[[], Awaitable[Observation | None]]:
    """A predicate for `eventually`: the observation once `check` holds for it."""

    async def probe() -> Observation | None:
        obs = await backend.observe(deployment_id=spec.deployment_id)
        return obs if check(obs) else None

    return probe


def applied(obs: Observation) -> bool:
    return condition(obs, "Applied").status


def ready(obs: Observation) -> bool:
    return condition(obs, "Ready").status


async def test_apply_creates_the_namespace_bundle_and_the_workload(
    fake_api: FakeKubeApi, backend: KubernetesBackend, cluster: Cluster
) -> None:
    spec = make_spec()

    await backend.apply(spec=spec)
    obs = await eventually(observed(backend, spec, applied))

    assert condition(obs, "Applied").message == f"revision 1 applied to namespace {NAMESPACE}"
    assert fake_api.get("v1", "Namespace", NAMESPACE) is not None
    assert [o["metadata"]["name"] for o in fake_api.objects("v1", "ResourceQuota", NAMESPACE)] == [
        "converge-quota"
    ]
    assert len(fake_api.objects("networking.k8s.io/v1", "NetworkPolicy", NAMESPACE)) == 5
    assert len(fake_api.objects("scheduling.k8s.io/v1", "PriorityClass")) == 3
    assert cluster.deployment()["spec"]["replicas"] == 2
    assert fake_api.get("v1", "Service", "chat", NAMESPACE) is not None
    assert fake_api.get("policy/v1", "PodDisruptionBudget", "chat", NAMESPACE) is not None
    assert not ready(obs)  # nothing runs yet


async def test_the_controllers_reports_become_replicas_and_conditions(
    backend: KubernetesBackend, cluster: Cluster
) -> None:
    spec = make_spec()
    await backend.apply(spec=spec)
    await eventually(observed(backend, spec, applied))
    dep = cluster.deployment()

    pods = [await cluster.start_pod(dep, template=dep["spec"]["template"], suffix=f"a{i}") for i in range(2)]
    obs = await eventually(observed(backend, spec, lambda o: len(o.replicas) == 2))
    assert {r.phase for r in obs.replicas} == {P.STARTING}
    assert {r.zone for r in obs.replicas} == {"zone-1"}

    for pod in pods:
        await cluster.pod_ready(pod)
    obs = await eventually(observed(backend, spec, lambda o: len(o.ready) == 2))
    # The pods are ready, but the Deployment controller has not said so yet.
    assert condition(obs, "Ready").reason == "RolloutPending"

    await cluster.deployment_status(dep, available=1)
    obs = await eventually(
        observed(backend, spec, lambda o: condition(o, "Ready").reason == "ReplicasNotAvailable")
    )
    assert "1/2 available" in condition(obs, "Ready").message

    await cluster.deployment_status(dep, available=2)
    obs = await eventually(observed(backend, spec, ready))
    assert condition(obs, "Progressing").reason == "RolloutComplete"
    assert condition(obs, "Degraded").status is False
    assert condition(obs, "Observed").status is True
    replica = obs.replicas[0]
    assert replica.endpoint is not None and replica.endpoint.startswith("http://127.0.0.")
    assert (replica.revision, replica.generation, replica.deployment_id) == (1, 0, spec.deployment_id)
    assert replica.started_at is not None


async def test_ready_replicas_report_their_load_from_converge_stats(
    backend: KubernetesBackend, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The autoscaler's input: each ready pod's in-flight requests and queue, from its server, and
    its engine's slots and KV cache where it reports them (llama.cpp does, others do not)."""
    engine = {"slots_busy": 3, "slots_total": 4, "kv_cache_usage_ratio": 0.5}
    load = {
        "127.0.0.2": {"in_flight": 3, "queue_depth": 1, **engine},
        "127.0.0.3": {"in_flight": 0, "queue_depth": 0},
    }

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(load[request.host.split(":")[0]])

    app = web.Application()
    app.router.add_get("/converge/stats", stats)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    for ip in load:
        await web.TCPSite(runner, ip, port).start()
    monkeypatch.setattr(observed_mod, "HTTP_PORT", port)
    try:
        spec = make_spec(replicas=2)
        await backend.apply(spec=spec)
        await eventually(observed(backend, spec, applied))
        await cluster.roll_out()
        obs = await eventually(observed(backend, spec, lambda o: len(o.ready) == 2))
        assert sorted((r.in_flight, r.queue_depth) for r in obs.replicas) == [(0, 0), (3, 1)]
        engines = {r.in_flight: r.engine for r in obs.replicas}
        assert engines == {3: EngineStats(**engine), 0: None}
        load["127.0.0.2"] = {"in_flight": 5, "queue_depth": 2}
        obs = await eventually(observed(backend, spec, lambda o: max(r.in_flight for r in o.replicas) == 5))
        assert max(r.queue_depth for r in obs.replicas) == 2
    finally:
        await runner.cleanup()


async def test_a_new_revision_updates_the_deployment_and_prunes_what_is_no_longer_rendered(
    fake_api: FakeKubeApi, backend: KubernetesBackend, cluster: Cluster, placements: Placements
) -> None:
    placements.autoscaling = Autoscaling(min_replicas=1, max_replicas=3)
    spec = make_spec()
    await backend.apply(spec=spec)
    await eventually(observed(backend, spec, applied))
    assert fake_api.get("autoscaling/v2", "HorizontalPodAutoscaler", "chat", NAMESPACE) is not None
    before = cluster.deployment()

    placements.autoscaling = None
    new = make_spec(spec.deployment_id, revision=2, replicas=2, args=("--ctx-size", "4096"))
    await backend.apply(spec=new)
    await eventually(observed(backend, new, applied))

    after = cluster.deployment()
    assert int(after["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    assert after["spec"]["template"]["metadata"]["labels"]["converge.dev/revision"] == "2"
    assert fake_api.get("autoscaling/v2", "HorizontalPodAutoscaler", "chat", NAMESPACE) is None


async def test_a_rolling_update_is_not_ready_until_the_new_revision_is(
    backend: KubernetesBackend, cluster: Cluster
) -> None:
    spec = make_spec()
    await backend.apply(spec=spec)
    await eventually(observed(backend, spec, applied))
    await cluster.roll_out()
    await eventually(observed(backend, spec, ready))

    new = make_spec(spec.deployment_id, revision=2)
    await backend.apply(spec=new)
    obs = await eventually(observed(backend, new, applied))
    assert condition(obs, "Ready").reason == "RollingUpdate"
    assert condition(obs, "Progressing").reason == "RollingUpdate"

    await cluster.roll_out()
    obs = await eventually(observed(backend, new, ready))
    assert {r.revision for r in obs.replicas} == {2}


async def test_a_crash_loop_is_degraded(backend: KubernetesBackend, cluster: Cluster) -> None:
    spec = make_spec(replicas=1)
    await backend.apply(spec=spec)
    await eventually(observed(backend, spec, applied))
    dep = cluster.deployment()
    pod = await cluster.start_pod(dep, template=dep["spec"]["template"], suffix="x")

    await cluster.crash_loop(pod, restarts=6)

    obs = await eventually(observed(backend, spec, lambda o: condition(o, "Degraded").status))
    assert condition(obs, "Degraded").reason == "CrashLoop"
    (replica,) = obs.replicas
    assert (replica.phase, replica.restarts, replica.endpoint) == (P.BACKOFF, 6, None)
    assert replica.last_exit == "Error (exit code 1)"


@pytest.mark.parametrize("drop", [True, False], ids=["connections-cut", "503"])
async def test_an_outage_mid_rollout_shows_as_a_condition_and_the_rollout_completes_after(
    fake_api: FakeKubeApi, backend: KubernetesBackend, cluster: Cluster, drop: bool
) -> None:
    spec = make_spec()
    await backend.apply(spec=spec)
    await eventually(observed(backend, spec, applied))
    await cluster.roll_out()
    await eventually(observed(backend, spec, ready))

    fake_api.faults.down(drop=drop)
    new = make_spec(spec.deployment_id, revision=2)
    await backend.apply(spec=new)

    obs = await eventually(
        observed(backend, new, lambda o: condition(o, "Applied").reason == "ApiUnavailable")
    )
    assert "retrying" in condition(obs, "Applied").message
    if drop:  # the watches went with the connections (a 503 leaves open watches streaming)
        obs = await eventually(observed(backend, new, lambda o: not condition(o, "Observed").status))
        assert "may be stale" in condition(obs, "Observed").message
    assert len(obs.ready) == 2  # the last known replicas, still serving revision 1
    assert condition(obs, "Degraded").status is False  # an outage of the API is not of the model
    assert cluster.deployment()["spec"]["template"]["metadata"]["labels"]["converge.dev/revision"] == "1"

    fake_api.faults.up()
    await eventually(observed(backend, new, applied))
    await cluster.roll_out()
    obs = await eventually(observed(backend, new, lambda o: ready(o) and condition(o, "Observed").status))
    assert {r.revision for r in obs.replicas} == {2}


async def test_a_rejected_apply_is_degraded_until_the_spec_changes(
    fake_api: FakeKubeApi, backend: KubernetesBackend, cluster: Cluster
) -> None:
    fake_api.faults.fail(422, count=1, path="/deployments/")
    spec = make_spec()

    await backend.apply(spec=spec)

    obs = await eventually(observed(backend, spec, lambda o: condition(o, "Degraded").status))
    assert condition(obs, "Degraded").reason == "ApiRejected"
    assert condition(obs, "Applied").reason == "ApiRejected"
    new = make_spec(spec.deployment_id, revision=2)
    await backend.apply(spec=new)
    obs = await eventually(observed(backend, new, applied))
    assert condition(obs, "Degraded").status is False


async def test_delete_removes_the_workload_and_leaves_the_namespace(
    fake_api: FakeKubeApi, backend: KubernetesBackend, cluster: Cluster
) -> None:
    spec = make_spec()
    await backend.apply(spec=spec)
    await eventually(observed(backend, spec, applied))
    await cluster.roll_out()

    await backend.delete(deployment_id=spec.deployment_id)

    assert fake_api.get("apps/v1", "Deployment", "chat", NAMESPACE) is None
    assert fake_api.get("v1", "Service", "chat", NAMESPACE) is None
    assert cluster.pods() == []  # owned by the Deployment: collected with it
    assert fake_api.get("v1", "Namespace", NAMESPACE) is not None
    obs = await eventually(observed(backend, spec, lambda o: not o.replicas))
    assert obs.conditions == []


@pytest.mark.parametrize("fake_api", [True], indirect=True)
async def test_with_kserve_a_deployment_is_an_inference_service(
    fake_api: FakeKubeApi, placements: Placements, cluster: Cluster
) -> None:
    runtime = KubernetesBackend(fast_config(fake_api, kserve=KServeMode.AUTO), placements=placements)
    await runtime.start()
    try:
        spec = make_spec(replicas=1)
        await runtime.apply(spec=spec)
        await eventually(observed(runtime, spec, applied))
        isvc = fake_api.get("serving.kserve.io/v1beta1", "InferenceService", "chat", NAMESPACE)
        assert isvc is not None
        assert fake_api.get("apps/v1", "Deployment", "chat", NAMESPACE) is None
        assert len(fake_api.objects("serving.kserve.io/v1alpha1", "ServingRuntime", NAMESPACE)) == 4

        # KServe's controller: a predictor Deployment it controls, and the pods' template.
        predictor = spec_pod_template(isvc)
        pod = await cluster.start_pod(isvc, template=predictor, suffix="predictor-0")
        await cluster.pod_ready(pod)
        obs = await eventually(
            observed(runtime, spec, lambda o: condition(o, "Ready").reason == "RolloutPending")
        )
        assert len(obs.ready) == 1
        await cluster.controllers.set_status(
            isvc,
            {
                "observedGeneration": isvc["metadata"]["generation"],
                "conditions": [
                    {"type": "Ready", "status": "False", "reason": "PredictorNotReady", "message": "wait"}
                ],
            },
        )
        obs = await eventually(
            observed(runtime, spec, lambda o: condition(o, "Ready").reason == "PredictorNotReady")
        )
        await cluster.controllers.set_status(isvc, {"conditions": [{"type": "Ready", "status": "True"}]})
        await eventually(observed(runtime, spec, ready))

        # KServe cannot hold an InferenceService at zero: scaling to zero removes it.
        await runtime.apply(spec=make_spec(spec.deployment_id, replicas=0))
        await eventually(
            lambda: fake_api.get("serving.kserve.io/v1beta1", "InferenceService", "chat", NAMESPACE) is None
        )
    finally:
        await runtime.stop()


def spec_pod_template(isvc: dict) -> dict:
    predictor = isvc["spec"]["predictor"]
    container = {
        k: v for k, v in predictor["model"].items() if k not in ("modelFormat", "runtime", "protocolVersion")
    }
    container["image"] = "ghcr.io/converge-dev/converge-llama-cpp:test"
    keys = ("initContainers", "volumes", "securityContext", "priorityClassName")
    return {
        "metadata": {"labels": predictor["labels"], "annotations": predictor["annotations"]},
        "spec": {"containers": [container], **{k: predictor[k] for k in keys}},
    }


async def test_zones_come_from_node_labels_with_allocatable_resources(
    backend: KubernetesBackend, cluster: Cluster
) -> None:
    gpu = {
        "nvidia.com/gpu": "2",
        "label:nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "label:nvidia.com/gpu.memory": "81559",
        "label:nvidia.com/gpu.count": "2",
    }
    await cluster.add_node(node("node-b", zone="zone-1", cpu="3920m", memory="16318412Ki"))
    await cluster.add_node(node("gpu-1", zone="zone-2", cpu="64", memory="512Gi", **gpu))
    mig = {"nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-2g.20gb": "0", "label:nvidia.com/gpu.count": "1"}
    await cluster.add_node(node("mig-1", zone="zone-2", cpu="32", memory="256Gi", **mig))
    await cluster.add_node(node("bare", zone=None, cpu="2", memory="4Gi"))
    cordoned = node("cordoned", zone="zone-3")
    cordoned["spec"] = {"unschedulable": True}
    await cluster.add_node(cordoned)

    zones = await eventually(lambda: _when_listed(backend, 6))

    by_name = {z.name: z for z in zones}
    assert sorted(by_name) == ["local", "zone-1", "zone-2"]
    assert by_name["zone-1"].cpu == pytest.approx(8 + 3.92)
    assert by_name["zone-1"].memory_bytes == (32 << 30) + 16318412 * 1024
    assert by_name["zone-1"].gpus == []
    gpus = by_name["zone-2"].gpus
    assert [(g.index, g.name, g.mig_profiles) for g in gpus] == [
        (0, "NVIDIA-H100-80GB-HBM3", []),
        (1, "NVIDIA-H100-80GB-HBM3", []),
        (2, "nvidia-gpu", ["1g.10gb"]),
    ]
    assert gpus[0].memory_bytes == 81559 << 20
    # "local" (a deployment's default: anywhere) is every schedulable node, labelled or not
    assert by_name["local"].cpu == pytest.approx(by_name["zone-1"].cpu + by_name["zone-2"].cpu + 2)
    assert len(by_name["local"].gpus) == 3 and [g.index for g in by_name["local"].gpus] == [0, 1, 2]


async def _when_listed(backend: KubernetesBackend, nodes: int) -> list[Zone] | None:
    if len(backend.informers["nodes"].items) < nodes:
        return None
    return await backend.zones()


async def test_logs_come_from_the_replicas_pod(
    fake_api: FakeKubeApi, backend: KubernetesBackend, cluster: Cluster
) -> None:
    spec = make_spec(replicas=1)
    await backend.apply(spec=spec)
    await eventually(observed(backend, spec, applied))
    await cluster.roll_out()
    obs = await eventually(observed(backend, spec, lambda o: len(o.replicas) == 1))
    (replica,) = obs.replicas
    fake_api.write_log(NAMESPACE, replica.id, "model loaded", container="server")

    lines = [line async for line in backend.logs(replica_id=replica.id, tail=10)]

    assert lines == ["model loaded"]
    with pytest.raises(LookupError):
        _ = [line async for line in backend.logs(replica_id="nobody")]


async def test_an_unknown_deployment_observes_nothing(backend: KubernetesBackend) -> None:
    obs = await backend.observe(deployment_id=uuid.uuid4())
    assert (obs.replicas, obs.conditions) == ([], [])
