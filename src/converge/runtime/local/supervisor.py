"""LocalBackend: model-server replicas as supervised child processes on this machine.

`apply` and `delete` only record what is wanted; one supervision task per backend converges,
level-triggered, every `health_interval_s` (and at once after a change). Each pass: notice
exited processes, probe the rest, enforce timeouts, restart crashed replicas whose backoff is
over, move drains along, then ask `rollout.plan` for the next step of every deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from time import monotonic
from typing import IO

import httpx
import structlog

from converge.kit.service import cancel
from converge.runtime.base import DeploymentSpec, Observation, ReplicaPhase, RuntimeBackend, Zone
from converge.runtime.local import gpus, health
from converge.runtime.local.adoption import adopt
from converge.runtime.local.config import LocalConfig
from converge.runtime.local.logs import append_note, read_log
from converge.runtime.local.ports import PortAllocator
from converge.runtime.local.process import (
    ProcessHandle,
    memory_limit_bytes,
    replica_argv,
    spawn,
)
from converge.runtime.local.replica import REPLICA_ID, DeploymentState, ReplicaState
from converge.runtime.local.sandbox import Sandbox
from converge.runtime.local.state import StateDoc, StateFile, hold_lock
from converge.runtime.local.zones import local_zone
from converge.runtime.rollout import is_complete, is_paused, plan

log = structlog.get_logger(__name__)

P = ReplicaPhase
# A ready replica must fail this many probes in a row before it leaves the routing set: one slow
# answer under load is not an outage.
UNREADY_AFTER_FAILED_PROBES = 3


class LocalBackend(RuntimeBackend):
    config_model = LocalConfig
    type = "local"
    reports_changes = True  # each pass tells the watchers which deployments' replicas moved

    def __init__(
        self,
        config: LocalConfig,
        *,
        sandbox: Sandbox | None = None,
        gpu_devices: tuple[str, ...] | None = None,
    ) -> None:
        self.config = config
        self.sandbox = sandbox or Sandbox()
        self._gpu_devices = gpu_devices  # None: this machine's, counted at start()
        self._deployments: dict[uuid.UUID, DeploymentState] = {}
        self._ports = PortAllocator()
        self._state = StateFile(config.state_dir / "replicas.json")
        self._dying: list[ProcessHandle] = []  # killed, no longer a replica, not yet reaped
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._passed = asyncio.Event()
        self._loaded = False  # replicas.json read: only then may it be rewritten
        self._lock: IO[bytes] | None = None
        self._seen: dict[uuid.UUID, tuple[tuple[object, ...], ...]] = {}  # what watchers last heard

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._lock = hold_lock(self.config.state_dir / ".lock")
        self._client = httpx.AsyncClient(timeout=self.config.probe_timeout_s, trust_env=False)
        if self._gpu_devices is None:
            self._gpu_devices = await asyncio.to_thread(gpus.machine_devices, dict(os.environ))
        try:
            self._take_over()
            await self._pass()  # adopted replicas are probed before start() returns
        except BaseException:
            await self.stop()
            raise
        self._task = asyncio.create_task(self._run(), name="local-runtime-supervisor")

    def _take_over(self) -> None:
        """Adopt what replicas.json records; specs applied before start() win over recorded ones."""
        applied = [d.spec for d in self._deployments.values() if d.spec is not None]
        now = monotonic()
        self._deployments, orphans = adopt(self._state.load(), ports=self._ports, now=now)
        for dep, r in orphans:
            self._stop(dep, r, now)
        for spec in applied:
            dep = self._deployments.setdefault(spec.deployment_id, DeploymentState(spec.deployment_id, spec))
            dep.spec = spec
        self._loaded = True

    async def stop(self) -> None:
        """Stop supervising, and stop the replicas: what a person stopping `converge up` expects.

        With `keep_replicas_on_stop` they keep serving instead, for the next LocalBackend to
        adopt (a restart of the control plane without downtime)."""
        await cancel(self._task)
        self._task = None
        if self._loaded and not self.config.keep_replicas_on_stop:
            await self._stop_replicas()
        self._persist()
        self._passed.set()  # delete() calls still waiting learn that nobody supervises any more
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    async def _stop_replicas(self) -> None:
        """SIGTERM every replica, SIGKILL what is left after `kill_grace_s`; deployments stay
        recorded, so the next start brings their replicas back."""
        replicas = [r for d in self._deployments.values() for r in d.replicas.values()]
        handles = [r.handle for r in replicas if r.handle is not None] + self._dying
        for handle in handles:
            handle.signal(signal.SIGTERM)
        deadline = monotonic() + self.config.kill_grace_s
        while any(h.poll() is None for h in handles) and monotonic() < deadline:
            await asyncio.sleep(0.05)
        for handle in handles:
            handle.signal(signal.SIGKILL)
        while any(h.poll() is None for h in handles) and monotonic() < deadline + 5:
            await asyncio.sleep(0.05)
        for r in replicas:
            if r.port is not None:
                self._ports.release(r.port)
        for dep in self._deployments.values():
            dep.replicas.clear()
        self._dying.clear()
        if handles:
            log.info("local_replicas_stopped", count=len(handles))

    # -- RuntimeBackend --------------------------------------------------------------------

    async def apply(self, *, spec: DeploymentSpec) -> None:
        if spec.zones and "local" not in spec.zones:
            raise ValueError(f"the local runtime has one zone, 'local'; got {list(spec.zones)}")
        dep = self._deployments.setdefault(spec.deployment_id, DeploymentState(spec.deployment_id, spec))
        dep.spec = spec
        dep.retarget(monotonic())
        self._persist()
        self._wake.set()

    async def observe(self, *, deployment_id: uuid.UUID) -> Observation:
        dep = self._deployments.get(deployment_id)
        if dep is None:
            return Observation(deployment_id=deployment_id)
        cfg, now = self.config, monotonic()
        return Observation(
            deployment_id=deployment_id,
            replicas=[r.to_replica() for r in dep.replicas.values()],
            conditions=dep.conditions(
                now,
                crashloop_window_s=cfg.crashloop_window_s,
                crashloop_restarts=cfg.crashloop_restarts,
                deadline_s=cfg.ready_timeout_s,
            ),
        )

    async def delete(self, *, deployment_id: uuid.UUID) -> None:
        """Drain and stop every replica of the deployment; returns once they have exited."""
        dep = self._deployments.get(deployment_id)
        if dep is None:
            return
        dep.spec = None
        self._persist()
        self._wake.set()
        ids = set(dep.replicas)
        await self._until(lambda: not ids & set(dep.replicas))

    async def logs(self, *, replica_id: str, tail: int = 100, follow: bool = False) -> AsyncIterator[str]:
        path = self._log_path(replica_id)
        if not path.exists():
            raise LookupError(f"no logs for replica {replica_id!r}")
        async for line in read_log(path, tail=tail, follow=follow):
            yield line

    async def zones(self) -> list[Zone]:
        return [await asyncio.to_thread(local_zone)]

    # -- supervision -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._pass()
            except Exception:
                log.exception("local_supervisor_pass_failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.health_interval_s):
                    await self._wake.wait()
            self._wake.clear()

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            if self._task is None or self._task.done():
                raise RuntimeError("the local runtime is not running: start() it first")
            await self._passed.wait()

    async def _pass(self) -> None:
        self._dying = [h for h in self._dying if h.poll() is None]
        for dep in self._deployments.values():
            for r in list(dep.replicas.values()):
                if r.handle is not None and (how := r.handle.poll()) is not None:
                    self._exited(dep, r, how)
        await self._probe_all()
        now = monotonic()
        for dep in list(self._deployments.values()):
            for r in list(dep.replicas.values()):
                self._supervise(dep, r, now)
            self._converge(dep, now)
            if dep.spec is None and not dep.replicas:
                del self._deployments[dep.id]
        self._persist()
        self._tell_watchers()
        self._passed.set()
        self._passed = asyncio.Event()

    def _exited(self, dep: DeploymentState, r: ReplicaState, how: str) -> None:
        self._ports.release(r.port)
        r.handle, r.last_exit = None, how
        if r.phase == P.DRAINING:
            del dep.replicas[r.id]
            dep.progress_at = monotonic()
            self._note(r, f"stopped ({how})")
        else:
            self._failed(r, how, monotonic())

    def _failed(self, r: ReplicaState, reason: str, now: float) -> None:
        """The replica's process is gone or given up on: wait, then start it again."""
        if r.handle is not None:
            r.handle.signal(signal.SIGKILL)
            self._dying.append(r.handle)
            self._ports.release(r.port)
            r.handle = None
        delay = r.back_off(reason, now=now, config=self.config)
        self._note(r, f"{reason}; restarting in {delay:g}s")
        log.warning("local_replica_failed", replica=r.id, reason=reason, retry_in_s=delay)

    async def _probe_all(self) -> None:
        client = self._client
        if client is None:
            return
        targets = [
            (dep, r)
            for dep in self._deployments.values()
            for r in dep.replicas.values()
            if r.endpoint is not None and r.term_at is None
        ]
        results = await asyncio.gather(
            *(health.probe(client, r.endpoint or "", stats=r.phase != P.STARTING) for _, r in targets)
        )
        now = monotonic()
        for (dep, r), result in zip(targets, results, strict=True):
            if r.handle is not None:  # still the process that was probed
                self._observed(dep, r, result, now)

    def _observed(self, dep: DeploymentState, r: ReplicaState, result: health.Probe, now: float) -> None:
        if result.in_flight is not None:
            r.in_flight, r.queue_depth, r.load_at = result.in_flight, result.queue_depth or 0, now
            r.engine = result.engine
        if r.phase == P.STARTING and result.ready:
            assert r.handle is not None and r.port is not None
            if not r.verified and not health.listens_on(r.handle.pid, r.port):
                self._failed(r, f"port {r.port} answers, but not from this replica", now)
                return
            r.verified, r.phase, r.failures, r.probe_failures = True, P.READY, 0, 0
            dep.progress_at = now
            self._note(r, f"ready on port {r.port}")
        elif r.phase == P.READY:
            r.probe_failures = 0 if result.ready else r.probe_failures + 1
            if r.probe_failures >= UNREADY_AFTER_FAILED_PROBES:
                r.phase, r.since = P.STARTING, now
                self._note(r, f"not ready after {r.probe_failures} failed probes")

    def _supervise(self, dep: DeploymentState, r: ReplicaState, now: float) -> None:
        cfg = self.config
        if r.phase == P.STARTING and now - r.since > cfg.ready_timeout_s:
            self._failed(r, f"not ready within {cfg.ready_timeout_s:g}s", now)
        elif r.phase == P.BACKOFF and now >= r.retry_at and dep.spec is not None:
            self._spawn(r, now, restart=True)
        elif r.phase == P.DRAINING and r.handle is not None and (sig := r.drain_signal(now, self.config)):
            r.handle.signal(sig)

    def _converge(self, dep: DeploymentState, now: float) -> None:
        if dep.spec is None:
            for r in list(dep.replicas.values()):
                if r.phase == P.READY:
                    self._drain(r, now)
                elif r.phase != P.DRAINING:
                    self._stop(dep, r, now)
            return
        spec = dep.retarget(now)
        step = plan(
            desired=spec.replicas,
            replicas=[r.view(spec) for r in dep.replicas.values()],
            canary=spec.canary_replicas,
        )
        for rid in step.stop:
            self._stop(dep, dep.replicas[rid], now)
        for rid in step.drain:
            self._drain(dep.replicas[rid], now)
        for _ in range(step.start):
            r = ReplicaState.for_spec(spec)
            dep.replicas[r.id] = r
            self._spawn(r, now, restart=False)
        views = [r.view(spec) for r in dep.replicas.values()]
        if is_complete(desired=spec.replicas, replicas=views):
            dep.complete, dep.progress_at = True, now
        elif is_paused(desired=spec.replicas, replicas=views, canary=spec.canary_replicas):
            dep.progress_at = now  # a paused canary waits for a promotion; it is not stuck

    def _drain(self, r: ReplicaState, now: float) -> None:
        """Out of the ready set now; SIGTERM once idle (after the grace) or at the drain timeout."""
        r.draining(now, terminated=False)
        self._note(r, "draining")

    def _stop(self, dep: DeploymentState, r: ReplicaState, now: float) -> None:
        """A replica that serves nothing: SIGTERM now (or just forget it when it has no process)."""
        if r.handle is None:
            del dep.replicas[r.id]
            return
        r.draining(now, terminated=True)
        r.handle.signal(signal.SIGTERM)
        self._note(r, "stopping")

    def _spawn(self, r: ReplicaState, now: float, *, restart: bool) -> None:
        if restart:
            r.restarts += 1
            r.restart_times.append(now)
        port = self._ports.allocate()
        t = r.template
        prefix = self.config.server_command or [sys.executable, "-m", "converge.serving"]
        argv = replica_argv(prefix=prefix, template=t, port=port)
        # Replicas never see the control plane's own settings (database URL, tokens, secrets):
        # their environment is an allow-list (sandbox.py), and they run as the sandbox's user.
        r.gpus = self._pick_gpus(r)
        env = self.sandbox.environment(
            {
                "OMP_NUM_THREADS": str(t.resources.threads),
                gpus.ENV: ",".join(r.gpus),  # a CPU replica sees no GPU
                **self._otel_env(r),
                **t.env,
            }
        )
        limit = memory_limit_bytes(t.resources, factor=self.config.memory_limit_factor)
        self._note(r, f"starting revision {r.revision} on port {port}")
        try:
            handle = spawn(
                argv=argv,
                env=env,
                log_path=self._log_path(r.id),
                sandbox=self.sandbox,
                memory_limit=limit if self.config.memory_limit else None,
            )
        except OSError as exc:
            self._ports.release(port)
            self._failed(r, f"could not start {argv[0]}: {exc}", now)
            return
        r.started(handle, port=port, now=now)

    def _pick_gpus(self, r: ReplicaState) -> tuple[str, ...]:
        in_use = (
            device
            for dep in self._deployments.values()
            for other in dep.replicas.values()
            if other is not r and other.handle is not None
            for device in other.gpus
        )
        return gpus.choose(gpus.wanted(r.template.resources), devices=self._gpu_devices or (), in_use=in_use)

    def _tell_watchers(self) -> None:
        """A process that died, a probe that flipped readiness, load that moved: the controller
        hears of it after this pass rather than at its next poll."""
        seen: dict[uuid.UUID, tuple[tuple[object, ...], ...]] = {
            dep.id: tuple(
                (r.id, r.phase, r.in_flight, r.queue_depth, r.restarts, r.endpoint)
                for r in dep.replicas.values()
            )
            for dep in self._deployments.values()
        }
        for deployment_id in seen.keys() | self._seen.keys():
            if seen.get(deployment_id) != self._seen.get(deployment_id):
                self.changed(deployment_id)
        self._seen = seen

    def _otel_env(self, r: ReplicaState) -> dict[str, str]:
        """Where a replica exports its spans, and who it says it is: one service per deployment."""
        if not self.config.otel_endpoint:
            return {}
        dep = self._deployments.get(r.deployment_id)
        name = dep.spec.name if dep is not None and dep.spec is not None else str(r.deployment_id)
        return {
            "CONVERGE_OTEL__ENDPOINT": self.config.otel_endpoint,
            "CONVERGE_OTEL__SAMPLE_RATIO": str(self.config.otel_sample_ratio),
            "OTEL_SERVICE_NAME": f"converge-replica-{name}",
            "OTEL_RESOURCE_ATTRIBUTES": f"converge.deployment.id={r.deployment_id},converge.replica.id={r.id}",
        }

    # -- adoption and persistence ----------------------------------------------------------

    def _persist(self) -> None:
        if not self._loaded:  # apply() before start(): the file still holds replicas to adopt
            return
        doc = StateDoc(
            deployments=[d.spec for d in self._deployments.values() if d.spec is not None],
            replicas=[r.to_record() for d in self._deployments.values() for r in d.replicas.values()],
        )
        self._state.save(doc)

    def _log_path(self, replica_id: str) -> Path:
        if not REPLICA_ID.match(replica_id):
            raise LookupError(f"no replica {replica_id!r}")
        return self.config.state_dir / "logs" / f"{replica_id}.log"

    def _note(self, r: ReplicaState, message: str) -> None:
        """A supervisor line in the replica's own log, so `logs` tells the whole story."""
        append_note(self._log_path(r.id), message)
