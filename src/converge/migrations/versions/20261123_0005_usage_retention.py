"""usage retention: a BRIN index on usage_records.at, for deleting expired rows cheaply

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 12:00:00
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_usage_records_at_brin", "usage_records", ["at"], postgresql_using="brin")


def downgrade() -> None:
    op.drop_index("ix_usage_records_at_brin", table_name="usage_records")
