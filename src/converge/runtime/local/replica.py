"""The supervisor's in-memory view of deployments and replicas, and how it is persisted."""

from __future__ import annotations

import re
import secrets
import signal
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from converge.runtime.base import (
    Condition,
    DeploymentSpec,
    EngineStats,
    Replica,
    ReplicaPhase,
    ReplicaTemplate,
)
from converge.runtime.local.config import LocalConfig
from converge.runtime.local.process import Identity, ProcessHandle
from converge.runtime.local.state import ReplicaRecord
from converge.runtime.rollout import ReplicaView, conditions

REPLICA_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,80}$")


def new_replica_id(spec: DeploymentSpec) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", spec.name.lower()).strip("-")[:40].strip("-") or "replica"
    return f"{slug}-r{spec.revision}-{secrets.token_hex(3)}"


@dataclass(eq=False)
class ReplicaState:
    id: str
    deployment_id: uuid.UUID
    revision: int
    generation: int
    template: ReplicaTemplate
    phase: ReplicaPhase = ReplicaPhase.STARTING
    handle: ProcessHandle | None = None
    port: int | None = None
    gpus: tuple[str, ...] = ()  # the devices its process sees (CUDA_VISIBLE_DEVICES)
    restarts: int = 0
    started_at: datetime | None = None
    last_exit: str | None = None
    in_flight: int = 0
    queue_depth: int = 0
    load_at: float = float("-inf")  # when in_flight/queue_depth were last read
    engine: EngineStats | None = None  # the engine's slots and KV cache, read with the load
    since: float = 0.0  # when the current process started, or it last stopped being ready
    verified: bool = False  # checked that our process owns the port it answers on
    probe_failures: int = 0
    failures: int = 0  # consecutive failed starts: the exponent of the backoff
    retry_at: float = 0.0
    restart_times: deque[float] = field(default_factory=deque)
    drain_started: float | None = None
    term_at: float | None = None  # SIGTERM sent
    killed: bool = False  # SIGKILL sent

    @classmethod
    def for_spec(cls, spec: DeploymentSpec) -> ReplicaState:
        return cls(
            id=new_replica_id(spec),
            deployment_id=spec.deployment_id,
            revision=spec.revision,
            generation=spec.restart_generation,
            template=spec.template,
        )

    @property
    def endpoint(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port is not None and self.handle is not None else None

    def is_current(self, spec: DeploymentSpec) -> bool:
        return (self.revision, self.generation) == (spec.revision, spec.restart_generation)

    def view(self, spec: DeploymentSpec) -> ReplicaView:
        return ReplicaView(id=self.id, current=self.is_current(spec), phase=self.phase)

    def started(self, handle: ProcessHandle, *, port: int, now: float) -> None:
        self.handle, self.port, self.phase, self.since = handle, port, ReplicaPhase.STARTING, now
        self.started_at, self.verified, self.probe_failures = datetime.now(UTC), False, 0
        self.drain_started = self.term_at = None
        self.killed = False

    def draining(self, now: float, *, terminated: bool) -> None:
        """Out of the ready set; `terminated` when SIGTERM goes out at once (nothing to drain)."""
        self.phase, self.drain_started, self.term_at = ReplicaPhase.DRAINING, now, now if terminated else None

    def back_off(self, reason: str, *, now: float, config: LocalConfig) -> float:
        """Crashed or given up on: BACKOFF for exponentially longer, the most once crash-looping."""
        # The exponent is capped: a replica crash-looping for days must not overflow a float.
        delay = min(config.backoff_initial_s * 2.0 ** min(self.failures, 32), config.backoff_max_s)
        if self.recent_restarts(now=now, window_s=config.crashloop_window_s) > config.crashloop_restarts:
            delay = config.backoff_max_s
        self.failures += 1
        self.phase, self.last_exit, self.retry_at = ReplicaPhase.BACKOFF, reason, now + delay
        self.in_flight = self.queue_depth = 0
        self.engine = None
        return delay

    def drain_signal(self, now: float, config: LocalConfig) -> signal.Signals | None:
        """What a draining replica gets now: SIGTERM once idle (a fresh stats reading says so)
        and past the grace, or at the drain timeout; SIGKILL if still alive a grace after that."""
        assert self.drain_started is not None
        waited = now - self.drain_started
        if self.term_at is None:
            idle = self.load_at >= self.drain_started and self.in_flight == 0 and self.queue_depth == 0
            if (idle and waited >= config.drain_grace_s) or waited >= config.drain_timeout_s:
                self.term_at = now
                return signal.SIGTERM
        elif not self.killed and now - self.term_at >= config.kill_grace_s:
            self.killed = True
            return signal.SIGKILL
        return None

    def recent_restarts(self, *, now: float, window_s: float) -> int:
        while self.restart_times and now - self.restart_times[0] > window_s:
            self.restart_times.popleft()
        return len(self.restart_times)

    def to_replica(self) -> Replica:
        return Replica(
            id=self.id,
            deployment_id=self.deployment_id,
            revision=self.revision,
            generation=self.generation,
            phase=self.phase,
            zone="local",
            endpoint=self.endpoint,
            pid=self.handle.pid if self.handle is not None else None,
            restarts=self.restarts,
            in_flight=self.in_flight,
            queue_depth=self.queue_depth,
            engine=self.engine,
            started_at=self.started_at,
            last_exit=self.last_exit,
        )

    def to_record(self) -> ReplicaRecord:
        ident = self.handle.identity if self.handle is not None else None
        return ReplicaRecord(
            id=self.id,
            deployment_id=self.deployment_id,
            revision=self.revision,
            generation=self.generation,
            template=self.template,
            phase=self.phase,
            port=self.port if ident is not None else None,
            gpus=list(self.gpus) if ident is not None else [],
            pid=ident.pid if ident is not None else None,
            create_time=ident.create_time if ident is not None else None,
            cmdline=list(ident.cmdline) if ident is not None else [],
            started_at=self.started_at,
            restarts=self.restarts,
            last_exit=self.last_exit,
        )

    @classmethod
    def from_record(cls, rec: ReplicaRecord) -> ReplicaState:
        state = cls(
            id=rec.id,
            deployment_id=rec.deployment_id,
            revision=rec.revision,
            generation=rec.generation,
            template=rec.template,
            restarts=rec.restarts,
            started_at=rec.started_at,
            last_exit=rec.last_exit,
        )
        if rec.pid is not None and rec.create_time is not None:
            state.handle = ProcessHandle(Identity(rec.pid, rec.create_time, tuple(rec.cmdline)))
            state.port, state.gpus = rec.port, tuple(rec.gpus)
        return state


@dataclass(eq=False)
class DeploymentState:
    id: uuid.UUID
    spec: DeploymentSpec | None  # None once deleted: what is left drains away
    replicas: dict[str, ReplicaState] = field(default_factory=dict)
    # (revision, generation, replicas, canary) being converged to
    target: tuple[int, int, int, int | None] | None = None
    progress_at: float = 0.0  # last time the rollout to `target` moved forward
    complete: bool = False  # `target` was reached (later crashes are not a stuck rollout)

    def retarget(self, now: float) -> DeploymentSpec:
        """A changed spec starts a new rollout, with its own progress deadline."""
        assert self.spec is not None
        spec = self.spec
        target = (spec.revision, spec.restart_generation, spec.replicas, spec.canary_replicas)
        if self.target != target:  # a promotion (canary -> None) restarts the deadline too
            self.target, self.progress_at, self.complete = target, now, False
        return spec

    def conditions(
        self, now: float, *, crashloop_window_s: float, crashloop_restarts: int, deadline_s: float
    ) -> list[Condition]:
        if self.spec is None:
            return [Condition(type="Ready", status=False, reason="Deleting", message="replicas are draining")]
        crash_loop = None
        for r in self.replicas.values():
            n = r.recent_restarts(now=now, window_s=crashloop_window_s)
            # A replica serving again is not crash-looping now, however often it restarted.
            if r.phase in (ReplicaPhase.STARTING, ReplicaPhase.BACKOFF) and n > crashloop_restarts:
                crash_loop = (
                    f"replica {r.id} restarted {n} times in {crashloop_window_s:g}s; last: {r.last_exit}"
                )
                break
        return conditions(
            desired=self.spec.replicas,
            revision=self.spec.revision,
            replicas=[r.view(self.spec) for r in self.replicas.values()],
            crash_loop=crash_loop,
            deadline_exceeded=not self.complete and now - self.progress_at > deadline_s,
            canary=self.spec.canary_replicas,
        )
