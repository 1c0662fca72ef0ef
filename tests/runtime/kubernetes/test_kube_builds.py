"""Builds as Jobs (`workers/kube_builds.py`, `runtime/kubernetes/build_status.py`): against the
fake API, with the test playing the Job controller and the kubelet, a build ends in the same
states with the same fields as a local build, its failing step's message as the reason; a
cancelled build's Job is deleted.

The builds live in a database of this module's own: the session app's local build runner
would otherwise claim them first."""

from __future__ import annotations

import contextlib
import copy
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from fake_api import FakeKubeApi
from kube_support import SHA, Cluster, fast_config
from mlflow_support import mlflow_server, with_mlflow
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from support import eventually, make_settings

from converge.control.builds.api import log_path
from converge.models import Artifact, AuditRecord, Build, LibraryModel, ModelVersion, Project
from converge.runtime.kubernetes import build_status
from converge.runtime.kubernetes.client import KubeClient
from converge.storage.db import Database, make_engine, make_sessionmaker, migrate_and_bootstrap
from converge.workers.kube_builds import KubeBuildRunner

Obj = dict[str, Any]
__all__ = ["mlflow_server"]  # the fixture, registered by importing it
FIGURES = {"ttft_ms": 80.5, "tokens_per_s": 41.2, "latency_ms_p50": 900.0, "latency_ms_p95": 950.0}


