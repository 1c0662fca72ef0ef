"""Cost request and response bodies: the price catalogue's versions, estimates, measured cost
reports, budgets and recommendations."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from converge.control.usage.schemas import EARLIEST, LATEST
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


# -- measured cost ------------------------------------------------------------------------------


class ReportGroup(StrEnum):
    DAY = "day"
    DEPLOYMENT = "deployment"


DEFAULT_REPORT_DAYS = 30


class CostReportQuery(Input):
    """Query parameters of GET /cost/report."""

    project: str | None = Field(
        default=None, max_length=63, description="Project id or name; required unless the caller is an admin"
    )
    since: date | None = Field(
        default=None, description="First UTC day (inclusive). Default: 29 days before `until`"
    )
    until: date | None = Field(default=None, description="Last UTC day (inclusive). Default: today")
    group_by: ReportGroup = Field(
        default=ReportGroup.DEPLOYMENT,
        description="deployment: one row per deployment over the window; day: one per deployment and day",
    )

    @field_validator("since", "until")
    @classmethod
    def _in_range(cls, value: date | None) -> date | None:
        if value is not None and not EARLIEST <= value <= LATEST:
            raise ValueError(f"'{value.isoformat()}' is outside {EARLIEST.isoformat()}..{LATEST.isoformat()}")
        return value

    @model_validator(mode="after")
    def _order(self) -> CostReportQuery:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError(f"since ({self.since}) must not be after until ({self.until})")
        return self

    def window(self, today: date) -> tuple[date, date]:
        until = self.until or today
        since = self.since or until - timedelta(days=DEFAULT_REPORT_DAYS - 1)
        return since, until


class CostMeasures(Output):
    replica_seconds: float = Field(description="Seconds replicas ran (starting, ready or draining)")
    replica_hours: float
    cost: float = Field(description="replica-hours x the price of a replica-hour, in `currency`")
    price_per_hour: float | None = Field(
        description="Cost per replica-hour (the catalogue's, averaged when resources or prices changed)"
    )
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_per_million_tokens: float | None = Field(description="null when no tokens were metered")


class CostRow(CostMeasures):
    day: date | None = Field(default=None, description="UTC day (group_by=day)")
    project_id: uuid.UUID
    deployment_id: uuid.UUID
    deployment: str | None = Field(description="The deployment's name; null once deleted")
    catalogue_versions: list[int] = Field(description="The price catalogue versions that priced this row")
    notes: list[str]


class CostReport(Output):
    since: date
    until: date
    group_by: ReportGroup
    currency: str
    data: list[CostRow]
    totals: CostMeasures


class BudgetBody(Input):
    monthly: float = Field(
        ge=1e-6,
        le=1e12,
        allow_inf_nan=False,
        description="Budget per calendar month (UTC), at least 0.000001",
    )
    enforce: bool = Field(
        default=False,
        description="Refuse the project's gateway requests (429) once the month's cost reaches it",
    )


class BudgetRead(Output):
    project_id: uuid.UUID
    monthly: float
    currency: str
    enforce: bool
    month: str = Field(description="The month checked, YYYY-MM (UTC)")
    spent: float = Field(description="Measured cost so far this month")
    percent: float
    alerted: int = Field(description="The highest threshold announced this month (0, 80 or 100)")
    exceeded: bool
    refusing: bool = Field(description="The gateway refuses the project's requests (enforce and exceeded)")
    checked_at: datetime | None


AdviceKind = Literal["right_size", "scale_to_zero", "quantised_variant", "consolidate", "spot"]


class RecommendationRead(Output):
    kind: AdviceKind
    project_id: uuid.UUID
    deployment_id: uuid.UUID
    deployment: str
    why: str = Field(description="The reason, with the numbers")
    current_hourly: float = Field(description="What one replica costs an hour now")
    proposed_hourly: float | None = Field(
        description="What one replica would cost (right_size, quantised_variant; consolidate: all the GPUs shared)"
    )
    monthly_savings: float = Field(description="Estimated saving per month, in `currency`")
    numbers: dict[str, float | int | str | None] = Field(description="The figures the advice rests on")


class RecommendationsRead(Output):
    project_id: uuid.UUID | None
    currency: str
    catalogue_version: int
    window_days: int = Field(description="Days of measured use the advice looks at")
    data: list[RecommendationRead] = Field(description="Largest saving first")
    not_checked: list[str] = Field(description="What could not be checked, and why")
