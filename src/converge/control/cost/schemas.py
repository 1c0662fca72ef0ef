"""Cost request and response bodies: the price catalogue's versions and estimates."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from converge.core.costs import PriceCatalogue
from converge.kit.schemas import Input, Output

Note = Annotated[str, StringConstraints(max_length=500)]


class CatalogueVersionSummary(Output):
    version: int
    note: str
    created_by: str
    created_at: datetime


class CatalogueRead(CatalogueVersionSummary):
    catalogue: PriceCatalogue


# What a deployment's own resources fix; an estimate of a deployment prices those, not these.
SPEC_ONLY = ("cpu_only", "mig_profile", "gpus", "cpu", "memory_gib")


class EstimateRequest(Input):
    """A spec (a library model version and what to run it with) or an existing deployment."""

    model: str | None = Field(
        default=None, min_length=1, max_length=260, description="NAME or NAME:VERSION from the Model Library"
    )
    model_version_id: uuid.UUID | None = None
    deployment_id: uuid.UUID | None = Field(default=None, description="Price this deployment's resources")
    context: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Tokens of context per request (default: the model's)"
    )
    concurrency: int = Field(default=1, ge=1, le=100_000, description="Requests in flight, over all replicas")
    replicas: int | None = Field(
        default=None, ge=0, le=1000, description="Default: 1 for a spec, the deployment's current target"
    )
    zone: str | None = Field(default=None, min_length=1, max_length=63, description="A price zone")
    spot: bool = Field(default=False, description="Spot prices instead of on-demand")
    cpu_only: bool = Field(default=False, description="Run on CPU: price cores and memory, no GPU")
    gpu_type: str | None = Field(default=None, min_length=1, max_length=64, description="e.g. H100")
    mig_profile: str | None = Field(default=None, min_length=1, max_length=32, description="e.g. 1g.10gb")
    gpus: int | None = Field(default=None, ge=1, le=64, description="A fixed GPU (or MIG slice) count")
    cpu: float | None = Field(default=None, gt=0, le=512, description="CPU cores per replica (default 1)")
    memory_gib: float | None = Field(
        default=None,
        gt=0,
        le=65536,
        description="Memory per replica (default: 2 GiB, or what a CPU replica needs)",
    )

    @model_validator(mode="after")
    def _one_subject(self) -> EstimateRequest:
        given = [
            name for name in ("model", "model_version_id", "deployment_id") if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of model, model_version_id or deployment_id"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.deployment_id is not None:
            fixed = [name for name in SPEC_ONLY if name in self.model_fields_set]
            if fixed:
                raise ValueError(
                    f"{', '.join(fixed)}: not with deployment_id, whose own resources are priced"
                )
        if self.cpu_only and (self.gpu_type or self.mig_profile or self.gpus):
            raise ValueError("cpu_only: cannot be combined with gpu_type, mig_profile or gpus")
        return self


class LineRead(Output):
    item: str
    quantity: float
    unit: str
    unit_price: float
    hourly: float
    monthly: float
    detail: str


class StepRead(Output):
    name: str
    expression: str
    value: float
    unit: str


class DeviceFitRead(Output):
    device: str
    gpu_type: str
    mig_profile: str | None
    count: int
    memory_bytes: int = Field(description="Memory of one device")
    need_bytes_per_device: int | None = Field(description="What each device holds; null when unknown")
    fits: bool | None
    share: str = Field(description="Part of one GPU's price that one device costs, e.g. 1/7")
    hourly: float = Field(description="GPU cost of one replica per hour")


class MissingRead(Output):
    fact: str
    needed_for: str


class MemoryRead(Output):
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    need_bytes: int


class SubjectRead(Output):
    kind: Literal["spec", "deployment"]
    model: str
    version: str
    model_version_id: uuid.UUID
    deployment_id: uuid.UUID | None = None
    deployment: str | None = None
    project_id: uuid.UUID | None = None


class ReplicaRead(Output):
    cpu: float
    memory_bytes: int
    gpu: DeviceFitRead | None = None


class EstimateRead(Output):
    subject: SubjectRead
    catalogue_version: int
    currency: str
    zone: str
    pricing: Literal["on_demand", "spot"]
    hours_per_month: float
    replicas: int
    context: int | None
    concurrency: int
    per_replica: ReplicaRead
    lines: list[LineRead]
    hourly: float
    monthly: float
    memory: MemoryRead | None = Field(description="The fit maths; null when the model's facts are missing")
    working: list[StepRead]
    candidates: list[DeviceFitRead] = Field(description="Every device the fit was checked against")
    alternatives: list[DeviceFitRead] = Field(description="Cheaper devices that also fit")
    notes: list[str]
    missing: list[MissingRead] = Field(
        description="Facts the memory maths lacked (the estimate then prices resources only)"
    )


CatalogueBody = PriceCatalogue
CataloguePatch = dict[str, Any]
