"""The migrations build exactly the schema the models describe."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from converge.models import Base
from converge.storage.db import Database, migrate_and_bootstrap, to_driver_url


def test_migrations_at_head_match_the_models(pg_url):
    name = f"m_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = urlsplit(pg_url)._replace(path=f"/{name}").geturl()
    head = migrate_and_bootstrap(Database(url=url))
    engine = create_engine(to_driver_url(url))
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head
            assert conn.exec_driver_sql("SELECT extname FROM pg_extension WHERE extname='vector'").scalar()
    finally:
        engine.dispose()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
