"""Canaries on Kubernetes: `render_canary` gives a revision's canary a workload object of its own
(valid against the official and KServe schemas, named apart from every other deployment's), and
the backend runs it beside the stable workload, which keeps the older revision and every replica
until the promotion, also across a restart of the process that applied it.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fake_api import FakeKubeApi
from kube_support import ARTIFACT, NAMESPACE, PROJECT, Cluster, Placements, fast_config, make_spec, node
from support import eventually

from converge.runtime.base import DeploymentSpec, Observation
from converge.runtime.kubernetes.backend import KubernetesBackend
from converge.runtime.kubernetes.config import KServeMode
from converge.runtime.kubernetes.labels import LABEL_DEPLOYMENT_ID, LABEL_REVISION, MAX_WORKLOAD_NAME
from converge.runtime.kubernetes.manifests import (
    LABEL_TRACK,
    canary_name,
    render_canary,
    render_workload,
)
from converge.runtime.kubernetes.specs import Autoscaling, ClusterProfile, InferenceWorkload

KSERVE_CRD = (
    Path(__file__).resolve().parents[3].parent
    / "shared"
    / "schemas"
    / "kserve"
    / "serving.kserve.io_inferenceservices.yaml"
)
CLUSTER = ClusterProfile()
KSERVE = dataclasses.replace(CLUSTER, kserve=True)


def _workload(spec: DeploymentSpec | None = None) -> InferenceWorkload:
    return InferenceWorkload(project=PROJECT, deployment=spec or make_spec(replicas=1), artifact=ARTIFACT)


# --- rendering --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.29", "1.33"])
def test_a_canary_deployment_validates_and_selects_only_its_own_pods(version: str) -> None:
    workload = _workload()
    canary = render_canary(workload, cluster=CLUSTER)

    kubernetes_validate.validate(canary, version, strict=True)
    selector = canary["spec"]["selector"]["matchLabels"]
    assert selector == {LABEL_DEPLOYMENT_ID: str(workload.deployment.deployment_id), LABEL_TRACK: "canary"}
    pod_labels = canary["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert canary["spec"]["replicas"] == 1
    # The stable workload's Service and PDB select by deployment id: they take the canary's pods in.
    stable = {o["kind"]: o for o in render_workload(workload, cluster=CLUSTER)}
    for kind, path in (("Service", ("selector",)), ("PodDisruptionBudget", ("selector", "matchLabels"))):
        wanted = stable[kind]["spec"]
        for key in path:
            wanted = wanted[key]
        assert wanted.items() <= pod_labels.items(), kind


def test_a_canary_inference_service_validates_against_the_kserve_crd() -> None:
    crd = yaml.safe_load(KSERVE_CRD.read_text(encoding="utf-8"))
    (served,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    validator = jsonschema.Draft202012Validator(_closed(copy.deepcopy(served["schema"]["openAPIV3Schema"])))

    canary = render_canary(_workload(), cluster=KSERVE)

    assert [e.message for e in validator.iter_errors(canary)] == []
    assert canary["kind"] == "InferenceService"
    assert canary["spec"]["predictor"]["labels"][LABEL_TRACK] == "canary"


def _closed(node: Any) -> Any:
    """A field the API server would prune from a custom resource fails instead."""
    if isinstance(node, dict):
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _closed(value)
    elif isinstance(node, list):
        for value in node:
            _closed(value)
    return node


def test_a_canary_is_named_apart_from_every_other_deployments_workload() -> None:
    chat = _workload(make_spec(name="chat"))
    named_like_its_canary = _workload(make_spec(name="chat-canary"))
    long = _workload(make_spec(name="a-deployment-name-that-is-much-longer-than-kserve-allows"))

    name = canary_name(chat)

    assert name.startswith("chat-canary-") and name != "chat-canary"
    assert render_workload(named_like_its_canary, cluster=CLUSTER)[0]["metadata"]["name"] == "chat-canary"
    assert len(canary_name(long)) <= MAX_WORKLOAD_NAME
    assert canary_name(chat) == name  # stable across renders: server-side apply finds it again


def test_a_canary_is_never_autoscaled() -> None:
    workload = dataclasses.replace(_workload(), autoscaling=Autoscaling(min_replicas=1, max_replicas=3))

    with pytest.raises(ValueError, match="fixed number of replicas"):
        render_canary(workload, cluster=CLUSTER)


# --- the backend ------------------------------------------------------------------------------------


@pytest.fixture
async def cluster(fake_api: FakeKubeApi) -> AsyncIterator[Cluster]:
    async with Cluster(fake_api) as c:
        await c.add_node(node("node-a", zone="zone-1"))
        yield c


def _observed(
    backend: KubernetesBackend, spec: DeploymentSpec, check: Callable[[Observation], bool]
) -> Callable[[], Awaitable[Observation | None]]:
    async def probe() -> Observation | None:
        obs = await backend.observe(deployment_id=spec.deployment_id)
        return obs if check(obs) else None

    return probe


def _applied(obs: Observation) -> bool:
    found = obs.condition("Applied")
    return found is not None and found.status


async def _apply(backend: KubernetesBackend, spec: DeploymentSpec) -> Observation:
    await backend.apply(spec=spec)
    return await eventually(_observed(backend, spec, _applied))


def _canary(spec: DeploymentSpec, count: int = 1) -> DeploymentSpec:
    return spec.model_copy(update={"canary_replicas": count})


def _revisions(api: FakeKubeApi) -> dict[str, tuple[str, int]]:
    """Each Deployment's pod-template revision and replicas, by name."""
    return {
        o["metadata"]["name"]: (
            o["spec"]["template"]["metadata"]["labels"][LABEL_REVISION],
            o["spec"]["replicas"],
        )
        for o in api.objects("apps/v1", "Deployment", NAMESPACE)
    }


