"""Helpers shared by test modules (import as `from support import ...`; fixtures live in conftest)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import uvicorn

from converge.config import Settings

BOOTSTRAP = "test-bootstrap-token-0123456789"
ADMIN = {"Authorization": f"Bearer {BOOTSTRAP}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def own_database(pg_url: str, prefix: str = "own") -> Iterator[str]:
    """A new, empty database on the run's PostgreSQL for one test (its URL), dropped after it:
    for tests whose writes must really commit without meeting what other tests committed."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield urlsplit(pg_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def make_settings(pg_url: str, tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": pg_url,
        "data_dir": tmp,
        "bootstrap_token": BOOTSTRAP,
        "server": {"sse_heartbeat_s": 1.0},
        "library": {"seed_catalogue": False},
        "deploy_defaults": False,
        **overrides,
    }
    return Settings(**values)


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


async def eventually(predicate: Any, *, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Call `predicate` (a function or a coroutine function) until it returns something truthy,
    and return that: a test waits for what it can observe, never for a guessed time. After
    `timeout` seconds it fails with the predicate's last answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            name = getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"not within {timeout:g} s: {name} answered {value!r}")
        await asyncio.sleep(interval)


def require_llama_server() -> None:
    """Skip the module when llama.cpp's server is not built (`make install` builds it)."""
    from converge.serving import llama

    try:
        llama.find_binary()
    except FileNotFoundError as exc:
        pytest.skip(str(exc), allow_module_level=True)
