"""Alembic environment: always run with a connection handed in by storage.db."""

from alembic import context

from converge.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("migrations run through converge.storage.db.migrate_and_bootstrap")
context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
