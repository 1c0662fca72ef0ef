"""The build runner on a cluster: each build is a Job of its steps in the project's namespace.

It claims queued builds as the local runner does (`builds.claim`), renders the build as a Job
(`manifests.render_build`: fetch, verify, scan, the smoke-loaded server, benchmark), applies it
with the project's namespace bundle, and reads the Job and its pod from informers (list +
watch) to move the build through the same states with the same fields as the local runner:
`running` from the claim; then `succeeded` with the benchmark's figures, `failed` with the
failing step's own message (`<step>: <message>`, from the container's termination message),
or `cancelled`. The build's log file gets each step's progress and, at the end, the steps' logs.
A finished or cancelled build's Job is deleted (its pod goes with it).

Level-triggered: every pass compares the running builds with the Jobs there are. A running
build without a Job gets one (after a restart too: nothing is requeued, the Jobs carry on); a
Job whose build is no longer running is deleted; a Job deleted while its build ran fails it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.config import Settings
from converge.control.builds import service
from converge.control.builds.schemas import BuildState
from converge.kit.observability import Metrics
from converge.kit.service import Service, cancel
from converge.models import Project
from converge.runtime.kubernetes import build_status
from converge.runtime.kubernetes.client import (
    MANAGED_BY_LABEL,
    ApiRejected,
    Informer,
    KubeClient,
    KubeError,
    Manifest,
    ObjectRef,
)
from converge.runtime.kubernetes.config import KServeMode, KubernetesConfig
from converge.runtime.kubernetes.labels import COMPONENT_BUILD, LABEL_BUILD_ID
from converge.runtime.kubernetes.manifests import (
    KSERVE_API,
    namespace_name,
    render_build,
    render_priority_classes,
    render_project,
)
from converge.runtime.kubernetes.model_cr import MANAGED_BY
from converge.runtime.kubernetes.specs import Artifact, BuildJob, ProjectQuota, ProjectRef
from converge.workers.builds import (
    BuildTarget,
    build_log,
    claim,
    failure_reason,
    load_target,
    log_to_mlflow,
    record,
    say,
    say_outcome,
)

log = structlog.get_logger(__name__)

JOB = ("batch/v1", "Job")
BUILD_OBJECTS: dict[str, str | None] = {
    MANAGED_BY_LABEL: MANAGED_BY,
    "app.kubernetes.io/component": COMPONENT_BUILD,
}
LOG_TAIL = 2000  # lines of each step's log copied into the build's log
# A Job applied but not yet seen by the informer is applied again only after this long.
REAPPLY_AFTER_S = 30.0


@dataclass(eq=False)
class _Tracked:
    """What this runner knows of a running build beyond the database."""

    applied_at: float | None = None
    seen: bool = False  # its Job was observed: a Job missing after that was deleted
    phases: tuple[tuple[str, str], ...] = ()
    error: str | None = None  # the last API error shown in the build's log


class KubeBuildRunner(Service):
    name = "kube-build-runner"

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        client: KubeClient,
        config: KubernetesConfig,
        artifact_base_uri: str,
        concurrency: int = 1,
        poll_s: float = 1.0,
        timeout_s: int = 3600,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self._metrics = metrics or Metrics()
        self._sessions, self._settings = sessions, settings
        self._client, self._config = client, config
        self._artifact_base_uri = artifact_base_uri
        self._concurrency, self._poll_s, self._timeout_s = concurrency, poll_s, timeout_s
        self.jobs = Informer(client, api_version=JOB[0], kind=JOB[1], labels=BUILD_OBJECTS)
        self.pods = Informer(client, api_version="v1", kind="Pod", labels=BUILD_OBJECTS)
        self._tracked: dict[uuid.UUID, _Tracked] = {}
        self._kserve: bool | None = {KServeMode.ON: True, KServeMode.OFF: False}.get(config.kserve)
        self._bundles: dict[str, str] = {}  # namespace -> digest of the bundle applied
        self._cluster_applied = False

    async def start(self) -> None:
        self._spawn(self.jobs.run())
        self._spawn(self.pods.run())
        self._spawn(self._loop())

    async def stop(self) -> None:
        await cancel(*self._tasks)

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("kube_build_reconcile_failed")
            await self._wait()

    async def _wait(self) -> None:
        changes = [asyncio.ensure_future(i.changed()) for i in (self.jobs, self.pods)]
        try:
            await asyncio.wait(changes, timeout=self._poll_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel(*changes)

    # -- one pass ------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Claim what the concurrency allows, move every running build on, delete stray Jobs."""
        if not (self.jobs.synced.is_set() and self.pods.synced.is_set()):
            return  # nothing can be told apart (missing or not listed yet) before the first list
        # The Jobs before the builds: a Job there now belongs to a build claimed before it, so
        # a build another runner claims meanwhile can never look like the owner of a stray Job.
        jobs = _by_build(self.jobs.items.values())
        pods: dict[str, list[Manifest]] = {}
        for pod in self.pods.items.values():
            pods.setdefault(_build_id(pod) or "", []).append(pod)
        async with self._sessions() as session:
            running = {b.id: b.cancel_requested for b in await service.running(session)}
        while len(running) < self._concurrency:
            claimed = await claim(self._sessions)
            if claimed is None:
                break
            running[claimed] = False
        for build_id, cancel_requested in running.items():
            key = str(build_id)
            try:
                await self._reconcile_build(
                    build_id, cancel_requested=cancel_requested, job=jobs.get(key), pods=pods.get(key, [])
                )
            except KubeError as exc:  # the API is away or refused a read: try again next pass
                self._api_error(build_id, exc)
        for key, job in jobs.items():
            if _uuid(key) not in running and self._client.owns(job, labels={LABEL_BUILD_ID: key}):
                await self._delete(job)
        for build_id in set(self._tracked) - set(running):
            del self._tracked[build_id]

    async def _reconcile_build(
        self, build_id: uuid.UUID, *, cancel_requested: bool, job: Manifest | None, pods: Sequence[Manifest]
    ) -> None:
        tracked = self._tracked.setdefault(build_id, _Tracked())
        if cancel_requested:
            if job is not None:
                await self._delete(job)
            await self._finish(build_id, BuildState.CANCELLED, reason="cancelled")
            return
        if job is None or job["metadata"].get("deletionTimestamp"):
            if tracked.seen:
                reason = "the build's Job was deleted before the build finished"
                await self._finish(build_id, BuildState.FAILED, reason=reason)
            elif tracked.applied_at is None or monotonic() - tracked.applied_at > REAPPLY_AFTER_S:
                await self._apply(build_id, tracked)
            return
        tracked.seen = True
        pod = build_status.newest_pod(pods)
        reading = build_status.read_job(job, pod)
        self._progress(build_id, tracked=tracked, phases=reading.phases)
        if not reading.finished:
            return
        results = reading.results
        if reading.succeeded and results is None and pod is not None:
            results = await self._results_from_log(pod)
        if reading.succeeded and results is not None:
            state, reason = BuildState.SUCCEEDED, ""
        elif reading.succeeded:
            state, reason = (
                BuildState.FAILED,
                "benchmark: its results are in neither its termination message nor its log",
            )
        else:
            state, reason = BuildState.FAILED, reading.reason[:2000]
        await self._finish(build_id, state, reason=reason, results=results, pod=pod)
        await self._delete(job)

    # -- applying ------------------------------------------------------------------------------

    async def _apply(self, build_id: uuid.UUID, tracked: _Tracked) -> None:
        target = await load_target(self._sessions, build_id)
        project = await self._project(target.project_id)
        cluster = self._config.cluster_profile(kserve=await self._kserve_served())
        try:
            ref = ProjectRef(project_id=project.id, name=project.name)
            job = render_build(self._job_spec(target, ref), cluster=cluster)
            bundle = render_project(
                ref, quota=ProjectQuota.from_stored(project.quotas or {}), cluster=cluster
            )
        except ValueError as exc:  # a build this cluster cannot run (e.g. no runtime for the format)
            await self._finish(build_id, BuildState.FAILED, reason=failure_reason(exc), describe=target)
            return
        namespace = namespace_name(ref, cluster=cluster)
        with build_log(self._settings, build_id) as out:
            if tracked.applied_at is None:
                say(out, target.describe())
            say(out, f"job: applying Job {namespace}/{job['metadata']['name']}")
        try:
            await self._apply_namespace(namespace, bundle)
            await self._client.apply(job)
        except ApiRejected as exc:
            if exc.code == 404:  # the namespace went (deleted by hand): the bundle again next pass
                self._bundles.pop(namespace, None)
                raise
            reason = f"the cluster refused the build's Job: {exc.message}"[:2000]
            await self._finish(build_id, BuildState.FAILED, reason=reason)
            return
        tracked.applied_at, tracked.error = monotonic(), None
        log.info("kube_build_applied", build_id=str(build_id), namespace=namespace)

    def _job_spec(self, target: BuildTarget, project: ProjectRef) -> BuildJob:
        return BuildJob(
            build_id=target.build_id,
            project=project,
            model_name=target.model_name,
            version=target.version,
            server=target.server,
            profile=target.profile,
            artifact=Artifact.in_store(
                base_uri=self._artifact_base_uri, sha256=target.sha256, format=target.format
            ),
            timeout_s=self._timeout_s,
        )

    async def _project(self, project_id: uuid.UUID) -> Project:
        async with self._sessions() as session:
            project = await session.get(Project, project_id)
            assert project is not None  # a build goes with its project (ON DELETE CASCADE)
            return project

    async def _kserve_served(self) -> bool:
        if self._kserve is None:
            self._kserve = await self._client.served(KSERVE_API, "InferenceService")
        return self._kserve

    async def _apply_namespace(self, namespace: str, bundle: list[Manifest]) -> None:
        """The priority classes and the project's namespace bundle, once per runner and change:
        the Kubernetes backend applies (and prunes) the same bundle for the project's
        deployments; a project may be built before it has any."""
        if not self._cluster_applied:
            await self._client.apply_all(render_priority_classes())
            self._cluster_applied = True
        digest = hashlib.sha256(json.dumps(bundle, sort_keys=True).encode()).hexdigest()
        if self._bundles.get(namespace) != digest:
            await self._client.apply_all(bundle)
            self._bundles[namespace] = digest

    async def _delete(self, job: Manifest) -> None:
        if await self._client.delete(ObjectRef.of(job, api_version=JOB[0], kind=JOB[1])):
            log.info("kube_build_job_deleted", job=job["metadata"]["name"])

    # -- reading -------------------------------------------------------------------------------

    def _progress(
        self, build_id: uuid.UUID, *, tracked: _Tracked, phases: tuple[tuple[str, str], ...]
    ) -> None:
        before = dict(tracked.phases)
        changed = [
            (step, phase) for step, phase in phases if before.get(step) != phase and phase != "waiting"
        ]
        tracked.phases = phases
        if changed:
            with build_log(self._settings, build_id) as out:
                for step, phase in changed:
                    say(out, f"{step}: {phase}")

    async def _results_from_log(self, pod: Manifest) -> dict[str, Any] | None:
        lines = await self._container_log(pod, build_status.BENCHMARK)
        return build_status.benchmark_results("\n".join(lines))

    async def _container_log(self, pod: Manifest, container: str) -> list[str]:
        meta = pod["metadata"]
        stream = self._client.logs(
            namespace=meta["namespace"], pod=meta["name"], container=container, tail=LOG_TAIL, follow=False
        )
        return [line async for line in stream]

    async def _copy_logs(self, out: Any, pod: Manifest) -> None:
        for step, _ in build_status.phases(pod):
            try:
                lines = await self._container_log(pod, step)
            except KubeError as exc:
                say(out, f"{step}: no log ({exc.reason})")
                continue
            for line in lines:
                out.write(f"[{step}] {line}\n")

    def _api_error(self, build_id: uuid.UUID, exc: KubeError) -> None:
        tracked = self._tracked.setdefault(build_id, _Tracked())
        message = f"{exc.reason}: {exc.message}"
        if tracked.error != message:  # once per kind of trouble, not on every retry
            tracked.error = message
            log.warning("kube_build_api_error", build_id=str(build_id), reason=exc.reason, error=exc.message)
            with build_log(self._settings, build_id) as out:
                say(out, f"job: the Kubernetes API: {message}; retrying")

    # -- recording -----------------------------------------------------------------------------

    async def _finish(
        self,
        build_id: uuid.UUID,
        state: BuildState,
        *,
        reason: str,
        results: dict[str, Any] | None = None,
        pod: Manifest | None = None,
        describe: BuildTarget | None = None,
    ) -> None:
        with build_log(self._settings, build_id) as out:
            if describe is not None:
                say(out, describe.describe())
            if pod is not None:
                await self._copy_logs(out, pod)
            if results is not None:
                say(out, f"benchmark: {results}")
                if state == BuildState.SUCCEEDED:  # as a local build: the run in MLflow, if configured
                    target = await load_target(self._sessions, build_id)
                    logged = await log_to_mlflow(
                        self._settings,
                        target,
                        figures=results,
                        out=out,
                        resources=_pod_resources(pod, target),
                    )
                    results = results | logged
            say_outcome(out, state, reason)
        if await record(
            self._sessions,
            build_id,
            state,
            reason=reason,
            results=results,
            if_running=True,
            metrics=self._metrics,
        ):
            log.info("kube_build_finished", build_id=str(build_id), state=state.value, reason=reason)
        self._tracked.pop(build_id, None)


def _pod_resources(pod: Manifest | None, target: BuildTarget) -> dict[str, Any]:
    """What the smoke-loaded server of a Kubernetes build had: its container's requests and limits."""
    spec: Mapping[str, Any] = (pod or {}).get("spec", {})
    containers: list[Mapping[str, Any]] = [*spec.get("initContainers", []), *spec.get("containers", [])]
    server = next((c for c in containers if c.get("name") == "smoke-load"), {})
    return {"runner": "kubernetes", "profile": target.profile, **server.get("resources", {})}


def _build_id(obj: Mapping[str, Any]) -> str | None:
    return (obj["metadata"].get("labels") or {}).get(LABEL_BUILD_ID)


def _by_build(jobs: Any) -> dict[str, Manifest]:
    return {key: job for job in jobs if (key := _build_id(job))}


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None
