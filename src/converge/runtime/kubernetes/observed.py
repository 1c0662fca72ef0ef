"""What a cluster reports, read as Converge's observed state (pure: objects in, records out).

- `replica`: a pod as a `Replica` (phase from deletion, pod phase, the server container's state
  and the pod's Ready condition; restarts from its restartCount).
- `conditions`: Ready, Progressing and Degraded by the same rules as every backend
  (`rollout.conditions`), from the pods, then held to what the workload's controller says:
  a Deployment is only Ready once it observed its generation and has `availableReplicas`,
  an InferenceService once its `Ready` condition is True.
- `zones`: nodes grouped by `topology.kubernetes.io/zone`, with their allocatable CPU, memory,
  GPUs and MIG profiles.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from converge.runtime.base import Condition, DeploymentSpec, Gpu, Replica, ReplicaPhase, Zone
from converge.runtime.kubernetes.labels import ANNOTATION_RESTART, LABEL_DEPLOYMENT_ID, LABEL_REVISION
from converge.runtime.kubernetes.manifests import SERVER_CONTAINER
from converge.runtime.kubernetes.namespaces import KSERVE_CONTAINER
from converge.runtime.kubernetes.pods import (
    GPU_MEMORY_LABEL,
    GPU_PRODUCT_LABEL,
    HTTP_PORT,
    LOCAL_ZONE,
    MIG_RESOURCE_PREFIX,
    ZONE_LABEL,
)
from converge.runtime.rollout import ReplicaView
from converge.runtime.rollout import conditions as rollout_conditions

Manifest = dict[str, Any]
P = ReplicaPhase

GPU_COUNT_LABEL = "nvidia.com/gpu.count"  # GPU feature discovery: physical GPUs on the node
# The kubelet's reasons for a container that waits to be (re)started after failing.
BACKOFF_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
_QUANTITY = re.compile(r"^([0-9.]+(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIXES = {
    "": 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity ("3920m", "16318412Ki", "1e9", "2") as a number."""
    if isinstance(text, int | float):
        return float(text)
    m = _QUANTITY.match(text.strip())
    if m is None or m.group(2) not in _SUFFIXES:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    return float(m.group(1)) * _SUFFIXES[m.group(2)]


def _timestamp(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


# --- pods ---------------------------------------------------------------------------------------


def server_container(pod: Manifest) -> str:
    names = [c["name"] for c in pod.get("spec", {}).get("containers", [])]
    for name in (SERVER_CONTAINER, KSERVE_CONTAINER):
        if name in names:
            return name
    return names[0] if names else SERVER_CONTAINER


def _container_status(pod: Manifest) -> Manifest:
    name = server_container(pod)
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == name), {})


def _condition(obj: Manifest, type_: str) -> Manifest | None:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c.get("type") == type_), None)


