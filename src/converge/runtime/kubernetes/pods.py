"""The pieces every pod Converge renders is made of (pure): containers, probes, security,
resources, GPU and zone placement, and the digest-keyed artifact cache.

Serving pods (Deployments and KServe predictors) and build Jobs are assembled from these in
`manifests.py`, so a rule such as "non-root, read-only root filesystem, no capabilities" or
"requests equal limits" lives in one place and holds for every workload.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from converge.runtime.base import Resources
from converge.runtime.kubernetes.specs import (
    Artifact,
    ClusterProfile,
    ContainerSize,
    GpuPlacement,
    GpuSharing,
    ServingRuntimeKind,
    check_label_value,
    check_mig_profile,
)

Manifest = dict[str, Any]

HTTP_PORT = 8080
PORT_NAME = "http"
# converge.serving.common's routes (a test keeps them equal; importing it would pull in uvicorn).
LIVE_PATH = "/health/live"
READY_PATH = "/health/ready"
VLLM_HEALTH_PATH = "/health"  # vLLM's server answers it once the engine is up; it has no live/ready pair
# serving.common.GRACEFUL_SHUTDOWN_S (30) for in-flight requests to finish, plus a margin.
TERMINATION_GRACE_S = 45

SERVER_COMMAND = ("python", "-m", "converge.serving")
VLLM_COMMAND = ("python3", "-m", "vllm.entrypoints.openai.api_server")
# The entry point of the pod steps (fetch, verify, scan, benchmark): `workers/steps.py`, over
# ArtifactStore.fetch_to and the build runner's checks, the same code the local builder runs,
# one step per container; `workers/kube_builds.py` reads their termination messages.
STEP_COMMAND = ("python", "-m", "converge.workers.steps")

CACHE_VOLUME = "artifact-cache"
CACHE_DIR = "/var/cache/converge/artifacts"
MODELS_DIR = "/models"
TMP_VOLUME = "tmp"
TMP_DIR = "/tmp"
TMP_SIZE = "1Gi"
SHM_VOLUME = "dshm"
SHM_SIZE = "2Gi"  # vLLM's workers exchange tensors through /dev/shm

ZONE_LABEL = "topology.kubernetes.io/zone"
HOSTNAME_LABEL = "kubernetes.io/hostname"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, also GPU feature discovery's
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"  # the device plugin's "mixed" MIG strategy
LOCAL_ZONE = "local"  # the local backend's one zone: on a cluster, "anywhere"
# Model loads take minutes; a Deployment is only "stuck" after half an hour without progress.
PROGRESS_DEADLINE_S = 1800


# --- quantities --------------------------------------------------------------------------------


def cpu_quantity(cores: float) -> str:
    millis = round(cores * 1000)
    if millis <= 0:
        raise ValueError(f"CPU must be at least 1m, got {cores}")
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def bytes_quantity(size: int) -> str:
    for suffix, unit in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


# --- security ----------------------------------------------------------------------------------


def container_security() -> Manifest:
    """Pod Security "restricted", and a root filesystem nothing can write to."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security(cluster: ClusterProfile) -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": cluster.run_as_user,
        "runAsGroup": cluster.run_as_group,
        "fsGroup": cluster.run_as_group,
        # A cache claim holds many large files: chown them only when the root's owner is wrong.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


# --- resources ---------------------------------------------------------------------------------


def gpu_request(resources: Resources, *, gpu: GpuPlacement, cluster: ClusterProfile) -> dict[str, str]:
    """The extended resource a replica asks for: whole GPUs, MIG slices or one time-sliced share."""
    if resources.mig_profile is not None:
        if gpu.sharing is GpuSharing.TIME_SLICED:
            raise ValueError("A MIG slice is not time-sliced here: ask for a MIG profile or a shared GPU")
        profile = check_mig_profile(resources.mig_profile)
        return {f"{MIG_RESOURCE_PREFIX}{profile}": str(max(1, resources.gpus))}
    if resources.gpus == 0:
        if gpu.sharing is GpuSharing.TIME_SLICED:
            raise ValueError("A time-sliced GPU share needs gpus: 1")
        return {}
    if gpu.sharing is GpuSharing.TIME_SLICED:
        if resources.gpus != 1:
            raise ValueError(
                f"A replica holds one share of a time-sliced GPU, not {resources.gpus}; "
                "ask for gpus: 1, or for whole GPUs (sharing: exclusive)"
            )
        return {cluster.shared_gpu_resource: "1"}
    return {cluster.gpu_resource: str(resources.gpus)}


