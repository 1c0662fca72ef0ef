"""Input drift bodies: the reference a person puts, and the drift report of a deployment."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from converge.core import drift
from converge.kit.schemas import INT64_MAX, Input, Output

FeatureName = Field(
    min_length=1, max_length=64, description="As the gateway names it: 0, 1, ... or a tensor's name"
)


class FeatureHistogramIn(Input):
    """One feature's histogram of the training data, as numpy.histogram returns it."""

    name: str = FeatureName
    edges: list[float] = Field(
        min_length=3,
        max_length=drift.MAX_BINS + 1,
        description="Bin edges, strictly increasing (numpy.histogram's second answer); the first and"
        " last bins are open, so inputs outside the training range fall into them",
    )
    counts: list[int] = Field(
        min_length=2, max_length=drift.MAX_BINS, description="Training rows per bin: one fewer than edges"
    )

    @model_validator(mode="after")
    def _a_histogram(self) -> FeatureHistogramIn:
        problem = drift.histogram_problem(np.asarray(self.edges, dtype=np.float64), np.asarray(self.counts))
        if problem:
            raise ValueError(problem)
        if sum(self.counts) > INT64_MAX:
            raise ValueError(f"counts must sum to at most {INT64_MAX}")
        return self


class ReferenceIn(Input):
    """The reference a deployment's inputs are compared with, from its training data: either
    per-feature histograms, or sample rows from which quantile bins are taken."""

    features: list[FeatureHistogramIn] | None = Field(default=None, min_length=1, max_length=256)
    rows: list[list[float]] | None = Field(
        default=None,
        min_length=10,
        max_length=100_000,
        description="Sample rows of the training data, one number per feature, as the model takes them",
    )
    names: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="With rows: the features' names (default 0, 1, ..., as the gateway names the columns"
        " of a request's one input tensor)",
    )
    bins: int = Field(
        default=drift.DEFAULT_BINS, ge=2, le=drift.MAX_BINS, description="With rows: quantile bins"
    )

    @field_validator("names")
    @classmethod
    def _names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if any(not 1 <= len(name) <= 64 for name in value):
            raise ValueError("every name is 1 to 64 characters")
        if len(set(value)) != len(value):
            raise ValueError("names must be unique")
        return value

    @field_validator("rows")
    @classmethod
    def _rows(cls, value: list[list[float]] | None) -> list[list[float]] | None:
        if value is None:
            return None
        width = len(value[0])
        if not 1 <= width <= 256:
            raise ValueError("a row holds 1 to 256 numbers")
        if any(len(row) != width for row in value):
            raise ValueError(f"every row must hold {width} numbers, as the first does")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> ReferenceIn:
        if (self.features is None) == (self.rows is None):
            raise ValueError("give either features (histograms) or rows (samples), not both or neither")
        if self.features is not None:
            names = [f.name for f in self.features]
            if len(set(names)) != len(names):
                raise ValueError("features: every name once")
            if self.names is not None or "bins" in self.model_fields_set:
                raise ValueError("names and bins go with rows, not with features")
        elif self.names is not None and self.rows is not None and len(self.names) != len(self.rows[0]):
            raise ValueError(f"names: one per column, {len(self.rows[0])}, not {len(self.names)}")
        return self


class FeatureReferenceRead(Output):
    name: str
    edges: list[float] = Field(description="Inner bin edges: the first and last bins are open")
    counts: list[int] = Field(description="Reference rows per bin (one more than edges)")
    count: int | None = None
    mean: float | None = None
    std: float | None = None


class ReferenceRead(Output):
    source: Literal["training", "first_window"]
    version: uuid.UUID = Field(description="Changes whenever the reference is replaced")
    revision: int | None = Field(description="first_window: the deployment revision it was taken from")
    rows: int
    created_by: str
    created_at: datetime
    features: list[FeatureReferenceRead]


class WindowRead(Output):
    started_at: datetime
    ended_at: datetime
    rows: int
    gateways: int = Field(description="Gateway replicas whose windows are summed")


class FeatureDrift(Output):
    name: str
    psi: float | None = Field(description="Population stability index of the window against the reference")
    ks: float | None = Field(description="Two-sample Kolmogorov-Smirnov statistic over the reference's bins")
    drifting: bool = Field(description="psi is over the threshold")
    window_count: int
    window_mean: float | None
    reference_count: int
    reference_mean: float | None


class DriftReport(Output):
    deployment_id: uuid.UUID
    revision: int
    threshold: float = Field(
        description="PSI above which a feature drifts (CONVERGE_GATEWAY__DRIFT__PSI_THRESHOLD)"
    )
    reference: ReferenceRead | None = Field(
        description="None until there is one: a training reference is put, or the first full window is seen"
    )
    window: WindowRead | None = Field(description="The last closed window, compared with the reference")
    current: WindowRead | None = Field(description="The window being counted now (not compared yet)")
    drifting: bool = Field(description="Any feature drifts")
    features: list[FeatureDrift]
