"""Settings of the local process supervisor."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class LocalConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    state_dir: Path = Field(description="replicas.json and logs/<replica>.log live here")
    server_command: list[str] | None = Field(
        default=None,
        description="Replaces [sys.executable, '-m', 'converge.serving'] (tests run a stub server)",
    )
    health_interval_s: float = Field(default=0.5, gt=0)
    probe_timeout_s: float = Field(default=2.0, gt=0)
    ready_timeout_s: float = Field(
        default=120,
        gt=0,
        description="A replica not ready by then is restarted; a rollout stuck that long fails",
    )
    drain_timeout_s: float = Field(default=30, ge=0)
    drain_grace_s: float = Field(
        default=2.0,
        ge=0,
        description="A draining replica keeps serving at least this long, so routers that still hold "
        "the previous routing snapshot never hit a closed port",
    )
    kill_grace_s: float = Field(default=10, ge=0, description="SIGTERM, then SIGKILL after this long")
    backoff_initial_s: float = Field(default=1, gt=0)
    backoff_max_s: float = Field(default=30, gt=0)
    crashloop_restarts: int = Field(default=5, ge=0)
    crashloop_window_s: float = Field(default=120, gt=0)
    keep_replicas_on_stop: bool = Field(
        default=False,
        description="Leave replicas running when the supervisor stops, for the next one to adopt",
    )
    otel_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP collector replicas export their spans to (CONVERGE_OTEL__ENDPOINT); None: no traces",
    )
    otel_sample_ratio: float = Field(default=1.0, ge=0, le=1)
    memory_limit: bool = True
    memory_limit_factor: float = Field(
        default=2.0,
        ge=1.0,
        description="RLIMIT_DATA = resources.memory_bytes x this (see process.memory_limit_bytes)",
    )