def replica_resources(resources: Resources, *, gpu: GpuPlacement, cluster: ClusterProfile) -> Manifest:
    """Requests equal to limits: Guaranteed QoS, so replicas are the last evicted and, with the
    static CPU manager, get whole cores to themselves."""
    amounts = {
        "cpu": cpu_quantity(resources.cpu),
        "memory": bytes_quantity(resources.memory_bytes),
        **gpu_request(resources, gpu=gpu, cluster=cluster),
    }
    return {"requests": dict(amounts), "limits": dict(amounts)}


def sized(size: ContainerSize) -> Manifest:
    amounts = {"cpu": cpu_quantity(size.cpu), "memory": bytes_quantity(size.memory_bytes)}
    return {"requests": dict(amounts), "limits": dict(amounts)}


# --- placement ---------------------------------------------------------------------------------


def gpu_product_label(gpu_type: str) -> str:
    """GPU feature discovery's product label for an NVML device name ("NVIDIA H100 80GB HBM3"
    -> "NVIDIA-H100-80GB-HBM3"); a name already in label form is kept."""
    return check_label_value(re.sub(r"\s+", "-", gpu_type.strip()), what="GPU type")


def placement(
    *,
    resources: Resources,
    gpu: GpuPlacement,
    zones: Sequence[str],
    selector: Mapping[str, str],
    max_replicas: int,
    cluster: ClusterProfile,
) -> Manifest:
    """affinity, tolerations and topologySpreadConstraints (only the ones that apply)."""
    wanted = _zones(zones)
    terms: list[Manifest] = []
    if wanted:
        terms.append({"key": ZONE_LABEL, "operator": "In", "values": wanted})
    if resources.gpu_type:
        terms.append(
            {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [gpu_product_label(resources.gpu_type)]}
        )
    if gpu.min_memory_mib is not None:
        if gpu.min_memory_mib <= 0:
            raise ValueError(f"min_memory_mib must be positive, got {gpu.min_memory_mib}")
        terms.append({"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": [str(gpu.min_memory_mib - 1)]})
    out: Manifest = {}
    if terms:
        required = {"nodeSelectorTerms": [{"matchExpressions": terms}]}
        out["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}
    if gpu_request(resources, gpu=gpu, cluster=cluster):
        out["tolerations"] = [{"key": cluster.gpu_taint_key, "operator": "Exists", "effect": "NoSchedule"}]
    spread = _spread(zones=wanted, selector=selector, max_replicas=max_replicas)
    if spread:
        out["topologySpreadConstraints"] = spread
    return out


def _zones(zones: Sequence[str]) -> list[str]:
    unique = list(dict.fromkeys(zones))
    if unique == [LOCAL_ZONE]:
        return []
    if LOCAL_ZONE in unique:
        raise ValueError(
            f"Zone {LOCAL_ZONE!r} is the local backend's; on a cluster name the zones, or only it"
        )
    return [check_label_value(zone, what="Zone") for zone in unique]


def _spread(*, zones: list[str], selector: Mapping[str, str], max_replicas: int) -> list[Manifest]:
    def common() -> Manifest:  # fresh each time: no object is shared between two places
        # pod-template-hash: spread each revision by itself, or a rollout skews against the old pods.
        return {"labelSelector": {"matchLabels": dict(selector)}, "matchLabelKeys": ["pod-template-hash"]}

    out: list[Manifest] = []
    if len(zones) > 1:
        # minDomains: with a zone out of nodes, replicas wait rather than crowd into the others.
        zone = {
            "maxSkew": 1,
            "minDomains": len(zones),
            "topologyKey": ZONE_LABEL,
            "whenUnsatisfiable": "DoNotSchedule",
        }
        out.append({**zone, **common()})
    if max_replicas > 1:
        node = {"maxSkew": 1, "topologyKey": HOSTNAME_LABEL, "whenUnsatisfiable": "ScheduleAnyway"}
        out.append({**node, **common()})
    return out


# --- volumes and the artifact cache ------------------------------------------------------------


def cache_volume(cluster: ClusterProfile) -> Manifest:
    cache = cluster.cache
    if cache.per_node:
        return {"name": CACHE_VOLUME, "hostPath": {"path": cache.host_path, "type": "Directory"}}
    return {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache.claim_name}}


