"""Cluster-wide and per-project objects (pure): PriorityClasses, and each project's namespace
with its quota, container defaults, network policies, cache claim and KServe ServingRuntimes."""

from __future__ import annotations

from collections.abc import Mapping

from converge.runtime.kubernetes import pods
from converge.runtime.kubernetes.labels import (
    COMPONENT_RUNTIME,
    COMPONENT_SERVER,
    metadata,
    namespace_name,
    priority_class_name,
    project_labels,
    serving_runtime_name,
)
from converge.runtime.kubernetes.model_cr import MANAGED_BY
from converge.runtime.kubernetes.pods import Manifest
from converge.runtime.kubernetes.specs import (
    SUPPORTED_FORMATS,
    ClusterProfile,
    EgressRule,
    PriorityTier,
    ProjectQuota,
    ProjectRef,
    ServingRuntimeKind,
)

KSERVE_RUNTIME_API = "serving.kserve.io/v1alpha1"
KSERVE_CONTAINER = "kserve-container"  # the name KServe merges a predictor's model spec into
PRIORITIES: Mapping[PriorityTier, int] = {
    PriorityTier.PRODUCTION: 1_000_000,
    PriorityTier.BUILD: 100_000,
    PriorityTier.DEVELOPMENT: 10_000,
}


# --- cluster-wide ------------------------------------------------------------------------------


def render_priority_classes() -> list[Manifest]:
    descriptions = {
        PriorityTier.PRODUCTION: "Converge production model servers: preempt builds and development",
        PriorityTier.BUILD: "Converge builds (fetch, verify, scan, smoke-load, benchmark)",
        PriorityTier.DEVELOPMENT: "Converge development model servers: wait for room, never preempt",
    }
    labels = {"app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/part-of": "converge"}
    return [
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": metadata(priority_class_name(tier), namespace=None, labels=labels),
            "value": PRIORITIES[tier],
            "globalDefault": False,
            "preemptionPolicy": "Never" if tier is PriorityTier.DEVELOPMENT else "PreemptLowerPriority",
            "description": descriptions[tier],
        }
        for tier in PriorityTier
    ]


# --- per project -------------------------------------------------------------------------------


def render_project(project: ProjectRef, *, quota: ProjectQuota, cluster: ClusterProfile) -> list[Manifest]:
    namespace = namespace_name(project, cluster=cluster)
    labels = project_labels(project)
    objects = [
        _namespace(namespace, labels=labels, cluster=cluster),
        _resource_quota(namespace, labels=labels, quota=quota, cluster=cluster),
        _limit_range(namespace, labels=labels, cluster=cluster),
        *render_network_policies(namespace, labels=labels, cluster=cluster),
    ]
    if not cluster.cache.per_node:
        objects.append(_cache_claim(namespace, labels=labels, cluster=cluster))
    if cluster.kserve:
        objects.extend(render_serving_runtimes(namespace=namespace, labels=labels, cluster=cluster))
    return objects


def _namespace(name: str, *, labels: Mapping[str, str], cluster: ClusterProfile) -> Manifest:
    # A hostPath cache is forbidden by Pod Security "baseline" and "restricted" alike (see
    # ArtifactCache); the pods themselves meet "restricted", which audit records against.
    enforce = "privileged" if cluster.cache.per_node else "restricted"
    security = {
        "pod-security.kubernetes.io/enforce": enforce,
        "pod-security.kubernetes.io/audit": "restricted",
    }
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": metadata(name, namespace=None, labels={**labels, **security}),
    }


def _resource_quota(
    namespace: str, *, labels: Mapping[str, str], quota: ProjectQuota, cluster: ClusterProfile
) -> Manifest:
    hard: dict[str, str] = {}
    if quota.cpu is not None:
        # Requests equal limits in every pod Converge renders; both are capped so that a pod
        # from elsewhere cannot take the quota's limits with tiny requests.
        hard["requests.cpu"] = hard["limits.cpu"] = _cpu_or_zero(quota.cpu)
    if quota.memory_bytes is not None:
        hard["requests.memory"] = hard["limits.memory"] = pods.bytes_quantity(quota.memory_bytes)
    if quota.gpus is not None:
        # Extended resources can only be quota'd on requests (they cannot be overcommitted).
        # A time-sliced share counts like a GPU: a project without GPUs gets no shares either.
        hard[f"requests.{cluster.gpu_resource}"] = str(quota.gpus)
        hard[f"requests.{cluster.shared_gpu_resource}"] = str(quota.gpus)
    for profile in sorted(quota.mig):
        hard[f"requests.{pods.MIG_RESOURCE_PREFIX}{profile}"] = str(quota.mig[profile])
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": metadata("converge-quota", namespace=namespace, labels=labels),
        "spec": {"hard": hard},
    }


def _cpu_or_zero(cores: float) -> str:
    return "0" if cores == 0 else pods.cpu_quantity(cores)


