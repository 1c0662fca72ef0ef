"""Roles and permissions: the one table the API, the README and the tests are checked against.

Project roles (`owner`, `developer`, `viewer`) hold permissions in one project. Organisation roles
hold theirs across the organisation: `admin` holds every permission, `library-approver` governs the
Model Library (approve, reject, revoke, deprecate, change any model) and holds nothing in any
project. Organisation-level permissions (marked below) are held by organisation roles only.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    VIEWER = "viewer"
    DEVELOPER = "developer"
    OWNER = "owner"
    LIBRARY_APPROVER = "library-approver"
    ADMIN = "admin"


PROJECT_ROLES = (Role.VIEWER, Role.DEVELOPER, Role.OWNER)
ORG_ROLES = (Role.ADMIN, Role.LIBRARY_APPROVER)
# Only project roles and admin are ranked: a library approver grants nothing in any project.
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
        "knowledge-bases:read",  # list, get, search, probe results, jobs
        "agents:read",  # agents, their revisions and runs; the project's MCP servers
        "rag-models:read",  # list, get and the revisions of RAG models
        "rulesets:read",  # list, get, versions and the deployments a ruleset is the default of
        "cost:read",  # estimates (the price catalogue itself is readable by every principal)
    }
)
DEVELOPER = VIEWER | {
    "keys:read",
    "keys:write",
    "library:submit",
    "deployments:write",
    "builds:write",
    "knowledge-bases:write",  # create, change, ingest, delete documents and bases
    "agents:write",  # create, change and delete agents (running one takes inference:use)
    "rag-models:write",  # create, change and delete RAG models
    "rulesets:write",  # create, change (a new version), delete, attach to and detach from deployments
    "chat:use",  # POST /chat and one's own sessions (the data path's /v1 takes inference:use)
}
OWNER = DEVELOPER | {"project:write", "project:delete", "members:write", "audit:read"}
# A project's MCP servers: its owners register streamable-HTTP ones (`mcp-servers:write`);
# a stdio server runs a program on the Converge host, so registering one is organisation-level.
OWNER |= {"mcp-servers:write"}
# Organisation-level: only organisation roles hold these. The library's governance is here because
# an approved or revoked version is approved or revoked for every project that deploys it.
LIBRARY_GOVERNANCE = frozenset({"library:approve", "library:govern"})
ORG_ONLY = LIBRARY_GOVERNANCE | {
    "projects:create",
    "keys:admin",
    "policies:write",
    "sources:write",
    "audit:read-all",
    "mcp-servers:stdio",
    "cost:write",  # the price catalogue: one set of prices for every project
}
ALL_PERMISSIONS = OWNER | ORG_ONLY

ROLE_PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.VIEWER: VIEWER,
    Role.DEVELOPER: DEVELOPER,
    Role.OWNER: OWNER,
    Role.ADMIN: ALL_PERMISSIONS,
    Role.LIBRARY_APPROVER: frozenset({"library:read"}) | LIBRARY_GOVERNANCE,
}


def role_allows(role: Role | str, permission: str) -> bool:
    return permission in ROLE_PERMISSIONS[Role(role)]


def may_grant(granter: Role | str, granted: Role | str) -> bool:
    """A principal can hand out (to a member or a key) at most its own role, and only ranked ones."""
    granter, granted = Role(granter), Role(granted)
    return granter in RANK and granted in RANK and RANK[granted] <= RANK[granter]


def permission_matrix() -> dict[str, dict[str, bool]]:
    """permission -> role -> allowed, for docs and the README table."""
    return {p: {r.value: p in ROLE_PERMISSIONS[r] for r in Role} for p in sorted(ALL_PERMISSIONS)}
