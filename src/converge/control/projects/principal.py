"""Who is calling: the authenticated principal and its roles."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from converge.core.rbac import RANK, Role, role_allows


@dataclass(frozen=True)
class Principal:
    subject: str
    kind: str  # "key" | "oidc" | "bootstrap" | "kubernetes" (a reconciler acting for an object)
    is_admin: bool = False
    roles: dict[uuid.UUID, Role] = field(default_factory=dict)
    key_id: uuid.UUID | None = None
    # Organisation roles other than admin (`library-approver`): they hold nothing in any project.
    org_roles: frozenset[Role] = frozenset()

    def role_in(self, project_id: uuid.UUID) -> Role | None:
        if self.is_admin:
            return Role.ADMIN
        return self.roles.get(project_id)

    def can(self, permission: str, project_id: uuid.UUID | None = None) -> bool:
        """With a project: the role there allows it. Without: some role, here or anywhere, allows it."""
        if self.is_admin:
            return True
        if project_id is not None:
            role = self.roles.get(project_id)
            return role is not None and role_allows(role, permission)
        return self.can_org(permission) or any(role_allows(r, permission) for r in self.roles.values())

    def can_org(self, permission: str) -> bool:
        """An organisation role allows it: for acts whose effect reaches every project."""
        return self.is_admin or any(role_allows(r, permission) for r in self.org_roles)

    def sees(self, project_id: uuid.UUID | None) -> bool:
        """Organisation-wide objects (no project) are visible to every principal."""
        return project_id is None or self.is_admin or project_id in self.roles

    @property
    def visible_projects(self) -> set[uuid.UUID] | None:
        """None means every project (admins)."""
        return None if self.is_admin else set(self.roles)


def merge_role(roles: dict[uuid.UUID, Role], project_id: uuid.UUID, role: Role) -> None:
    current = roles.get(project_id)
    if current is None or RANK[role] > RANK[current]:
        roles[project_id] = role
