"""Helpers for the Kubernetes client and backend tests: specs, fast settings, and `Cluster`,
which plays the parties a real cluster has besides Converge (the Deployment and ReplicaSet
controllers, KServe's controller, the kubelet) by writing through the fake API's HTTP surface,
status subresources included."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from fake_api import Actor, FakeKubeApi

from converge.runtime.base import DeploymentSpec, ReplicaTemplate, Resources, ServerKind
from converge.runtime.kubernetes.backend import Placement
from converge.runtime.kubernetes.config import KServeMode, KubernetesConfig
from converge.runtime.kubernetes.specs import Artifact, Autoscaling, ProjectRef

Obj = dict[str, Any]
SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PROJECT = ProjectRef(project_id=uuid.UUID("11111111-2222-3333-4444-555555555555"), name="team-a")
NAMESPACE = "converge-team-a"
ARTIFACT = Artifact.in_store(base_uri="s3://converge-artifacts/library", sha256=SHA, format="gguf")


def fast_config(
    api: FakeKubeApi, *, kserve: KServeMode = KServeMode.OFF, **overrides: Any
) -> KubernetesConfig:
    values: dict[str, Any] = {
        "base_url": api.url,
        "kserve": kserve,
        "request_timeout_s": 5,
        "request_attempts": 3,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        **overrides,
    }
    return KubernetesConfig(**values)


def make_spec(
    deployment_id: uuid.UUID | None = None,
    *,
    name: str = "chat",
    revision: int = 1,
    replicas: int = 2,
    args: tuple[str, ...] = (),
    zones: tuple[str, ...] = ("local",),
) -> DeploymentSpec:
    return DeploymentSpec(
        deployment_id=deployment_id or uuid.uuid4(),
        name=name,
        revision=revision,
        template=ReplicaTemplate(
            server=ServerKind.LLAMA_CPP,
            model_name="smollm2",
            artifact_path="/unused/on/a/cluster",
            args=args,
            resources=Resources(cpu=1, memory_bytes=1 << 30),
        ),
        replicas=replicas,
        zones=zones,
    )


class Placements:
    """A placement source (what the control plane will provide), with an optional autoscaler."""

    def __init__(self) -> None:
        self.autoscaling: Autoscaling | None = None
        self.calls = 0

    async def __call__(self, spec: DeploymentSpec) -> Placement:
        self.calls += 1
        return Placement(project=PROJECT, artifact=ARTIFACT, autoscaling=self.autoscaling)


def node(name: str, *, zone: str | None, cpu: str = "8", memory: str = "32Gi", **extra: str) -> Obj:
    labels = {"kubernetes.io/hostname": name}
    if zone is not None:
        labels["topology.kubernetes.io/zone"] = zone
    gpu_labels = {k: v for k, v in extra.items() if k.startswith("label:")}
    labels |= {k.removeprefix("label:"): v for k, v in gpu_labels.items()}
    resources = {k: v for k, v in extra.items() if not k.startswith("label:")}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {
            "allocatable": {"cpu": cpu, "memory": memory, "pods": "110", **resources},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }


class Cluster:
    """The cluster's own controllers and kubelet, driven by the test step by step."""

    def __init__(self, api: FakeKubeApi) -> None:
        self.api = api
        self.kubelet = Actor(api, "kubelet")
        self.controllers = Actor(api, "kube-controller-manager")
        self._ips = 0

    async def __aenter__(self) -> Cluster:
        await self.kubelet.__aenter__()
        await self.controllers.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kubelet.__aexit__()
        await self.controllers.__aexit__()

    async def add_node(self, obj: Obj) -> Obj:
        status = obj.pop("status")
        created = await self.kubelet.create(obj)
        return await self.kubelet.set_status(created, status)

    def deployment(self, name: str = "chat", namespace: str = NAMESPACE) -> Obj:
        found = self.api.get("apps/v1", "Deployment", name, namespace)
        assert found is not None, f"no Deployment {namespace}/{name}"
        return found

    def pods(self, namespace: str = NAMESPACE) -> list[Obj]:
        return self.api.objects("v1", "Pod", namespace)

    async def start_pod(self, owner: Obj, *, template: Obj, suffix: str, node_name: str = "node-a") -> Obj:
        """A pod as the ReplicaSet controller creates it from `template`, scheduled on a node."""
        meta = owner["metadata"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{suffix}",
                "namespace": meta["namespace"],
                "labels": copy.deepcopy(template["metadata"]["labels"]),
                "annotations": copy.deepcopy(template["metadata"].get("annotations", {})),
                "ownerReferences": [
                    {
                        "apiVersion": owner["apiVersion"],
                        "kind": owner["kind"],
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": {**copy.deepcopy(template["spec"]), "nodeName": node_name},
        }
        created = await self.controllers.create(pod)
        return await self.kubelet.set_status(created, {"phase": "Pending"})

    async def pod_ready(self, pod: Obj, *, restarts: int = 0) -> Obj:
        self._ips += 1
        container = pod["spec"]["containers"][0]["name"]
        return await self.kubelet.set_status(
            pod,
            {
                "phase": "Running",
                # Loopback addresses: nothing listens on a pod's port, so the backend's reads of
                # /converge/stats are refused at once (a test that wants them serves them there).
                "podIP": f"127.0.0.{self._ips + 1}",
                "startTime": "2026-12-01T10:00:00Z",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    {
                        "name": container,
                        "image": pod["spec"]["containers"][0]["image"],
                        "imageID": "",
                        "ready": True,
                        "restartCount": restarts,
                        "state": {"running": {"startedAt": "2026-12-01T10:00:05Z"}},
                    }
                ],
            },
        )

    async def crash_loop(self, pod: Obj, *, restarts: int) -> Obj:
        container = pod["spec"]["containers"][0]["name"]
        return await self.kubelet.set_status(
            pod,
            {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [
                    {
                        "name": container,
                        "image": pod["spec"]["containers"][0]["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": restarts,
                        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s"}},
                        "lastState": {"terminated": {"reason": "Error", "exitCode": 1}},
                    }
                ],
            },
        )

    async def roll_out(
        self, name: str = "chat", namespace: str = NAMESPACE, *, node_name: str = "node-a"
    ) -> Obj:
        """The Deployment's rollout as its controllers finish it: old pods go, `replicas` ready
        pods of the current template, and the status a Deployment controller writes."""
        dep = self.deployment(name, namespace)
        revision = dep["spec"]["template"]["metadata"]["labels"]["converge.dev/revision"]
        for pod in self.pods(namespace):
            if pod["metadata"]["labels"].get("converge.dev/revision") != revision:
                await self.controllers.delete(pod)
        current = [
            p
            for p in self.pods(namespace)
            if p["metadata"]["labels"].get("converge.dev/revision") == revision
        ]
        for i in range(len(current), dep["spec"]["replicas"]):
            pod = await self.start_pod(
                dep, template=dep["spec"]["template"], suffix=f"r{revision}-{i}", node_name=node_name
            )
            await self.pod_ready(pod)
        return await self.deployment_status(dep, available=dep["spec"]["replicas"])

    async def deployment_status(self, dep: Obj, *, available: int) -> Obj:
        replicas = dep["spec"]["replicas"]
        return await self.controllers.set_status(
            dep,
            {
                "observedGeneration": dep["metadata"]["generation"],
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": available,
                "availableReplicas": available,
                "conditions": [
                    {"type": "Available", "status": "True" if available >= replicas else "False"},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
                ],
            },
        )
