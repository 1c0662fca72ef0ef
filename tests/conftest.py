"""Shared fixtures: one embedded PostgreSQL per run, migrations once, each test rolled back.

Tests that need committed data (SSE, two app instances, restarts) use `committed_client` or
start real servers; everything else runs inside a transaction that is rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy.ext.asyncio import AsyncSession

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

from converge.app import create_app  # noqa: E402
from converge.config import Settings  # noqa: E402

BOOTSTRAP = "test-bootstrap-token-0123456789"
ADMIN = {"Authorization": f"Bearer {BOOTSTRAP}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The run's one embedded PostgreSQL, with a fresh database for this run."""
    import pgserver

    # Short path: the Unix socket lives in the data dir and socket paths are limited to ~100 bytes.
    root = Path(os.environ.get("CONVERGE_TEST_PG", f"/tmp/cvg-test-pg-{os.getuid()}"))
    server = pgserver.get_server(root, cleanup_mode="stop")
    name = f"t_{uuid.uuid4().hex[:12]}"
    server.psql(f"CREATE DATABASE {name};")
    yield server.get_uri(name)
    with contextlib.suppress(Exception):
        server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


def make_settings(pg_url: str, tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": pg_url,
        "data_dir": tmp,
        "bootstrap_token": BOOTSTRAP,
        "server": {"sse_heartbeat_s": 1.0},
        **overrides,
    }
    return Settings(**values)


@pytest.fixture(scope="session")
def settings(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(pg_url, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(settings, on_first_key=None)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client whose every database write is rolled back after the test."""
    state = app.state.converge
    async with state.engine.connect() as conn:
        outer = await conn.begin()

        def factory() -> AsyncSession:
            return AsyncSession(bind=conn, expire_on_commit=False, join_transaction_mode="create_savepoint")

        state.extras["session_factory"] = factory
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                yield c
        finally:
            state.extras.pop("session_factory", None)
            await outer.rollback()


@pytest.fixture
async def committed_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose writes really commit (for NOTIFY/SSE); tests use unique names."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


class LiveServer:
    def __init__(self, app: Any, port: int) -> None:
        self.app, self.port = app, port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LiveServer:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await self.task


@pytest.fixture
def live_server(app: Any) -> Callable[..., LiveServer]:
    """`async with live_server() as srv:` serves the session app on a real loopback port."""
    return lambda application=None: LiveServer(application or app, free_port())


async def make_project(client: httpx.AsyncClient, name: str | None = None) -> dict[str, Any]:
    resp = await client.post("/projects", json={"name": name or f"p-{uuid.uuid4().hex[:10]}"}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def make_key(client: httpx.AsyncClient, project_id: str, role: str, **extra: Any) -> dict[str, str]:
    resp = await client.post(
        f"/projects/{project_id}/keys", json={"name": f"{role}-key", "role": role, **extra}, headers=ADMIN
    )
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}
