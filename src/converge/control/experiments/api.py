"""HTTP for experiments, on the seed's path: the configured MLflow tracking server, read through."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from converge.control.experiments import service
from converge.control.experiments.schemas import ExperimentRead, MetricHistory, RunRead
from converge.control.projects.auth import require
from converge.control.projects.principal import Principal
from converge.deps import StateDep
from converge.errors import PROBLEM_JSON, PROBLEM_RESPONSES
from converge.kit.pagination import Page, PageDep

_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "No tracking server is configured (the message says how), or it cannot be "
        "reached in time (the message names its URI)",
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
}
router = APIRouter(prefix="/mlflow", tags=["experiments"], responses={**PROBLEM_RESPONSES, **_UNAVAILABLE})
# Builds log their benchmarks per library model, so reading them is reading the library.
ExperimentsRead = Annotated[Principal, require("library:read")]
MlflowId = Annotated[str, Path(min_length=1, max_length=256)]


@router.get("/experiments", response_model=Page[ExperimentRead])
async def list_experiments(
    *, state: StateDep, principal: ExperimentsRead, page: PageDep
) -> Page[ExperimentRead]:
    """The tracking server's experiments, by name; builds log to `converge/<model name>`."""
    return await service.list_experiments(state.settings.mlflow, limit=page.limit, after=page.after)


@router.get("/experiments/{experiment_id}", response_model=ExperimentRead)
async def get_experiment(
    experiment_id: MlflowId, *, state: StateDep, principal: ExperimentsRead
) -> ExperimentRead:
    return await service.get_experiment(state.settings.mlflow, experiment_id)


@router.get("/experiments/{experiment_id}/runs", response_model=Page[RunRead])
async def list_runs(
    experiment_id: MlflowId, *, state: StateDep, principal: ExperimentsRead, page: PageDep
) -> Page[RunRead]:
    """The experiment's runs, newest first, with their params and latest metrics."""
    return await service.list_runs(state.settings.mlflow, experiment_id, limit=page.limit, after=page.after)


@router.get("/runs/{run_id}/metrics/{key:path}", response_model=MetricHistory)
async def metric_history(
    run_id: MlflowId,
    *,
    key: Annotated[
        str, Path(min_length=1, max_length=500, description="e.g. ttft_ms or concurrency/c4/ttft_ms_p50")
    ],
    state: StateDep,
    principal: ExperimentsRead,
) -> MetricHistory:
    """Every logged value of one metric of a run, by step."""
    return await service.metric_history(state.settings.mlflow, run_id=run_id, key=key)
