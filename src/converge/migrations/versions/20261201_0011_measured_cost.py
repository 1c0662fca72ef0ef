"""Measured cost: replica-seconds per day, daily usage roll-ups, project budgets in money

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 19:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replica_usage_daily",
        sa.Column("deployment_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("zone", sa.String(63), nullable=False),
        sa.Column("resources_key", sa.String(64), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("resources", postgresql.JSONB(), nullable=False),
        sa.Column("replica_seconds", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "deployment_id", "day", "zone", "resources_key", name=op.f("pk_replica_usage_daily")
        ),
    )
    op.create_index("ix_replica_usage_daily_project_day", "replica_usage_daily", ["project_id", "day"])
    op.create_table(
        "usage_daily",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("deployment_id", sa.Uuid(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("day", "project_id", "deployment_id", name=op.f("pk_usage_daily")),
    )
    op.create_index("ix_usage_daily_project_day", "usage_daily", ["project_id", "day"])
    op.create_table(
        "project_budgets",
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("monthly", sa.Float(), nullable=False),
        sa.Column("enforce", sa.Boolean(), nullable=False),
        sa.Column("month", sa.Integer(), nullable=False),
        sa.Column("alerted", sa.Integer(), nullable=False),
        sa.Column("spent", sa.Float(), nullable=False),
        sa.Column("exceeded", sa.Boolean(), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_by", sa.String(255), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_project_budgets_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("project_id", name=op.f("pk_project_budgets")),
    )


def downgrade() -> None:
    op.drop_table("project_budgets")
    op.drop_index("ix_usage_daily_project_day", table_name="usage_daily")
    op.drop_table("usage_daily")
    op.drop_index("ix_replica_usage_daily_project_day", table_name="replica_usage_daily")
    op.drop_table("replica_usage_daily")
