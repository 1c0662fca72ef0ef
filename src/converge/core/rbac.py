"""Roles and permissions: the one table the API, the README and the tests are checked against.

Roles are per project (`owner`, `developer`, `viewer`); `admin` is organisation-wide and holds
every permission. Organisation-level permissions (marked below) are held by admins only.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    VIEWER = "viewer"
    DEVELOPER = "developer"
    OWNER = "owner"
    ADMIN = "admin"


PROJECT_ROLES = (Role.VIEWER, Role.DEVELOPER, Role.OWNER)
RANK = {Role.VIEWER: 0, Role.DEVELOPER: 1, Role.OWNER: 2, Role.ADMIN: 3}

VIEWER = frozenset(
    {
        "project:read",
        "members:read",
        "events:read",
        "library:read",
        "deployments:read",
        "builds:read",
        "inference:use",
    }
)
DEVELOPER = VIEWER | {"keys:read", "keys:write", "library:submit", "deployments:write", "builds:write"}
OWNER = DEVELOPER | {"project:write", "project:delete", "members:write", "audit:read", "library:approve"}
# Organisation-level: only admins hold these.
ORG_ONLY = frozenset({"projects:create", "keys:admin", "policies:write", "sources:write", "audit:read-all"})
ALL_PERMISSIONS = OWNER | ORG_ONLY

ROLE_PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.VIEWER: VIEWER,
    Role.DEVELOPER: DEVELOPER,
    Role.OWNER: OWNER,
    Role.ADMIN: ALL_PERMISSIONS,
}


def role_allows(role: Role | str, permission: str) -> bool:
    return permission in ROLE_PERMISSIONS[Role(role)]


def may_grant(granter: Role | str, granted: Role | str) -> bool:
    """A principal can hand out (to a member or a key) at most its own role."""
    return RANK[Role(granted)] <= RANK[Role(granter)]


def permission_matrix() -> dict[str, dict[str, bool]]:
    """permission -> role -> allowed, for docs and the README table."""
    return {p: {r.value: p in ROLE_PERMISSIONS[r] for r in Role} for p in sorted(ALL_PERMISSIONS)}
