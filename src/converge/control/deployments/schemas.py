from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from converge.kit.schemas import INT32_MAX, Input, Output
from converge.runtime.base import ServerKind

DeploymentName = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
]
Profile = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")]
# The list and mapping fields, declared once: an update holds the same limits as a create.
Zones = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=63)]],
    Field(min_length=1, max_length=16, description="One zone, or several to spread over"),
]
# A process environment: a name the OS accepts (no '=', not empty), a bounded value.
EnvName = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
]
Env = Annotated[dict[EnvName, Annotated[str, StringConstraints(max_length=4096)]], Field(max_length=64)]
Args = Annotated[list[Annotated[str, StringConstraints(max_length=1024)]], Field(max_length=64)]
Aliases = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=128)]],
    Field(max_length=16, description="Extra model names the gateway resolves to this deployment"),
]


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
    zones: Zones = Field(default_factory=lambda: ["local"])
    rollout: RolloutIn = RolloutIn()
    env: Env = Field(default_factory=dict)
    args: Args = Field(default_factory=list)


class DeploymentCreate(DeploymentSpecIn):
    name: DeploymentName
    aliases: Aliases = Field(default_factory=list)


class DeploymentUpdate(Input):
    """Fields to change; the rest is taken from the current revision."""

    model_version_id: uuid.UUID | None = None
    server: ServerKind | None = None
    profile: Profile | None = None
    resources: ResourcesIn | None = None
    replicas: ReplicasIn | None = None
    autoscaling: AutoscalingIn | None = None
    zones: Zones | None = None
    rollout: RolloutIn | None = None
    env: Env | None = None
    args: Args | None = None
    aliases: Aliases | None = None


class RollbackIn(Input):
    revision: int = Field(ge=1, le=INT32_MAX)  # an INTEGER column


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
