"""Build and ingestion metrics move when a job finishes: a build that fails observes its
duration under outcome "failed" (local runner), and an ingestion run that fails under its outcome."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from typing import Any

from support import ADMIN, eventually, make_project

from converge.control.builds.schemas import BuildState
from converge.kit.observability import Metrics
from converge.models import Build, IngestionJob, KnowledgeBase
from converge.workers.builds import BuildRunner
from converge.workers.ingestion import IngestionRunner


async def _version(client: Any) -> dict[str, Any]:
    model = (await client.post("/models", json={"name": f"m-{uuid.uuid4().hex[:8]}"}, headers=ADMIN)).json()
    resp = await client.post(
        f"/models/{model['id']}/versions/upload",
        params={"version": "v1", "filename": "weights.bin"},
        content=b"weights " + os.urandom(248),
        headers={**ADMIN, "content-type": "application/octet-stream"},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


async def test_a_build_that_fails_is_observed_under_its_server_and_outcome(app, client):
    state = app.state.converge
    project = await make_project(client)
    version = await _version(client)
    # Its bytes (random, this test's alone) leave the store: the build fails at its first step.
    await state.artifacts.delete(version["artifact_sha256"])
    async with state.session_factory() as session, session.begin():
        build = Build(
            project_id=uuid.UUID(project["id"]),
            model_version_id=uuid.UUID(version["id"]),
            profile="cpu",
            server="llama-cpp",
            state=BuildState.QUEUED,
            created_by="test",
        )
        session.add(build)
    metrics = Metrics()
    labels = {"server": "llama-cpp", "outcome": "failed"}
    # One claim a minute: the build is claimed at start, and while it runs nothing else uses the
    # test's one connection (the wait below reads the metric, not the database).
    runner = BuildRunner(
        sessions=state.session_factory,
        settings=state.settings,
        store=state.artifacts,
        poll_s=60,
        metrics=metrics,
    )
    await runner.start()
    try:
        await eventually(
            lambda: metrics.registry.get_sample_value("converge_build_duration_seconds_count", labels),
            timeout=30,
        )
    finally:
        await runner.stop()
    async with state.session_factory() as session:
        failed = await session.get(Build, build.id, populate_existing=True)
    assert failed is not None and failed.state == BuildState.FAILED, failed and failed.reason
    assert metrics.registry.get_sample_value("converge_build_duration_seconds_count", labels) == 1
    seconds = metrics.registry.get_sample_value("converge_build_duration_seconds_sum", labels)
    assert failed.started_at is not None and failed.finished_at is not None
    assert seconds == (failed.finished_at - failed.started_at).total_seconds()
    succeeded = {"server": "llama-cpp", "outcome": "succeeded"}
    assert metrics.registry.get_sample_value("converge_build_duration_seconds_count", succeeded) is None


async def test_an_ingestion_run_that_fails_is_observed_under_its_outcome(app, client):
    state = app.state.converge
    project = await make_project(client)
    now = datetime.now(UTC)
    async with state.session_factory() as session, session.begin():
        # A base whose embedding deployment was deleted: the run fails before embedding anything.
        kb = KnowledgeBase(
            project_id=uuid.UUID(project["id"]),
            name=f"kb-{uuid.uuid4().hex[:8]}",
            embedding_deployment_id=None,
            dimension=384,
            max_tokens=256,
            created_by="test",
        )
        session.add(kb)
        await session.flush()
        job = IngestionJob(
            kb_id=kb.id,
            project_id=kb.project_id,
            state="running",
            source={"kind": "upload", "files": []},
            created_by="test",
            started_at=now,
            heartbeat_at=now,
        )
        session.add(job)
    metrics = Metrics()
    runner = IngestionRunner(
        sessions=state.session_factory,
        settings=state.settings,
        store=state.artifacts,
        gateway=state.gateway,
        metrics=metrics,
    )
    await runner.run(job.id)
    async with state.session_factory() as session:
        row = await session.get(IngestionJob, job.id, populate_existing=True)
        assert row is not None and row.state == "failed", row and row.reason
    get = metrics.registry.get_sample_value
    assert get("converge_ingestion_job_duration_seconds_count", {"outcome": "failed"}) == 1
    assert get("converge_ingestion_job_duration_seconds_count", {"outcome": "succeeded"}) is None
    assert get("converge_ingestion_chunks_embedded_total") == 0  # nothing was embedded
