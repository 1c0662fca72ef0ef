"""The control plane at scale: list indexes, leader leases (fencing), reconcile notifications

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 22:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

CHANNEL = "converge_reconcile"  # kit/channels.py RECONCILE (migrations do not import the app)

INDEXES = [
    ("ix_deployments_project_id_id", "deployments", ["project_id", "id"]),
    ("ix_builds_project_id_id", "builds", ["project_id", "id"]),
    ("ix_builds_state_id", "builds", ["state", "id"]),
    ("ix_events_project_id_id", "events", ["project_id", "id"]),
    ("ix_events_at", "events", ["at"]),
    ("ix_audit_log_project_id_id", "audit_log", ["project_id", "id"]),
    ("ix_audit_log_action_id", "audit_log", ["action", "id"]),
    ("ix_audit_log_at", "audit_log", ["at"]),
]

# What a deployment's reconcile reads: its own desired state (the replica target included, which
# a wake or an operator sets), its model version (revocation, scans), the version's model and
# builds (policy facts), and the deployment policies. The controller's status writes (status,
# phase) do not wake it; its autoscaling steps do, once each.
FUNCTIONS = {
    "converge_notify_deployment": "'deployment:' || NEW.id::text",
    "converge_notify_version": "'version:' || NEW.id::text",
    "converge_notify_build": "'version:' || NEW.model_version_id::text",
    "converge_notify_model": "'model:' || NEW.id::text",
}
DEPLOYMENT_CHANGED = " OR ".join(
    f"OLD.{c} IS DISTINCT FROM NEW.{c}"
    for c in (
        "revision",
        "restart_generation",
        "promoted_revision",
        "model_version_id",
        "deleting",
        "desired_replicas",
        "last_active_at",
    )
)
TRIGGERS = [
    (
        "converge_reconcile_deployment_insert",
        "AFTER INSERT ON deployments FOR EACH ROW",
        "converge_notify_deployment",
    ),
    (
        "converge_reconcile_deployment_update",
        f"AFTER UPDATE ON deployments FOR EACH ROW WHEN ({DEPLOYMENT_CHANGED})",
        "converge_notify_deployment",
    ),
    (
        "converge_reconcile_version",
        "AFTER UPDATE ON model_versions FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*)",
        "converge_notify_version",
    ),
    (
        "converge_reconcile_model",
        "AFTER UPDATE ON library_models FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*)",
        "converge_notify_model",
    ),
    (
        "converge_reconcile_build",
        "AFTER INSERT OR UPDATE OF state ON builds FOR EACH ROW",
        "converge_notify_build",
    ),
    (
        "converge_reconcile_policy",
        "AFTER INSERT OR UPDATE OR DELETE ON policies FOR EACH STATEMENT",
        "converge_notify_policy",
    ),
]


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)
    op.create_index(
        "ix_events_kind_pattern", "events", ["kind", "id"], postgresql_ops={"kind": "varchar_pattern_ops"}
    )
    op.create_table(
        "leader_leases",
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("role", name=op.f("pk_leader_leases")),
    )
    for function, payload in FUNCTIONS.items():
        op.execute(
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN PERFORM pg_notify('{CHANNEL}', {payload}); RETURN NULL; END $$"
        )
    op.execute(
        "CREATE FUNCTION converge_notify_policy() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN PERFORM pg_notify('{CHANNEL}', 'policy:'); RETURN NULL; END $$"
    )
    for name, when, function in TRIGGERS:
        op.execute(f"CREATE TRIGGER {name} {when} EXECUTE FUNCTION {function}()")


def downgrade() -> None:
    for name, when, _ in TRIGGERS:
        table = when.split(" ON ")[1].split()[0]
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    for function in [*FUNCTIONS, "converge_notify_policy"]:
        op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    op.drop_table("leader_leases")
    op.drop_index("ix_events_kind_pattern", table_name="events")
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
