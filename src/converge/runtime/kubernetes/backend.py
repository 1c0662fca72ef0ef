"""KubernetesBackend: deployments as Deployments or KServe InferenceServices in project namespaces.

`apply` only records the desired spec and wakes the deployment's reconcile task, as the local
backend's supervisor does; the task renders the project's namespace bundle and the workload
(`manifests.py`), applies what changed (server-side apply), prunes what Converge applied before
and no longer renders, and applies everything again every `resync_s` so that drift is undone.
An API that fails (409, 429, 5xx, lost connections) is retried with backoff and reported in the
deployment's `Applied` condition; it never raises out of `apply`. `observe` reads what the
informers (list + watch) hold: pods become replicas (with their load from `/converge/stats`, for
the autoscaler, `load.py`), and the Deployment's or InferenceService's status holds Ready back
until its controller agrees.

What a `DeploymentSpec` does not say (the project, its quota, the artifact's digest, address and
format, the tier) comes from a `PlacementSource` the control plane provides.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from time import monotonic

import structlog

from converge.kit.service import cancel
from converge.runtime.base import Condition, DeploymentSpec, Observation, RuntimeBackend, Zone
from converge.runtime.kubernetes import observed
from converge.runtime.kubernetes.client import (
    MANAGED_BY_LABEL,
    ApiRejected,
    Informer,
    KubeClient,
    Manifest,
    ObjectRef,
    TransientApiError,
)
from converge.runtime.kubernetes.config import KServeMode, KubernetesConfig
from converge.runtime.kubernetes.labels import (
    ANNOTATION_RESTART,
    COMPONENT_SERVER,
    LABEL_BUILD_ID,
    LABEL_DEPLOYMENT_ID,
    LABEL_PROJECT_ID,
    LABEL_REVISION,
    workload_name,
)
from converge.runtime.kubernetes.load import PodLoad
from converge.runtime.kubernetes.manifests import (
    KSERVE_API,
    namespace_name,
    render_canary,
    render_priority_classes,
    render_project,
    render_workload,
)
from converge.runtime.kubernetes.model_cr import MANAGED_BY
from converge.runtime.kubernetes.namespaces import KSERVE_RUNTIME_API
from converge.runtime.kubernetes.pods import MODELS_DIR
from converge.runtime.kubernetes.specs import (
    Artifact,
    Autoscaling,
    ClusterProfile,
    GpuPlacement,
    InferenceWorkload,
    PriorityTier,
    ProjectQuota,
    ProjectRef,
    ServingRuntimeKind,
)

log = structlog.get_logger(__name__)

# What a deployment's objects can be; pruned by the deployment-id label.
WORKLOAD_KINDS = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
    (KSERVE_API, "InferenceService"),
)
# What a project's namespace holds besides its workloads; pruned by the project-id label.
BUNDLE_KINDS = (
    ("v1", "ResourceQuota"),
    ("v1", "LimitRange"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("v1", "PersistentVolumeClaim"),
    (KSERVE_RUNTIME_API, "ServingRuntime"),
)
WORKLOAD_OBJECT_KINDS = frozenset({"Deployment", "InferenceService"})


@dataclass(frozen=True, kw_only=True)
class Placement:
    """What the cluster needs beyond the `DeploymentSpec`: where and what it runs."""

    project: ProjectRef
    artifact: Artifact
    quota: ProjectQuota = ProjectQuota()
    runtime: ServingRuntimeKind | None = None
    autoscaling: Autoscaling | None = None  # None: exactly spec.replicas (the controller scales)
    tier: PriorityTier = PriorityTier.PRODUCTION
    gpu: GpuPlacement = GpuPlacement()


PlacementSource = Callable[[DeploymentSpec], Awaitable[Placement]]


@dataclass(frozen=True, kw_only=True)
class _Failure:
    reason: str
    message: str
    since: datetime
    attempts: int
    permanent: bool  # retrying the same objects will not help: Degraded until the spec changes


@dataclass(eq=False)
class _Tracked:
    spec: DeploymentSpec
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    applied_spec: DeploymentSpec | None = None
    applied_digest: str | None = None
    applied_at: float = 0.0
    namespace: str | None = None
    workload: ObjectRef | None = None
    failure: _Failure | None = None
    refused_digest: str | None = None
    # The workload that serves while a canary runs: the last one applied without a canary.
    stable: InferenceWorkload | None = None
    canary: ObjectRef | None = None

    def failed(self, *, reason: str, message: str, permanent: bool) -> None:
        previous = self.failure
        same = previous is not None and previous.reason == reason
        self.failure = _Failure(
            reason=reason,
            message=message,
            since=previous.since if same and previous else datetime.now(UTC),
            attempts=(previous.attempts + 1) if same and previous else 1,
            permanent=permanent,
        )
        if not same:  # once per kind of failure, not on every retry
            log.warning(
                "kubernetes_apply_failed",
                deployment=str(self.spec.deployment_id),
                reason=reason,
                error=message,
            )


class KubernetesBackend(RuntimeBackend):
    config_model = KubernetesConfig
    type = "kubernetes"

    def __init__(
        self, config: KubernetesConfig, *, placements: PlacementSource, client: KubeClient | None = None
    ) -> None:
        self.config = config
        self._placements = placements
        self._client = client
        self._owns_client = client is None
        self._tracked: dict[uuid.UUID, _Tracked] = {}
        self.informers: dict[str, Informer] = {}
        self._informer_tasks: list[asyncio.Task[None]] = []
        self._kserve: bool | None = {KServeMode.ON: True, KServeMode.OFF: False}.get(config.kserve)
        self._cluster_applied_at: float | None = None
        self._bundles: dict[str, tuple[str, float]] = {}  # namespace -> (digest, applied at)
        self._bundle_locks: dict[str, asyncio.Lock] = {}
        self._started = False
        self._load = PodLoad()

    @property
    def client(self) -> KubeClient:
        if self._client is None:
            raise RuntimeError("the Kubernetes runtime is not started: start() it first")
        return self._client

    def _informer(self, name: str) -> Informer:
        if name not in self.informers:
            raise RuntimeError("the Kubernetes runtime is not started: start() it first")
        return self.informers[name]

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        if self._client is None:
            self._client = KubeClient(self.config)
        self._started = True
        servers: dict[str, str | None] = {
            MANAGED_BY_LABEL: MANAGED_BY,
            "app.kubernetes.io/component": COMPONENT_SERVER,
        }
        self._inform("pods", api_version="v1", kind="Pod", labels=servers)
        workloads: dict[str, str | None] = {MANAGED_BY_LABEL: MANAGED_BY, LABEL_DEPLOYMENT_ID: None}
        self._inform("deployments", api_version="apps/v1", kind="Deployment", labels=workloads)
        self._inform("nodes", api_version="v1", kind="Node", labels=None)
        if self._kserve:
            self._inform_kserve()
        for tracked in self._tracked.values():
            self._run(tracked)

    async def stop(self) -> None:
        await cancel(*(t.task for t in self._tracked.values()), *self._informer_tasks)
        for tracked in self._tracked.values():
            tracked.task = None
        self._informer_tasks.clear()
        self.informers.clear()
        self._started = False
        await self._load.close()
        if self._client is not None and self._owns_client:
            await self._client.close()
            self._client = None

    def _inform(
        self, name: str, *, api_version: str, kind: str, labels: dict[str, str | None] | None
    ) -> None:
        informer = Informer(self.client, api_version=api_version, kind=kind, labels=labels)
        self.informers[name] = informer
        self._informer_tasks.append(asyncio.create_task(informer.run(), name=f"kubernetes-watch-{name}"))

    def _inform_kserve(self) -> None:
        if "inferenceservices" not in self.informers:
            labels: dict[str, str | None] = {MANAGED_BY_LABEL: MANAGED_BY, LABEL_DEPLOYMENT_ID: None}
            self._inform("inferenceservices", api_version=KSERVE_API, kind="InferenceService", labels=labels)

    # -- RuntimeBackend --------------------------------------------------------------------

    def artifact_path(self, *, sha256: str) -> str:
        """Pods fetch the artifact by digest into the cache and mount it here (`pods.model_path`):
        the controller downloads nothing."""
        return f"{MODELS_DIR}/{sha256.removeprefix('sha256:').lower()}"

    async def apply(self, *, spec: DeploymentSpec) -> None:
        tracked = self._tracked.get(spec.deployment_id)
        if tracked is None:
            tracked = self._tracked[spec.deployment_id] = _Tracked(spec)
        tracked.spec = spec
        if self._started and tracked.task is None:
            self._run(tracked)
        tracked.wake.set()

    async def observe(self, *, deployment_id: uuid.UUID) -> Observation:
        pods = self._pods_of(deployment_id)
        zones = {n["metadata"]["name"]: observed.node_zone(n) for n in self._items("nodes")}
        replicas = await self._load.of([observed.replica(p, node_zones=zones) for p in pods])
        tracked = self._tracked.get(deployment_id)
        if tracked is None:
            return Observation(deployment_id=deployment_id, replicas=replicas)
        spec = tracked.spec
        workload = self._workload_of(tracked) if spec.replicas > 0 else None
        conditions = observed.conditions(spec, pods=pods, replicas=replicas, workload=workload)
        failure = tracked.failure
        if failure is not None and failure.permanent:
            conditions = [c for c in conditions if c.type != "Degraded"]
            conditions.append(
                Condition(type="Degraded", status=True, reason=failure.reason, message=failure.message)
            )
        conditions += [self._applied_condition(tracked), self._watch_condition()]
        return Observation(deployment_id=deployment_id, replicas=replicas, conditions=conditions)

    async def delete(self, *, deployment_id: uuid.UUID) -> None:
        """Delete the deployment's objects (their pods go with them, gracefully); raises
        TransientApiError when the API cannot be reached, for the caller to try again."""
        tracked = self._tracked.pop(deployment_id, None)
        if tracked is not None:
            await cancel(tracked.task)
        await self.client.prune(
            kinds=WORKLOAD_KINDS, labels={LABEL_DEPLOYMENT_ID: str(deployment_id)}, keep=()
        )

    async def logs(self, *, replica_id: str, tail: int = 100, follow: bool = False) -> AsyncIterator[str]:
        pods = self._informer("pods")
        if pods.synced.is_set():
            candidates = list(pods.items.values())
        else:
            candidates, _ = await self.client.list_objects("v1", "Pod", labels=pods.labels)
        pod = next((p for p in candidates if p["metadata"]["name"] == replica_id), None)
        if pod is None:
            raise LookupError(f"no replica {replica_id!r}")
        lines = self.client.logs(
            namespace=pod["metadata"]["namespace"],
            pod=replica_id,
            container=observed.server_container(pod),
            tail=tail,
            follow=follow,
        )
        async for line in lines:
            yield line

    async def zones(self) -> list[Zone]:
        nodes = self._informer("nodes")
        items = (
            list(nodes.items.values())
            if nodes.synced.is_set()
            else (await self.client.list_objects("v1", "Node"))[0]
        )
        return observed.zones(items, gpu_resource=self.config.cluster_profile(kserve=False).gpu_resource)

    # -- reconcile -------------------------------------------------------------------------

    def _run(self, tracked: _Tracked) -> None:
        name = f"kubernetes-reconcile-{tracked.spec.deployment_id}"
        tracked.task = asyncio.create_task(self._reconcile_loop(tracked), name=name)

    async def _reconcile_loop(self, tracked: _Tracked) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.resync_s):
                    await tracked.wake.wait()
            tracked.wake.clear()
            try:
                await self._reconcile(tracked)
            except TransientApiError as exc:
                tracked.failed(reason=exc.reason, message=exc.message, permanent=False)
                attempts = tracked.failure.attempts if tracked.failure else 1
                await asyncio.sleep(self.client.backoff.delay(attempts, retry_after=exc.retry_after))
                tracked.wake.set()
            except ApiRejected as exc:
                tracked.failed(reason=exc.reason, message=exc.message, permanent=True)
            except Exception as exc:  # a bug or a broken placement source: shown, retried later
                log.exception("kubernetes_reconcile_failed", deployment=str(tracked.spec.deployment_id))
                tracked.failed(
                    reason="ReconcileFailed", message=f"{type(exc).__name__}: {exc}", permanent=True
                )

    async def _reconcile(self, tracked: _Tracked) -> None:
        spec = tracked.spec
        try:
            placement = await self._placements(spec)
        except Exception as exc:
            raise TransientApiError(
                f"placement of {spec.name}: {exc}", reason="PlacementUnavailable"
            ) from exc
        cluster = self.config.cluster_profile(kserve=await self._kserve_served())
        workload = InferenceWorkload(
            project=placement.project,
            deployment=spec,
            artifact=placement.artifact,
            runtime=placement.runtime,
            autoscaling=placement.autoscaling,
            tier=placement.tier,
            gpu=placement.gpu,
        )
        namespace = namespace_name(placement.project, cluster=cluster)
        try:
            bundle = render_project(placement.project, quota=placement.quota, cluster=cluster)
            rendered = self._render(tracked, workload, cluster=cluster, namespace=namespace)
        except ValueError as exc:
            tracked.failed(reason="InvalidSpec", message=str(exc), permanent=True)
            return
        objects = rendered.objects
        digest = _digest([bundle, objects])
        fresh = monotonic() - tracked.applied_at < self.config.resync_s
        if (digest == tracked.applied_digest and fresh) or (digest == tracked.refused_digest and fresh):
            return
        try:
            await self._apply_cluster_objects()
            await self._apply_bundle(namespace=namespace, project=placement.project, bundle=bundle)
            await self.client.apply_all(objects)
        except ApiRejected as exc:
            if exc.code == 404:  # the namespace went (deleted by hand): apply the bundle again
                self._bundles.pop(namespace, None)
                raise TransientApiError(exc.message, reason="NamespaceMissing", code=404) from exc
            tracked.refused_digest, tracked.applied_at = digest, monotonic()
            raise
        keep = rendered.keep
        await self.client.prune(
            kinds=WORKLOAD_KINDS, labels={LABEL_DEPLOYMENT_ID: str(spec.deployment_id)}, keep=keep
        )
        tracked.applied_spec, tracked.applied_digest, tracked.applied_at = spec, digest, monotonic()
        tracked.namespace, tracked.failure, tracked.refused_digest = namespace, None, None
        tracked.workload = next(
            (ref for ref in keep if ref.kind in WORKLOAD_OBJECT_KINDS and ref != rendered.canary), None
        )
        tracked.canary = rendered.canary
        if rendered.stable is not None:
            tracked.stable = rendered.stable
        log.info(
            "kubernetes_applied",
            deployment=str(spec.deployment_id),
            revision=spec.revision,
            objects=len(keep),
            canary=rendered.canary is not None,
        )

    def _render(
        self, tracked: _Tracked, workload: InferenceWorkload, *, cluster: ClusterProfile, namespace: str
    ) -> _Rendered:
        """The deployment's objects: its workload, or, while a canary runs, the stable workload
        (still at the older revision, with the spec's replicas) and the canary beside it."""
        spec = workload.deployment
        if cluster.kserve and spec.replicas == 0:
            # KServe cannot hold an InferenceService at zero replicas: none is rendered then.
            return _Rendered(objects=[], keep=frozenset(), stable=workload)
        canary = spec.canary_replicas
        stable = self._older_stable(tracked, spec)
        if (
            canary is None
            or spec.replicas == 0
            or (stable is None and not self._older_in_cluster(spec, cluster=cluster, namespace=namespace))
        ):
            objects = render_workload(workload, cluster=cluster)
            return _Rendered(objects=objects, keep=_refs(objects), stable=workload)
        canary_spec = spec.model_copy(update={"replicas": min(spec.replicas, canary)})
        canary_object = render_canary(
            replace(workload, deployment=canary_spec, autoscaling=None), cluster=cluster
        )
        canary_ref = ObjectRef.of(canary_object)
        if stable is not None:
            held = replace(
                stable, deployment=stable.deployment.model_copy(update={"replicas": spec.replicas})
            )
            objects = [*render_workload(held, cluster=cluster), canary_object]
            return _Rendered(objects=objects, keep=_refs(objects), stable=held, canary=canary_ref)
        # The stable workload was applied by an earlier process, whose spec this one does not
        # know: leave it as the cluster has it (not applied, not pruned) until the promotion.
        named = render_workload(workload, cluster=cluster)
        objects = [o for o in named if o["kind"] not in WORKLOAD_OBJECT_KINDS] + [canary_object]
        return _Rendered(objects=objects, keep=_refs(named) | {canary_ref}, stable=None, canary=canary_ref)

    @staticmethod
    def _older_stable(tracked: _Tracked, spec: DeploymentSpec) -> InferenceWorkload | None:
        """The stable workload this process applied, if it serves an older revision (or restart
        generation) than `spec` and runs any replicas."""
        stable = tracked.stable
        if stable is None or stable.deployment.replicas == 0 or _current(stable.deployment, spec):
            return None
        return stable

    def _older_in_cluster(self, spec: DeploymentSpec, *, cluster: ClusterProfile, namespace: str) -> bool:
        """Whether the cluster holds the deployment's workload at an older revision, with replicas."""
        informer = self._informer("inferenceservices" if cluster.kserve else "deployments")
        if not informer.synced.is_set():  # deciding on an empty copy would end a canary early
            raise TransientApiError("workloads are not listed yet", reason="Listing")
        found = informer.items.get((namespace, workload_name(spec.name)))
        if found is None:
            return False
        if found["kind"] == "InferenceService":  # one exists only while it has replicas
            pod, replicas = found["spec"]["predictor"], 1
        else:
            pod, replicas = found["spec"]["template"]["metadata"], found["spec"].get("replicas", 1)
        revision = int((pod.get("labels") or {}).get(LABEL_REVISION, 0))
        generation = int((pod.get("annotations") or {}).get(ANNOTATION_RESTART, 0))
        return replicas > 0 and (revision, generation) != (spec.revision, spec.restart_generation)

    async def _kserve_served(self) -> bool:
        if self._kserve is None:
            self._kserve = await self.client.served(KSERVE_API, "InferenceService")
            log.info("kubernetes_kserve_detected", installed=self._kserve)
        if self._kserve:
            self._inform_kserve()
        return self._kserve

    async def _apply_cluster_objects(self) -> None:
        if self._cluster_applied_at is None or monotonic() - self._cluster_applied_at >= self.config.resync_s:
            await self.client.apply_all(render_priority_classes())
            self._cluster_applied_at = monotonic()

    async def _apply_bundle(self, *, namespace: str, project: ProjectRef, bundle: list[Manifest]) -> None:
        """The namespace and what it holds, once for every deployment of the project."""
        digest = _digest(bundle)
        async with self._bundle_locks.setdefault(namespace, asyncio.Lock()):
            applied = self._bundles.get(namespace)
            if (
                applied is not None
                and applied[0] == digest
                and monotonic() - applied[1] < self.config.resync_s
            ):
                return
            await self.client.apply_all(bundle)
            await self.client.prune(
                kinds=BUNDLE_KINDS,
                namespace=namespace,
                labels={LABEL_PROJECT_ID: str(project.project_id)},
                absent=(LABEL_DEPLOYMENT_ID, LABEL_BUILD_ID),
                keep={ObjectRef.of(o) for o in bundle},
            )
            self._bundles[namespace] = (digest, monotonic())

    # -- observation -----------------------------------------------------------------------

    def _items(self, informer: str) -> list[Manifest]:
        found = self.informers.get(informer)
        return list(found.items.values()) if found else []

    def _pods_of(self, deployment_id: uuid.UUID) -> list[Manifest]:
        wanted = str(deployment_id)
        pods = [
            p
            for p in self._items("pods")
            if (p["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT_ID) == wanted
        ]
        return sorted(pods, key=lambda p: p["metadata"]["name"])

    def _workload_of(self, tracked: _Tracked) -> Manifest | None:
        """The workload object whose status the conditions follow: the canary's while one runs
        (the stable one serves the older revision, and its rollout is not the one under way)."""
        ref = tracked.canary or tracked.workload
        if ref is None:
            return None
        informer = self.informers.get(
            "inferenceservices" if ref.kind == "InferenceService" else "deployments"
        )
        return informer.items.get((ref.namespace or "", ref.name)) if informer else None

    @staticmethod
    def _applied_condition(tracked: _Tracked) -> Condition:
        spec, failure = tracked.spec, tracked.failure
        if failure is not None:
            since = failure.since.strftime("%Y-%m-%dT%H:%M:%SZ")
            retry = "" if failure.permanent else f"; retrying (attempt {failure.attempts}, since {since})"
            return Condition(
                type="Applied", status=False, reason=failure.reason, message=failure.message + retry
            )
        if tracked.applied_spec == spec:
            return Condition(
                type="Applied",
                status=True,
                reason="Applied",
                message=f"revision {spec.revision} applied to namespace {tracked.namespace}",
            )
        return Condition(
            type="Applied",
            status=False,
            reason="Applying",
            message=f"revision {spec.revision} is being applied",
        )

    def _watch_condition(self) -> Condition:
        errors = [(name, i.error) for name, i in self.informers.items() if i.error is not None]
        if errors:
            name, error = errors[0]
            return Condition(
                type="Observed",
                status=False,
                reason=error.reason,
                message=f"the status shown may be stale: watching {name} failed ({error.message})",
            )
        unsynced = [name for name, i in self.informers.items() if not i.synced.is_set()]
        if unsynced:
            return Condition(
                type="Observed",
                status=False,
                reason="Listing",
                message=f"not listed yet: {', '.join(unsynced)}",
            )
        return Condition(type="Observed", status=True, reason="Watching", message="")


@dataclass(frozen=True, kw_only=True)
class _Rendered:
    objects: list[Manifest]
    keep: frozenset[ObjectRef]  # what pruning leaves (what is applied, and a stable kept as it is)
    stable: InferenceWorkload | None  # the workload that serves the older revision from now on
    canary: ObjectRef | None = None


def _refs(objects: list[Manifest]) -> frozenset[ObjectRef]:
    return frozenset(ObjectRef.of(o) for o in objects)


def _current(applied: DeploymentSpec, spec: DeploymentSpec) -> bool:
    return (applied.revision, applied.restart_generation) == (spec.revision, spec.restart_generation)


def _digest(objects: object) -> str:
    return hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()
