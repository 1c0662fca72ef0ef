"""Gen AI runtime: rulesets, RAG models, agents, MCP servers, chat sessions and messages

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 16:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _stamps() -> list[sa.Column]:
    """id, created_at, created_by, updated_at: fresh columns for each table."""
    return [
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    ]


def _project_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["project_id"], ["projects.id"], name=op.f(f"fk_{table}_project_id_projects"), ondelete="CASCADE"
    )


def _named(table: str, *, current: str) -> None:
    """A project-scoped, versioned object: name unique in the project, the current spec."""
    op.create_table(
        table,
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column(current, sa.Integer(), nullable=False),
        sa.Column("spec", postgresql.JSONB(), nullable=False),
        *_stamps(),
        _project_fk(table),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
        sa.UniqueConstraint("project_id", "name", name=op.f(f"uq_{table}_project_id")),
    )
    op.create_index(op.f(f"ix_{table}_project_id"), table, ["project_id"])


def _revisions(table: str, *, parent: str, owner: str, number: str) -> None:
    """The immutable history of a versioned object."""
    op.create_table(
        table,
        sa.Column(owner, sa.Uuid(), nullable=False),
        sa.Column(number, sa.Integer(), nullable=False),
        sa.Column("spec", postgresql.JSONB(), nullable=False),
        sa.Column("author", sa.String(255), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            [owner], [f"{parent}.id"], name=op.f(f"fk_{table}_{owner}_{parent}"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
        sa.UniqueConstraint(owner, number, name=op.f(f"uq_{table}_{owner}")),
    )
    op.create_index(op.f(f"ix_{table}_{owner}"), table, [owner])


def upgrade() -> None:
    _named("rulesets", current="version")
    _revisions("ruleset_versions", parent="rulesets", owner="ruleset_id", number="version")
    op.create_table(
        "deployment_rulesets",
        sa.Column("deployment_id", sa.Uuid(), nullable=False),
        sa.Column("ruleset_id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name=op.f("fk_deployment_rulesets_deployment_id_deployments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["ruleset_id"],
            ["rulesets.id"],
            name=op.f("fk_deployment_rulesets_ruleset_id_rulesets"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("deployment_id", name=op.f("pk_deployment_rulesets")),
    )
    op.create_index(op.f("ix_deployment_rulesets_ruleset_id"), "deployment_rulesets", ["ruleset_id"])
    op.create_index(op.f("ix_deployment_rulesets_project_id"), "deployment_rulesets", ["project_id"])

    _named("rag_models", current="revision")
    _revisions("rag_model_revisions", parent="rag_models", owner="rag_model_id", number="revision")
    _named("agents", current="revision")
    _revisions("agent_revisions", parent="agents", owner="agent_id", number="revision")

    op.create_table(
        "mcp_servers",
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("transport", sa.String(16), nullable=False),
        sa.Column("command", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("env", postgresql.JSONB(), nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=False),
        *_stamps(),
        _project_fk("mcp_servers"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mcp_servers")),
        sa.UniqueConstraint("project_id", "name", name=op.f("uq_mcp_servers_project_id")),
    )
    op.create_index(op.f("ix_mcp_servers_project_id"), "mcp_servers", ["project_id"])

    op.create_table(
        "chat_sessions",
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("principal", sa.String(255), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("target_kind", sa.String(16), nullable=False),
        sa.Column("target_id", sa.Uuid(), nullable=False),
        sa.Column("ruleset_id", sa.Uuid(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _project_fk("chat_sessions"),
        sa.ForeignKeyConstraint(
            ["ruleset_id"],
            ["rulesets.id"],
            name=op.f("fk_chat_sessions_ruleset_id_rulesets"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_sessions")),
    )
    op.create_index(
        "ix_chat_sessions_project_id_principal", "chat_sessions", ["project_id", "principal", "updated_at"]
    )
    op.create_table(
        "chat_messages",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("session_id", sa.Uuid(), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("tool_calls", postgresql.JSONB(), nullable=True),
        sa.Column("tool_call_id", sa.String(255), nullable=True),
        sa.Column("trace", postgresql.JSONB(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["chat_sessions.id"],
            name=op.f("fk_chat_messages_session_id_chat_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chat_messages")),
        sa.UniqueConstraint("session_id", "turn", name=op.f("uq_chat_messages_session_id")),
    )


def downgrade() -> None:
    for table in (
        "chat_messages",
        "chat_sessions",
        "mcp_servers",
        "agent_revisions",
        "agents",
        "rag_model_revisions",
        "rag_models",
        "deployment_rulesets",
        "ruleset_versions",
        "rulesets",
    ):
        op.drop_table(table)
