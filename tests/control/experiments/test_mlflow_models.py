"""Builds log their benchmarks to MLflow, and models registered in MLflow come into the library.

A build's figures become an MLflow run in `converge/<model>` whose id the build shows; a server
that is down costs the run, never the build. A version registered in MLflow imports by
`mlflow://models/NAME/VERSION` from a registered MLflow source, with its provenance, through the
library's scans and policies; it builds (a real smoke-load and benchmark), deploys and answers V2
`infer` with the model's own predictions. The hostile version never runs its pickle.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow_support import VENV, Tracking, with_mlflow
from services import stop_process, wait_for_http
from support import ADMIN, eventually, free_port, make_project

from converge.control.builds.schemas import BuildState
from converge.kit.observability import Metrics
from converge.models import Build
from converge.runtime.base import ServerKind
from converge.serving.v2 import restricted
from converge.serving.v2.formats import mlflow_sklearn
from converge.serving.v2.mlserver import mlserver_env, probe_sklearn
from converge.workers.builds import BuildRunner, load_target, local_resources, log_to_mlflow, record

# One worker runs every test of the MLflow server (one server per run, a session fixture).
pytestmark = pytest.mark.xdist_group("mlflow")

LLM_FIGURES = {
    "ttft_ms": 41.5,
    "tokens_per_s": 30.25,
    "latency_ms_p50": 900.0,
    "latency_ms_p95": 1200.0,
    "tokens_per_s_c4": 80.0,
    "ttft_ms_c4": 60.0,
    "concurrency": {"c4": {"requests": 8, "latency_ms_p95": 1500.0}},
}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def _uploaded(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
    model = (await client.post("/models", json={"name": _unique("bench")}, headers=ADMIN)).json()
    resp = await client.post(
        f"/models/{model['id']}/versions/upload",
        params={"version": "v1", "filename": "weights.bin"},
        content=b"weights " + os.urandom(248),
        headers={**ADMIN, "content-type": "application/octet-stream"},
    )
    assert resp.status_code == 201, resp.text
    return model, resp.json()


async def _running_build(app: Any, client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any], Build]:
    project = await make_project(client)
    model, version = await _uploaded(client)
    async with app.state.converge.session_factory() as session, session.begin():
        build = Build(
            project_id=uuid.UUID(project["id"]),
            model_version_id=uuid.UUID(version["id"]),
            profile="cpu",
            server="llama-cpp",
            state=BuildState.RUNNING,
            started_at=datetime.now(UTC),
            created_by="test",
        )
        session.add(build)
    return model, version, build


async def test_a_build_logs_its_benchmark_as_an_mlflow_run_and_shows_its_id(
    app: Any, client: httpx.AsyncClient, configured: Tracking
) -> None:
    state = app.state.converge
    model, version, build = await _running_build(app, client)
    target = await load_target(state.session_factory, build.id)
    out = io.StringIO()
    logged = await log_to_mlflow(
        with_mlflow(state.settings, configured.uri),
        target,
        figures=LLM_FIGURES,
        out=out,
        resources=local_resources(ServerKind.LLAMA_CPP),
    )
    assert await record(
        state.session_factory, build.id, BuildState.SUCCEEDED, reason="", results=LLM_FIGURES | logged
    )
    run_id = logged["mlflow_run_id"]
    assert f"mlflow: run {run_id}" in out.getvalue()

    shown = (await client.get(f"/ai-converge/builds/{build.id}", headers=ADMIN)).json()
    assert shown["state"] == "succeeded" and shown["mlflow_run_id"] == run_id
    assert shown["results"]["mlflow_run_id"] == run_id

    experiments = (await client.get("/mlflow/experiments", params={"limit": 500}, headers=ADMIN)).json()
    experiment = next(e for e in experiments["items"] if e["name"] == f"converge/{model['name']}")
    runs = (await client.get(f"/mlflow/experiments/{experiment['id']}/runs", headers=ADMIN)).json()["items"]
    (run,) = [r for r in runs if r["id"] == run_id]
    assert run["build_id"] == str(build.id) and run["status"] == "FINISHED"
    params = run["params"]
    assert (params["model"], params["version"], params["server"], params["profile"]) == (
        model["name"],
        "v1",
        "llama-cpp",
        "cpu",
    )
    assert params["digest"] == f"sha256:{version['artifact_sha256']}"
    assert '"n_threads": 1' in params["resources"]
    assert run["metrics"]["ttft_ms"] == 41.5 and run["metrics"]["tokens_per_s_c4"] == 80.0
    nested = await client.get(f"/mlflow/runs/{run_id}/metrics/concurrency/c4/latency_ms_p95", headers=ADMIN)
    assert [p["value"] for p in nested.json()["points"]] == [1500.0]

    # The version keeps the figures for policies; the run's ids are the build's, not facts.
    figures = (await client.get(f"/models/{model['id']}/versions/{version['id']}", headers=ADMIN)).json()
    assert figures["benchmarks"]["ttft_ms"] == 41.5
    assert not [key for key in figures["benchmarks"] if key.startswith("mlflow_")]


async def test_a_tracking_server_that_is_down_costs_the_run_not_the_build(
    app: Any, client: httpx.AsyncClient
) -> None:
    state = app.state.converge
    _, _, build = await _running_build(app, client)
    target = await load_target(state.session_factory, build.id)
    down = f"http://127.0.0.1:{free_port()}"
    out = io.StringIO()
    logged = await log_to_mlflow(
        with_mlflow(state.settings, down), target, figures=LLM_FIGURES, out=out, resources={}
    )
    assert down in logged["mlflow_error"] and "mlflow_run_id" not in logged
    await record(
        state.session_factory, build.id, BuildState.SUCCEEDED, reason="", results=LLM_FIGURES | logged
    )
    shown = (await client.get(f"/ai-converge/builds/{build.id}", headers=ADMIN)).json()
    assert shown["state"] == "succeeded" and shown["mlflow_run_id"] is None
    assert down in shown["results"]["mlflow_error"] and shown["results"]["ttft_ms"] == 41.5
    assert "the run was not logged" in out.getvalue()


# --- import, build, deploy, serve ------------------------------------------------------------


async def _approver(client: httpx.AsyncClient) -> dict[str, str]:
    made = await client.post("/keys", json={"name": "approver", "role": "library-approver"}, headers=ADMIN)
    assert made.status_code == 201, made.text
    return {"Authorization": f"Bearer {made.json()['token']}"}


async def _mlflow_source(client: httpx.AsyncClient, tracking: Tracking, model_name: str) -> dict[str, Any]:
    body = {
        "name": _unique("mlflow"),
        "kind": "mlflow",
        "uri": f"mlflow://models/{tracking.model_name}",
        "model_name": model_name,
        "interval_s": 86400,
        "enabled": False,
        "options": {"tracking_uri": tracking.uri},
    }
    resp = await client.post("/sources", json=body, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def _build_with_runner(app: Any, tracking: Tracking) -> None:
    """Run the queued build with a runner of the test's own (the session app's cannot see it)."""
    state = app.state.converge
    metrics = Metrics()
    runner = BuildRunner(
        sessions=state.session_factory,
        settings=with_mlflow(state.settings, tracking.uri),
        store=state.artifacts,
        poll_s=60,  # one claim, at start; meanwhile nothing else uses the test's connection
        metrics=metrics,
    )
    await runner.start()
    try:
        count = metrics.registry.get_sample_value

        def finished() -> float | None:
            return sum(
                count("converge_build_duration_seconds_count", {"server": "v2", "outcome": outcome}) or 0
                for outcome in ("succeeded", "failed", "cancelled")
            )

        await eventually(finished, timeout=180, interval=0.2)
    finally:
        await runner.stop()


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
async def replica_of(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    async def launch(model_path: Path, name: str) -> str:
        port = free_port()
        log = tmp_path / f"{name}.log"
        argv = [sys.executable, "-m", "converge.serving", "v2", "--model-path", str(model_path)]
        argv += ["--model-name", name, "--port", str(port)]
        proc = _spawn(argv, log)
        started.append(proc)
        await asyncio.to_thread(
            wait_for_http, f"http://127.0.0.1:{port}/health/ready", proc, log, timeout=180
        )
        return f"http://127.0.0.1:{port}"

    yield launch
    for proc in started:
        stop_process(proc)


@pytest.mark.slow
async def test_an_mlflow_model_imports_passes_the_gates_builds_deploys_and_infers(
    app: Any, client: httpx.AsyncClient, configured: Tracking, tmp_path: Path, replica_of: Any
) -> None:
    state = app.state.converge
    logged = configured.logged
    model = (await client.post("/models", json={"name": _unique("iris")}, headers=ADMIN)).json()
    source = await _mlflow_source(client, configured, model["name"])
    uri = f"mlflow://models/{configured.model_name}/1"

    resp = await client.post(
        f"/models/{model['id']}/versions", json={"version": "1", "uri": uri}, headers=ADMIN
    )
    assert resp.status_code == 201, resp.text
    version = resp.json()
    provenance = version["source"]
    assert (
        provenance["kind"] == "mlflow"
        and provenance["known"] is True
        and provenance["name"] == source["name"]
    )
    assert provenance["run_id"] == logged["run_id"]
    assert provenance["model_uri"] == f"models:/{configured.model_name}/1"
    assert provenance["artifact_sha256"] == version["artifact_sha256"]
    assert version["format"] == "mlflow"
    assert version["scan"]["status"] == "clean", version["scan"]  # the cloudpickle, allow-listed
    assert version["state"] == "pending_approval", version["state_reason"]
    approved = await client.post(
        f"/models/{model['id']}/versions/{version['id']}/approve", json={}, headers=await _approver(client)
    )
    assert approved.json()["state"] == "approved", approved.text

    project = await make_project(client)
    queued = await client.post(
        "/ai-converge/build",
        json={"project_id": project["id"], "model_version_id": version["id"]},
        headers=ADMIN,
    )
    assert queued.status_code == 202, queued.text
    await _build_with_runner(app, configured)
    build = (await client.get(f"/ai-converge/builds/{queued.json()['id']}", headers=ADMIN)).json()
    assert build["state"] == "succeeded", build["reason"]
    assert build["server"] == "v2" and build["results"]["rows_per_s"] > 0
    history = await client.get(f"/mlflow/runs/{build['mlflow_run_id']}/metrics/rows_per_s", headers=ADMIN)
    assert [p["value"] for p in history.json()["points"]] == [build["results"]["rows_per_s"]]

    deployed = await client.post(
        "/deployments",
        params={"project": project["id"]},
        json={"name": "iris", "model_version_id": version["id"]},
        headers=ADMIN,
    )
    assert deployed.status_code == 201, deployed.text
    assert deployed.json()["spec"]["server"] == "v2", deployed.json()

    # The replica a deployment runs, on the library's own copy of the artifact.
    artifact = await state.artifacts.fetch_to(version["artifact_sha256"], tmp_path / "cache")
    url = await replica_of(artifact, "iris")
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        meta = (await http.get("/v2/models/iris")).json()
        assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]  # the signature
        rows = logged["rows"]
        body = {"inputs": [{"name": "x", "shape": [len(rows), 4], "datatype": "FP64", "data": rows}]}
        answer = await http.post("/v2/models/iris/infer", json=body)
        assert answer.status_code == 200, answer.text
        assert [int(v) for v in answer.json()["outputs"][0]["data"]] == logged["predict"]


@pytest.mark.slow
async def test_a_source_syncs_every_version_and_the_hostile_one_never_runs(
    app: Any, committed_client: httpx.AsyncClient, tracking: Tracking, tmp_path: Path
) -> None:
    assert VENV is not None
    model_name = _unique("iris-synced")
    source = await _mlflow_source(committed_client, tracking, model_name)
    try:
        synced = await committed_client.post(f"/sources/{source['id']}/sync", headers=ADMIN)
        assert synced.status_code == 200, synced.text
        assert synced.json()["new_versions"] == ["1", "2", "3"], synced.json()["source"]["last_error"]
        again = await committed_client.post(f"/sources/{source['id']}/sync", headers=ADMIN)
        assert again.json()["new_versions"] == []  # idempotent
    finally:
        await committed_client.delete(f"/sources/{source['id']}", headers=ADMIN)
    found = (await committed_client.get("/models", params={"name": model_name}, headers=ADMIN)).json()[
        "items"
    ]
    detail = (await committed_client.get(f"/models/{found[0]['id']}", headers=ADMIN)).json()
    versions = {v["version"]: v for v in detail["versions"]}
    assert (
        versions["2"]["source"]["registered_version"] == "2" and versions["2"]["scan"]["status"] != "unsafe"
    )
    hostile = versions["3"]
    assert hostile["source"]["run_id"] == tracking.logged["hostile_run_id"]
    assert hostile["scan"]["status"] == "unsafe" and hostile["state"] == "rejected"
    assert any("system" in (f.get("global") or "") for f in hostile["scan"]["findings"])

    # Behind the scan, the replica's own loader: skops loads, the hostile pickle is refused.
    support = restricted.install(tmp_path / "support")
    env = mlserver_env(VENV, support=support)
    python = VENV / "bin" / "python"
    for name, expected in (("2", "skops"), ("3", "pickle")):
        folder = await app.state.converge.artifacts.fetch_to(
            versions[name]["artifact_sha256"], tmp_path / name
        )
        flavour = mlflow_sklearn(folder)
        assert flavour is not None and flavour.serialization == expected
        if name == "2":
            facts = probe_sklearn(python, flavour.model_file, env=env, timeout=120, support=support)
            assert facts["type"].endswith("LogisticRegression") and facts["n_features"] == 4
        else:
            with pytest.raises(RuntimeError, match="refused to load"):
                probe_sklearn(python, flavour.model_file, env=env, timeout=120, support=support)
    assert not Path(tracking.logged["marker"]).exists(), "the hostile pickle ran"
