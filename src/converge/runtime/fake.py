"""FakeBackend: an in-memory, deterministic runtime for control-plane tests.

It follows the local backend's rolling rules (`rollout.plan`: surge 1, unavailable 0, drain
before stop) but moves synchronously: `apply` converges as far as it can at once, and each
`observe` call is one tick of time (starting replicas age, crashed ones restart, drains finish).
Tests steer it: `crash`, `set_load`, `fail_revision`, `write_log`, and `serve_at` (replicas report
real endpoints, e.g. test upstreams the gateway can reach).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import BaseModel, Field

from converge.runtime.base import (
    Condition,
    DeploymentSpec,
    EngineStats,
    Observation,
    Replica,
    ReplicaPhase,
    RuntimeBackend,
    Zone,
)
from converge.runtime.rollout import ReplicaView, conditions, is_complete, is_paused, plan

P = ReplicaPhase


class FakeConfig(BaseModel):
    ready_after: int = Field(default=0, ge=0, description="observe() calls before a new replica is READY")
    progress_deadline: int = Field(
        default=10, ge=1, description="observe() calls without progress before ProgressDeadlineExceeded"
    )
    crashloop_restarts: int = Field(default=5, ge=0)
    zones: list[Zone] = Field(default_factory=lambda: [Zone(name="local", cpu=8, memory_bytes=32 << 30)])


@dataclass(eq=False)
class _Replica:
    id: str
    deployment_id: uuid.UUID
    revision: int
    generation: int
    pid: int
    phase: ReplicaPhase = P.STARTING
    age: int = 0  # observe() ticks since (re)start
    restarts: int = 0
    in_flight: int = 0
    queue_depth: int = 0
    engine: EngineStats | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_exit: str | None = None

    def view(self, spec: DeploymentSpec) -> ReplicaView:
        current = (self.revision, self.generation) == (spec.revision, spec.restart_generation)
        return ReplicaView(id=self.id, current=current, phase=self.phase)

    def to_replica(self, endpoint: str | None = None) -> Replica:
        running = self.phase != P.BACKOFF
        return Replica(
            id=self.id,
            deployment_id=self.deployment_id,
            revision=self.revision,
            generation=self.generation,
            phase=self.phase,
            zone="local",
            endpoint=(endpoint or f"http://fake/{self.id}") if running else None,
            pid=self.pid if running else None,
            restarts=self.restarts,
            in_flight=self.in_flight,
            queue_depth=self.queue_depth,
            engine=self.engine,
            started_at=self.started_at,
            last_exit=self.last_exit,
        )


@dataclass(eq=False)
class _Deployment:
    spec: DeploymentSpec
    replicas: dict[str, _Replica] = field(default_factory=dict)
    target: tuple[int, int, int, int | None] | None = None  # (revision, generation, replicas, canary)
    stalled: int = 0  # observe() ticks without progress while the rollout is incomplete
    complete: bool = False


class FakeBackend(RuntimeBackend):
    config_model = FakeConfig
    type = "fake"
    reports_changes = True  # every steering call below tells the watchers

    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config or FakeConfig()
        self.applied: list[DeploymentSpec] = []  # every apply(), in order
        self.running = False
        self._deployments: dict[uuid.UUID, _Deployment] = {}
        self._failing: dict[tuple[uuid.UUID, int], bool] = {}  # -> crashes at start
        self._logs: dict[str, list[str]] = {}
        self._log_written = asyncio.Event()
        self._counter = 0
        self._endpoints: dict[uuid.UUID, list[str]] = {}

    async def start(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running = False

    # -- RuntimeBackend --------------------------------------------------------------------

    async def apply(self, *, spec: DeploymentSpec) -> None:
        self.applied.append(spec)
        dep = self._deployments.setdefault(spec.deployment_id, _Deployment(spec))
        dep.spec = spec
        target = (spec.revision, spec.restart_generation, spec.replicas, spec.canary_replicas)
        if dep.target != target:
            dep.target, dep.stalled, dep.complete = target, 0, False
        self._settle(dep)

    async def observe(self, *, deployment_id: uuid.UUID) -> Observation:
        dep = self._deployments.get(deployment_id)
        if dep is None:
            return Observation(deployment_id=deployment_id)
        progressed = self._tick(dep)
        progressed = self._settle(dep) or progressed
        views = [r.view(dep.spec) for r in dep.replicas.values()]
        if is_complete(desired=dep.spec.replicas, replicas=views):
            dep.complete = True
        # A paused canary waits for a promotion: a resting state, not a stalled rollout.
        paused = is_paused(desired=dep.spec.replicas, replicas=views, canary=dep.spec.canary_replicas)
        dep.stalled = 0 if progressed or dep.complete or paused else dep.stalled + 1
        return Observation(
            deployment_id=deployment_id,
            replicas=[self._reported(deployment_id, i, r) for i, r in enumerate(dep.replicas.values())],
            conditions=self._conditions(dep, views),
        )

    async def delete(self, *, deployment_id: uuid.UUID) -> None:
        self._deployments.pop(deployment_id, None)

    async def logs(self, *, replica_id: str, tail: int = 100, follow: bool = False) -> AsyncIterator[str]:
        if replica_id not in self._logs:
            raise LookupError(f"no logs for replica {replica_id!r}")
        lines = self._logs[replica_id]
        seen = len(lines)
        for line in lines[max(0, seen - tail) :] if tail > 0 else []:
            yield line
        while follow:
            written = self._log_written
            if len(lines) == seen:
                await written.wait()
                continue
            for line in lines[seen:]:
                yield line
            seen = len(lines)

    async def zones(self) -> list[Zone]:
        return list(self.config.zones)

    # -- steering (tests) ------------------------------------------------------------------

    def serve_at(self, deployment_id: uuid.UUID, endpoints: list[str]) -> None:
        """Replica i of this deployment reports endpoints[i] (in replica order)."""
        self._endpoints[deployment_id] = endpoints
        self.changed(deployment_id)

    def _reported(self, deployment_id: uuid.UUID, index: int, replica: _Replica) -> Replica:
        endpoints = self._endpoints.get(deployment_id, [])
        return replica.to_replica(endpoints[index] if index < len(endpoints) else None)

    def crash(self, replica_id: str, *, reason: str = "killed by SIGKILL") -> None:
        """The replica's process dies; the next observe() restarts it."""
        r = self._replica(replica_id)
        r.phase, r.last_exit, r.in_flight, r.queue_depth = P.BACKOFF, reason, 0, 0
        self._log(r, f"exited: {reason}")
        self.changed(r.deployment_id)

    def set_load(
        self,
        replica_id: str,
        *,
        in_flight: int | None = None,
        queue_depth: int | None = None,
        engine: EngineStats | None = None,
    ) -> None:
        """A draining replica with in_flight or queue_depth > 0 does not stop. `engine`: what
        its engine reports of its slots and KV cache (as llama.cpp's server does)."""
        r = self._replica(replica_id)
        r.in_flight = r.in_flight if in_flight is None else in_flight
        r.queue_depth = r.queue_depth if queue_depth is None else queue_depth
        r.engine = r.engine if engine is None else engine
        self.changed(r.deployment_id)

    def fail_revision(
        self, *, deployment_id: uuid.UUID, revision: int, crash: bool = False, failing: bool = True
    ) -> None:
        """Replicas of this revision never become ready: they hang in STARTING, or with `crash`
        exit at every start (a crash loop). `failing=False` heals the revision."""
        key = (deployment_id, revision)
        if failing:
            self._failing[key] = crash
        else:
            self._failing.pop(key, None)
        self.changed(deployment_id)

    def write_log(self, replica_id: str, line: str) -> None:
        self._log(self._replica(replica_id), line)

    # -- internals -------------------------------------------------------------------------

    def _replica(self, replica_id: str) -> _Replica:
        for dep in self._deployments.values():
            if replica_id in dep.replicas:
                return dep.replicas[replica_id]
        raise LookupError(f"no replica {replica_id!r}")

    def _can_be_ready(self, r: _Replica) -> bool:
        return r.age >= self.config.ready_after and (r.deployment_id, r.revision) not in self._failing

    def _tick(self, dep: _Deployment) -> bool:
        """One unit of time: restarts after a crash, starting replicas age. True on progress."""
        progressed = False
        for r in dep.replicas.values():
            if r.phase == P.BACKOFF:
                self._counter += 1
                r.phase, r.age, r.pid, r.restarts = P.STARTING, 0, 1000 + self._counter, r.restarts + 1
                r.started_at = datetime.now(UTC)
                self._log(r, f"restarted (restart {r.restarts})")
            elif r.phase == P.STARTING:
                r.age += 1
            if r.phase == P.STARTING and self._failing.get((r.deployment_id, r.revision)):
                r.phase, r.last_exit = P.BACKOFF, "exited with code 1"
                self._log(r, "exited: exited with code 1")
            elif r.phase == P.STARTING and self._can_be_ready(r):
                r.phase, progressed = P.READY, True
                self._log(r, "ready")
        return progressed

    def _settle(self, dep: _Deployment) -> bool:
        """Apply rollout steps until none is left to take now. True if anything moved."""
        spec, moved = dep.spec, False
        for _ in range(4 * (spec.replicas + len(dep.replicas)) + 4):
            step = plan(
                desired=spec.replicas,
                replicas=[r.view(spec) for r in dep.replicas.values()],
                canary=spec.canary_replicas,
            )
            idle = [r for r in dep.replicas.values() if r.phase == P.DRAINING and not r.in_flight]
            idle = [r for r in idle if not r.queue_depth]
            if not (step.start or step.drain or step.stop or idle):
                break
            moved = True
            for r in idle:
                self._log(r, "stopped")
                del dep.replicas[r.id]
            for rid in step.stop:
                self._log(dep.replicas[rid], "stopped")
                del dep.replicas[rid]
            for rid in step.drain:
                dep.replicas[rid].phase = P.DRAINING
            for _ in range(step.start):
                self._start(dep)
        return moved

    def _start(self, dep: _Deployment) -> None:
        self._counter += 1
        slug = re.sub(r"[^a-z0-9]+", "-", dep.spec.name.lower()).strip("-") or "replica"
        r = _Replica(
            id=f"{slug}-r{dep.spec.revision}-{self._counter}",
            deployment_id=dep.spec.deployment_id,
            revision=dep.spec.revision,
            generation=dep.spec.restart_generation,
            pid=1000 + self._counter,
        )
        dep.replicas[r.id] = r
        self._log(r, f"started revision {r.revision}")
        if self._can_be_ready(r):
            r.phase = P.READY
            self._log(r, "ready")

    def _conditions(self, dep: _Deployment, views: list[ReplicaView]) -> list[Condition]:
        looping = next(
            (
                r
                for r in dep.replicas.values()
                if r.phase != P.READY and r.restarts > self.config.crashloop_restarts
            ),
            None,
        )
        return conditions(
            desired=dep.spec.replicas,
            revision=dep.spec.revision,
            replicas=views,
            crash_loop=f"replica {looping.id} restarted {looping.restarts} times" if looping else None,
            deadline_exceeded=not dep.complete and dep.stalled >= self.config.progress_deadline,
            canary=dep.spec.canary_replicas,
        )

    def _log(self, r: _Replica, line: str) -> None:
        self._logs.setdefault(r.id, []).append(line)
        self._log_written.set()  # wakes followers; the next line waits on a fresh event
        self._log_written = asyncio.Event()
