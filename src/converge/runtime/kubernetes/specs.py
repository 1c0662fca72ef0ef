"""Typed inputs of the Kubernetes manifest renderers (`manifests.py`): plain records, no I/O.

A serving workload reuses the `DeploymentSpec` the local backend receives (resources, GPUs,
zones, replicas) and adds what only a cluster needs: the project it runs in, the artifact's
address in the object store, the serving runtime, autoscaling bounds and a priority tier.
`ClusterProfile` holds the cluster-wide settings (KServe present or not, images, where the
artifact cache lives, who may reach the model servers).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from converge import __version__
from converge.runtime.base import DeploymentSpec, Resources, ServerKind
from converge.runtime.kubernetes.model_cr import artifact_uri

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_MIG_PROFILE = re.compile(r"^[1-9][0-9]*g\.[0-9]+gb$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_CPU_TARGET = 70  # percent of the CPU requested, averaged over the replicas


class ServingRuntimeKind(StrEnum):
    """The program a replica's container runs; one KServe `ServingRuntime` each."""

    LLAMA_CPP = "llama-cpp"  # python -m converge.serving llama-cpp (GGUF chat)
    EMBEDDINGS = "embeddings"  # python -m converge.serving embeddings
    V2 = "v2"  # python -m converge.serving v2 (MLServer behind Converge's restricted loaders)
    VLLM = "vllm"  # vLLM's OpenAI-compatible server, for chat models on GPUs

    @classmethod
    def default_for(cls, server: ServerKind) -> ServingRuntimeKind:
        return cls(server.value)

    @property
    def is_converge_server(self) -> bool:
        """Runs `converge.serving`, so answers `/health/live`, `/health/ready`, `/converge/stats`."""
        return self is not ServingRuntimeKind.VLLM


# Library formats (control/deployments/admission.py SERVER_FOR_FORMAT, plus what vLLM loads).
SUPPORTED_FORMATS: Mapping[ServingRuntimeKind, tuple[str, ...]] = {
    ServingRuntimeKind.LLAMA_CPP: ("gguf",),
    ServingRuntimeKind.EMBEDDINGS: ("sentence-transformers",),
    ServingRuntimeKind.V2: ("pickle", "onnx", "mlflow"),
    ServingRuntimeKind.VLLM: ("safetensors", "hf", "gguf"),
}


class GpuSharing(StrEnum):
    EXCLUSIVE = "exclusive"  # whole GPUs (`nvidia.com/gpu`) or MIG slices (`nvidia.com/mig-*`)
    TIME_SLICED = "time-sliced"  # one share of a GPU the device plugin time-slices


class PriorityTier(StrEnum):
    """Who yields to whom when the cluster is full: production inference > builds > development."""

    PRODUCTION = "production"
    BUILD = "build"
    DEVELOPMENT = "development"


@dataclass(frozen=True, kw_only=True)
class ProjectRef:
    project_id: uuid.UUID
    name: str  # the project's DNS-label name (control/projects/schemas.py ProjectName)

    def __post_init__(self) -> None:
        if len(self.name) > 63 or not _DNS1123_LABEL.fullmatch(self.name):
            raise ValueError(
                f"Project name {self.name!r} is not a DNS label (a-z, 0-9, '-', 1-63 characters)"
            )


@dataclass(frozen=True, kw_only=True)
class ProjectQuota:
    """A project's quota; None = unlimited (as in `Project.quotas`), 0 = none at all.

    MIG slices are capped per profile listed in `mig`: a ResourceQuota has no wildcard, so a
    profile that is not listed is not capped (list the cluster's profiles at 0 to forbid them).
    """

    cpu: float | None = None
    memory_bytes: int | None = None
    gpus: int | None = None
    mig: Mapping[str, int] = field(default_factory=dict)  # MIG profile ("1g.10gb") -> slices

    def __post_init__(self) -> None:
        for name, value in (("cpu", self.cpu), ("memory_bytes", self.memory_bytes), ("gpus", self.gpus)):
            if value is not None and value < 0:
                raise ValueError(f"Quota {name} must not be negative, got {value}")
        for profile, count in self.mig.items():
            check_mig_profile(profile)
            if count < 0:
                raise ValueError(f"Quota for MIG profile {profile} must not be negative, got {count}")

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> ProjectQuota:
        """From `Project.quotas` ({"cpu", "memory_bytes", "gpus"}, optionally {"mig": {...}})."""
        return cls(
            cpu=stored.get("cpu"),
            memory_bytes=stored.get("memory_bytes"),
            gpus=stored.get("gpus"),
            mig=dict(stored.get("mig") or {}),
        )


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """A library artifact: its digest, where the object store keeps it, and its format."""

    sha256: str
    uri: str
    format: str

    def __post_init__(self) -> None:
        digest = self.sha256.removeprefix("sha256:").lower()
        if not _SHA256.fullmatch(digest):
            raise ValueError(f"{self.sha256!r} is not a hex SHA-256 digest")
        object.__setattr__(self, "sha256", digest)  # frozen: normalised once, here
        if not self.uri.strip():
            raise ValueError("The artifact's URI is empty; pass where the object store keeps it")

    @classmethod
    def in_store(cls, *, base_uri: str, sha256: str, format: str) -> Artifact:
        """The artifact at its content address under the library's `base_uri` (s3://..., file://...)."""
        return cls(sha256=sha256, uri=artifact_uri(base_uri, sha256), format=format)


