"""trigram search: a pg_trgm GIN index serves substring filters on model names

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 12:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    # A database made by an older Converge may carry an older pgvector than the server offers.
    # Only when it does: ALTER EXTENSION wants the extension's owner even when nothing changes,
    # and on an external server that may not be the role that migrates.
    outdated = op.get_bind().execute(
        sa.text(
            "SELECT e.extversion <> a.default_version FROM pg_extension AS e "
            "JOIN pg_available_extensions AS a ON a.name = e.extname WHERE e.extname = 'vector'"
        )
    )
    if outdated.scalar():
        op.execute("ALTER EXTENSION vector UPDATE")
    # `GET /models?name=` is a substring filter (ILIKE '%...%'): without an index, a search that
    # matches few models walks all of them in id order to fill a page (p99 35 ms at 10,000
    # models, twice the first page's). fastupdate off: names are written rarely and read often,
    # and with 2,000 new names waiting in the GIN pending list for autovacuum the planner
    # priced the index out and scanned the table.
    op.create_index(
        "ix_library_models_name_trgm",
        "library_models",
        ["name"],
        postgresql_using="gin",
        postgresql_ops={"name": "gin_trgm_ops"},
        postgresql_with={"fastupdate": "off"},
    )


def downgrade() -> None:
    # pg_trgm stays: other objects (or another application's) may use it.
    op.drop_index("ix_library_models_name_trgm", table_name="library_models", postgresql_using="gin")
