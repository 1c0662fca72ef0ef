from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from converge.core.rbac import Role
from converge.kit.schemas import Input, Output

ProjectName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"),
    Field(description="DNS-label style: lowercase letters, digits and '-', 1-63 characters"),
]
Subject = Annotated[str, StringConstraints(min_length=1, max_length=255)]
KeyName = Annotated[str, StringConstraints(min_length=1, max_length=100)]


class Quotas(Input):
    cpu: float | None = Field(default=None, ge=0, description="CPU cores; null = unlimited")
    memory_bytes: int | None = Field(default=None, ge=0)
    gpus: int | None = Field(default=None, ge=0)


class Limits(Input):
    """Gateway limits. Both a key's and its project's apply; null (or absent) = unlimited."""

    rpm: int | None = Field(default=None, ge=1, description="Requests per minute; null = unlimited")
    tpm: int | None = Field(
        default=None, ge=1, description="Tokens (prompt + completion) per minute; null = unlimited"
    )
    concurrency: int | None = Field(default=None, ge=1, description="Requests in flight; null = unlimited")
    monthly_tokens: int | None = Field(
        default=None, ge=1, description="Tokens per calendar month (UTC); null = unlimited"
    )

    def stored(self) -> dict[str, int]:
        """The JSONB form: only the limits that are set."""
        return self.model_dump(exclude_none=True)


Environment = Literal["production", "staging", "development"]
ENVIRONMENT_HELP = "What the project is for; a development project is advised spot capacity"


class ProjectCreate(Input):
    name: ProjectName
    description: str = Field(default="", max_length=1000)
    environment: Environment = Field(default="production", description=ENVIRONMENT_HELP)
    quotas: Quotas = Quotas()
    limits: Limits = Limits()


class ProjectUpdate(Input):
    description: str | None = Field(default=None, max_length=1000)
    environment: Environment | None = Field(default=None, description=ENVIRONMENT_HELP)
    quotas: Quotas | None = None
    limits: Limits | None = Field(default=None, description="Replaces every limit; {} = unlimited")


class ProjectRead(Output):
    id: uuid.UUID
    name: str
    description: str
    environment: Environment
    quotas: dict[str, float | int | None]
    limits: dict[str, int] = Field(description="Gateway limits that are set; an absent one is unlimited")
    created_at: datetime
    updated_at: datetime
    your_role: Role | None = None


class MemberCreate(Input):
    subject: Subject = Field(description="The OIDC subject (the `sub` claim) of the user")
    role: Role


class MemberUpdate(Input):
    role: Role


class MemberRead(Output):
    id: uuid.UUID
    project_id: uuid.UUID
    subject: str
    role: Role
    added_by: str
    created_at: datetime


class KeyCreate(Input):
    name: KeyName
    role: Role = Field(default=Role.DEVELOPER, description="At most the caller's own role")
    expires_in_days: int | None = Field(default=90, ge=1, le=3650, description="null = never expires")
    limits: Limits = Limits()


class OrgKeyCreate(Input):
    name: KeyName
    role: Literal[Role.ADMIN, Role.LIBRARY_APPROVER] = Field(
        default=Role.ADMIN,
        description="An organisation role: `admin`, or `library-approver` (governs the Model Library only)",
    )
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)
    limits: Limits = Limits()


class KeyUpdate(Input):
    name: KeyName | None = None
    limits: Limits | None = Field(default=None, description="Replaces every limit; {} = unlimited")


class KeyRead(Output):
    id: uuid.UUID
    name: str
    prefix: str
    project_id: uuid.UUID | None
    role: Role
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    limits: dict[str, int] = Field(description="Gateway limits that are set; an absent one is unlimited")


class KeyCreated(KeyRead):
    token: str = Field(description="The key itself. Shown once; store it now.")


class WhoAmI(Output):
    subject: str
    kind: str
    is_admin: bool
    roles: dict[str, Role] = Field(description="Project id -> your role there")
    org_roles: list[Role] = Field(
        default_factory=list, description="Organisation roles other than admin, e.g. library-approver"
    )
