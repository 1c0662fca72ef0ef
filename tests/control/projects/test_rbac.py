"""The role x permission matrix, driven by the one table in core/rbac.py, over real HTTP calls."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import ADMIN, make_key, make_project

from converge.core.rbac import (
    LIBRARY_GOVERNANCE,
    PROJECT_ROLES,
    ROLE_PERMISSIONS,
    Role,
    may_grant,
    permission_matrix,
)

README = Path(__file__).resolve().parents[3] / "README.md"


@dataclass(frozen=True)
class Action:
    permission: str
    method: str
    path: str  # {p} = the project under test
    body: Any = None
    project_scoped: bool = True


ACTIONS = [
    Action("project:read", "GET", "/projects/{p}"),
    Action("project:write", "PATCH", "/projects/{p}", {"description": "changed"}),
    Action("project:delete", "DELETE", "/projects/{p}"),
    Action("members:read", "GET", "/projects/{p}/members"),
    Action("members:write", "POST", "/projects/{p}/members", {"subject": "someone", "role": "viewer"}),
    Action("keys:read", "GET", "/projects/{p}/keys"),
    Action("keys:write", "POST", "/projects/{p}/keys", {"name": "k", "role": "viewer"}),
    Action("audit:read", "GET", "/audit?project={p}"),
    Action("events:read", "GET", "/events?project={p}"),
    Action("projects:create", "POST", "/projects", {"name": "created-by-test"}, project_scoped=False),
    Action("keys:admin", "GET", "/keys", project_scoped=False),
]
ROLES = [Role.VIEWER, Role.DEVELOPER, Role.OWNER, "outsider"]


@pytest.mark.parametrize("role", ROLES, ids=str)
@pytest.mark.parametrize("action", ACTIONS, ids=lambda a: a.permission)
async def test_role_permission_matrix(client, role, action):
    project = await make_project(client)
    other = await make_project(client)
    key_project = other["id"] if role == "outsider" else project["id"]
    headers = await make_key(client, key_project, "owner" if role == "outsider" else role)
    resp = await client.request(
        action.method, action.path.format(p=project["id"]), json=action.body, headers=headers
    )
    if role == "outsider":
        expected = 404 if action.project_scoped else 403
    elif action.permission in ROLE_PERMISSIONS[Role(role)]:
        expected = {"GET": 200, "PATCH": 200, "POST": 201, "DELETE": 204}[action.method]
    else:
        expected = 403
    assert resp.status_code == expected, resp.text
    if expected >= 400:
        assert resp.headers["content-type"] == "application/problem+json"


async def test_admin_sees_every_project_as_admin(client):
    project = await make_project(client)
    resp = await client.get(f"/projects/{project['id']}", headers=ADMIN)
    assert resp.status_code == 200
    assert resp.json()["your_role"] == "admin"


def test_the_table_is_monotonic_in_rank():
    order = [Role.VIEWER, Role.DEVELOPER, Role.OWNER, Role.ADMIN]
    for lower, higher in zip(order, order[1:], strict=False):
        assert ROLE_PERMISSIONS[lower] <= ROLE_PERMISSIONS[higher]
    assert all(row["admin"] for row in permission_matrix().values())


def test_library_governance_is_organisation_level_only():
    for role in PROJECT_ROLES:
        assert not ROLE_PERMISSIONS[role] & LIBRARY_GOVERNANCE, role
    # The library approver reads and governs the library, and holds nothing in any project.
    assert ROLE_PERMISSIONS[Role.LIBRARY_APPROVER] == {"library:read"} | LIBRARY_GOVERNANCE
    assert not may_grant(Role.LIBRARY_APPROVER, Role.VIEWER)
    assert not may_grant(Role.OWNER, Role.LIBRARY_APPROVER)


def test_the_readme_permission_table_is_the_matrix():
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| permission |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = {
            role: cell == "yes" for role, cell in zip(header[1:], cells[1:], strict=True)
        }
    assert header[1:] == [r.value for r in Role]
    assert rows == permission_matrix()


async def test_nobody_grants_above_their_own_role(client):
    project = await make_project(client)
    developer = await make_key(client, project["id"], "developer")
    up = await client.post(
        f"/projects/{project['id']}/keys", json={"name": "x", "role": "owner"}, headers=developer
    )
    assert up.status_code == 403 and "above your own role" in up.json()["detail"]
    same = await client.post(
        f"/projects/{project['id']}/keys", json={"name": "x", "role": "developer"}, headers=developer
    )
    assert same.status_code == 201
    assert may_grant(Role.OWNER, Role.VIEWER) and not may_grant(Role.VIEWER, Role.OWNER)


async def test_project_keys_cannot_hold_admin(client):
    project = await make_project(client)
    resp = await client.post(
        f"/projects/{project['id']}/keys", json={"name": "x", "role": "admin"}, headers=ADMIN
    )
    assert resp.status_code == 403


async def test_listing_projects_shows_only_visible_ones(client):
    mine, theirs = await make_project(client), await make_project(client)
    headers = await make_key(client, mine["id"], "viewer")
    seen = {p["id"] for p in (await client.get("/projects", headers=headers)).json()["items"]}
    assert seen == {mine["id"]}
    assert theirs["id"] not in seen


async def test_pagination_walks_every_project_once(client):
    made = {(await make_project(client, f"page-{i}-{uuid.uuid4().hex[:6]}"))["id"] for i in range(7)}
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/projects", params=params, headers=ADMIN)).json()
        seen += [p["id"] for p in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert made <= set(seen) and len(seen) == len(set(seen))
