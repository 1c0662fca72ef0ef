"""Render what Converge runs on a cluster as plain Kubernetes objects (pure: specs in, dicts out).

- `render_priority_classes`: production inference > builds > development (cluster-scoped, once).
- `render_project`: a project's namespace with its quota, container defaults, network policies
  (deny by default; the gateway and the controller may reach model servers), the artifact cache
  claim where the cache is a claim, and the `ServingRuntime`s where KServe is installed.
- `render_workload`: one deployment revision, as a KServe `InferenceService` (Standard/raw mode)
  or as Deployment + Service + HorizontalPodAutoscaler; a PodDisruptionBudget either way.
- `render_build`: a build as a Job whose containers are its steps.

Artifacts are fetched once per node into a digest-keyed cache by an init container, never by
KServe's storage initializer (which downloads again for every pod): an `InferenceService` here
carries no `storageUri`, so KServe injects nothing. Every object carries `app.kubernetes.io/*`
labels and Converge's ownership labels, which are what the client prunes by. Applying the
objects (server-side apply, field manager "converge") is `client.py`'s job, not this module's.
"""

from __future__ import annotations

import hashlib

from converge.runtime.base import Resources
from converge.runtime.kubernetes import pods
from converge.runtime.kubernetes.labels import (
    ANNOTATION_ARTIFACT_URI,
    ANNOTATION_PROFILE,
    ANNOTATION_RESTART,
    ANNOTATION_SHA256,
    GROUP,
    HASH_CHARS,
    LABEL_BUILD_ID,
    MAX_WORKLOAD_NAME,
    build_job_name,
    build_labels,
    metadata,
    namespace_name,
    priority_class_name,
    serving_runtime_name,
    workload_labels,
    workload_name,
    workload_selector,
)
from converge.runtime.kubernetes.model_cr import ANNOTATION_MODEL_NAME, ANNOTATION_VERSION_NAME
from converge.runtime.kubernetes.namespaces import (
    KSERVE_CONTAINER,
    protocol_version,
    render_network_policies,
    render_priority_classes,
    render_project,
    render_serving_runtimes,
)
from converge.runtime.kubernetes.pods import Manifest
from converge.runtime.kubernetes.specs import (
    DEFAULT_CPU_TARGET,
    SUPPORTED_FORMATS,
    Artifact,
    BuildJob,
    ClusterProfile,
    InferenceWorkload,
    PriorityTier,
    ServingRuntimeKind,
)

__all__ = [
    "build_job_name",
    "canary_name",
    "namespace_name",
    "render_build",
    "render_canary",
    "render_network_policies",
    "render_priority_classes",
    "render_project",
    "render_serving_runtimes",
    "render_workload",
    "workload_name",
]

KSERVE_API = "serving.kserve.io/v1beta1"
# "RawDeployment" is read as "Standard" by KServe >= 0.15 and understood by every release
# before it: plain Deployments, which (unlike Knative) allow init containers and hostPath.
KSERVE_DEPLOYMENT_MODE = "RawDeployment"
SERVER_CONTAINER = "server"
BUILD_TTL_S = 86_400  # the controller reads a finished Job's status and logs well within a day
# A canary's workload object and pods carry it; the stable ones do not (they predate canaries).
LABEL_TRACK = f"{GROUP}/track"
TRACK_CANARY = "canary"


# --- serving workloads -------------------------------------------------------------------------


def render_workload(workload: InferenceWorkload, *, cluster: ClusterProfile) -> list[Manifest]:
    """The objects that run `workload`: an InferenceService where KServe is installed, else a
    Deployment, a Service and (when it scales) a HorizontalPodAutoscaler; a PDB either way."""
    _check(
        workload.serving_runtime, artifact=workload.artifact, resources=workload.deployment.template.resources
    )
    if cluster.kserve:
        return [_inference_service(workload, cluster=cluster), _disruption_budget(workload, cluster=cluster)]
    objects = [_deployment(workload, cluster=cluster), _service(workload, cluster=cluster)]
    if _scales(workload):
        objects.append(_autoscaler(workload, cluster=cluster))
    objects.append(_disruption_budget(workload, cluster=cluster))
    return objects