def _limit_range(namespace: str, *, labels: Mapping[str, str], cluster: ClusterProfile) -> Manifest:
    """Requests and limits for containers that name none: a quota'd namespace refuses them."""
    size = pods.sized(cluster.container_default)
    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": metadata("converge-defaults", namespace=namespace, labels=labels),
        "spec": {
            "limits": [{"type": "Container", "default": size["limits"], "defaultRequest": size["requests"]}]
        },
    }


def render_network_policies(
    namespace: str, *, labels: Mapping[str, str], cluster: ClusterProfile
) -> list[Manifest]:
    """Deny everything, then allow: model servers <- the gateway (and the api and worker roles,
    which embed through an in-process one) and the controller; every pod -> DNS and
    the artifact store. Nothing else reaches a model server, and a model server reaches nothing."""

    def policy(name: str, spec: Manifest) -> Manifest:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": metadata(name, namespace=namespace, labels=labels),
            "spec": spec,
        }

    def from_platform(*peers: Mapping[str, str]) -> Manifest:
        return {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/component": COMPONENT_SERVER,
                    "app.kubernetes.io/managed-by": MANAGED_BY,
                }
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [_peer(cluster.system_namespace, pod_labels) for pod_labels in peers],
                    "ports": [{"protocol": "TCP", "port": pods.HTTP_PORT}],
                }
            ],
        }

    dns = [{"protocol": protocol, "port": 53} for protocol in ("UDP", "TCP")]
    return [
        policy("converge-default-deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        # The data path: the gateway, and the api and worker roles' in-process gateways.
        policy(
            "converge-allow-gateway",
            from_platform(cluster.gateway_pods, cluster.api_pods, cluster.worker_pods),
        ),
        policy("converge-allow-controller", from_platform(cluster.controller_pods)),
        policy(
            "converge-allow-dns",
            {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [{"to": [_peer(cluster.dns.namespace, cluster.dns.pod_labels)], "ports": dns}],
            },
        ),
        policy(
            "converge-allow-artifact-store",
            {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [_egress(rule) for rule in cluster.artifact_store_egress],
            },
        ),
        *(
            [
                policy(
                    "converge-allow-otel-collector",  # the model servers' spans (cluster.otel_endpoint)
                    {
                        "podSelector": {},
                        "policyTypes": ["Egress"],
                        "egress": [_egress(rule) for rule in cluster.otel_egress],
                    },
                )
            ]
            if cluster.otel_egress
            else []
        ),
    ]


def _peer(namespace: str, pod_labels: Mapping[str, str]) -> Manifest:
    return {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "podSelector": {"matchLabels": dict(pod_labels)},
    }


def _egress(rule: EgressRule) -> Manifest:
    if rule.pods is not None:
        peer = _peer(rule.pods.namespace, rule.pods.pod_labels)
    else:
        peer = {"ipBlock": {"cidr": rule.cidr}}
    return {"to": [peer], "ports": [{"protocol": "TCP", "port": port} for port in rule.ports]}


def _cache_claim(namespace: str, *, labels: Mapping[str, str], cluster: ClusterProfile) -> Manifest:
    cache = cluster.cache
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(cache.claim_name, namespace=namespace, labels=labels),
        "spec": {
            "accessModes": ["ReadWriteMany"],  # every replica, on any node, reads the same cache
            "storageClassName": cache.storage_class,
            "resources": {"requests": {"storage": cache.claim_size}},
        },
    }


def render_serving_runtimes(
    *, namespace: str, labels: Mapping[str, str], cluster: ClusterProfile
) -> list[Manifest]:
    """One KServe `ServingRuntime` per runtime kind, in the project's namespace.

    `autoSelect: false`: an InferenceService names its runtime, so KServe never picks one of
    these for somebody else's model format. Each InferenceService adds its model's args,
    resources, probes and mounts to the container (KServe appends args, merges the rest).
    """
    out = []
    for kind in ServingRuntimeKind:
        command, args = pods.runtime_command(kind)
        container = {
            "name": KSERVE_CONTAINER,
            "image": cluster.images.for_runtime(kind),
            "command": command,
            "args": args,
            "ports": pods.server_ports(),
            "securityContext": pods.container_security(),
        }
        out.append(
            {
                "apiVersion": KSERVE_RUNTIME_API,
                "kind": "ServingRuntime",
                "metadata": metadata(
                    serving_runtime_name(kind),
                    namespace=namespace,
                    labels={
                        **labels,
                        "app.kubernetes.io/name": kind.value,
                        "app.kubernetes.io/component": COMPONENT_RUNTIME,
                    },
                ),
                "spec": {
                    "supportedModelFormats": [
                        {"name": f, "autoSelect": False} for f in SUPPORTED_FORMATS[kind]
                    ],
                    "protocolVersions": [protocol_version(kind)],
                    "multiModel": False,
                    "containers": [container],
                },
            }
        )
    return out


def protocol_version(kind: ServingRuntimeKind) -> str:
    return "v2" if kind is ServingRuntimeKind.V2 else "v1"
