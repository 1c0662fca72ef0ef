"""Experiments: read MLflow's experiments, runs and metric histories; log builds' benchmarks as runs.

Nothing here is stored by Converge: MLflow holds it, and each call reads it from the tracking
server (`tracking.call`: in a thread, under a deadline). A build's run is found again through
the id the build keeps in its results (`mlflow_run_id`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from converge.config import MlflowSettings
from converge.control.experiments import tracking
from converge.control.experiments.schemas import ExperimentRead, MetricHistory, MetricPoint, RunRead
from converge.errors import AppError, NotFound
from converge.kit.pagination import INVALID_CURSOR, Page, encode_cursor

if TYPE_CHECKING:  # imported where used: see tracking.py
    from mlflow.entities import Experiment, Metric, Run
    from mlflow.tracking import MlflowClient

log = structlog.get_logger(__name__)
EXPERIMENT_PREFIX = "converge/"  # one experiment per library model: converge/<model name>
BUILD_TAG = "converge.build_id"


def _when(millis: int | None) -> datetime | None:
    return datetime.fromtimestamp(millis / 1000, UTC) if millis else None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _experiment(e: Experiment) -> ExperimentRead:
    return ExperimentRead(
        id=e.experiment_id,
        name=e.name,
        lifecycle_stage=e.lifecycle_stage,
        artifact_location=e.artifact_location,
        tags=dict(e.tags or {}),
        created_at=_when(e.creation_time),
        updated_at=_when(e.last_update_time),
    )


def _run(r: Run) -> RunRead:
    tags = dict(r.data.tags or {})
    return RunRead(
        id=r.info.run_id,
        name=r.info.run_name,
        experiment_id=r.info.experiment_id,
        status=r.info.status,
        started_at=_when(r.info.start_time),
        ended_at=_when(r.info.end_time),
        params=dict(r.data.params or {}),
        metrics={key: _finite(value) for key, value in (r.data.metrics or {}).items()},
        tags={key: value for key, value in tags.items() if not key.startswith("mlflow.")},
        artifact_uri=r.info.artifact_uri,
        build_id=tags.get(BUILD_TAG),
    )


def _cursor(token: str | None) -> str | None:
    return encode_cursor(token) if token else None


async def list_experiments(
    settings: MlflowSettings, *, limit: int, after: str | None
) -> Page[ExperimentRead]:
    uri = tracking.tracking_uri(settings)
    found = await tracking.call(
        uri,
        lambda c: c.search_experiments(max_results=limit, page_token=after, order_by=["name ASC"]),
        timeout_s=settings.timeout_s,
        invalid=INVALID_CURSOR,
    )
    return Page(items=[_experiment(e) for e in found], next_cursor=_cursor(found.token))


async def get_experiment(settings: MlflowSettings, experiment_id: str) -> ExperimentRead:
    uri = tracking.tracking_uri(settings)
    found = await tracking.call(
        uri,
        lambda c: c.get_experiment(experiment_id),
        timeout_s=settings.timeout_s,
        absent=f"Experiment {experiment_id} not found on {uri}",
    )
    return _experiment(found)


async def list_runs(
    settings: MlflowSettings, experiment_id: str, *, limit: int, after: str | None
) -> Page[RunRead]:
    """Newest first. An experiment MLflow does not hold is a 404, not an empty page."""
    await get_experiment(settings, experiment_id)
    found = await tracking.call(
        tracking.tracking_uri(settings),
        lambda c: c.search_runs(
            [experiment_id], max_results=limit, order_by=["attributes.start_time DESC"], page_token=after
        ),
        timeout_s=settings.timeout_s,
        invalid=INVALID_CURSOR,
    )
    return Page(items=[_run(r) for r in found], next_cursor=_cursor(found.token))


async def metric_history(settings: MlflowSettings, *, run_id: str, key: str) -> MetricHistory:
    uri = tracking.tracking_uri(settings)

    def history(c: MlflowClient) -> tuple[Run, list[Metric]]:
        return c.get_run(run_id), c.get_metric_history(run_id, key)

    run, points = await tracking.call(
        uri, history, timeout_s=settings.timeout_s, absent=f"Run {run_id} not found on {uri}"
    )
    if not points:
        known = ", ".join(sorted(run.data.metrics or {})) or "none"
        raise NotFound(f"Run {run_id} has no metric '{key}' (its metrics: {known})")
    ordered = sorted(points, key=lambda m: (m.step, m.timestamp))
    return MetricHistory(
        run_id=run_id,
        key=key,
        points=[
            MetricPoint(
                step=m.step, value=_finite(m.value), timestamp=datetime.fromtimestamp(m.timestamp / 1000, UTC)
            )
            for m in ordered
        ],
    )


# --- builds ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BuildRun:
    """What a build's MLflow run records: the build, what it built, where, and its figures."""

    build_id: str
    project_id: str
    model: str
    version: str
    digest: str
    server: str
    profile: str
    resources: dict[str, Any]
    figures: dict[str, Any]

    def params(self) -> dict[str, str]:
        return {
            "model": self.model,
            "version": self.version,
            "digest": self.digest,
            "server": self.server,
            "profile": self.profile,
            "resources": json.dumps(self.resources, sort_keys=True),
            "build_id": self.build_id,
            "project_id": self.project_id,
        }


def benchmark_metrics(figures: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number in the figures, nested ones under `a/b` keys (MLflow allows `/` in names):
    `ttft_ms`, `tokens_per_s_c4`, `concurrency/c4/latency_ms_p95`, `texts_per_s`, `rows_per_s`."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(benchmark_metrics(value, prefix=f"{name}/"))
    return out


def _log_run(client: MlflowClient, run: BuildRun) -> tuple[str, str]:
    from mlflow.entities import Metric, Param, RunStatus, RunTag
    from mlflow.exceptions import MlflowException

    name = f"{EXPERIMENT_PREFIX}{run.model}"
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(name, tags={"converge.model": run.model})
        except MlflowException:  # another build created it first
            again = client.get_experiment_by_name(name)
            if again is None:
                raise
            experiment_id = again.experiment_id
    created = client.create_run(
        experiment_id,
        run_name=f"{run.model}:{run.version} build {run.build_id[:8]}",
        tags={BUILD_TAG: run.build_id, "converge.server": run.server, "converge.profile": run.profile},
    )
    run_id = created.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in benchmark_metrics(run.figures).items()]
    params = [Param(key, value) for key, value in run.params().items()]
    for start in range(0, max(len(metrics), 1), 1000):  # MLflow takes 1,000 metrics per batch
        client.log_batch(
            run_id,
            metrics=metrics[start : start + 1000],
            params=params if start == 0 else (),
            tags=[RunTag("converge.model_version", f"{run.model}:{run.version}")] if start == 0 else (),
        )
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))
    return experiment_id, run_id


async def log_build(settings: MlflowSettings, run: BuildRun) -> dict[str, str]:
    """Log a build's benchmark as an MLflow run; what to add to the build's results.

    No server configured: nothing. A server that fails: `mlflow_error`, never an exception,
    because a build's figures are worth keeping even when MLflow is down.
    """
    if not settings.tracking_uri:
        return {}
    uri = settings.tracking_uri
    try:
        experiment_id, run_id = await tracking.call(
            uri, lambda c: _log_run(c, run), timeout_s=settings.timeout_s
        )
    except AppError as exc:
        log.warning("mlflow_log_failed", build_id=run.build_id, tracking_uri=uri, error=exc.detail)
        return {"mlflow_error": exc.detail}
    return {"mlflow_run_id": run_id, "mlflow_experiment_id": experiment_id, "mlflow_tracking_uri": uri}