def render_canary(workload: InferenceWorkload, *, cluster: ClusterProfile) -> Manifest:
    """The canary of a revision, beside the stable workload that keeps serving the older one: a
    Deployment (or InferenceService) of its own with exactly `workload.deployment.replicas`
    replicas, never autoscaled, its pods labelled `converge.dev/track: canary`.

    It renders no Service or PDB: the stable ones select pods by deployment id, so they take the
    canary's pods in as well. The canary Deployment's selector adds the track label, so it never
    counts the stable pods; the stable Deployment's wider selector matching the canary's pods is
    harmless, as Deployments and ReplicaSets only manage pods they own (controller references).
    Promoting is the stable workload taking the new revision, and the canary being pruned.
    """
    _check(
        workload.serving_runtime, artifact=workload.artifact, resources=workload.deployment.template.resources
    )
    if workload.autoscaling is not None:
        raise ValueError("A canary runs a fixed number of replicas: render it without autoscaling")
    track = {LABEL_TRACK: TRACK_CANARY}
    if cluster.kserve:
        obj = _inference_service(workload, cluster=cluster)
        obj["spec"]["predictor"]["labels"] |= track
    else:
        obj = _deployment(workload, cluster=cluster)
        obj["spec"]["selector"]["matchLabels"] |= track
        obj["spec"]["template"]["metadata"]["labels"] |= track
    obj["metadata"]["name"] = canary_name(workload)
    obj["metadata"]["labels"] |= track
    return obj


def canary_name(workload: InferenceWorkload) -> str:
    """`<name>-canary-<hash of the deployment id>`: no other deployment's workload can be named so
    (a deployment named "chat-canary" is not "chat"'s canary)."""
    spec = workload.deployment
    suffix = hashlib.sha256(str(spec.deployment_id).encode()).hexdigest()[:HASH_CHARS]
    base = workload_name(spec.name)[: MAX_WORKLOAD_NAME - len(suffix) - len("--canary")].rstrip("-")
    return f"{base}-canary-{suffix}"


def _check(kind: ServingRuntimeKind, *, artifact: Artifact, resources: Resources) -> None:
    formats = SUPPORTED_FORMATS[kind]
    if artifact.format not in formats:
        raise ValueError(
            f"The {kind} runtime serves {', '.join(formats)}, not {artifact.format!r}; "
            "pick the runtime for this format"
        )
    if kind is ServingRuntimeKind.VLLM and resources.gpus == 0 and resources.mig_profile is None:
        raise ValueError("vLLM runs on GPUs: give the deployment gpus >= 1 or a MIG profile")


def _scales(workload: InferenceWorkload) -> bool:
    bounds = workload.autoscaling
    return bounds is not None and bounds.max_replicas > bounds.min_replicas


def _replica_bounds(workload: InferenceWorkload) -> tuple[int, int]:
    if workload.autoscaling is not None:
        return workload.autoscaling.min_replicas, workload.autoscaling.max_replicas
    return workload.deployment.replicas, workload.deployment.replicas


def _object_meta(workload: InferenceWorkload, *, cluster: ClusterProfile) -> Manifest:
    return metadata(
        workload_name(workload.deployment.name),
        namespace=namespace_name(workload.project, cluster=cluster),
        labels=workload_labels(workload),
    )


def _pod_annotations(workload: InferenceWorkload) -> dict[str, str]:
    return {
        ANNOTATION_ARTIFACT_URI: workload.artifact.uri,
        ANNOTATION_SHA256: workload.artifact.sha256,
        # Bumped by redeploy: a changed pod template replaces every replica.
        ANNOTATION_RESTART: str(workload.deployment.restart_generation),
    }


def _pod_common(workload: InferenceWorkload, *, cluster: ClusterProfile) -> Manifest:
    """The pod-spec fields an InferenceService predictor and a Deployment's template share."""
    spec = workload.deployment
    resources = spec.template.resources
    _, max_replicas = _replica_bounds(workload)
    return {
        "priorityClassName": priority_class_name(workload.tier),
        "automountServiceAccountToken": False,  # model servers never call the Kubernetes API
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": pods.TERMINATION_GRACE_S,
        "securityContext": pods.pod_security(cluster),
        **pods.placement(
            resources=resources,
            gpu=workload.gpu,
            zones=spec.zones,
            selector=workload_selector(workload),
            max_replicas=max_replicas,
            cluster=cluster,
        ),
        "initContainers": [pods.fetch_container(workload.artifact, cluster=cluster)],
        "volumes": [pods.cache_volume(cluster), *pods.scratch_volumes(workload.serving_runtime)],
    }


