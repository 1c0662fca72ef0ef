from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from converge.kit.schemas import Input, Output
from converge.runtime.base import ServerKind

DeploymentName = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
]
Profile = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")]


class ResourcesIn(Input):
    cpu: float = Field(default=1.0, gt=0, le=512, description="CPU cores per replica")
    memory_bytes: int = Field(default=2 << 30, gt=0, description="Memory per replica")
    gpus: int = Field(default=0, ge=0, le=16)
    gpu_type: str | None = Field(default=None, max_length=64)
    mig_profile: str | None = Field(default=None, max_length=32, description="e.g. 1g.10gb")


class ReplicasIn(Input):
    min: int = Field(default=1, ge=0, le=64)
    max: int = Field(default=1, ge=1, le=64)

    @model_validator(mode="after")
    def _min_not_above_max(self) -> ReplicasIn:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) must not exceed replicas.max ({self.max})")
        return self


class AutoscalingIn(Input):
    target_in_flight: float = Field(default=4.0, gt=0, description="In-flight requests per replica")
    scale_up_after_s: float = Field(default=5.0, ge=0, description="Sustained load before scaling up")
    cooldown_s: float = Field(default=60.0, ge=0, description="Quiet time before scaling down")
    scale_to_zero_after_s: float | None = Field(default=None, ge=10, description="Idle time; null = never")


class RolloutIn(Input):
    strategy: Literal["rolling"] = "rolling"
    canary_weight: int | None = Field(
        default=None, ge=0, le=100, description="Percent of traffic to the new revision"
    )


class DeploymentSpecIn(Input):
    """Everything that makes a revision. Changing any of it creates a new revision."""

    model_version_id: uuid.UUID
    runtime: Literal["local"] = "local"
    server: ServerKind | None = Field(default=None, description="Default: chosen from the artifact format")
    profile: Profile = Field(default="cpu", description="The build profile this deployment needs")
    resources: ResourcesIn = ResourcesIn()
    replicas: ReplicasIn = ReplicasIn()
    autoscaling: AutoscalingIn = AutoscalingIn()
    zones: list[Annotated[str, StringConstraints(min_length=1, max_length=63)]] = Field(
        default_factory=lambda: ["local"],
        min_length=1,
        max_length=16,
        description="One zone, or several to spread over",
    )
    rollout: RolloutIn = RolloutIn()
    env: dict[str, Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default_factory=dict, max_length=64
    )
    args: list[Annotated[str, StringConstraints(max_length=1024)]] = Field(
        default_factory=list, max_length=64
    )


class DeploymentCreate(DeploymentSpecIn):
    name: DeploymentName
    aliases: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=list,
        max_length=16,
        description="Extra model names the gateway resolves to this deployment",
    )


class DeploymentUpdate(Input):
    """Fields to change; the rest is taken from the current revision."""

    model_version_id: uuid.UUID | None = None
    server: ServerKind | None = None
    profile: Profile | None = None
    resources: ResourcesIn | None = None
    replicas: ReplicasIn | None = None
    autoscaling: AutoscalingIn | None = None
    zones: list[str] | None = None
    rollout: RolloutIn | None = None
    env: dict[str, str] | None = None
    args: list[str] | None = None
    aliases: list[str] | None = None


class RollbackIn(Input):
    revision: int = Field(ge=1)


class DeploymentRead(Output):
    id: uuid.UUID
    project_id: uuid.UUID
    name: str
    aliases: list[str]
    model_version_id: uuid.UUID
    revision: int
    restart_generation: int
    promoted_revision: int | None = None
    desired_replicas: int
    phase: str
    status: dict[str, Any]
    spec: dict[str, Any] = Field(default_factory=dict)
    deleting: bool
    created_by: str
    created_at: datetime
    updated_at: datetime


class RevisionRead(Output):
    revision: int
    spec: dict[str, Any]
    reason: str
    created_by: str
    created_at: datetime


class ZoneRead(Output):
    name: str
    cpu: float
    memory_bytes: int
    gpus: list[dict[str, Any]]