async def test_a_canary_survives_a_restart_of_the_process_that_applied_it(
    fake_api: FakeKubeApi, cluster: Cluster
) -> None:
    first = KubernetesBackend(fast_config(fake_api), placements=Placements())
    await first.start()
    stable = make_spec(replicas=2)
    await _apply(first, stable)
    await cluster.roll_out()
    canary = _canary(make_spec(stable.deployment_id, revision=2, replicas=2))
    await _apply(first, canary)
    name = canary_name(_workload(canary))
    assert _revisions(fake_api) == {"chat": ("1", 2), name: ("2", 1)}
    await first.stop()

    # A new leader knows nothing of revision 1's spec: it leaves the stable Deployment as it is.
    second = KubernetesBackend(fast_config(fake_api), placements=Placements())
    await second.start()
    try:
        await _apply(second, canary)
        assert _revisions(fake_api) == {"chat": ("1", 2), name: ("2", 1)}

        promoted = make_spec(stable.deployment_id, revision=2, replicas=2)
        await _apply(second, promoted)
        assert _revisions(fake_api) == {"chat": ("2", 2)}
    finally:
        await second.stop()


async def test_a_new_canary_revision_replaces_the_canary_not_the_stable_one(
    fake_api: FakeKubeApi, cluster: Cluster
) -> None:
    backend = KubernetesBackend(fast_config(fake_api), placements=Placements())
    await backend.start()
    try:
        stable = make_spec(replicas=3)
        await _apply(backend, stable)
        await cluster.roll_out()
        name = canary_name(_workload(stable))
        await _apply(backend, _canary(make_spec(stable.deployment_id, revision=2, replicas=3)))
        await _apply(backend, _canary(make_spec(stable.deployment_id, revision=3, replicas=3), count=2))
        assert _revisions(fake_api) == {"chat": ("1", 3), name: ("3", 2)}

        # Scaled while the canary runs: the stable revision keeps serving every replica.
        await _apply(backend, _canary(make_spec(stable.deployment_id, revision=3, replicas=4), count=2))
        assert _revisions(fake_api) == {"chat": ("1", 4), name: ("3", 2)}
    finally:
        await backend.stop()


async def test_a_canary_with_nothing_older_running_is_an_ordinary_rollout(
    fake_api: FakeKubeApi, cluster: Cluster
) -> None:
    backend = KubernetesBackend(fast_config(fake_api), placements=Placements())
    await backend.start()
    try:
        await _apply(backend, _canary(make_spec(replicas=2)))
        assert _revisions(fake_api) == {"chat": ("1", 2)}
    finally:
        await backend.stop()


async def test_with_kserve_the_canary_is_a_second_inference_service(
    fake_api: FakeKubeApi, cluster: Cluster
) -> None:
    backend = KubernetesBackend(fast_config(fake_api, kserve=KServeMode.ON), placements=Placements())
    await backend.start()
    try:
        stable = make_spec(replicas=2)
        await _apply(backend, stable)
        await _apply(backend, _canary(make_spec(stable.deployment_id, revision=2, replicas=2)))

        services = {
            o["metadata"]["name"]: o["spec"]["predictor"]
            for o in fake_api.objects("serving.kserve.io/v1beta1", "InferenceService", NAMESPACE)
        }
        name = canary_name(_workload(stable))
        assert sorted(services) == sorted(["chat", name])
        assert services["chat"]["labels"][LABEL_REVISION] == "1" and services["chat"]["minReplicas"] == 2
        assert services[name]["labels"][LABEL_REVISION] == "2" and services[name]["maxReplicas"] == 1

        await _apply(backend, make_spec(stable.deployment_id, revision=2, replicas=2))
        (promoted,) = fake_api.objects("serving.kserve.io/v1beta1", "InferenceService", NAMESPACE)
        assert promoted["metadata"]["name"] == "chat"
        assert promoted["spec"]["predictor"]["labels"][LABEL_REVISION] == "2"
    finally:
        await backend.stop()


def test_the_canary_name_is_a_dns_label_for_any_deployment_id() -> None:
    for _ in range(20):
        name = canary_name(_workload(make_spec(uuid.uuid4(), name="x" * 63)))
        assert len(name) <= MAX_WORKLOAD_NAME and name[0].isalpha() and name[-1].isalnum()
