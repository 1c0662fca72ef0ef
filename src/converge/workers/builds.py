"""The build runner: fetch (verified), smoke-load in the target server, benchmark, record.

The claim, the record of the outcome, the build's log file and what a build is of
(`BuildTarget`) are shared with the Kubernetes build runner (`kube_builds.py`), which runs
the same steps as a Job: both move a build through the same states with the same fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.config import Settings
from converge.control.builds import service
from converge.control.builds.api import log_path
from converge.control.builds.benchmark import benchmark_server
from converge.control.builds.schemas import BuildState
from converge.control.experiments.service import BuildRun, log_build
from converge.control.library import acquire
from converge.control.library import repository as library_repo
from converge.kit.net import free_port
from converge.kit.observability import Metrics
from converge.kit.service import Service, cancel
from converge.models import Build
from converge.observability import tracing
from converge.runtime.base import ServerKind
from converge.runtime.local.sandbox import Sandbox
from converge.storage.artifacts import ArtifactStore
from converge.storage.db import transaction

log = structlog.get_logger(__name__)
READY_TIMEOUT_S = 300


class Cancelled(Exception):
    pass


class BuildRunner(Service):
    name = "build-runner"

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        store: ArtifactStore,
        concurrency: int = 1,
        poll_s: float = 1.0,
        sandbox: Sandbox | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self._metrics = metrics or Metrics()
        self._sessions, self._settings, self._store = sessions, settings, store
        self._sandbox = sandbox or Sandbox()
        self._concurrency, self._poll_s = concurrency, poll_s
        self._active: set[asyncio.Task[None]] = set()  # the builds running now

    async def start(self) -> None:
        async with transaction(self._sessions) as session:
            if count := await service.requeue_interrupted(session):
                log.info("builds_requeued", count=count)
        self._spawn(self._claim())

    async def stop(self) -> None:
        await cancel(*self._tasks, *self._active)

    async def _claim(self) -> None:
        while True:
            try:
                while len(self._active) < self._concurrency:
                    build_id = await claim(self._sessions)
                    if build_id is None:
                        break
                    task = asyncio.create_task(self._build(build_id))
                    self._active.add(task)
                    task.add_done_callback(self._active.discard)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("build_claim_failed")
            await asyncio.sleep(self._poll_s)

    async def _build(self, build_id: uuid.UUID) -> None:
        with (
            build_log(self._settings, build_id) as out,
            tracing.span("build", **{"converge.build.id": str(build_id)}) as span,
        ):
            try:
                results = await self._steps(build_id, out)
                state, reason = BuildState.SUCCEEDED, ""
            except Cancelled:
                results, state, reason = None, BuildState.CANCELLED, "cancelled"
            except Exception as exc:  # the reason is shown to the user; the log has the detail
                log.warning("build_failed", build_id=str(build_id), error=str(exc))
                results, state, reason = None, BuildState.FAILED, failure_reason(exc)
            say_outcome(out, state, reason)
            if span is not None:
                span.set_attribute("converge.build.state", state.value)
        await record(self._sessions, build_id, state, reason=reason, results=results, metrics=self._metrics)

    async def _steps(self, build_id: uuid.UUID, out: TextIO) -> dict[str, Any]:
        target = await load_target(self._sessions, build_id)
        kind = target.server
        say(out, target.describe())
        say(out, f"fetch: {target.sha256} into the runtime cache (verified)")
        t0 = time.perf_counter()
        local = await self._store.fetch_to(target.sha256, acquire.cache_dir(self._settings))
        say(out, f"fetch: done in {time.perf_counter() - t0:.1f}s -> {local}")
        if await cancel_requested(self._sessions, build_id):
            raise Cancelled
        async with smoke_server(
            kind,
            local,
            target.model_name,
            out,
            lambda: cancel_requested(self._sessions, build_id),
            sandbox=self._sandbox,
        ) as base_url:
            say(out, "benchmark: running")
            figures = await benchmark_server(kind, base_url, target.model_name, inputs=target.inputs)
        say(out, f"benchmark: {figures}")
        return figures | await log_to_mlflow(
            self._settings, target, figures=figures, out=out, resources=local_resources(kind)
        )


# --- shared with the Kubernetes build runner -------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BuildTarget:
    """What a build is of, read once from the database: everything its steps need."""

    build_id: uuid.UUID
    project_id: uuid.UUID
    server: ServerKind
    profile: str
    model_name: str
    version: str
    format: str
    sha256: str
    inspection: dict[str, Any] = field(default_factory=dict)

    @property
    def inputs(self) -> list[dict[str, Any]] | None:
        """The inspection's model inputs: the V2 benchmark's fallback request."""
        return self.inspection.get("inputs")

    def describe(self) -> str:
        return (
            f"build {self.build_id}: {self.model_name}:{self.version} ({self.format}) -> "
            f"{self.server}, profile {self.profile}"
        )

    def mlflow_run(self, figures: dict[str, Any], *, resources: dict[str, Any]) -> BuildRun:
        return BuildRun(
            build_id=str(self.build_id),
            project_id=str(self.project_id),
            model=self.model_name,
            version=self.version,
            digest=f"sha256:{self.sha256}",
            server=self.server.value,
            profile=self.profile,
            resources=resources,
            figures=figures,
        )


def local_resources(kind: ServerKind) -> dict[str, Any]:
    """What the local runner's smoke-load server had: this host's CPUs (llama.cpp: one thread)."""
    return {
        "runner": "local",
        "host_cpus": os.cpu_count(),
        **({"n_threads": 1} if kind == ServerKind.LLAMA_CPP else {}),
    }


async def log_to_mlflow(
    settings: Settings,
    target: BuildTarget,
    *,
    figures: dict[str, Any],
    out: TextIO,
    resources: dict[str, Any],
) -> dict[str, Any]:
    """The benchmark as an MLflow run, when a tracking server is configured: what to add to the
    results (`mlflow_run_id`, or `mlflow_error`). Never fails the build."""
    try:
        logged = await log_build(settings.mlflow, target.mlflow_run(figures, resources=resources))
    except Exception as exc:  # the figures stand whatever MLflow does
        log.warning("mlflow_log_failed", build_id=str(target.build_id), error=str(exc))
        logged = {"mlflow_error": failure_reason(exc)}
    if "mlflow_run_id" in logged:
        say(out, f"mlflow: run {logged['mlflow_run_id']} in experiment {logged['mlflow_experiment_id']}")
    elif "mlflow_error" in logged:
        say(out, f"mlflow: the run was not logged: {logged['mlflow_error']}")
    return logged


async def load_target(sessions: async_sessionmaker[AsyncSession], build_id: uuid.UUID) -> BuildTarget:
    async with sessions() as session:
        build = await session.get(Build, build_id)
        assert build is not None
        version = await library_repo.get_version(session, build.model_version_id)
        assert version is not None
        model = await library_repo.get_model(session, version.model_id)
        assert model is not None
        return BuildTarget(
            build_id=build.id,
            project_id=build.project_id,
            server=ServerKind(build.server),
            profile=build.profile,
            model_name=model.name,
            version=version.version,
            format=version.format,
            sha256=version.artifact_sha256,
            inspection=dict(version.inspection or {}),
        )


async def claim(sessions: async_sessionmaker[AsyncSession]) -> uuid.UUID | None:
    """The oldest queued build, now running (its `started_at` and event written), or None."""
    async with transaction(sessions) as session:
        build = await service.claim_next(session)
        return build.id if build is not None else None


async def cancel_requested(sessions: async_sessionmaker[AsyncSession], build_id: uuid.UUID) -> bool:
    async with sessions() as session:
        build = await session.get(Build, build_id)
        return build is None or build.cancel_requested


async def record(
    sessions: async_sessionmaker[AsyncSession],
    build_id: uuid.UUID,
    state: BuildState,
    *,
    reason: str,
    results: dict[str, Any] | None,
    if_running: bool = False,
    metrics: Metrics | None = None,
) -> bool:
    """The build's outcome: state, reason, results, `finished_at`, its event, and the version's
    benchmark figures on success (and in `metrics`, its duration). `if_running`: only while the
    build is still running (another runner may have finished it). Returns whether it was recorded."""
    async with transaction(sessions) as session:
        build = await session.get(Build, build_id, with_for_update=True)
        if build is None or (if_running and build.state != BuildState.RUNNING):
            return False
        await service.finish(session, build, state, reason=reason, results=results)
    if metrics is not None and build.started_at is not None and build.finished_at is not None:
        seconds = (build.finished_at - build.started_at).total_seconds()
        metrics.observe_build(server=build.server, outcome=state.value, seconds=seconds)
    return True


def failure_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


@contextlib.contextmanager
def build_log(settings: Settings, build_id: uuid.UUID) -> Iterator[TextIO]:
    """The build's log file (what `GET /ai-converge/builds/{id}/logs` streams), line-buffered."""
    path = log_path(settings.data_dir, build_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", buffering=1) as out:
        yield out


def say_outcome(out: TextIO, state: BuildState, reason: str) -> None:
    say(out, f"build {state.value}{': ' + reason if reason else ''}")


def say(out: TextIO, line: str) -> None:
    out.write(f"{time.strftime('%H:%M:%S')} {line}\n")


@contextlib.asynccontextmanager
async def smoke_server(  # noqa: ANN201
    kind: ServerKind, path: Path, name: str, out: TextIO, cancelled: Any, *, sandbox: Sandbox
):
    """Start the target server on the artifact, wait until it is ready, stop it afterwards.

    This is the first time the artifact's code paths run: as the sandbox's user, with its
    allow-listed environment, exactly as a replica would."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "converge.serving",
        kind.value,
        "--model-path",
        str(path),
        "--model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *(["--n-threads", "1"] if kind == ServerKind.LLAMA_CPP else []),  # what a default 1-CPU replica gets
    ]
    say(out, "smoke-load: " + " ".join(cmd))
    proc = sandbox.popen(cmd, output=out, env=sandbox.environment())
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
                if time.perf_counter() - t0 > READY_TIMEOUT_S:
                    raise RuntimeError(f"the server was not ready within {READY_TIMEOUT_S}s")
                if await cancelled():
                    raise Cancelled
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/health/ready")).status_code == 200:
                        break
                await asyncio.sleep(0.5)
        say(out, f"smoke-load: ready in {time.perf_counter() - t0:.1f}s")
        yield base
    finally:
        await _stop(proc)


async def _stop(proc: subprocess.Popen[bytes], *, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; the server's whole session, workers included."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the session, if any
    while proc.poll() is None:
        await asyncio.sleep(0.05)