@dataclass(frozen=True, kw_only=True)
class Autoscaling:
    """A HorizontalPodAutoscaler on CPU utilisation; the stabilisation windows follow the
    deployment's `autoscaling.scale_up_after_s` and `cooldown_s`."""

    min_replicas: int
    max_replicas: int
    target_cpu_utilization: int = DEFAULT_CPU_TARGET
    scale_up_after_s: float = 5.0
    cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"Autoscaling needs 1 <= min_replicas <= max_replicas, got {self.min_replicas}..{self.max_replicas}"
                " (scaling to zero is the controller's job: it stops rendering the workload)"
            )
        if not 1 <= self.target_cpu_utilization <= 100:
            raise ValueError(f"target_cpu_utilization is a percentage, got {self.target_cpu_utilization}")
        for name, window in (("scale_up_after_s", self.scale_up_after_s), ("cooldown_s", self.cooldown_s)):
            if not 0 <= window <= 3600:  # the HPA's limit for a stabilisation window
                raise ValueError(f"{name} must be between 0 and 3600 seconds, got {window}")


@dataclass(frozen=True, kw_only=True)
class GpuPlacement:
    """What a cluster adds to `Resources.gpus/gpu_type/mig_profile`."""

    sharing: GpuSharing = GpuSharing.EXCLUSIVE
    min_memory_mib: int | None = None  # matched against GPU feature discovery's nvidia.com/gpu.memory


@dataclass(frozen=True, kw_only=True)
class InferenceWorkload:
    """One revision of a deployment, as a cluster runs it."""

    project: ProjectRef
    deployment: DeploymentSpec
    artifact: Artifact
    runtime: ServingRuntimeKind | None = None  # None: the one named like deployment.template.server
    autoscaling: Autoscaling | None = None  # None: exactly deployment.replicas
    tier: PriorityTier = PriorityTier.PRODUCTION
    gpu: GpuPlacement = GpuPlacement()

    @property
    def serving_runtime(self) -> ServingRuntimeKind:
        return self.runtime or ServingRuntimeKind.default_for(self.deployment.template.server)


@dataclass(frozen=True, kw_only=True)
class BuildJob:
    """One build (workers/builds.py's steps) as a Kubernetes Job in the project's namespace."""

    build_id: uuid.UUID
    project: ProjectRef
    model_name: str
    version: str
    server: ServerKind
    profile: str
    artifact: Artifact
    resources: Resources = Resources()  # what the target profile gives one replica
    runtime: ServingRuntimeKind | None = None
    gpu: GpuPlacement = GpuPlacement()
    timeout_s: int = 3600

    @property
    def serving_runtime(self) -> ServingRuntimeKind:
        return self.runtime or ServingRuntimeKind.default_for(self.server)


def _default_image(name: str) -> str:
    # One image per runtime, as one virtual environment per server kind runs locally; tagged
    # with the package version so a release's manifests name the release's images.
    return f"ghcr.io/converge-dev/{name}:{__version__}"


@dataclass(frozen=True, kw_only=True)
class RuntimeImages:
    converge: str = field(
        default_factory=lambda: _default_image("converge")
    )  # fetch, verify, scan, benchmark
    llama_cpp: str = field(default_factory=lambda: _default_image("converge-llama-cpp"))
    embeddings: str = field(default_factory=lambda: _default_image("converge-embeddings"))
    v2: str = field(default_factory=lambda: _default_image("converge-v2"))
    vllm: str = "docker.io/vllm/vllm-openai:v0.10.2"

    def for_runtime(self, kind: ServingRuntimeKind) -> str:
        return {
            ServingRuntimeKind.LLAMA_CPP: self.llama_cpp,
            ServingRuntimeKind.EMBEDDINGS: self.embeddings,
            ServingRuntimeKind.V2: self.v2,
            ServingRuntimeKind.VLLM: self.vllm,
        }[kind]


