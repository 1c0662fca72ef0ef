"""What the MLflow routes answer: experiments, runs and a metric's history, as MLflow holds them."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from converge.kit.schemas import Output


class ExperimentRead(Output):
    id: str
    name: str
    lifecycle_stage: str
    artifact_location: str | None
    tags: dict[str, str]
    created_at: datetime | None
    updated_at: datetime | None


class RunRead(Output):
    id: str
    name: str | None
    experiment_id: str
    status: str
    started_at: datetime | None
    ended_at: datetime | None
    params: dict[str, str]
    metrics: dict[str, float | None] = Field(description="The latest value of each metric (null: not finite)")
    tags: dict[str, str] = Field(description="The run's tags, MLflow's own `mlflow.*` ones left out")
    artifact_uri: str | None
    build_id: str | None = Field(default=None, description="The Converge build that logged this run, if any")


class MetricPoint(Output):
    step: int
    value: float | None = Field(description="null: the logged value was NaN or infinite")
    timestamp: datetime


class MetricHistory(Output):
    run_id: str
    key: str
    points: list[MetricPoint]
