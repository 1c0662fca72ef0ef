"""Projects say what they are for: production, staging or development (spot advice, for one)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 01:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "projects",
        sa.Column("environment", sa.String(16), nullable=False, server_default="production"),
    )
    op.create_check_constraint(
        "ck_projects_environment", "projects", "environment IN ('production', 'staging', 'development')"
    )


def downgrade() -> None:
    op.drop_constraint("ck_projects_environment", "projects", type_="check")
    op.drop_column("projects", "environment")
