"""`converge experiments ...`: the MLflow tracking server's experiments, runs and metric histories."""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import quote

import typer

from converge.cli.client import ProfileOpt, api
from converge.cli.output import fields, table, when

experiments = typer.Typer(
    help="Experiments in MLflow: every build logs its benchmark as a run in converge/<model>.",
    no_args_is_help=True,
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the raw answer")]
LimitOpt = Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many")]
# The figures a run's table shows first, when it has them (the rest is in `--json`).
HEADLINE = ("ttft_ms", "tokens_per_s", "texts_per_s", "rows_per_s", "latency_ms_p50", "latency_ms_p95")


def _raw(body: Any) -> None:
    typer.echo(json.dumps(body, indent=2))  # plain: no rich wrapping or markup in what a script reads


@experiments.command("list")
def experiments_list(*, as_json: JsonOpt = False, limit: LimitOpt = 200, profile: ProfileOpt = None) -> None:
    """The tracking server's experiments, by name."""
    items = list(api(profile).paged("/mlflow/experiments", limit=limit))
    if as_json:
        _raw(items)
        return
    rows = [
        {
            "id": e["id"],
            "name": e["name"],
            "stage": e["lifecycle_stage"],
            "created": when(e.get("created_at")),
            "updated": when(e.get("updated_at")),
        }
        for e in items
    ]
    table(rows, ["id", "name", "stage", "created", "updated"], title="Experiments")


@experiments.command("runs")
def experiments_runs(
    experiment_id: Annotated[str, typer.Argument(help="Experiment id (see `converge experiments list`)")],
    *,
    as_json: JsonOpt = False,
    limit: LimitOpt = 50,
    profile: ProfileOpt = None,
) -> None:
    """An experiment's runs, newest first, with their headline figures."""
    client = api(profile)
    experiment = client.call("GET", f"/mlflow/experiments/{quote(experiment_id, safe='')}")
    runs = list(client.paged(f"/mlflow/experiments/{quote(experiment_id, safe='')}/runs", limit=limit))
    if as_json:
        _raw(runs)
        return
    shown = [key for key in HEADLINE if any(key in r["metrics"] for r in runs)]
    rows = [
        {
            "run": r["id"],
            "started": when(r.get("started_at")),
            "status": r["status"],
            "model": _model(r),
            "server": r["params"].get("server"),
            **{key: r["metrics"].get(key) for key in shown},
        }
        for r in runs
    ]
    table(rows, ["run", "started", "status", "model", "server", *shown], title=experiment["name"])


def _model(run: dict[str, Any]) -> str | None:
    params = run["params"]
    if "model" not in params:
        return None
    return f"{params['model']}:{params.get('version', '?')}"


@experiments.command("metric")
def experiments_metric(
    run_id: Annotated[str, typer.Argument(help="Run id (see `converge experiments runs`)")],
    key: Annotated[str, typer.Argument(help="Metric, e.g. ttft_ms or concurrency/c4/ttft_ms_p50")],
    *,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Every logged value of one metric of a run."""
    history = api(profile).call(
        "GET", f"/mlflow/runs/{quote(run_id, safe='')}/metrics/{quote(key, safe='/')}"
    )
    if as_json:
        _raw(history)
        return
    fields([(f"step {p['step']}", p["value"]) for p in history["points"]], title=f"{key} of run {run_id}")
