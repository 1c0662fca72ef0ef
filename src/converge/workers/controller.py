"""The deployment controller: one leader at a time, level-triggered reconcile of what changed.

A reconcile compares one deployment's desired state (its current revision, replica target and
restart generation) with what the runtime backend observes, applies the difference, and writes
back status conditions (Ready, Progressing, Degraded) with reason and message. It trusts no
earlier pass: a crash loses nothing, the next leader simply reconciles again.

What is reconciled is decided by a work queue (workers/workqueue.py), so the work grows with
changes, not with the number of deployments:
- NOTIFY from the database (triggers, migration 0012): a deployment's spec, its model version
  or model, a build of that version, or any `deployment` policy changed;
- the runtime's watch: a replica started, became ready, died, drained, or its load moved;
- the gateway's wake requests (scale up from zero);
- a deployment in motion (a rollout, a drain, a restart, an autoscaling timer) queues itself
  again after `controller.requeue_s`, or exactly when its timer is due;
- a failed reconcile is retried with exponential backoff per deployment;
- every deployment once on taking over, and again every `controller.resync_s` (the safety net).
A backend that does not report changes (`reports_changes` False) is polled: each deployment
queues itself again after `requeue_s`, as every pass used to.

Writes are fenced (storage/leader.py): a leader whose lease epoch moved on cannot write.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.config import Settings
from converge.control.deployments import admission, repository
from converge.control.deployments.service import wake_deployment
from converge.control.events.service import record
from converge.control.library import acquire
from converge.control.library import repository as library_repo
from converge.control.projects import repository as projects_repo
from converge.core.lifecycle import SERVABLE
from converge.kit import channels
from converge.kit.observability import Metrics
from converge.kit.service import Service, cancel
from converge.models import Deployment
from converge.observability import tracing
from converge.runtime.base import (
    Condition,
    DeploymentSpec,
    Observation,
    ReplicaPhase,
    ReplicaTemplate,
    Resources,
    RuntimeBackend,
    ServerKind,
)
from converge.storage.artifacts import ArtifactStore
from converge.storage.db import transaction
from converge.storage.leader import Fenced, Lease, fence, lease
from converge.workers import retention
from converge.workers.autoscaling import _Load, autoscale, autoscale_inputs, requeue_after
from converge.workers.replica_meter import ReplicaMeter
from converge.workers.revision import canary_replicas, server_args
from converge.workers.workqueue import WorkQueue

log = structlog.get_logger(__name__)
LEADER_LOCK_KEY = 0x43_74_72_6C  # "Ctrl"
ROLE = "controller"  # its row in leader_leases
POLICY_RECHECK_S = 5.0
PING_S = 2.0  # the lock's connection is checked this often while waiting for notifications
# Replica time of deployments at rest is metered from their last observation this often (the
# meter bills at most max_gap_s, 60 s, between two observations of one deployment).
METER_TICK_S = 30.0
KEY_EXPIRY_S = 300.0  # the soonest key expiry per project, for the alert (a week's warning)


class Controller(Service):
    name = "controller"

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        store: ArtifactStore,
        runtime: RuntimeBackend,
        conninfo: str,
        interval_s: float | None = None,
        metrics: Metrics | None = None,
        meter: ReplicaMeter | None = None,
        owns_runtime: bool = False,
    ) -> None:
        self._sessions, self._settings, self._store = sessions, settings, store
        self.meter = meter  # measured cost: replica-seconds from every observation
        self._metrics = metrics or Metrics()
        self._labels: dict[uuid.UUID, str] = {}  # "<project>/<name>", as the gateway labels it
        self._runtime, self._conninfo = runtime, conninfo
        self._interval = settings.controller.requeue_s if interval_s is None else interval_s
        # The local runtime supervises this machine's replicas for whoever leads: started (and
        # so adopting what the previous leader left running) when this process wins the lease.
        self._owns_runtime = owns_runtime
        super().__init__()
        self._paths: dict[str, Path] = {}
        self._fetching: dict[str, asyncio.Lock] = {}
        self._load: dict[uuid.UUID, _Load] = {}
        self._observed: dict[uuid.UUID, Observation] = {}
        self._metered: dict[uuid.UUID, tuple[uuid.UUID, int, dict[str, Any]]] = {}
        self._uses: dict[uuid.UUID, tuple[uuid.UUID, uuid.UUID]] = {}  # -> (version id, model id)
        self._facts = 0  # bumped when a policy, model, version or build changes: memos are stale
        self._wakes: set[uuid.UUID] = set()
        self._lease: Lease | None = None
        self.queue: WorkQueue[uuid.UUID] | None = None  # while leading
        self.is_leader = False
        self.epoch: int | None = None  # the lease epoch this process leads under
        self.passes = 0
        runtime.watch(self._runtime_changed)

    async def _run(self) -> None:
        cfg = self._settings.controller
        while True:
            try:
                async with lease(
                    self._conninfo, key=LEADER_LOCK_KEY, role=ROLE, poll_s=cfg.standby_poll_s
                ) as held:
                    await self._lead(held)
            except asyncio.CancelledError:
                raise
            except Fenced as exc:
                log.warning("controller_fenced", error=str(exc))
            except Exception:
                log.exception("controller_leadership_lost")
                await asyncio.sleep(self._interval)
            finally:
                self.is_leader, self._lease, self.queue = False, None, None
                self._metrics.forget_replicas()

    async def _lead(self, held: Lease) -> None:
        """Lead until the lock's connection goes, a write is fenced, or the service stops."""
        cfg = self._settings.controller
        if self._owns_runtime:
            await self._runtime.start()  # idempotent; adopts replicas the last leader left
        await held.conn.execute(f"LISTEN {channels.WAKE}")
        await held.conn.execute(f"LISTEN {channels.RECONCILE}")
        queue: WorkQueue[uuid.UUID] = WorkQueue(base_delay_s=cfg.retry_base_s, max_delay_s=cfg.retry_max_s)
        self._lease, self.queue, self.epoch, self.is_leader = held, queue, held.epoch, True
        log.info("controller_leading", epoch=held.epoch, holder=held.holder)
        await self.resync()  # whatever happened while nobody led
        with contextlib.suppress(Exception):  # a gauge: the next round tries again
            await self.key_expiry()
        tasks = [
            asyncio.create_task(self._listen(held), name="controller-listen"),
            asyncio.create_task(self._every(cfg.resync_s, self.resync), name="controller-resync"),
            asyncio.create_task(self._every(METER_TICK_S, self.meter_tick), name="controller-meter"),
            asyncio.create_task(self._every(KEY_EXPIRY_S, self.key_expiry), name="controller-key-expiry"),
            asyncio.create_task(self._prune_loop(), name="controller-prune"),
            *(asyncio.create_task(self._work(queue), name="controller-work") for _ in range(cfg.workers)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if (exc := task.exception()) is not None:
                    raise exc
        finally:
            await cancel(*tasks)

    async def _listen(self, held: Lease) -> None:
        while True:
            await held.conn.execute("SELECT 1")  # raises once the lock's connection is gone
            async for note in held.conn.notifies(timeout=PING_S):
                self._notified(note.channel, note.payload)

    def _notified(self, channel: str, payload: str) -> None:
        queue = self.queue
        if queue is None:
            return
        kind, _, ident = payload.partition(":") if channel == channels.RECONCILE else ("wake", "", payload)
        if kind == "policy":
            self._facts += 1
            for deployment_id in list(self._uses):
                queue.add(deployment_id)
            return
        try:
            object_id = uuid.UUID(ident)
        except ValueError:
            return
        if kind == "wake":
            self._wakes.add(object_id)
            queue.add(object_id)
        elif kind == "deployment":
            queue.add(object_id)
        elif kind in ("version", "model"):
            self._facts += 1
            position = 0 if kind == "version" else 1
            for deployment_id, uses in list(self._uses.items()):
                if uses[position] == object_id:
                    queue.add(deployment_id)

    def _runtime_changed(self, deployment_id: uuid.UUID) -> None:
        if self.queue is not None:
            self.queue.add(deployment_id)

    async def resync(self) -> None:
        """Queue every live deployment (one query): what no notification reported is caught here."""
        async with self._sessions() as session:
            ids = list((await session.scalars(select(Deployment.id).order_by(Deployment.id))).all())
        if self.queue is not None:
            for deployment_id in ids:
                self.queue.add(deployment_id)
        self.passes += 1

    @staticmethod
    async def _every(seconds: float, job: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Fenced:
                raise
            except Exception:  # the next round tries again; the leader keeps leading meanwhile
                log.exception("controller_job_failed", job=getattr(job, "__name__", str(job)))

    async def _work(self, queue: WorkQueue[uuid.UUID]) -> None:
        while True:
            deployment_id = await queue.get()
            try:
                await self._process(queue, deployment_id)
            finally:
                queue.done(deployment_id)

    async def _process(self, queue: WorkQueue[uuid.UUID], deployment_id: uuid.UUID) -> None:
        started = time.perf_counter()
        try:
            if deployment_id in self._wakes:
                self._wakes.discard(deployment_id)
                await self._wake_row(deployment_id)
            with tracing.span("reconcile", **{"converge.deployment.id": str(deployment_id)}):
                after = await self.reconcile(deployment_id)
        except Fenced:
            raise
        except Exception:
            self._metrics.reconcile_errors.inc()
            delay = queue.retry(deployment_id)
            log.exception("reconcile_failed", deployment_id=str(deployment_id), retry_in_s=delay)
        else:
            queue.forget(deployment_id)
            if after is not None:
                queue.add_after(deployment_id, after)
        finally:
            self._metrics.reconcile_duration.observe(time.perf_counter() - started)

    async def meter_tick(self) -> None:
        """Replica time of the deployments nothing happened to since their last reconcile."""
        if self.meter is None:
            return
        for deployment_id, (project_id, revision, resources) in list(self._metered.items()):
            if (observed := self._observed.get(deployment_id)) is not None:
                self.meter.observe(
                    project_id=project_id, revision=revision, resources=resources, observed=observed
                )

    async def key_expiry(self) -> None:
        """`converge_api_key_next_expiry_timestamp_seconds`: what the key-expiry alert reads."""
        async with self._sessions() as session:
            found = await projects_repo.next_key_expiries(session, datetime.now(UTC))
        self._metrics.observe_key_expiry({name: at.timestamp() for name, at in found.items()})

    async def _prune_loop(self) -> None:
        settings = self._settings.retention
        while True:
            try:
                await retention.prune(self._sessions, settings=settings)
            except Exception:  # the next round tries again; pruning late loses nothing
                log.exception("retention_prune_failed")
            await asyncio.sleep(settings.prune_interval_s)

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncSession]:
        """A transaction for the controller's writes, refused once another leader took over."""
        async with transaction(self._sessions) as session:
            if self._lease is not None:
                await fence(session, role=ROLE, epoch=self._lease.epoch)
            yield session

    async def wake(self, deployment_id: uuid.UUID) -> None:
        await self._wake_row(deployment_id)
        await self.reconcile(deployment_id)

    async def _wake_row(self, deployment_id: uuid.UUID) -> None:
        async with self._writing() as session:
            row = await repository.get(session, deployment_id, lock=True)
            if row is None or row.deleting:
                return
            await wake_deployment(session, None, deployment=row)

    async def reconcile_all(self) -> None:
        """Reconcile every deployment once, in this task (tests; the leader uses the queue)."""
        async with self._sessions() as session:
            ids = [d.id for d in await repository.all_active(session)]
        for deployment_id in ids:
            started = time.perf_counter()
            try:
                await self.reconcile(deployment_id)
            except Exception:
                self._metrics.reconcile_errors.inc()
                log.exception("reconcile_failed", deployment_id=str(deployment_id))
            self._metrics.reconcile_duration.observe(time.perf_counter() - started)
        self.passes += 1

    async def _artifact(self, sha256: str) -> str:
        """The artifact's path as replicas see it: where the backend mounts it (pods fetch by
        digest themselves, so nothing is downloaded here), else a verified copy on this machine."""
        mounted = self._runtime.artifact_path(sha256=sha256)
        if mounted is not None:
            return mounted
        async with self._fetching.setdefault(sha256, asyncio.Lock()):  # workers share one copy
            if sha256 not in self._paths:  # verified once per leader; the cache is content-addressed
                self._paths[sha256] = await self._store.fetch_to(sha256, acquire.cache_dir(self._settings))
        return str(self._paths[sha256])

    async def reconcile(self, deployment_id: uuid.UUID) -> float | None:
        """Converge one deployment; how soon to look at it again (None: when something changes)."""
        async with self._sessions() as session:
            if self._lease is not None:  # a stale leader applies nothing to the runtime either
                await fence(session, role=ROLE, epoch=self._lease.epoch, lock=False)
            deployment = await repository.get(session, deployment_id)
            if deployment is None:
                self._forget(deployment_id)
                return None
            if deployment.id not in self._labels:  # names never change: looked up once
                project = await projects_repo.get_project(session, deployment.project_id)
                owner = project.name if project is not None else deployment.project_id
                self._labels[deployment.id] = f"{owner}/{deployment.name}"
            rev = await repository.revision(session, deployment.id, deployment.revision)
            version = await library_repo.get_version(session, deployment.model_version_id)
            denied = (
                await self._policy_denials(session, deployment, rev.spec, version)
                if rev is not None and version is not None and not deployment.deleting
                else []
            )
        if deployment.deleting:
            await self._runtime.delete(deployment_id=deployment.id)
            async with self._writing() as session:
                await record(
                    session,
                    None,
                    action="deployment.deleted",
                    project_id=deployment.project_id,
                    object_type="deployment",
                    object_id=deployment.id,
                    changes={"name": deployment.name},
                )
                row = await repository.get(session, deployment.id, lock=True)
                if row is not None:
                    await session.delete(row)
            self._forget(deployment.id)
            return None
        assert rev is not None and version is not None
        self._uses[deployment.id] = (version.id, version.model_id)
        spec = rev.spec
        servable = version.state in SERVABLE
        memory = self._load.setdefault(deployment.id, _Load())
        if deployment.last_active_at is not None and deployment.last_active_at != memory.woken_at:
            memory.woken_at, memory.idle_since = (
                deployment.last_active_at,
                None,
            )  # activity: idle again from now
        target = (
            autoscale(
                current=deployment.desired_replicas,
                spec=spec,
                observed=self._observed.get(deployment.id),
                memory=memory,
                now=time.monotonic(),
            )
            if servable
            else 0
        )
        template = ReplicaTemplate(
            server=ServerKind(spec["server"]),
            model_name=spec["model_name"],
            artifact_path=await self._artifact(version.artifact_sha256),
            args=server_args(spec),
            env=spec.get("env", {}),
            resources=Resources(**spec["resources"]),
        )
        await self._runtime.apply(
            spec=DeploymentSpec(
                deployment_id=deployment.id,
                name=deployment.name,
                revision=deployment.revision,
                template=template,
                replicas=target,
                zones=tuple(spec.get("zones", ["local"])),
                restart_generation=deployment.restart_generation,
                canary_replicas=canary_replicas(deployment, spec, target=target),
            )
        )
        observed = await self._runtime.observe(deployment_id=deployment.id)
        previous = self._observed.get(deployment.id)
        self._observed[deployment.id] = observed
        self._metered[deployment.id] = (deployment.project_id, rev.revision, spec["resources"])
        if self.meter is not None:
            self.meter.observe(
                project_id=deployment.project_id,
                revision=rev.revision,
                resources=spec["resources"],
                observed=observed,
            )
        phases = [r.phase for r in observed.replicas]
        self._metrics.observe_replicas(
            self._labels[deployment.id], {p.value: phases.count(p) for p in ReplicaPhase}
        )
        self._metrics.observe_engine(
            self._labels[deployment.id],
            (
                (r.id, r.engine)
                for r in observed.replicas
                if r.phase == ReplicaPhase.READY and r.engine is not None
            ),
        )
        phase = await self._write_status(
            deployment, observed, target=target, servable=servable, version_state=version.state, denied=denied
        )
        if not self._runtime.reports_changes:
            return self._interval
        if autoscale_inputs(observed) != autoscale_inputs(previous):
            return 0.0  # this pass scaled on the previous load: look again at once
        return requeue_after(
            phase=phase,
            observed=observed,
            target=target,
            spec=spec,
            memory=memory,
            now=time.monotonic(),
            interval=self._interval,
        )

    def _forget(self, deployment_id: uuid.UUID) -> None:
        self._load.pop(deployment_id, None)
        self._observed.pop(deployment_id, None)
        self._metered.pop(deployment_id, None)
        self._uses.pop(deployment_id, None)
        self._metrics.forget_deployment(self._labels.pop(deployment_id, ""))

    async def _policy_denials(
        self, session: AsyncSession, deployment: Deployment, spec: dict[str, Any], version: Any
    ) -> list[str]:
        """Why the `deployment` policies no longer admit this deployment (checked every few
        seconds, and at once when its revision or version changes). The gateway refuses with it."""
        memory = self._load.setdefault(deployment.id, _Load())
        checked = (deployment.revision, version.id, version.state, version.updated_at, self._facts)
        now = time.monotonic()
        if memory.policy and memory.policy[0] == checked and now - memory.policy[1] < POLICY_RECHECK_S:
            return memory.policy[2]
        project = await projects_repo.get_project(session, deployment.project_id)
        model = await library_repo.get_model(session, version.model_id)
        if project is None or model is None:
            return []
        reasons, _ = await admission.policy_reasons(
            session,
            None,
            project=project,
            model=model,
            version=version,
            profile=spec.get("profile", "cpu"),
            replicas_max=spec.get("replicas", {}).get("max", 1),
            settings=self._settings,
        )
        memory.policy = (checked, now, reasons)
        return reasons

    async def _write_status(
        self,
        deployment: Deployment,
        observed: Observation,
        *,
        target: int,
        servable: bool,
        version_state: str,
        denied: list[str],
    ) -> str:
        conditions = list(observed.conditions)
        conditions.append(
            Condition(
                type="Admitted",
                status=not denied,
                reason="PolicyDenied" if denied else "PolicyAdmitted",
                message="; ".join(denied),
            )
        )
        if not servable:
            conditions = [c for c in conditions if c.type != "Degraded"] + [
                Condition(
                    type="Degraded",
                    status=True,
                    reason="ModelVersionRevoked",
                    message=f"the model version is {version_state}; replicas were stopped",
                )
            ]
        phase = _phase(conditions, target=target, servable=servable)
        replicas = [r.model_dump(mode="json") for r in observed.replicas]
        status = {
            "conditions": [c.model_dump() for c in conditions],
            "replicas": replicas,
            "ready_replicas": len(observed.ready),
            "target_replicas": target,
        }
        memory = self._load[deployment.id]
        restarted = {r.id: r.restarts for r in observed.replicas if r.restarts > memory.restarts.get(r.id, 0)}
        if (
            status == deployment.status
            and phase == deployment.phase
            and target == deployment.desired_replicas
        ):
            return phase
        async with self._writing() as session:
            row = await repository.get(session, deployment.id, lock=True)
            if row is None:
                return phase
            changed_phase = row.phase != phase
            row.status, row.phase, row.desired_replicas = status, phase, target
            if any(r.in_flight for r in observed.replicas):
                row.last_active_at = datetime.now(UTC)
            if changed_phase:
                await record(
                    session,
                    None,
                    action="deployment.status",
                    project_id=row.project_id,
                    object_type="deployment",
                    object_id=row.id,
                    changes={
                        "phase": phase,
                        "conditions": status["conditions"],
                        "ready": len(observed.ready),
                    },
                )
            # The gateway reloads its routes on this (no outbox event: replica churn is not news).
            await session.execute(text("SELECT pg_notify(:c, :p)"), {"c": channels.ROUTES, "p": str(row.id)})
            for replica_id, count in restarted.items():
                await record(
                    session,
                    None,
                    action="deployment.replica_restarted",
                    project_id=row.project_id,
                    object_type="deployment",
                    object_id=row.id,
                    changes={"replica": replica_id, "restarts": count},
                )
        self._metrics.count_restarts(
            self._labels[deployment.id], sum(n - memory.restarts.get(r, 0) for r, n in restarted.items())
        )
        memory.restarts.update({r.id: r.restarts for r in observed.replicas})
        return phase


def _phase(conditions: list[Condition], *, target: int, servable: bool) -> str:
    by_type = {c.type: c for c in conditions}
    if not servable:
        return "Revoked"
    if (d := by_type.get("Degraded")) and d.status:
        return "Degraded"
    if target == 0:
        return "ScaledToZero"
    if (r := by_type.get("Ready")) and r.status:
        return "Ready"
    return "Progressing"
