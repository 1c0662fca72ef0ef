"""`converge cost report | budget` through CliRunner against the session app (rolled back)."""

from __future__ import annotations

import json
import uuid

from support import ADMIN, make_project
from test_cost_cli import cost_cli, row
from test_estimate_api import deployment, library_version
from test_report import make_deployment, replica_time, today, usage

__all__ = ["cost_cli"]  # the fixture, used by name


async def test_report_prints_cost_and_cost_per_million_tokens(app, client, cost_cli):
    project = await make_project(client)
    d = await make_deployment(app, project)
    await replica_time(app, d, day=today(), seconds=7200)
    await usage(app, d, day=today(), tokens=[(600_000, 400_000, 200)])
    raw = await cost_cli("report", "--project", project["name"], "--json")
    assert raw.exit_code == 0, raw.output
    body = json.loads(raw.stdout)
    (data,) = body["data"]
    cost = data["cost"]
    assert data["total_tokens"] == 1_000_000 and data["cost_per_million_tokens"] == cost
    result = await cost_cli("report", "--project", project["name"])
    assert result.exit_code == 0, result.output
    shown = f"{cost:.6g} {body['currency']}" if cost < 1 else f"{cost:,.2f} {body['currency']}"
    assert row(result.stdout, d["name"], "2.00 h")
    assert row(result.stdout, "1", "1,000,000", shown)
    by_day = await cost_cli("report", "--project", project["id"], "--by", "day")
    assert by_day.exit_code == 0 and row(by_day.stdout, str(today()), d["name"], "2.00 h"), by_day.output


async def test_budget_sets_and_shows_the_month(app, client, cost_cli):
    project = await make_project(client)
    result = await cost_cli("budget", project["name"], "--monthly", "250", "--enforce")
    assert result.exit_code == 0, result.output
    assert row(result.stdout, "budget", "250.00")
    assert row(result.stdout, "enforce", "yes")
    missing = await cost_cli("report", "--project", "no-such-project")
    assert missing.exit_code != 0 and "not found" in missing.output


async def test_recommendations_print_the_advice_and_what_was_not_checked(app, client, cost_cli):
    project = await make_project(client)
    marked = await client.patch(
        f"/projects/{project['id']}", json={"environment": "development"}, headers=ADMIN
    )
    assert marked.status_code == 200, marked.text
    version = await library_version(app, inspection={})
    quiet = await deployment(app, project=project, version_id=version["version_id"])
    await deployment(app, project=project, version_id=version["version_id"], gpus=1, gpu_type="L4")
    d = {"id": uuid.UUID(quiet), "project_id": uuid.UUID(project["id"]), "name": "quiet"}
    await replica_time(app, d, day=today(), seconds=86400)
    result = await cost_cli("recommendations", "--project", project["name"])
    assert result.exit_code == 0, result.output
    assert row(result.stdout, "scale to zero") and "0 of the 24 hours" in result.stdout
    assert row(result.stdout, "spot") and "development project" in result.stdout
    # The GPU deployment's library record has no facts for the memory fit: said, not guessed.
    assert "not checked:" in result.output and "right-size not checked" in result.output
