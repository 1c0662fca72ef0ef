"""The deployment controller: one leader at a time, level-triggered reconcile.

Every pass compares each deployment's desired state (its current revision, replica target and
restart generation) with what the runtime backend observes, applies the difference, and writes
back status conditions (Ready, Progressing, Degraded) with reason and message. It trusts no
earlier pass: a crash loses nothing, the next leader simply reconciles again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import structlog
from sqlalchemy import text
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
from converge.kit.service import Service
from converge.models import Deployment
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
from converge.storage.leader import leadership
from converge.workers.replica_meter import ReplicaMeter

log = structlog.get_logger(__name__)
LEADER_LOCK_KEY = 0x43_74_72_6C  # "Ctrl"
POLICY_RECHECK_S = 5.0


@dataclass
class _Load:
    """What the autoscaler remembers between passes (in memory: a new leader starts fresh)."""

    high_since: float | None = None
    low_since: float | None = None
    idle_since: float | None = None
    woken_at: datetime | None = None
    restarts: dict[str, int] = field(default_factory=dict)
    policy: tuple[Any, float, list[str]] | None = None  # (what was checked, when, reasons)


def autoscale(
    *, current: int, spec: dict[str, Any], observed: Observation | None, memory: _Load, now: float
) -> int:
    """The replica target for this pass, from the in-flight and queue figures replicas report."""
    replicas, auto = spec["replicas"], spec["autoscaling"]
    lo, hi = replicas["min"], replicas["max"]
    ready = observed.ready if observed else []
    load = sum(r.in_flight + r.queue_depth for r in ready)
    wanted = max(lo, min(hi, math.ceil(load / auto["target_in_flight"]))) if load else lo
    memory.idle_since = (now if memory.idle_since is None else memory.idle_since) if load == 0 else None
    to_zero = auto.get("scale_to_zero_after_s")
    if to_zero is not None and memory.idle_since is not None and now - memory.idle_since >= to_zero:
        return 0
    if current == 0:
        return current if to_zero is not None and load == 0 else max(lo, 1)
    if wanted > current:
        memory.low_since = None
        memory.high_since = now if memory.high_since is None else memory.high_since
        return min(hi, current + 1) if now - memory.high_since >= auto["scale_up_after_s"] else current
    memory.high_since = None
    if wanted < current:
        memory.low_since = now if memory.low_since is None else memory.low_since
        if now - memory.low_since >= auto["cooldown_s"]:
            memory.low_since = now
            return max(wanted, current - 1)
        return current
    memory.low_since = None
    return max(current, lo)


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
        interval_s: float = 1.0,
        metrics: Metrics | None = None,
        meter: ReplicaMeter | None = None,
    ) -> None:
        self._sessions, self._settings, self._store = sessions, settings, store
        self.meter = meter  # measured cost: replica-seconds from every observation
        self._metrics = metrics or Metrics()
        self._labels: dict[uuid.UUID, str] = {}  # "<project>/<name>", as the gateway labels it
        self._runtime, self._conninfo, self._interval = runtime, conninfo, interval_s
        super().__init__()
        self._paths: dict[str, Path] = {}
        self._load: dict[uuid.UUID, _Load] = {}
        self._observed: dict[uuid.UUID, Observation] = {}
        self.is_leader = False
        self.passes = 0

    async def _run(self) -> None:
        while True:
            try:
                async with leadership(self._conninfo, key=LEADER_LOCK_KEY) as conn:
                    self.is_leader = True
                    log.info("controller_leading")
                    await conn.execute(f"LISTEN {channels.WAKE}")
                    while True:  # the lock lives as long as this connection
                        await conn.execute("SELECT 1")
                        await self.reconcile_all()
                        for deployment_id in await self._wake_requests(conn):
                            await self.wake(deployment_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("controller_pass_failed")
                await asyncio.sleep(self._interval)
            finally:
                self.is_leader = False
                self._metrics.forget_replicas()

    async def _wake_requests(self, conn: psycopg.AsyncConnection[Any]) -> set[uuid.UUID]:
        """Wait up to one interval for the gateway's wake requests (returning at the first)."""
        ids: set[uuid.UUID] = set()
        async for note in conn.notifies(timeout=self._interval, stop_after=1):
            with contextlib.suppress(ValueError):
                ids.add(uuid.UUID(note.payload))
        return ids

    async def wake(self, deployment_id: uuid.UUID) -> None:
        async with transaction(self._sessions) as session:
            row = await repository.get(session, deployment_id, lock=True)
            if row is None or row.deleting:
                return
            await wake_deployment(session, None, deployment=row)
        await self.reconcile(deployment_id)

    async def reconcile_all(self) -> None:
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
        if sha256 not in self._paths:  # verified once per leader; the cache is content-addressed
            self._paths[sha256] = await self._store.fetch_to(sha256, acquire.cache_dir(self._settings))
        return str(self._paths[sha256])

    async def reconcile(self, deployment_id: uuid.UUID) -> None:
        async with self._sessions() as session:
            deployment = await repository.get(session, deployment_id)
            if deployment is None:
                return
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
            async with transaction(self._sessions) as session:
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
            self._load.pop(deployment.id, None)
            self._metrics.forget_deployment(self._labels.pop(deployment.id, ""))
            return
        assert rev is not None and version is not None
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
                canary_replicas=canary_replicas(deployment, spec, target),
            )
        )
        observed = await self._runtime.observe(deployment_id=deployment.id)
        self._observed[deployment.id] = observed
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
        await self._write_status(
            deployment, observed, target=target, servable=servable, version_state=version.state, denied=denied
        )

    async def _policy_denials(
        self, session: AsyncSession, deployment: Deployment, spec: dict[str, Any], version: Any
    ) -> list[str]:
        """Why the `deployment` policies no longer admit this deployment (checked every few
        seconds, and at once when its revision or version changes). The gateway refuses with it."""
        memory = self._load.setdefault(deployment.id, _Load())
        checked = (deployment.revision, version.id, version.state, version.updated_at)
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
    ) -> None:
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
            return
        async with transaction(self._sessions) as session:
            row = await repository.get(session, deployment.id, lock=True)
            if row is None:
                return
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


def canary_replicas(deployment: Deployment, spec: dict[str, Any], target: int) -> int | None:
    """How many replicas of a canary revision run beside the old ones: the weight's share of the
    target (at least one, or there is no canary), until the revision is promoted."""
    weight = (spec.get("rollout") or {}).get("canary_weight")
    if weight is None or not 0 < weight < 100 or deployment.promoted_revision == deployment.revision:
        return None
    return max(1, round(target * weight / 100))


def server_args(spec: dict[str, Any]) -> tuple[str, ...]:
    """The spec's server args, plus a thread count that matches the replica's CPU allowance:
    llama.cpp threads spin while they wait, so one per granted core, never all the machine's;
    and, for a deployment given GPUs, every layer offloaded to them (the spec's own args win)."""
    args = list(spec.get("args", []))
    if spec["server"] == ServerKind.LLAMA_CPP:
        if "--n-threads" not in args:
            args += ["--n-threads", str(max(1, int(spec["resources"]["cpu"])))]
        if "--n-gpu-layers" not in args and has_gpu(spec["resources"]):
            args += ["--n-gpu-layers", "-1"]
    return tuple(args)


def has_gpu(resources: dict[str, Any]) -> bool:
    return bool(resources.get("gpus")) or resources.get("mig_profile") is not None


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
