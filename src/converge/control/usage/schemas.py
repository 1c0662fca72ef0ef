"""The usage query (its window, filters and grouping) and the aggregated report."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from converge.kit.schemas import Input, Output

DEFAULT_WINDOW = timedelta(days=30)


class GroupBy(StrEnum):
    DAY = "day"
    KEY = "key"
    DEPLOYMENT = "deployment"
    MODEL = "model"
    ENDPOINT = "endpoint"


def _comma_list(value: Any) -> Any:
    """`group_by=day,model` and `group_by=day&group_by=model` mean the same; repeats count once."""
    items = value if isinstance(value, list) else [value]
    parts = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    return list(dict.fromkeys(parts))


def _date_or_datetime(value: Any) -> Any:
    """A bare `YYYY-MM-DD` stays a date (a whole UTC day); anything longer is a datetime."""
    if not isinstance(value, str):
        return value
    try:
        return date.fromisoformat(value) if len(value) == 10 else datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"'{value}' is not an ISO date (YYYY-MM-DD) or datetime") from exc


# Far enough apart for any report, near enough that a day or an offset either side (a date as
# `until`, the default 30-day window, a +14:00 zone) never leaves the calendar Python can hold.
EARLIEST, LATEST = date(1970, 1, 1), date(9998, 12, 31)


def _in_range(value: datetime | date) -> datetime | date:
    day = value.date() if isinstance(value, datetime) else value
    if not EARLIEST <= day <= LATEST:
        raise ValueError(f"'{value.isoformat()}' is outside {EARLIEST.isoformat()}..{LATEST.isoformat()}")
    return value


Instant = Annotated[datetime | date, BeforeValidator(_date_or_datetime), AfterValidator(_in_range)]


def _start(value: datetime | date) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.combine(value, time.min, tzinfo=UTC)


def _end(value: datetime | date) -> datetime:
    """A date as `until` includes that whole day."""
    if isinstance(value, datetime):
        return _start(value)
    return _start(value + timedelta(days=1))


class UsageQuery(Input):
    """Query parameters of GET /usage."""

    project: str | None = Field(
        default=None, max_length=63, description="Project id or name; required unless the caller is an admin"
    )
    key: uuid.UUID | None = Field(default=None, description="Only this API key's requests")
    deployment: str | None = Field(
        default=None, max_length=63, description="Only this deployment (id, or name within the project)"
    )
    since: Instant | None = Field(
        default=None,
        description="Start (inclusive): ISO date or datetime, UTC unless an offset is given. "
        "Default: 30 days before `until`",
    )
    until: Instant | None = Field(
        default=None, description="End (exclusive; a date includes that whole day). Default: now"
    )
    group_by: Annotated[list[GroupBy], BeforeValidator(_comma_list)] = Field(
        default=[GroupBy.DAY],
        min_length=1,
        description="Comma-separated: day, key, deployment, model, endpoint",
    )

    @field_validator("until")
    @classmethod
    def _until_after_since(
        cls, until: datetime | date | None, info: ValidationInfo
    ) -> datetime | date | None:
        since = info.data.get("since")
        if until is not None and since is not None and _start(since) >= _end(until):
            raise ValueError(f"until ({until.isoformat()}) must be after since ({since.isoformat()})")
        return until

    def window(self, now: datetime) -> tuple[datetime, datetime]:
        until = _end(self.until) if self.until is not None else now
        since = _start(self.since) if self.since is not None else until - DEFAULT_WINDOW
        return since, until


class UsageTotals(Output):
    requests: int
    errors: int = Field(description="Requests answered with a status >= 400")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    ttft_ms_p50: float | None = Field(description="Time to first token (streamed requests)")


class _Groups(Output):
    day: date | None = Field(default=None, description="UTC day")
    key_id: uuid.UUID | None = None
    deployment_id: uuid.UUID | None = None
    deployment: str | None = Field(default=None, description="The deployment's name")
    model: str | None = Field(default=None, description="The model name the client asked for")
    endpoint: str | None = Field(default=None, description="chat | completions | embeddings | v2")


class UsageRow(UsageTotals, _Groups):
    """One group: only the fields named in `group_by` are present."""


class UsageReport(Output):
    since: datetime
    until: datetime
    group_by: list[GroupBy]
    data: list[UsageRow]
    totals: UsageTotals
