"""library governance: the project that submitted a model (none for the organisation's own)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("library_models", sa.Column("submitting_project_id", sa.Uuid(), nullable=True))
    op.create_index(
        op.f("ix_library_models_submitting_project_id"), "library_models", ["submitting_project_id"]
    )
    op.create_foreign_key(
        op.f("fk_library_models_submitting_project_id_projects"),
        "library_models",
        "projects",
        ["submitting_project_id"],
        ["id"],
        ondelete="SET NULL",
    )
    # Models a project key created belong to that key's project. Anything else (admins, OIDC
    # users, the catalogue, registry sync) stays the organisation's: governed, the safe default.
    op.execute(
        """
        UPDATE library_models AS m SET submitting_project_id = k.project_id
        FROM api_keys AS k
        WHERE m.created_by = 'key:' || k.prefix AND k.project_id IS NOT NULL
        """
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("fk_library_models_submitting_project_id_projects"), "library_models", type_="foreignkey"
    )
    op.drop_index(op.f("ix_library_models_submitting_project_id"), table_name="library_models")
    op.drop_column("library_models", "submitting_project_id")