def _server_container(workload: InferenceWorkload, *, cluster: ClusterProfile, kserve: bool) -> Manifest:
    """The model server; under KServe the ServingRuntime gives the image and command."""
    kind = workload.serving_runtime
    template = workload.deployment.template
    command, runtime_args = pods.runtime_command(kind)
    args = pods.workload_args(
        kind,
        artifact=workload.artifact,
        model_name=template.model_name,
        resources=template.resources,
        extra=template.args,
    )
    container: Manifest = {"name": KSERVE_CONTAINER if kserve else SERVER_CONTAINER}
    if not kserve:
        container |= {"image": cluster.images.for_runtime(kind), "command": command}
        args = [*runtime_args, *args]
    container |= {
        "args": args,
        "env": pods.server_env(
            kind,
            template.env,
            resources=template.resources,
            tracing=pods.otel_env(
                cluster,
                service=f"converge-replica-{workload.deployment.name}",
                attributes={"converge.deployment.id": str(workload.deployment.deployment_id)},
            ),
        ),
        **({} if kserve else {"ports": pods.server_ports()}),
        "resources": pods.replica_resources(template.resources, gpu=workload.gpu, cluster=cluster),
        **pods.probes(kind),
        "securityContext": pods.container_security(),
        "volumeMounts": pods.server_mounts(kind, workload.artifact),
    }
    return container


def _inference_service(workload: InferenceWorkload, *, cluster: ClusterProfile) -> Manifest:
    low, high = _replica_bounds(workload)
    if high == 0:
        raise ValueError(
            "An InferenceService cannot be held at zero replicas in KServe's Standard mode; "
            "delete the workload instead"
        )
    kind = workload.serving_runtime
    model = {
        "modelFormat": {"name": workload.artifact.format},
        "runtime": serving_runtime_name(kind),
        "protocolVersion": protocol_version(kind),
        **_server_container(workload, cluster=cluster, kserve=True),
    }
    predictor: Manifest = {
        "minReplicas": low,
        "maxReplicas": high,
        "scaleMetric": "cpu",
        "scaleTarget": workload.autoscaling.target_cpu_utilization
        if workload.autoscaling
        else DEFAULT_CPU_TARGET,
        "deploymentStrategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        },
        "labels": workload_labels(workload),
        "annotations": _pod_annotations(workload),
        **_pod_common(workload, cluster=cluster),
        "model": model,
    }
    meta = _object_meta(workload, cluster=cluster)
    meta["annotations"] = {
        "serving.kserve.io/deploymentMode": KSERVE_DEPLOYMENT_MODE,
        "serving.kserve.io/autoscalerClass": "hpa",
        ANNOTATION_ARTIFACT_URI: workload.artifact.uri,
        ANNOTATION_SHA256: workload.artifact.sha256,
    }
    return {
        "apiVersion": KSERVE_API,
        "kind": "InferenceService",
        "metadata": meta,
        "spec": {"predictor": predictor},
    }


def _deployment(workload: InferenceWorkload, *, cluster: ClusterProfile) -> Manifest:
    spec: Manifest = {}
    if not _scales(workload):
        # With an autoscaler, replicas is the HPA's field: leaving it out keeps server-side
        # apply from resetting what the HPA chose on every reconcile.
        spec["replicas"] = _replica_bounds(workload)[0]
    spec |= {
        "revisionHistoryLimit": 3,
        "progressDeadlineSeconds": pods.PROGRESS_DEADLINE_S,
        "selector": {"matchLabels": workload_selector(workload)},
        # As the local backend rolls out: one new replica at a time, none taken away first.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {
            "metadata": {"labels": workload_labels(workload), "annotations": _pod_annotations(workload)},
            "spec": {
                **_pod_common(workload, cluster=cluster),
                "containers": [_server_container(workload, cluster=cluster, kserve=False)],
            },
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _object_meta(workload, cluster=cluster),
        "spec": spec,
    }


def _service(workload: InferenceWorkload, *, cluster: ClusterProfile) -> Manifest:
    port = {
        "name": pods.PORT_NAME,
        "port": 80,
        "targetPort": pods.PORT_NAME,
        "protocol": "TCP",
        "appProtocol": "http",
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _object_meta(workload, cluster=cluster),
        "spec": {"type": "ClusterIP", "selector": workload_selector(workload), "ports": [port]},
    }


def _autoscaler(workload: InferenceWorkload, *, cluster: ClusterProfile) -> Manifest:
    bounds = workload.autoscaling
    assert bounds is not None
    target = {"type": "Utilization", "averageUtilization": bounds.target_cpu_utilization}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _object_meta(workload, cluster=cluster),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": workload_name(workload.deployment.name),
            },
            "minReplicas": bounds.min_replicas,
            "maxReplicas": bounds.max_replicas,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": target}}],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": round(bounds.scale_up_after_s)},
                "scaleDown": {"stabilizationWindowSeconds": round(bounds.cooldown_s)},
            },
        },
    }