def scratch_volumes(runtime: ServingRuntimeKind | None) -> list[Manifest]:
    volumes: list[Manifest] = [{"name": TMP_VOLUME, "emptyDir": {"sizeLimit": TMP_SIZE}}]
    if runtime is ServingRuntimeKind.VLLM:
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}})
    return volumes


def model_path(artifact: Artifact) -> str:
    return f"{MODELS_DIR}/{artifact.sha256}"


def model_mount(artifact: Artifact) -> Manifest:
    """Only this artifact of the shared cache, read-only: a server sees no other project's models."""
    return {
        "name": CACHE_VOLUME,
        "mountPath": model_path(artifact),
        "subPath": artifact.sha256,
        "readOnly": True,
    }


def _tmp_mount() -> Manifest:
    return {"name": TMP_VOLUME, "mountPath": TMP_DIR}


def step_container(
    *, name: str, args: Sequence[str], mounts: Sequence[Manifest], cluster: ClusterProfile
) -> Manifest:
    container: Manifest = {
        "name": name,
        "image": cluster.images.converge,
        "command": list(STEP_COMMAND),
        "args": list(args),
        "env": [{"name": "HOME", "value": TMP_DIR}],
        "resources": sized(cluster.step_size),
        "securityContext": container_security(),
        "volumeMounts": [*mounts, _tmp_mount()],
        # A step ends with one JSON line; one that fails without writing its result file (a
        # crash, an import error) still reports its last log lines as the termination message,
        # which the build runner records as the failing step's reason.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if cluster.artifact_store_secret is not None:
        container["envFrom"] = [{"secretRef": {"name": cluster.artifact_store_secret}}]
    return container


def fetch_container(artifact: Artifact, *, cluster: ClusterProfile) -> Manifest:
    """Fill the cache with the artifact once per node (or claim): a copy already there is
    re-hashed and kept when its sha256 matches; otherwise the blob is streamed from the object
    store, verified while it is written, and renamed into place only then."""
    args = ["fetch", "--uri", artifact.uri, "--sha256", artifact.sha256, "--cache-dir", CACHE_DIR]
    mounts = [{"name": CACHE_VOLUME, "mountPath": CACHE_DIR}]
    return step_container(name="fetch", args=args, mounts=mounts, cluster=cluster)


# --- the model server --------------------------------------------------------------------------


def runtime_command(runtime: ServingRuntimeKind) -> tuple[list[str], list[str]]:
    """(command, the args every workload of this runtime starts with)."""
    if runtime is ServingRuntimeKind.VLLM:
        return list(VLLM_COMMAND), []
    return list(SERVER_COMMAND), [runtime.value]


def workload_args(
    runtime: ServingRuntimeKind,
    *,
    artifact: Artifact,
    model_name: str,
    resources: Resources,
    extra: Sequence[str],
) -> list[str]:
    """The args after `runtime_command`'s: which model, under which name, on which port."""
    path = model_path(artifact)
    if runtime is ServingRuntimeKind.VLLM:
        args = ["--model", path, "--served-model-name", model_name]
        args += ["--host", "0.0.0.0", "--port", str(HTTP_PORT)]
        gpus = resources.gpus if resources.mig_profile is None else 1
        if gpus > 1 and "--tensor-parallel-size" not in extra:
            args += ["--tensor-parallel-size", str(gpus)]
        return [*args, *extra]
    args = ["--model-path", path, "--model-name", model_name, "--host", "0.0.0.0", "--port", str(HTTP_PORT)]
    if runtime is ServingRuntimeKind.LLAMA_CPP and "--n-threads" not in extra:
        # llama.cpp counts the node's CPUs, not the pod's: give it the threads it was granted.
        args += ["--n-threads", str(resources.threads)]
    gpu = resources.gpus > 0 or resources.mig_profile is not None
    if runtime is ServingRuntimeKind.LLAMA_CPP and gpu and "--n-gpu-layers" not in extra:
        args += ["--n-gpu-layers", "-1"]  # a pod given a GPU offloads every layer to it
    return [*args, *extra]


def otel_env(cluster: ClusterProfile, *, service: str, attributes: Mapping[str, str]) -> dict[str, str]:
    """Where a model server exports its spans and who it says it is (the OpenTelemetry SDK reads
    OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES); nothing when the cluster has no collector."""
    if not cluster.otel_endpoint:
        return {}
    return {
        "CONVERGE_OTEL__ENDPOINT": cluster.otel_endpoint,  # Converge's servers
        "CONVERGE_OTEL__SAMPLE_RATIO": str(cluster.otel_sample_ratio),
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{cluster.otel_endpoint}/v1/traces",  # other servers' SDKs
        "OTEL_SERVICE_NAME": service,
        "OTEL_RESOURCE_ATTRIBUTES": ",".join(f"{k}={v}" for k, v in sorted(attributes.items())),
    }


def server_env(
    runtime: ServingRuntimeKind,
    extra: Mapping[str, str],
    *,
    resources: Resources,
    tracing: Mapping[str, str] | None = None,
) -> list[Manifest]:
    # Nothing is fetched from a model hub at run time; the root filesystem is read-only, so
    # caches go to /tmp. A CPU server runs the threads it was granted (it would count the
    # node's CPUs). The deployment's own environment comes last and wins.
    base = {"HOME": TMP_DIR, "HF_HUB_OFFLINE": "1", **(tracing or {})}
    if runtime is ServingRuntimeKind.VLLM:
        base |= {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    else:
        base["OMP_NUM_THREADS"] = str(resources.threads)
    merged = base | dict(extra)
    return [{"name": name, "value": merged[name]} for name in sorted(merged)]


def probes(runtime: ServingRuntimeKind, *, startup_budget_s: int | None = None) -> Manifest:
    """Liveness and readiness on the server's own health routes.

    A Converge server answers /health/live as soon as it listens, while the model loads, so
    liveness never kills a slow load and only readiness waits for it. vLLM listens only once its
    engine is up, so a startup probe gives it `startup_budget_s` (15 minutes by default) first.
    """
    live, ready = (
        (VLLM_HEALTH_PATH, VLLM_HEALTH_PATH)
        if runtime is ServingRuntimeKind.VLLM
        else (LIVE_PATH, READY_PATH)
    )
    out: Manifest = {
        "livenessProbe": _http_probe(live, period_s=10, timeout_s=5, failures=3),
        "readinessProbe": _http_probe(ready, period_s=5, timeout_s=3, failures=3),
    }
    if startup_budget_s is None and runtime is ServingRuntimeKind.VLLM:
        startup_budget_s = 900
    if startup_budget_s is not None:
        period = 5
        out["startupProbe"] = _http_probe(
            ready, period_s=period, timeout_s=3, failures=max(1, -(-startup_budget_s // period))
        )
    return out


def _http_probe(path: str, *, period_s: int, timeout_s: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": PORT_NAME, "scheme": "HTTP"},
        "periodSeconds": period_s,
        "timeoutSeconds": timeout_s,
        "failureThreshold": failures,
    }


def server_ports() -> list[Manifest]:
    return [{"name": PORT_NAME, "containerPort": HTTP_PORT, "protocol": "TCP"}]


def server_mounts(runtime: ServingRuntimeKind, artifact: Artifact) -> list[Manifest]:
    mounts = [model_mount(artifact), _tmp_mount()]
    if runtime is ServingRuntimeKind.VLLM:
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    return mounts
