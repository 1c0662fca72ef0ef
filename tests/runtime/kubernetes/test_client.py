"""The Kubernetes client against a fake API at the HTTP boundary: server-side apply as field
manager "converge", pruning only what Converge owns, informers (list + watch, bookmarks, 410
re-list), retries on 409/429/5xx and lost connections, logs."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fake_api import APPLY, Actor, FakeKubeApi
from kube_support import ARTIFACT, NAMESPACE, PROJECT, Cluster, fast_config, make_spec
from support import eventually

from converge.runtime.kubernetes.client import (
    ApiRejected,
    Informer,
    KubeClient,
    ObjectRef,
    TransientApiError,
    load_config,
)
from converge.runtime.kubernetes.labels import LABEL_DEPLOYMENT_ID
from converge.runtime.kubernetes.manifests import render_project, render_workload
from converge.runtime.kubernetes.specs import (
    Autoscaling,
    ClusterProfile,
    InferenceWorkload,
    ProjectQuota,
)

CLUSTER = ClusterProfile()
WORKLOAD_KINDS = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
)


def bundle() -> list[dict]:
    return render_project(PROJECT, quota=ProjectQuota(cpu=8, memory_bytes=32 << 30, gpus=1), cluster=CLUSTER)


def workload(**changes: object) -> InferenceWorkload:
    base = InferenceWorkload(project=PROJECT, deployment=make_spec(replicas=2), artifact=ARTIFACT)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def cluster(fake_api: FakeKubeApi) -> AsyncIterator[Cluster]:
    async with Cluster(fake_api) as c:
        yield c


def applies(api: FakeKubeApi) -> list:
    return [r for r in api.requests if r.method == "PATCH"]


# --- apply and prune ---------------------------------------------------------------------------


async def test_apply_creates_the_namespace_bundle_and_the_workload_by_server_side_apply(
    fake_api: FakeKubeApi, kube: KubeClient
) -> None:
    objects = bundle() + render_workload(workload(), cluster=CLUSTER)
    applied = await kube.apply_all(objects)

    for manifest, result in zip(objects, applied, strict=True):
        ref = ObjectRef.of(manifest)
        stored = fake_api.get(ref.api_version, ref.kind, ref.name, ref.namespace)
        assert stored is not None, ref
        assert stored["metadata"]["labels"] == manifest["metadata"]["labels"]
        for key in set(manifest) - {"apiVersion", "kind", "metadata"}:
            assert stored[key] == manifest[key], (ref, key)
        assert result["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]
        (entry,) = stored["metadata"]["managedFields"]
        assert (entry["manager"], entry["operation"]) == ("converge", "Apply")
    for request in applies(fake_api):
        assert request.content_type == APPLY
        assert request.query["fieldManager"] == "converge"
        assert request.query["force"] == "true"
    assert fake_api.get("v1", "Namespace", NAMESPACE) is not None
    assert {o["kind"] for o in fake_api.objects("apps/v1", "Deployment", NAMESPACE)} == {"Deployment"}


async def test_an_unchanged_apply_writes_nothing(fake_api: FakeKubeApi, kube: KubeClient) -> None:
    objects = bundle() + render_workload(workload(), cluster=CLUSTER)
    await kube.apply_all(objects)
    version = fake_api.resource_version

    await kube.apply_all(objects)

    assert fake_api.resource_version == version


async def test_a_changed_apply_updates_and_prune_removes_only_what_converge_owns(
    fake_api: FakeKubeApi, kube: KubeClient, cluster: Cluster
) -> None:
    await kube.apply_all(bundle())
    scaled = workload(autoscaling=Autoscaling(min_replicas=1, max_replicas=4))
    first = await kube.apply_all(render_workload(scaled, cluster=CLUSTER))
    assert {o["kind"] for o in first} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    before = cluster.deployment()
    deployment_id = str(scaled.deployment.deployment_id)
    # Neighbours prune must leave alone: unlabelled; labelled but applied by someone else;
    # labelled, applied by "converge", but controlled by another object (as KServe's are).
    foreign = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "foreign", "namespace": NAMESPACE}}
    await cluster.controllers.create({**foreign, "spec": {"ports": [{"port": 80}]}})
    labels = {"app.kubernetes.io/managed-by": "converge", LABEL_DEPLOYMENT_ID: deployment_id}
    await cluster.controllers.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "lookalike", "namespace": NAMESPACE, "labels": labels},
        }
    )
    owner = await cluster.controllers.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner", "namespace": NAMESPACE}}
    )
    controlled = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "controlled",
            "namespace": NAMESPACE,
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "owner",
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
    }
    await kube.apply(controlled)

    fixed = workload(deployment=make_spec(scaled.deployment.deployment_id, replicas=3, revision=2))
    desired = render_workload(fixed, cluster=CLUSTER)
    await kube.apply_all(desired)
    pruned = await kube.prune(
        kinds=WORKLOAD_KINDS,
        labels={LABEL_DEPLOYMENT_ID: deployment_id},
        keep={ObjectRef.of(o) for o in desired},
    )

    after = cluster.deployment()
    assert int(after["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    assert after["spec"]["replicas"] == 3
    assert [str(ref) for ref in pruned] == [f"HorizontalPodAutoscaler {NAMESPACE}/chat"]
    assert fake_api.get("autoscaling/v2", "HorizontalPodAutoscaler", "chat", NAMESPACE) is None
    for name in ("foreign", "lookalike", "controlled", "chat"):
        assert fake_api.get("v1", "Service", name, NAMESPACE) is not None, name


async def test_a_forced_apply_takes_back_a_field_someone_else_changed(
    fake_api: FakeKubeApi, kube: KubeClient
) -> None:
    await kube.apply_all(bundle())
    (deployment, *_) = render_workload(workload(), cluster=CLUSTER)
    await kube.apply(deployment)
    async with Actor(fake_api, "kubectl") as person:
        edit = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "chat", "namespace": NAMESPACE},
        }
        edit["spec"] = {"replicas": 9}
        code, refused = await person.apply(edit)
        assert code == 409 and refused["reason"] == "Conflict"
        assert refused["details"]["causes"][0]["field"] == ".spec.replicas"
        code, _ = await person.apply(edit, force=True)
        assert code == 200

    applied = await kube.apply(deployment)

    assert applied["spec"]["replicas"] == 2
    managers = {e["manager"] for e in applied["metadata"]["managedFields"]}
    assert "converge" in managers


# --- retries ----------------------------------------------------------------------------------


async def test_a_409_conflict_is_applied_again(fake_api: FakeKubeApi, kube: KubeClient) -> None:
    (namespace, *_) = bundle()
    fake_api.faults.fail(409, count=1, method="PATCH")

    applied = await kube.apply(namespace)

    assert applied["metadata"]["name"] == NAMESPACE
    assert len(applies(fake_api)) == 2


@pytest.mark.parametrize("status", [429, 500, 503, 504])
async def test_throttling_and_server_errors_are_retried(
    fake_api: FakeKubeApi, kube: KubeClient, status: int
) -> None:
    (namespace, *_) = bundle()
    fake_api.faults.fail(status, count=2, retry_after=0 if status == 429 else None)

    await kube.apply(namespace)

    assert len(applies(fake_api)) == 3


async def test_an_outage_raises_a_transient_error_and_the_next_try_succeeds(
    fake_api: FakeKubeApi, kube: KubeClient
) -> None:
    (namespace, *_) = bundle()
    fake_api.faults.down()

    with pytest.raises(TransientApiError) as raised:
        await kube.apply(namespace)
    assert raised.value.reason == "ApiUnavailable"
    assert len(applies(fake_api)) == 3  # request_attempts

    fake_api.faults.up()
    await kube.apply(namespace)
    assert fake_api.get("v1", "Namespace", NAMESPACE) is not None


async def test_a_rejected_request_is_not_retried(fake_api: FakeKubeApi, kube: KubeClient) -> None:
    (namespace, *_) = bundle()
    fake_api.faults.fail(422, count=1)

    with pytest.raises(ApiRejected) as raised:
        await kube.apply(namespace)

    assert raised.value.code == 422
    assert len(applies(fake_api)) == 1


async def test_served_tells_whether_kserve_is_installed(fake_api: FakeKubeApi, kube: KubeClient) -> None:
    assert await kube.served("serving.kserve.io/v1beta1", "InferenceService")


@pytest.mark.parametrize("fake_api", [False], indirect=True)
async def test_served_is_false_without_kserve_crds(kube: KubeClient) -> None:
    assert not await kube.served("serving.kserve.io/v1beta1", "InferenceService")


# --- informers ----------------------------------------------------------------------------------


@pytest.fixture
async def pods(kube: KubeClient) -> AsyncIterator[Informer]:
    informer = Informer(
        kube, api_version="v1", kind="Pod", labels={"app.kubernetes.io/managed-by": "converge"}
    )
    task = asyncio.create_task(informer.run())
    await asyncio.wait_for(informer.synced.wait(), 5)
    yield informer
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def rolled_out(kube: KubeClient, cluster: Cluster) -> None:
    await kube.apply_all(bundle() + render_workload(workload(), cluster=CLUSTER))
    await cluster.roll_out()


async def test_a_watch_turns_status_updates_into_items(
    fake_api: FakeKubeApi, kube: KubeClient, cluster: Cluster, pods: Informer
) -> None:
    await rolled_out(kube, cluster)

    running = await eventually(
        lambda: [p for p in pods.items.values() if p.get("status", {}).get("phase") == "Running"]
    )

    assert len(running) == 2
    watches = [r for r in fake_api.requests if r.query.get("watch") == "true"]
    assert watches and all(r.query.get("allowWatchBookmarks") == "true" for r in watches)
    assert all(r.query.get("resourceVersion") for r in watches)  # from the list's, never "from now"
    assert pods.lists == 1
    await eventually(lambda: pods.resource_version == str(fake_api.resource_version))  # bookmarks


async def test_a_410_on_the_watch_lists_again_and_carries_on(
    fake_api: FakeKubeApi, kube: KubeClient, cluster: Cluster, pods: Informer
) -> None:
    await rolled_out(kube, cluster)
    await eventually(lambda: len(pods.items) == 2)
    gone = next(iter(pods.items.values()))

    fake_api.hold_watches()  # the watch misses the deletion...
    await cluster.controllers.delete(gone)
    fake_api.compact()  # ...and its history is gone: 410 Expired

    await eventually(lambda: pods.lists == 2)
    await eventually(lambda: len(pods.items) == 1)
    assert pods.error is None
    (survivor,) = pods.items.values()
    await cluster.kubelet.set_status(survivor, {"phase": "Failed"})
    await eventually(lambda: next(iter(pods.items.values()))["status"]["phase"] == "Failed")


async def test_a_lost_watch_is_reported_and_recovers(
    fake_api: FakeKubeApi, kube: KubeClient, cluster: Cluster, pods: Informer
) -> None:
    fake_api.faults.down()
    await eventually(lambda: pods.error is not None)
    assert pods.error is not None and pods.error.reason == "ApiUnavailable"

    fake_api.faults.up()
    await rolled_out(kube, cluster)

    await eventually(lambda: len(pods.items) == 2)
    assert pods.error is None


# --- logs ----------------------------------------------------------------------------------------


async def test_logs_come_from_the_pods_server_container(
    fake_api: FakeKubeApi, kube: KubeClient, cluster: Cluster
) -> None:
    await rolled_out(kube, cluster)
    pod = cluster.pods()[0]
    name = pod["metadata"]["name"]
    for i in range(5):
        fake_api.write_log(NAMESPACE, name, f"line {i}", container="server")
    fake_api.write_log(NAMESPACE, name, "fetched", container="fetch")

    tail = [
        line
        async for line in kube.logs(namespace=NAMESPACE, pod=name, container="server", tail=2, follow=False)
    ]
    assert tail == ["line 3", "line 4"]

    followed: list[str] = []

    async def follow() -> None:
        async for line in kube.logs(namespace=NAMESPACE, pod=name, container="server", tail=1, follow=True):
            followed.append(line)

    task = asyncio.create_task(follow())
    await eventually(lambda: followed == ["line 4"])
    fake_api.write_log(NAMESPACE, name, "line 5", container="server")
    await eventually(lambda: followed == ["line 4", "line 5"])
    await cluster.controllers.delete(pod)
    await asyncio.wait_for(task, 5)  # the stream ends with the pod


async def test_logs_of_a_missing_pod_are_rejected(kube: KubeClient) -> None:
    with pytest.raises(ApiRejected) as raised:
        _ = [
            line
            async for line in kube.logs(
                namespace=NAMESPACE, pod="nope", container="server", tail=1, follow=False
            )
        ]
    assert raised.value.code == 404


def test_config_without_base_url_reads_a_kubeconfig(tmp_path: Path, fake_api: FakeKubeApi) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
        f"clusters: [{{name: c, cluster: {{server: '{fake_api.url}'}}}}]\n"
        "users: [{name: u, user: {token: abc}}]\n"
        "contexts: [{name: test, context: {cluster: c, user: u, namespace: converge}}]\n"
    )
    single = load_config(
        fast_config(fake_api).model_copy(update={"base_url": None, "kubeconfig": kubeconfig})
    )
    assert single.cluster.server == fake_api.url
    assert single.namespace == "converge"