def _disruption_budget(workload: InferenceWorkload, *, cluster: ClusterProfile) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _object_meta(workload, cluster=cluster),
        "spec": {
            "maxUnavailable": 1,  # drains take replicas one at a time, as rollouts do
            "selector": {"matchLabels": workload_selector(workload)},
            # A crash-looping replica serves nothing: never let it block a node drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


# --- builds ------------------------------------------------------------------------------------


def render_build(build: BuildJob, *, cluster: ClusterProfile) -> Manifest:
    """A build as a Job, its steps in order: fetch, verify and scan as init containers; the
    target server as a sidecar whose startup probe is the smoke-load (the Job waits until the
    model answers /health/ready); the benchmark as the main container, which writes its figures
    to the termination message for the controller to record as the build's results.
    """
    kind = build.serving_runtime
    _check(kind, artifact=build.artifact, resources=build.resources)
    labels = build_labels(build)
    path = pods.model_path(build.artifact)
    steps = [
        pods.fetch_container(build.artifact, cluster=cluster),
        pods.step_container(
            name="verify",
            args=["verify", "--sha256", build.artifact.sha256, "--path", path],
            mounts=[pods.model_mount(build.artifact)],
            cluster=cluster,
        ),
        pods.step_container(
            name="scan",
            args=["scan", "--format", build.artifact.format, "--path", path],
            mounts=[pods.model_mount(build.artifact)],
            cluster=cluster,
        ),
        _smoke_server(build, cluster=cluster),
    ]
    benchmark = pods.step_container(
        name="benchmark",
        args=[
            "benchmark",
            *("--server", kind.value, "--model-name", build.model_name),
            *("--base-url", f"http://127.0.0.1:{pods.HTTP_PORT}", "--results", "/dev/termination-log"),
        ],
        mounts=[],
        cluster=cluster,
    )
    benchmark["terminationMessagePolicy"] = "FallbackToLogsOnError"
    pod_spec = {
        "restartPolicy": "Never",
        "priorityClassName": priority_class_name(PriorityTier.BUILD),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pods.pod_security(cluster),
        **pods.placement(
            resources=build.resources,
            gpu=build.gpu,
            zones=("local",),
            selector={LABEL_BUILD_ID: str(build.build_id)},
            max_replicas=1,
            cluster=cluster,
        ),
        "initContainers": steps,
        "containers": [benchmark],
        "volumes": [pods.cache_volume(cluster), *pods.scratch_volumes(kind)],
    }
    annotations = {ANNOTATION_ARTIFACT_URI: build.artifact.uri, ANNOTATION_SHA256: build.artifact.sha256}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(
            build_job_name(build.build_id),
            namespace=namespace_name(build.project, cluster=cluster),
            labels=labels,
            annotations={
                **annotations,
                ANNOTATION_MODEL_NAME: build.model_name,
                ANNOTATION_VERSION_NAME: build.version,
                ANNOTATION_PROFILE: build.profile,
            },
        ),
        "spec": {
            "backoffLimit": 0,  # a failed build is a result to report, not something to retry
            "activeDeadlineSeconds": build.timeout_s,
            "ttlSecondsAfterFinished": BUILD_TTL_S,
            "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
        },
    }


def _smoke_server(build: BuildJob, *, cluster: ClusterProfile) -> Manifest:
    """The target server as a native sidecar (restartPolicy Always on an init container): the
    benchmark starts only once its startup probe passes, and it stops when the benchmark ends."""
    kind = build.serving_runtime
    command, runtime_args = pods.runtime_command(kind)
    args = pods.workload_args(
        kind, artifact=build.artifact, model_name=build.model_name, resources=build.resources, extra=()
    )
    return {
        "name": "smoke-load",
        "image": cluster.images.for_runtime(kind),
        "command": command,
        "args": [*runtime_args, *args],
        "restartPolicy": "Always",
        "env": pods.server_env(kind, {}, resources=build.resources),
        "ports": pods.server_ports(),
        "resources": pods.replica_resources(build.resources, gpu=build.gpu, cluster=cluster),
        # workers/builds.py READY_TIMEOUT_S: the model must answer within five minutes.
        **pods.probes(kind, startup_budget_s=300),
        "securityContext": pods.container_security(),
        "volumeMounts": pods.server_mounts(kind, build.artifact),
    }