def _phase(pod: Manifest, container: Manifest) -> ReplicaPhase:
    if pod["metadata"].get("deletionTimestamp"):
        return P.DRAINING  # terminating: out of the Service's endpoints, finishing requests
    phase = pod.get("status", {}).get("phase")
    if phase in ("Failed", "Succeeded"):  # a server that exits for good (evicted, OOM-killed with Never)
        return P.FAILED
    waiting = (container.get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in BACKOFF_REASONS:
        return P.BACKOFF
    ready = _condition(pod, "Ready")
    if phase == "Running" and ready is not None and ready.get("status") == "True":
        return P.READY
    return P.STARTING


def _last_exit(container: Manifest) -> str | None:
    terminated = (container.get("lastState") or {}).get("terminated")
    waiting = (container.get("state") or {}).get("waiting") or {}
    if terminated:
        reason = terminated.get("reason") or "Error"
        return f"{reason} (exit code {terminated.get('exitCode')})"
    if waiting.get("reason") in BACKOFF_REASONS:
        return f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    return None


def replica(pod: Manifest, *, node_zones: Mapping[str, str]) -> Replica:
    meta, status = pod["metadata"], pod.get("status", {})
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    container = _container_status(pod)
    phase = _phase(pod, container)
    ip = status.get("podIP")
    node = pod.get("spec", {}).get("nodeName")
    return Replica(
        id=meta["name"],
        deployment_id=uuid.UUID(labels[LABEL_DEPLOYMENT_ID]),
        revision=int(labels.get(LABEL_REVISION, 0)),
        generation=int(annotations.get(ANNOTATION_RESTART, 0)),
        phase=phase,
        zone=node_zones.get(node, LOCAL_ZONE) if node else "",  # "": not scheduled yet
        endpoint=f"http://{ip}:{HTTP_PORT}" if ip and phase in (P.READY, P.STARTING, P.DRAINING) else None,
        restarts=int(container.get("restartCount", 0)),
        started_at=_timestamp(status.get("startTime")),
        last_exit=_last_exit(container),
    )


def crash_loop(pods: Iterable[Manifest]) -> str | None:
    for pod in pods:
        container = _container_status(pod)
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == "CrashLoopBackOff":
            return (
                f"replica {pod['metadata']['name']} restarted {container.get('restartCount', 0)} times"
                f" ({_last_exit(container) or 'CrashLoopBackOff'})"
            )
    return None


# --- conditions ----------------------------------------------------------------------------------


def conditions(
    spec: DeploymentSpec, *, pods: Sequence[Manifest], replicas: Sequence[Replica], workload: Manifest | None
) -> list[Condition]:
    """Ready, Progressing, Degraded for `spec`, from its pods and its workload object (the
    Deployment or InferenceService; None when it is not there, or none is desired)."""
    views = [
        ReplicaView(
            id=r.id,
            current=(r.revision, r.generation) == (spec.revision, spec.restart_generation),
            phase=r.phase,
        )
        for r in replicas
    ]
    out = rollout_conditions(
        desired=spec.replicas,
        revision=spec.revision,
        replicas=views,
        crash_loop=crash_loop(pods),
        deadline_exceeded=_deadline_exceeded(workload),
        canary=spec.canary_replicas,
    )
    if out[0].status and spec.replicas > 0:
        out[0] = _workload_ready(workload, desired=spec.replicas) or out[0]
    return out


def _deadline_exceeded(workload: Manifest | None) -> bool:
    progressing = _condition(workload, "Progressing") if workload else None
    return bool(
        progressing
        and progressing.get("status") == "False"
        and progressing.get("reason") == "ProgressDeadlineExceeded"
    )


def _workload_ready(workload: Manifest | None, *, desired: int) -> Condition | None:
    """A Ready=False condition when the workload's controller disagrees with the pods, else None."""
    if workload is None:
        return Condition(
            type="Ready",
            status=False,
            reason="WorkloadMissing",
            message="the workload object is not observed yet",
        )
    kind, meta, status = workload["kind"], workload["metadata"], workload.get("status") or {}
    name = f"{kind} {meta.get('namespace')}/{meta['name']}"
    generation, observed = meta.get("generation", 0), status.get("observedGeneration", 0)
    if observed < generation:
        return Condition(
            type="Ready",
            status=False,
            reason="RolloutPending",
            message=f"{name}: generation {generation} not yet observed by its controller (at {observed})",
        )
    if kind == "InferenceService":
        ready = _condition(workload, "Ready")
        if ready is None or ready.get("status") != "True":
            return Condition(
                type="Ready",
                status=False,
                reason=(ready or {}).get("reason") or "InferenceServiceNotReady",
                message=f"{name}: {(ready or {}).get('message') or 'not Ready'}",
            )
        return None
    available = int(status.get("availableReplicas") or 0)
    if available < desired:
        return Condition(
            type="Ready",
            status=False,
            reason="ReplicasNotAvailable",
            message=f"{name}: {available}/{desired} available ({status.get('readyReplicas') or 0} ready,"
            f" {status.get('updatedReplicas') or 0} updated)",
        )
    return None


# --- zones ----------------------------------------------------------------------------------------


def node_zone(node: Manifest) -> str:
    return (node["metadata"].get("labels") or {}).get(ZONE_LABEL) or LOCAL_ZONE


def schedulable(node: Manifest) -> bool:
    ready = _condition(node, "Ready")
    return (
        not node.get("spec", {}).get("unschedulable") and ready is not None and ready.get("status") == "True"
    )


def zones(nodes: Iterable[Manifest], *, gpu_resource: str = "nvidia.com/gpu") -> list[Zone]:
    """Allocatable capacity of the schedulable, ready nodes per labelled zone, and the zone
    "local": every such node, labelled or not. "local" is what a deployment names by default and
    what the renderers place anywhere, so on a multi-zone cluster it is the whole cluster (a
    default deployment is admitted against all of it), and on an unlabelled one the only zone."""
    by_zone: dict[str, Zone] = {LOCAL_ZONE: Zone(name=LOCAL_ZONE, cpu=0.0, memory_bytes=0)}
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        if not schedulable(node):
            continue
        allocatable = node.get("status", {}).get("allocatable") or {}
        for name in {node_zone(node), LOCAL_ZONE}:
            zone = by_zone.setdefault(name, Zone(name=name, cpu=0.0, memory_bytes=0))
            zone.cpu += quantity(allocatable.get("cpu", "0"))
            zone.memory_bytes += int(quantity(allocatable.get("memory", "0")))
            zone.gpus.extend(_gpus(node, allocatable, gpu_resource=gpu_resource, first_index=len(zone.gpus)))
    return [by_zone[name] for name in sorted(by_zone)]


def _gpus(
    node: Manifest, allocatable: Mapping[str, Any], *, gpu_resource: str, first_index: int
) -> list[Gpu]:
    labels = node["metadata"].get("labels") or {}
    whole = int(quantity(allocatable.get(gpu_resource, "0")))
    mig = sorted(
        key.removeprefix(MIG_RESOURCE_PREFIX)
        for key, value in allocatable.items()
        if key.startswith(MIG_RESOURCE_PREFIX) and quantity(value) > 0
    )
    if not whole and not mig:
        return []
    # GPU feature discovery's count is the physical GPUs: allocatable nvidia.com/gpu counts
    # time-sliced shares, and is 0 on a node whose GPUs are all split into MIG slices.
    physical = int(labels[GPU_COUNT_LABEL]) if labels.get(GPU_COUNT_LABEL, "").isdigit() else max(whole, 1)
    memory = int(labels[GPU_MEMORY_LABEL]) << 20 if labels.get(GPU_MEMORY_LABEL, "").isdigit() else 0
    product = labels.get(GPU_PRODUCT_LABEL) or "nvidia-gpu"
    return [
        Gpu(index=first_index + i, name=product, memory_bytes=memory, mig_profiles=list(mig))
        for i in range(physical)
    ]
