"""`/mlflow/*` reads a real MLflow tracking server: experiments, runs newest first, a metric's
history; without a server it says how to configure one, and an unreachable one is a prompt 503."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mlflow_support import Tracking, with_mlflow
from support import ADMIN, free_port, make_key, make_project

ROUTES = (
    "/mlflow/experiments",
    "/mlflow/experiments/1",
    "/mlflow/experiments/1/runs",
    "/mlflow/runs/r/metrics/m",
)

pytestmark = pytest.mark.xdist_group("mlflow")  # one MLflow server per run: one worker


def _problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    return resp.json()


async def test_experiments_runs_and_a_metric_history_come_from_the_server(
    client: httpx.AsyncClient, configured: Tracking
) -> None:
    logged = configured.logged
    listed = await client.get("/mlflow/experiments", headers=ADMIN)
    assert listed.status_code == 200, listed.text
    names = {e["name"]: e["id"] for e in listed.json()["items"]}
    assert names["converge-tests/iris"] == logged["experiment_id"]

    # One experiment a page: the cursor walks them all, each once.
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 1}
    while True:
        page = (await client.get("/mlflow/experiments", params=params, headers=ADMIN)).json()
        assert len(page["items"]) <= 1
        seen += [e["id"] for e in page["items"]]
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    assert sorted(seen) == sorted(names.values())

    one = await client.get(f"/mlflow/experiments/{logged['experiment_id']}", headers=ADMIN)
    assert one.json()["name"] == "converge-tests/iris" and one.json()["lifecycle_stage"] == "active"

    runs = (await client.get(f"/mlflow/experiments/{logged['experiment_id']}/runs", headers=ADMIN)).json()
    ids = [r["id"] for r in runs["items"]]
    assert ids[0] == logged["hostile_run_id"]  # logged last: newest first
    assert logged["run_id"] in ids
    starts = [r["started_at"] for r in runs["items"]]
    assert starts == sorted(starts, reverse=True)
    train = next(r for r in runs["items"] if r["id"] == logged["run_id"])
    assert train["params"]["max_iter"] == "1000" and train["metrics"]["loss"] == 0.25
    assert train["status"] == "FINISHED" and train["name"] == "train"

    history = await client.get(f"/mlflow/runs/{logged['run_id']}/metrics/loss", headers=ADMIN)
    assert history.status_code == 200, history.text
    points = history.json()["points"]
    assert [(p["step"], p["value"]) for p in points] == [(0, 0.9), (1, 0.5), (2, 0.25)]


async def test_what_mlflow_does_not_hold_is_a_404_and_a_bad_cursor_a_400(
    client: httpx.AsyncClient, configured: Tracking
) -> None:
    logged = configured.logged
    missing_metric = _problem(
        await client.get(f"/mlflow/runs/{logged['run_id']}/metrics/nope", headers=ADMIN), 404
    )
    assert "'nope'" in missing_metric["detail"] and "loss" in missing_metric["detail"]
    _problem(
        await client.get("/mlflow/runs/0123456789abcdef0123456789abcdef/metrics/loss", headers=ADMIN), 404
    )
    _problem(await client.get("/mlflow/experiments/987654321", headers=ADMIN), 404)
    _problem(await client.get("/mlflow/experiments/987654321/runs", headers=ADMIN), 404)
    bad = await client.get("/mlflow/experiments", params={"cursor": "bm90LWEtdG9rZW4"}, headers=ADMIN)
    assert "cursor" in _problem(bad, 400)["detail"]


async def test_any_member_reads_experiments_and_a_credential_is_needed(
    client: httpx.AsyncClient, configured: Tracking
) -> None:
    project = await make_project(client)
    viewer = await make_key(client, project["id"], "viewer")
    assert (await client.get("/mlflow/experiments", headers=viewer)).status_code == 200
    _problem(await client.get("/mlflow/experiments"), 401)


async def test_without_a_tracking_server_every_route_says_how_to_configure_one(
    client: httpx.AsyncClient,
) -> None:
    for path in ROUTES:
        body = _problem(await client.get(path, headers=ADMIN), 503)
        assert "CONVERGE_MLFLOW__TRACKING_URI" in body["detail"], path


async def test_an_unreachable_server_is_a_503_naming_its_uri(
    app: Any, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = app.state.converge
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setattr(state, "settings", with_mlflow(state.settings, uri))
    for path in ROUTES:
        body = _problem(await client.get(path, headers=ADMIN), 503)
        assert uri in body["detail"], path


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_a_server_that_never_answers_is_a_503_within_the_timeout(
    app: Any, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, silent_server: str
) -> None:
    state = app.state.converge
    monkeypatch.setattr(state, "settings", with_mlflow(state.settings, silent_server, timeout_s=0.5))
    body = _problem(await client.get("/mlflow/experiments", headers=ADMIN), 503)
    assert silent_server in body["detail"] and "did not answer within 0.5 s" in body["detail"]