@dataclass(frozen=True, kw_only=True)
class ArtifactCache:
    """Where verified artifacts are kept, keyed by digest, for every pod that needs them.

    Default, `host_path`: one directory per node, so an artifact crosses the network once per
    node whatever the number of replicas, and loads at local-disk speed. The directory must
    exist, writable by `ClusterProfile.run_as_user` (node bootstrap or a DaemonSet prepares it;
    hostPath type `Directory` makes a missing one an explicit pod event rather than a root-owned
    directory the non-root fetcher cannot write). Pod Security "baseline" and "restricted"
    forbid hostPath volumes, so namespaces are labelled to enforce neither.

    With `storage_class`: one ReadWriteMany claim per project namespace instead (fetched once
    per project, read over the network storage), which keeps Pod Security "restricted"
    enforceable. A ReadWriteOnce node-local class cannot serve this: a Deployment's pods would
    all be pinned to the node of its first replica.
    """

    host_path: str = "/var/lib/converge/artifacts"
    storage_class: str | None = None
    claim_name: str = "converge-artifact-cache"
    claim_size: str = "500Gi"

    @property
    def per_node(self) -> bool:
        return self.storage_class is None


@dataclass(frozen=True, kw_only=True)
class PodPeer:
    """Pods in a namespace, selected by labels (NetworkPolicy peers)."""

    namespace: str
    pod_labels: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class EgressRule:
    """Where pods may connect to: a CIDR, or pods of a namespace; on these TCP ports."""

    ports: tuple[int, ...]
    cidr: str | None = None
    pods: PodPeer | None = None

    def __post_init__(self) -> None:
        if (self.cidr is None) == (self.pods is None):
            raise ValueError("An egress rule names exactly one of cidr or pods")
        if not self.ports or not all(0 < p < 65536 for p in self.ports):
            raise ValueError(f"Egress ports must be TCP ports, got {self.ports}")


def _platform_pods(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "converge", "app.kubernetes.io/component": component}


@dataclass(frozen=True, kw_only=True)
class ContainerSize:
    cpu: float
    memory_bytes: int


@dataclass(frozen=True, kw_only=True)
class ClusterProfile:
    kserve: bool = False  # KServe's CRDs are installed: InferenceServices, else Deployments
    system_namespace: str = "converge"  # where the API, gateway and controller run
    namespace_prefix: str = "converge-"
    gateway_pods: Mapping[str, str] = field(default_factory=lambda: _platform_pods("gateway"))
    controller_pods: Mapping[str, str] = field(default_factory=lambda: _platform_pods("controller"))
    # The api and worker roles embed through an in-process gateway (knowledge-base search and
    # ingestion), so they reach model servers directly too.
    api_pods: Mapping[str, str] = field(default_factory=lambda: _platform_pods("api"))
    worker_pods: Mapping[str, str] = field(default_factory=lambda: _platform_pods("worker"))
    dns: PodPeer = PodPeer(namespace="kube-system", pod_labels={"k8s-app": "kube-dns"})
    # The artifact store the library uses; the default suits S3-compatible stores over HTTPS.
    artifact_store_egress: tuple[EgressRule, ...] = (EgressRule(cidr="0.0.0.0/0", ports=(443,)),)
    # A Secret in each project namespace with the store's credentials (AWS_* and the like), or
    # None when pods reach the store through workload identity.
    artifact_store_secret: str | None = None
    images: RuntimeImages = RuntimeImages()
    cache: ArtifactCache = ArtifactCache()
    # An OTLP/HTTP collector the model servers export their spans to (reachable from project
    # namespaces, e.g. http://otel-collector.observability:4318), and where pods may reach it;
    # None: the servers trace nothing.
    otel_endpoint: str | None = None
    otel_sample_ratio: float = 1.0
    otel_egress: tuple[EgressRule, ...] = ()
    run_as_user: int = 1000
    run_as_group: int = 1000
    gpu_resource: str = "nvidia.com/gpu"
    shared_gpu_resource: str = "nvidia.com/gpu.shared"  # the device plugin's renameByDefault name
    gpu_taint_key: str = "nvidia.com/gpu"
    step_size: ContainerSize = ContainerSize(
        cpu=0.5, memory_bytes=512 << 20
    )  # fetch, verify, scan, benchmark
    container_default: ContainerSize = ContainerSize(cpu=0.5, memory_bytes=512 << 20)  # the LimitRange's

    def __post_init__(self) -> None:
        if self.run_as_user <= 0 or self.run_as_group <= 0:
            raise ValueError("Pods run as a non-root user: run_as_user and run_as_group must be > 0")


def check_label_value(value: str, *, what: str) -> str:
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a valid Kubernetes label value")
    return value


def check_mig_profile(profile: str) -> str:
    if not _MIG_PROFILE.fullmatch(profile):
        raise ValueError(f"MIG profile {profile!r} is not of the form <n>g.<m>gb (e.g. 1g.10gb)")
    return profile
