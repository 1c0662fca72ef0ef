"""storage/db.py: the embedded PostgreSQL survives a restart; start-up is safe when two processes race."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from converge.app import create_app
from converge.config import Settings
from converge.control.projects.bootstrap import ensure_admin_key
from converge.storage.db import (
    MIGRATION_LOCK_KEY,
    Database,
    advisory_xact_lock,
    migrate_and_bootstrap,
    to_driver_url,
    try_advisory_xact_lock,
)

# Sessions waiting for the migration/bootstrap advisory lock in this database.
WAITING_FOR_LOCK = f"""
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND NOT granted AND objid = {MIGRATION_LOCK_KEY}
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def app_settings(**values: Any) -> Settings:
    # Background workers (registry sync, catalogue seeding) are not under test and would add events.
    return Settings(bootstrap_token=None, run_workers=False, **values)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def running(settings: Settings, on_first_key: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """One app start-up and shutdown (its whole lifespan), with an in-process HTTP client."""
    app = create_app(settings, on_first_key=on_first_key)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield app, http


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Short path: the embedded server's Unix socket lives in <data_dir>/postgres (limit ~100 bytes).
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="cvg-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fresh_db_url(pg_url: str) -> Iterator[str]:
    """A new, empty database (no migrations) on the run's embedded server."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield urlsplit(pg_url)._replace(path=f"/{name}").geturl()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def org_key_prefixes(url: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT prefix FROM api_keys WHERE project_id IS NULL")
        return [row[0] for row in await cur.fetchall()]


def token_prefix(token: str) -> str:
    return token.removeprefix("cvg_").split("_", 1)[0]


async def all_events(http: httpx.AsyncClient, headers: dict[str, str]) -> list[tuple[int, str, str]]:
    resp = await http.get("/events", params={"limit": 500}, headers=headers)
    assert resp.status_code == 200, resp.text
    return [(e["id"], e["kind"], e["object_id"]) for e in resp.json()["items"]]


async def test_embedded_postgres_restart_keeps_projects_keys_and_events(data_dir: Path) -> None:
    settings = app_settings(data_dir=data_dir, database_url=None)
    first_keys: list[str] = []
    second_keys: list[str] = []
    started: list[Any] = []  # every embedded server handle, stopped at the end whatever happens
    name = f"keep-{uuid.uuid4().hex[:8]}"
    try:
        async with running(settings, first_keys.append) as (app, http):
            embedded = app.state.converge.database.embedded
            started.append(embedded)
            assert embedded is not None
            assert Path(embedded.pgdata) == (data_dir / "postgres").resolve()
            assert (data_dir / "postgres" / "PG_VERSION").is_file()
            first_pid = embedded.get_pid()
            assert len(first_keys) == 1
            admin = bearer(first_keys[0])
            created = await http.post("/projects", json={"name": name}, headers=admin)
            assert created.status_code == 201, created.text
            project_id = created.json()["id"]
            key = await http.post(
                f"/projects/{project_id}/keys", json={"name": "ci", "role": "developer"}, headers=admin
            )
            assert key.status_code == 201, key.text
            events = await all_events(http, admin)
        assert {"key.created", "project.created"} <= {kind for _, kind, _ in events}

        # Stop PostgreSQL too (this process holds its last handle), so the second start has to
        # bring the server up again from the files in the data directory.
        embedded.cleanup()
        assert not (data_dir / "postgres" / "postmaster.pid").exists()  # removed by a clean shutdown

        async with running(settings, second_keys.append) as (app, http):
            restarted = app.state.converge.database.embedded
            started.append(restarted)
            assert restarted.get_pid() != first_pid
            assert second_keys == []  # not a first start: no new admin key
            projects = (await http.get("/projects", headers=admin)).json()["items"]
            assert [p["id"] for p in projects if p["name"] == name] == [project_id]
            me = await http.get("/auth/whoami", headers=bearer(key.json()["token"]))
            assert me.status_code == 200, me.text
            assert me.json()["roles"] == {project_id: "developer"}
            assert await all_events(http, admin) == events
    finally:
        for server in started:
            server.cleanup()  # a no-op for a handle already cleaned up


def wait_for_a_lock_waiter(conn: Any) -> bool:
    deadline = time.monotonic() + 30
    while conn.execute(text(WAITING_FOR_LOCK)).scalar_one() == 0:
        assert time.monotonic() < deadline, "the other start-up never waited for the lock"
        time.sleep(0.02)
    return True


def test_concurrent_migrations_take_turns_and_leave_one_head_row(fresh_db_url: str) -> None:
    start_together = threading.Barrier(2)
    counter = threading.Lock()
    inside, most_inside = 0, 0
    saw_the_other_waiting: list[bool] = []  # one entry per start, in the order they held the lock

    def bootstrap(conn: Any) -> None:
        """Runs while holding the lock; the first holder sees the other start blocked on it."""
        nonlocal inside, most_inside
        with counter:
            inside += 1
            most_inside = max(most_inside, inside)
            first = not saw_the_other_waiting
        waiting = first and wait_for_a_lock_waiter(conn)
        with counter:
            saw_the_other_waiting.append(waiting)
            inside -= 1

    def start(_: int) -> str:
        start_together.wait()
        return migrate_and_bootstrap(Database(url=fresh_db_url), bootstrap)

    with ThreadPoolExecutor(2) as pool:
        heads = list(pool.map(start, range(2)))

    assert heads[0] == heads[1] != ""
    assert saw_the_other_waiting == [True, False]
    assert most_inside == 1
    with psycopg.connect(fresh_db_url) as conn:
        rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    assert rows == [(heads[0],)]


def failing_bootstrap(conn: Any) -> None:
    conn.execute(text("SELECT 1/0"))


def test_a_failed_start_up_releases_the_lock_for_the_next_one(fresh_db_url: str) -> None:
    with pytest.raises(Exception):  # noqa: B017 - which error is raised is the next test's concern
        migrate_and_bootstrap(Database(url=fresh_db_url), failing_bootstrap)

    with psycopg.connect(fresh_db_url, autocommit=True) as conn:
        free = conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK_KEY,)).fetchone()
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    assert free == (True,)


def test_a_failed_start_up_reports_its_own_error(fresh_db_url: str) -> None:
    with pytest.raises(Exception, match="division by zero"):
        migrate_and_bootstrap(Database(url=fresh_db_url), failing_bootstrap)


async def test_two_app_startups_together_create_exactly_one_organisation_key(
    fresh_db_url: str, tmp_path: Path
) -> None:
    settings = app_settings(database_url=fresh_db_url, data_dir=tmp_path)
    shown: list[str] = []
    both_up = asyncio.Barrier(2)

    async def start() -> None:
        async with running(settings, shown.append):
            await both_up.wait()  # both instances are up before either shuts down

    await asyncio.gather(start(), start())

    assert len(shown) == 1
    assert await org_key_prefixes(fresh_db_url) == [token_prefix(shown[0])]


async def test_a_second_bootstrap_waits_for_the_first_to_commit_and_creates_nothing(
    fresh_db_url: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(migrate_and_bootstrap, Database(url=fresh_db_url))
    settings = app_settings(database_url=fresh_db_url, data_dir=tmp_path)
    engine_a = create_async_engine(to_driver_url(fresh_db_url))
    engine_b = create_async_engine(to_driver_url(fresh_db_url))

    async def second() -> str | None:
        async with AsyncSession(engine_b) as session, session.begin():
            return await ensure_admin_key(session, settings)

    try:
        async with AsyncSession(engine_a) as session, session.begin():
            token = await ensure_admin_key(session, settings)
            assert token is not None
            other = asyncio.create_task(second())
            # Deterministic: commit only once the second start is seen blocked on the lock.
            async with await psycopg.AsyncConnection.connect(fresh_db_url, autocommit=True) as probe:
                while await (await probe.execute(WAITING_FOR_LOCK)).fetchone() == (0,):
                    assert not other.done(), f"second bootstrap did not wait: {other.result()!r}"
                    await asyncio.sleep(0.02)
        assert await other is None
    finally:
        await engine_a.dispose()
        await engine_b.dispose()

    assert await org_key_prefixes(fresh_db_url) == [token_prefix(token)]


async def test_advisory_xact_lock_helpers_hold_until_the_transaction_ends(app: Any) -> None:
    """`try_advisory_xact_lock` is refused while another transaction holds the key, and the key
    frees itself when that transaction ends (no unlock call)."""
    engine = app.state.converge.engine
    key = 0x54_65_73_74  # "Test": used by nothing else
    async with AsyncSession(engine) as holder, AsyncSession(engine) as other:
        async with holder.begin():
            await advisory_xact_lock(holder, key)
            async with other.begin():
                assert not await try_advisory_xact_lock(other, key)
        async with other.begin():
            assert await try_advisory_xact_lock(other, key)
