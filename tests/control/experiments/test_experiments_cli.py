"""`converge experiments list|runs|metric` against a real server reading the real MLflow one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow_support import Tracking
from rich.console import Console
from support import BOOTSTRAP, LiveServer
from typer.testing import CliRunner, Result

from converge.cli import output
from converge.cli.main import app as cli_app

pytestmark = pytest.mark.xdist_group("mlflow")  # one MLflow server per run: one worker


@pytest.fixture
async def converge(
    live_server: Callable[..., LiveServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    monkeypatch.setattr(output, "console", Console(width=250))  # no folded cells
    monkeypatch.setattr(output, "err", Console(stderr=True, width=250))
    async with live_server() as server:
        env = {"CONVERGE_CLI_CONFIG": str(tmp_path / "cli.json"), "CONVERGE_URL": server.url}
        env |= {"CONVERGE_API_KEY": BOOTSTRAP, "NO_COLOR": "1"}

        async def run(*args: str) -> Result:
            # The CLI is synchronous and the server runs on this loop: invoke it in a thread.
            return await asyncio.to_thread(CliRunner().invoke, cli_app, list(args), env=env)

        yield run


async def test_list_and_runs_show_what_mlflow_holds(converge: Any, configured: Tracking) -> None:
    logged = configured.logged
    listed = await converge("experiments", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert {"id": logged["experiment_id"], "name": "converge-tests/iris"}.items() <= next(
        e for e in json.loads(listed.output) if e["name"] == "converge-tests/iris"
    ).items()
    table = await converge("experiments", "list")
    assert "converge-tests/iris" in table.output

    runs = await converge("experiments", "runs", logged["experiment_id"], "--json")
    assert runs.exit_code == 0, runs.output
    assert [r["id"] for r in json.loads(runs.output)][:1] == [logged["hostile_run_id"]]
    shown = await converge("experiments", "runs", logged["experiment_id"])
    assert logged["run_id"] in shown.output and "FINISHED" in shown.output

    metric = await converge("experiments", "metric", logged["run_id"], "loss", "--json")
    assert [p["value"] for p in json.loads(metric.output)["points"]] == [0.9, 0.5, 0.25]


async def test_without_a_tracking_server_the_cli_says_how_to_configure_one(converge: Any) -> None:
    result = await converge("experiments", "list")
    assert result.exit_code == 1 and "CONVERGE_MLFLOW__TRACKING_URI" in result.output
