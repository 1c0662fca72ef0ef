from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, StringConstraints

from converge.core.lifecycle import VersionState
from converge.kit.schemas import Input, Output

ModelName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"),
    Field(description="Lowercase letters, digits, '.', '_' and '-'"),
]
VersionName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9]([A-Za-z0-9._+-]*[A-Za-z0-9])?$"),
]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^(sha256:)?[0-9a-f]{64}$")]


class ModelCreate(Input):
    name: ModelName
    description: str = Field(default="", max_length=10_000)
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    visibility: Literal["public", "restricted"] = "public"
    projects: list[uuid.UUID] = Field(
        default_factory=list, description="Projects that see a restricted model"
    )
    submitting_project_id: uuid.UUID | None = Field(
        default=None,
        description="The project submitting the model (it may manage the model while no other project "
        "deploys it). Default: the caller's one project where it holds library:submit; admins: none",
    )


class ModelUpdate(Input):
    description: str | None = Field(default=None, max_length=10_000)
    tags: list[Tag] | None = Field(default=None, max_length=32)
    visibility: Literal["public", "restricted"] | None = None
    projects: list[uuid.UUID] | None = None


class ModelRead(Output):
    id: uuid.UUID
    name: str
    description: str
    tags: list[str]
    visibility: str
    projects: list[uuid.UUID]
    submitting_project_id: uuid.UUID | None = Field(
        description="The project that submitted the model; null: the organisation's own"
    )
    created_by: str
    created_at: datetime
    updated_at: datetime


class VersionRegister(Input):
    version: VersionName
    uri: Annotated[str, StringConstraints(min_length=1, max_length=2048)] = Field(
        description="s3://bucket/key, oci://registry/repo:tag, mlflow://models/NAME/VERSION, "
        "or a path on the server (admins only)"
    )
    sha256: Sha256 | None = Field(default=None, description="Expected digest of the artifact")


class VersionRead(Output):
    id: uuid.UUID
    model_id: uuid.UUID
    version: str
    state: VersionState
    state_reason: str
    format: str
    artifact_sha256: str
    source: dict[str, Any]
    inspection: dict[str, Any]
    scan: dict[str, Any]
    benchmarks: dict[str, Any]
    decision: dict[str, Any]
    submitted_by: str
    created_at: datetime
    updated_at: datetime
    approvals: list[ApprovalRead] = Field(default_factory=list)


class ModelDetail(ModelRead):
    versions: list[VersionRead]


class VerdictBody(Input):
    note: str = Field(default="", max_length=2000)


class RevokeBody(Input):
    reason: str = Field(
        default="",
        max_length=2000,
        validation_alias=AliasChoices("reason", "note"),
        description="Why (required unless dry_run): recorded in the audit log and sent to every "
        "project whose deployments stop. `note` is accepted as another name for it",
    )


class StoppedDeployment(Output):
    id: uuid.UUID
    name: str
    phase: str


class AffectedProject(Output):
    id: uuid.UUID
    name: str
    deployments: list[StoppedDeployment]


class RevocationPlan(Output):
    """What revoking a version would stop; nothing was changed."""

    dry_run: Literal[True] = True
    model_id: uuid.UUID
    version_id: uuid.UUID
    version: str
    state: VersionState = Field(description="The version's state now")
    projects: list[AffectedProject] = Field(description="Per project, the deployments that would stop")
    deployment_count: int


class ApprovalRead(Output):
    approver: str
    verdict: str
    note: str
    created_at: datetime
    decision: dict[str, Any]


VersionRead.model_rebuild()
