"""Names and labels of the objects Converge renders (pure).

Every object carries `app.kubernetes.io/*` labels and Converge's ownership labels; the client
selects what Converge owns (and so may prune) by them, never by name alone.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping

from converge.runtime.kubernetes.model_cr import MANAGED_BY, label_value
from converge.runtime.kubernetes.pods import Manifest
from converge.runtime.kubernetes.specs import (
    BuildJob,
    ClusterProfile,
    InferenceWorkload,
    PriorityTier,
    ProjectRef,
    ServingRuntimeKind,
)

GROUP = "converge.dev"
LABEL_PROJECT = f"{GROUP}/project"
LABEL_PROJECT_ID = f"{GROUP}/project-id"
LABEL_DEPLOYMENT = f"{GROUP}/deployment"
LABEL_DEPLOYMENT_ID = f"{GROUP}/deployment-id"
LABEL_REVISION = f"{GROUP}/revision"
LABEL_TIER = f"{GROUP}/tier"
LABEL_BUILD_ID = f"{GROUP}/build-id"
ANNOTATION_SHA256 = f"{GROUP}/sha256"
ANNOTATION_ARTIFACT_URI = f"{GROUP}/artifact-uri"
ANNOTATION_RESTART = f"{GROUP}/restart-generation"
ANNOTATION_PROFILE = f"{GROUP}/profile"
COMPONENT_SERVER = "inference-server"
COMPONENT_BUILD = "build"
COMPONENT_RUNTIME = "serving-runtime"

MAX_WORKLOAD_NAME = 40  # KServe derives "<name>-predictor" and hostnames from it
HASH_CHARS = 8

# --- names ---------------------------------------------------------------------------------------


def namespace_name(project: ProjectRef, *, cluster: ClusterProfile) -> str:
    return _fit(f"{cluster.namespace_prefix}{project.name}", max_length=63, key=str(project.project_id))


def workload_name(deployment_name: str) -> str:
    """A DNS-1035 label (Services and KServe need a leading letter), short enough for KServe."""
    name = deployment_name if deployment_name[:1].isalpha() else f"d-{deployment_name}"
    return _fit(name, max_length=MAX_WORKLOAD_NAME, key=deployment_name)


def serving_runtime_name(kind: ServingRuntimeKind) -> str:
    return f"converge-{kind.value}"


def priority_class_name(tier: PriorityTier) -> str:
    return f"converge-{tier.value}"


def build_job_name(build_id: uuid.UUID) -> str:
    return f"build-{build_id}"


def _fit(name: str, *, max_length: int, key: str) -> str:
    if len(name) <= max_length:
        return name
    suffix = hashlib.sha256(key.encode()).hexdigest()[:HASH_CHARS]
    return f"{name[: max_length - HASH_CHARS - 1].rstrip('-')}-{suffix}"


def project_labels(project: ProjectRef) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "converge",
        LABEL_PROJECT: label_value(project.name),
        LABEL_PROJECT_ID: str(project.project_id),
    }


def workload_selector(workload: InferenceWorkload) -> dict[str, str]:
    # The id, not the name or revision: selectors are immutable, a rollout keeps its Deployment.
    return {LABEL_DEPLOYMENT_ID: str(workload.deployment.deployment_id)}


def workload_labels(workload: InferenceWorkload) -> dict[str, str]:
    spec = workload.deployment
    return {
        **project_labels(workload.project),
        "app.kubernetes.io/name": workload.serving_runtime.value,
        "app.kubernetes.io/instance": workload_name(spec.name),
        "app.kubernetes.io/component": COMPONENT_SERVER,
        LABEL_DEPLOYMENT: label_value(spec.name),
        LABEL_DEPLOYMENT_ID: str(spec.deployment_id),
        LABEL_REVISION: str(spec.revision),
        LABEL_TIER: workload.tier.value,
    }


def metadata(
    name: str,
    *,
    namespace: str | None,
    labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
) -> Manifest:
    meta: Manifest = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def build_labels(build: BuildJob) -> dict[str, str]:
    return {
        **project_labels(build.project),
        "app.kubernetes.io/name": "converge-build",
        "app.kubernetes.io/instance": build_job_name(build.build_id),
        "app.kubernetes.io/component": COMPONENT_BUILD,
        LABEL_BUILD_ID: str(build.build_id),
        LABEL_TIER: PriorityTier.BUILD.value,
    }
