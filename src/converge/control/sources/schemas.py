from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from converge.control.library.schemas import ModelName
from converge.kit.schemas import Input, Output

TrackingUri = Annotated[str, StringConstraints(max_length=2048, pattern=r"^https?://[^\s/]+")]


class SourceOptions(Input):
    endpoint: Annotated[str, StringConstraints(max_length=2048, pattern=r"^https?://[^\s/]+")] | None = Field(
        default=None, description="S3 endpoint URL (MinIO, moto, ...)"
    )
    region: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    access_key_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    secret_access_key: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = Field(
        default=None, description="Stored; never returned"
    )
    insecure: bool | None = Field(default=None, description="Plain HTTP to the OCI registry")
    tracking_uri: TrackingUri | None = Field(
        default=None, description="The MLflow tracking server (kind mlflow; its model registry is read)"
    )


class SourceCreate(Input):
    name: Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    kind: Literal["oci", "s3", "mlflow"]
    uri: Annotated[str, StringConstraints(min_length=6, max_length=2048)] = Field(
        description="oci://registry/repository, s3://bucket/prefix, or mlflow://models/NAME (a model "
        "registered in MLflow: its versions become versions)"
    )
    model_name: ModelName = Field(description="Library model that new tags/objects become versions of")
    interval_s: float = Field(default=60.0, ge=1, le=86400)
    enabled: bool = True
    options: SourceOptions = SourceOptions()

    @model_validator(mode="after")
    def _scheme_matches_kind(self) -> SourceCreate:
        if not self.uri.startswith(f"{self.kind}://"):
            raise ValueError(f"uri must start with {self.kind}:// for a source of kind '{self.kind}'")
        if self.kind == "mlflow":
            if not re.fullmatch(r"mlflow://models/[^\s]+", self.uri.rstrip("/")) or re.search(
                r"/[0-9]+/?$", self.uri
            ):
                raise ValueError("uri must name a registered model: mlflow://models/NAME (no version)")
            if self.options.tracking_uri is None:
                raise ValueError("options.tracking_uri is required for a source of kind 'mlflow'")
        elif self.options.tracking_uri is not None:
            raise ValueError("options.tracking_uri is for sources of kind 'mlflow' only")
        return self


class SourceUpdate(Input):
    interval_s: float | None = Field(default=None, ge=1, le=86400)
    enabled: bool | None = None


class SourceRead(Output):
    id: uuid.UUID
    name: str
    kind: str
    uri: str
    model_name: str
    interval_s: float
    enabled: bool
    options: dict[str, Any]
    created_by: str
    created_at: datetime
    last_sync_at: datetime | None
    last_error: str | None
    next_run_at: datetime | None

    @model_validator(mode="after")
    def _hide_secret(self) -> SourceRead:
        if self.options.get("secret_access_key"):
            self.options = {**self.options, "secret_access_key": "********"}
        return self


class SyncResult(Output):
    source: SourceRead
    new_versions: list[str]