@pytest.fixture(scope="module")
async def sessions(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    name = f"kb_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = urlsplit(pg_url)._replace(path=f"/{name}").geturl()
    migrate_and_bootstrap(Database(url=url))
    settings = make_settings(url, tmp_path_factory.mktemp("kube-builds"))
    engine = make_engine(Database(url=url), settings)
    yield make_sessionmaker(engine)
    await engine.dispose()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def queued_build(sessions: async_sessionmaker[AsyncSession]) -> tuple[uuid.UUID, str]:
    """A project, an approved GGUF version and a queued build of it: (build id, namespace)."""
    suffix = uuid.uuid4().hex[:8]
    async with sessions() as session, session.begin():
        project = Project(name=f"team-{suffix}", quotas={"cpu": 8})
        if await session.get(Artifact, SHA) is None:
            session.add(Artifact(sha256=SHA, size_bytes=1234))
        model = LibraryModel(name=f"tiny-{suffix}", created_by="test")
        session.add_all([project, model])
        await session.flush()
        version = ModelVersion(
            model_id=model.id,
            version="q4",
            state="approved",
            format="gguf",
            artifact_sha256=SHA,
            submitted_by="test",
        )
        session.add(version)
        await session.flush()
        build = Build(
            project_id=project.id,
            model_version_id=version.id,
            profile="cpu",
            server="llama-cpp",
            state="queued",
            results={},
            created_by="test",
        )
        session.add(build)
        await session.flush()
        return build.id, f"converge-{project.name}"


async def build_row(sessions: async_sessionmaker[AsyncSession], build_id: uuid.UUID) -> Build:
    async with sessions() as session:
        build = await session.get(Build, build_id)
        assert build is not None
        return build


@pytest.fixture
async def runner(
    sessions: async_sessionmaker[AsyncSession], fake_api: FakeKubeApi, kube: KubeClient, tmp_path: Path
) -> AsyncIterator[KubeBuildRunner]:
    async with started_runner(
        sessions, fake_api, kube, make_settings("postgresql://unused/x", tmp_path)
    ) as r:
        yield r


@contextlib.asynccontextmanager
async def started_runner(
    sessions: async_sessionmaker[AsyncSession], fake_api: FakeKubeApi, kube: KubeClient, settings: Any
) -> AsyncIterator[KubeBuildRunner]:
    service = KubeBuildRunner(
        sessions=sessions,
        settings=settings,
        client=kube,
        config=fast_config(fake_api),
        artifact_base_uri="s3://converge-artifacts/library",
        concurrency=4,
        poll_s=0.05,
    )
    await service.start()
    yield service
    await service.stop()


async def applied_job(api: FakeKubeApi, build_id: uuid.UUID, namespace: str) -> Obj:
    return await eventually(lambda: api.get("batch/v1", "Job", f"build-{build_id}", namespace), timeout=15)


def terminated(code: int, message: str = "") -> Obj:
    return {
        "terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message}
    }


def step_line(step: str, **fields: Any) -> str:
    return json.dumps({"step": step, **fields})


async def run_pod(cluster: Cluster, job: Obj, *, states: dict[str, Obj]) -> Obj:
    """The Job's pod as the Job controller creates it, with the step states the kubelet reports."""
    pod = await cluster.start_pod(job, template=job["spec"]["template"], suffix="x1")
    spec = pod["spec"]

    def status(container: Obj) -> Obj:
        state = states.get(container["name"], {"waiting": {"reason": "PodInitializing"}})
        out: Obj = {"name": container["name"], "image": container["image"], "imageID": "", "ready": False}
        out |= {"restartCount": 0, "state": copy.deepcopy(state)}
        if container.get("restartPolicy") == "Always" and "running" in state:
            out |= {"started": True, "ready": True}
        return out

    return await cluster.kubelet.set_status(
        pod,
        {
            "phase": "Running",
            "initContainerStatuses": [status(c) for c in spec["initContainers"]],
            "containerStatuses": [status(c) for c in spec["containers"]],
        },
    )


DONE = {"fetch": terminated(0), "verify": terminated(0), "scan": terminated(0)}


async def test_a_build_job_that_completes_records_its_figures_as_a_local_build_does(
    sessions: async_sessionmaker[AsyncSession], fake_api: FakeKubeApi, runner: KubeBuildRunner
) -> None:
    build_id, namespace = await queued_build(sessions)
    job = await applied_job(fake_api, build_id, namespace)
    build = await build_row(sessions, build_id)
    assert build.state == "running" and build.started_at is not None
    assert fake_api.get("v1", "Namespace", namespace) is not None  # the project's bundle came first
    async with Cluster(fake_api) as cluster:
        message = step_line("benchmark", ok=True, results=FIGURES)
        states = {**DONE, "smoke-load": {"running": {}}, "benchmark": terminated(0, message)}
        pod = await run_pod(cluster, job, states=states)
        fake_api.write_log(namespace, pod["metadata"]["name"], "fetched 1234 bytes", container="fetch")
        await cluster.controllers.set_status(
            job, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        )

    async def finished() -> Build | None:
        row = await build_row(sessions, build_id)
        return row if row.state != "running" else None

    build = await eventually(finished, timeout=15)
    assert (build.state, build.reason, build.results) == ("succeeded", "", FIGURES)
    assert build.finished_at is not None
    async with sessions() as session:
        version = await session.get(ModelVersion, build.model_version_id)
        assert version is not None and version.benchmarks == {**FIGURES, "profile": "cpu"}
        actions = await session.scalars(
            select(AuditRecord.action).where(AuditRecord.object_id == str(build_id)).order_by(AuditRecord.id)
        )
        assert list(actions) == ["build.running", "build.succeeded"]
    await eventually(lambda: fake_api.get("batch/v1", "Job", f"build-{build_id}", namespace) is None)
    log = log_path(runner._settings.data_dir, build_id).read_text()
    assert "[fetch] fetched 1234 bytes" in log and "benchmark: done" in log
    assert log.rstrip().endswith("build succeeded")


async def succeed(fake_api: FakeKubeApi, job: Obj) -> None:
    async with Cluster(fake_api) as cluster:
        message = step_line("benchmark", ok=True, results=FIGURES)
        states = {**DONE, "smoke-load": {"running": {}}, "benchmark": terminated(0, message)}
        await run_pod(cluster, job, states=states)
        await cluster.controllers.set_status(
            job, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        )


@pytest.mark.xdist_group("mlflow")  # one MLflow server per run: one worker
async def test_a_kubernetes_build_logs_its_benchmark_as_an_mlflow_run_with_its_pods_resources(
    sessions: async_sessionmaker[AsyncSession],
    fake_api: FakeKubeApi,
    kube: KubeClient,
    mlflow_server: str,
    tmp_path: Path,
) -> None:
    settings = with_mlflow(make_settings("postgresql://unused/x", tmp_path), mlflow_server)
    async with started_runner(sessions, fake_api, kube, settings):
        build_id, namespace = await queued_build(sessions)
        job = await applied_job(fake_api, build_id, namespace)
        await succeed(fake_api, job)

        async def finished() -> Build | None:
            row = await build_row(sessions, build_id)
            return row if row.state != "running" else None

        build = await eventually(finished, timeout=30)
    assert build.state == "succeeded", build.reason
    assert build.results is not None and build.results.items() >= FIGURES.items()
    run_id = build.results["mlflow_run_id"]
    async with httpx.AsyncClient(base_url=mlflow_server) as mlflow:
        run = (await mlflow.get("/api/2.0/mlflow/runs/get", params={"run_id": run_id})).json()["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics == FIGURES
    assert params["build_id"] == str(build_id) and params["profile"] == "cpu"
    resources = json.loads(params["resources"])
    # What the Job's smoke-loaded server was given, read from its pod.
    smoke = next(c for c in job["spec"]["template"]["spec"]["initContainers"] if c["name"] == "smoke-load")
    assert resources == {"runner": "kubernetes", "profile": "cpu", **smoke["resources"]}
    assert run["info"]["status"] == "FINISHED"
    log = log_path(settings.data_dir, build_id).read_text()
    assert f"mlflow: run {run_id}" in log


async def test_a_step_that_fails_fails_the_build_with_its_message(
    sessions: async_sessionmaker[AsyncSession], fake_api: FakeKubeApi, runner: KubeBuildRunner
) -> None:
    build_id, namespace = await queued_build(sessions)
    job = await applied_job(fake_api, build_id, namespace)
    error = "/models/x is not the approved artifact: sha256 mismatch: expected a, got b"
    async with Cluster(fake_api) as cluster:
        # The termination message of a failed step is the tail of its log: its last line says why.
        message = "hashing /models/x\n" + step_line("verify", ok=False, error=error)
        await run_pod(cluster, job, states={"fetch": terminated(0), "verify": terminated(1, message)})

    async def failed() -> Build | None:
        row = await build_row(sessions, build_id)
        return row if row.state == "failed" else None

    build = await eventually(failed, timeout=15)
    assert build.reason == f"verify: {error}"
    assert build.results == {} and build.finished_at is not None
    await eventually(lambda: fake_api.get("batch/v1", "Job", f"build-{build_id}", namespace) is None)
    assert (
        log_path(runner._settings.data_dir, build_id)
        .read_text()
        .rstrip()
        .endswith(f"build failed: verify: {error}")
    )


async def test_a_cancelled_build_deletes_its_job(
    sessions: async_sessionmaker[AsyncSession], fake_api: FakeKubeApi, runner: KubeBuildRunner
) -> None:
    build_id, namespace = await queued_build(sessions)
    job = await applied_job(fake_api, build_id, namespace)
    async with Cluster(fake_api) as cluster:
        await run_pod(cluster, job, states={"fetch": {"running": {}}})
    async with sessions() as session, session.begin():  # what POST /ai-converge/builds/{id}/cancel sets
        await session.execute(update(Build).where(Build.id == build_id).values(cancel_requested=True))

    await eventually(lambda: fake_api.get("batch/v1", "Job", f"build-{build_id}", namespace) is None)
    build = await eventually(lambda: _state(sessions, build_id, "cancelled"), timeout=15)
    assert build.reason == "cancelled" and build.finished_at is not None
    assert not fake_api.objects("v1", "Pod", namespace)  # the pod went with its Job


async def _state(sessions: async_sessionmaker[AsyncSession], build_id: uuid.UUID, state: str) -> Build | None:
    row = await build_row(sessions, build_id)
    return row if row.state == state else None


async def test_a_job_deleted_by_hand_fails_its_build(
    sessions: async_sessionmaker[AsyncSession], fake_api: FakeKubeApi, runner: KubeBuildRunner
) -> None:
    build_id, namespace = await queued_build(sessions)
    job = await applied_job(fake_api, build_id, namespace)
    await eventually(lambda: (namespace, job["metadata"]["name"]) in runner.jobs.items)
    await eventually(lambda: runner._tracked.get(build_id) and runner._tracked[build_id].seen)
    async with Cluster(fake_api) as cluster:
        await cluster.controllers.delete(job)
    build = await eventually(lambda: _state(sessions, build_id, "failed"), timeout=15)
    assert build.reason == "the build's Job was deleted before the build finished"


# --- reading a Job's status (pure) -------------------------------------------------------------


def _pod(init: list[tuple[str, Obj]], main: Obj | None = None, *, sidecar: Obj | None = None) -> Obj:
    containers = [{"name": name} for name, _ in init]
    statuses = [{"name": name, "state": state} for name, state in init]
    if sidecar is not None:
        containers.append({"name": "smoke-load", "restartPolicy": "Always"})
        statuses.append({"name": "smoke-load", **sidecar})
    return {
        "metadata": {"name": "p"},
        "spec": {"initContainers": containers, "containers": [{"name": "benchmark"}]},
        "status": {
            "initContainerStatuses": statuses,
            "containerStatuses": [{"name": "benchmark", "state": main or {"waiting": {}}}],
        },
    }


JOB: Obj = {"spec": {"activeDeadlineSeconds": 3600}, "status": {}}


@pytest.mark.parametrize(
    ("pod", "job", "reason"),
    [
        pytest.param(
            _pod(
                [("fetch", terminated(0))],
                sidecar={
                    "restartCount": 2,
                    "state": {"waiting": {}},
                    "lastState": terminated(1, "llama.cpp: cannot load model"),
                },
            ),
            JOB,
            "smoke-load: the server exited with code 1 before the benchmark ended: llama.cpp: cannot load model",
            id="smoke-load-crash",
        ),
        pytest.param(
            _pod([("fetch", {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}})]),
            JOB,
            "fetch: cannot start: ImagePullBackOff: no such image",
            id="image",
        ),
        pytest.param(
            _pod([("fetch", {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": ""}})]),
            JOB,
            "fetch: exited with code 137 (OOMKilled)",
            id="oom",
        ),
        pytest.param(
            _pod([("fetch", terminated(0))]),
            {
                **JOB,
                "status": {
                    "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]
                },
            },
            "the build did not finish within 3600s (DeadlineExceeded)",
            id="deadline",
        ),
    ],
)
def test_a_failed_job_names_the_step_and_why(pod: Obj, job: Obj, reason: str) -> None:
    reading = build_status.read_job(job, pod)
    assert reading.finished and not reading.succeeded
    assert reading.reason == reason


def test_a_running_job_reports_its_steps_and_the_stopped_sidecar_is_no_failure() -> None:
    pod = _pod([("fetch", terminated(0))], sidecar={"started": True, "state": {"running": {}}})
    reading = build_status.read_job(JOB, pod)
    assert not reading.finished
    assert reading.phases == (("fetch", "done"), ("smoke-load", "ready"), ("benchmark", "waiting"))
    message = step_line("benchmark", ok=True, results=FIGURES)
    done = _pod(
        [("fetch", terminated(0))],
        terminated(0, message),
        sidecar={"state": terminated(143)},  # the kubelet stops the server after the benchmark
    )
    complete: Obj = {**JOB, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    reading = build_status.read_job(complete, done)
    assert reading.succeeded and reading.results == FIGURES
