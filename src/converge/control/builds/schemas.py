from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field, computed_field

from converge.control.deployments.schemas import Profile
from converge.kit.schemas import Input, Output
from converge.runtime.base import ServerKind


class BuildState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({BuildState.SUCCEEDED, BuildState.FAILED, BuildState.CANCELLED})


class BuildCreate(Input):
    project_id: uuid.UUID
    model_version_id: uuid.UUID
    profile: Profile = Field(default="cpu", description="Target profile the benchmark figures are for")
    server: ServerKind | None = Field(default=None, description="Default: chosen from the artifact format")


class BuildRead(Output):
    id: uuid.UUID
    project_id: uuid.UUID
    model_version_id: uuid.UUID
    profile: str
    server: str
    state: BuildState
    reason: str
    results: dict[str, Any]
    cancel_requested: bool
    started_at: datetime | None
    finished_at: datetime | None
    created_by: str
    created_at: datetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run its benchmark was logged as (`GET /mlflow/runs/{id}/metrics/{key}`);
        null when no tracking server is configured or logging failed (`results.mlflow_error`)."""
        value = self.results.get("mlflow_run_id")
        return value if isinstance(value, str) else None
