"""GET /usage over real SQL aggregation: grouping, filters, windows, percentiles, isolation, errors."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from support import ADMIN, make_key, make_project

from converge.models import Artifact, Deployment, LibraryModel, ModelVersion, UsageRecord

MEASURES = {
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "latency_ms_p50",
    "latency_ms_p95",
    "ttft_ms_p50",
}
# A window of its own, far from any request another test (or a running gateway) might record.
SINCE, UNTIL = "2001-03-01", "2001-03-31"


def at(day: int, hour: int = 12) -> datetime:
    return datetime(2001, 3, day, hour, tzinfo=UTC)


def usage(project: dict[str, Any], when: datetime, **values: Any) -> UsageRecord:
    defaults: dict[str, Any] = {
        "model": "chat-model",
        "endpoint": "chat",
        "status": 200,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "latency_ms": 100.0,
    }
    return UsageRecord(at=when, project_id=uuid.UUID(project["id"]), **{**defaults, **values})


async def insert(app, *rows: Any) -> None:
    async with app.state.converge.session_factory() as session, session.begin():
        session.add_all(rows)


async def deployment(app, project: dict[str, Any], name: str) -> str:
    """A deployment row, without the build and admission that the deployments tests cover."""
    sha = uuid.uuid4().hex * 2
    model_id, version_id, deployment_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with app.state.converge.session_factory() as session, session.begin():
        session.add(Artifact(sha256=sha, size_bytes=1))
        session.add(LibraryModel(id=model_id, name=f"m-{uuid.uuid4().hex[:8]}", created_by="test"))
        await session.flush()
        session.add(
            ModelVersion(
                id=version_id,
                model_id=model_id,
                version="v1",
                state="approved",
                artifact_sha256=sha,
                submitted_by="test",
            )
        )
        await session.flush()
        session.add(
            Deployment(
                id=deployment_id,
                project_id=uuid.UUID(project["id"]),
                name=name,
                model_version_id=version_id,
                created_by="test",
            )
        )
    return str(deployment_id)


async def get_usage(client, headers=ADMIN, **params: Any):
    return await client.get("/usage", params={"since": SINCE, "until": UNTIL, **params}, headers=headers)


async def key_id(client, project: dict[str, Any], role: str = "developer") -> tuple[str, dict[str, str]]:
    headers = await make_key(client, project["id"], role)
    me = (await client.get(f"/projects/{project['id']}/keys", headers=ADMIN)).json()["items"][-1]
    return me["id"], headers


async def test_groups_by_day_by_default_with_sums_errors_and_percentiles(app, client):
    project = await make_project(client)
    await insert(
        app,
        usage(project, at(3, 1), latency_ms=10, ttft_ms=4, stream=True),
        usage(project, at(3, 2), latency_ms=20, ttft_ms=8, stream=True),
        usage(project, at(3, 3), latency_ms=30, status=429, prompt_tokens=0, completion_tokens=0),
        usage(project, at(3, 4), latency_ms=40, status=500, prompt_tokens=7, completion_tokens=0),
        usage(project, at(5), latency_ms=50, prompt_tokens=100, completion_tokens=200),
    )
    resp = await get_usage(client, project=project["id"])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["group_by"] == ["day"]
    first, second = body["data"]
    assert set(first) == {"day"} | MEASURES
    assert first == {
        "day": "2001-03-03",
        "requests": 4,
        "errors": 2,
        "prompt_tokens": 27,
        "completion_tokens": 10,
        "total_tokens": 37,
        "latency_ms_p50": 25.0,
        "latency_ms_p95": pytest.approx(38.5),  # percentile_cont interpolates between 30 and 40
        "ttft_ms_p50": 6.0,  # only the streamed requests have a time to first token
    }
    assert second["day"] == "2001-03-05" and second["requests"] == 1 and second["ttft_ms_p50"] is None
    assert body["totals"] == {
        "requests": 5,
        "errors": 2,
        "prompt_tokens": 127,
        "completion_tokens": 210,
        "total_tokens": 337,
        "latency_ms_p50": 30.0,
        "latency_ms_p95": pytest.approx(48.0),
        "ttft_ms_p50": 6.0,
    }


async def test_days_are_utc_days(app, client):
    project = await make_project(client)
    late_evening_west = datetime(2001, 3, 9, 23, 30, tzinfo=timezone(timedelta(hours=-2)))
    await insert(app, usage(project, late_evening_west))
    rows = (await get_usage(client, project=project["id"])).json()["data"]
    assert [r["day"] for r in rows] == ["2001-03-10"]


async def test_groups_by_several_fields_and_only_shows_those(app, client):
    project = await make_project(client)
    k1, _ = await key_id(client, project)
    k2, _ = await key_id(client, project)
    await insert(
        app,
        usage(project, at(2), key_id=uuid.UUID(k1), model="a", endpoint="chat"),
        usage(project, at(3), key_id=uuid.UUID(k1), model="a", endpoint="chat"),
        usage(project, at(3), key_id=uuid.UUID(k1), model="b", endpoint="embeddings", completion_tokens=0),
        usage(project, at(4), key_id=uuid.UUID(k2), model="a", endpoint="completions"),
        usage(project, at(4), key_id=None, model="a", endpoint="chat"),  # its key was deleted
    )
    resp = await get_usage(client, project=project["id"], group_by="key,model,endpoint")
    rows = resp.json()["data"]
    assert all(set(r) == {"key_id", "model", "endpoint"} | MEASURES for r in rows)
    got = {(r["key_id"], r["model"], r["endpoint"]): r["requests"] for r in rows}
    assert got == {
        (k1, "a", "chat"): 2,
        (k1, "b", "embeddings"): 1,
        (k2, "a", "completions"): 1,
        (None, "a", "chat"): 1,
    }
    assert resp.json()["group_by"] == ["key", "model", "endpoint"]
    repeated = await get_usage(client, project=project["id"], group_by=["model", "model,endpoint"])
    assert repeated.json()["group_by"] == ["model", "endpoint"]


async def test_filters_by_key(app, client):
    project = await make_project(client)
    k1, _ = await key_id(client, project)
    k2, _ = await key_id(client, project)
    await insert(
        app,
        usage(project, at(2), key_id=uuid.UUID(k1)),
        usage(project, at(2), key_id=uuid.UUID(k1)),
        usage(project, at(2), key_id=uuid.UUID(k2)),
    )
    body = (await get_usage(client, project=project["id"], key=k1, group_by="key")).json()
    assert [(r["key_id"], r["requests"]) for r in body["data"]] == [(k1, 2)]
    assert body["totals"]["requests"] == 2


async def test_groups_and_filters_by_deployment_by_id_or_name(app, client):
    project = await make_project(client)
    chat = await deployment(app, project, "chat")
    embed = await deployment(app, project, "embed")
    await insert(
        app,
        usage(project, at(2), deployment_id=uuid.UUID(chat)),
        usage(project, at(2), deployment_id=uuid.UUID(chat)),
        usage(project, at(2), deployment_id=uuid.UUID(embed)),
        usage(project, at(2), deployment_id=None),  # no deployment answered (or it was deleted)
    )
    rows = (await get_usage(client, project=project["id"], group_by="deployment")).json()["data"]
    assert {(r["deployment_id"], r["deployment"], r["requests"]) for r in rows} == {
        (chat, "chat", 2),
        (embed, "embed", 1),
        (None, None, 1),
    }
    assert all(set(r) == {"deployment_id", "deployment"} | MEASURES for r in rows)
    by_name = (await get_usage(client, project=project["name"], deployment="chat")).json()
    by_id = (await get_usage(client, project=project["id"], deployment=chat)).json()
    assert by_name["totals"]["requests"] == by_id["totals"]["requests"] == 2
    missing = await get_usage(client, project=project["id"], deployment="nope")
    assert missing.status_code == 404


async def test_the_window_dates_include_whole_days_and_datetimes_are_exact(app, client):
    project = await make_project(client)
    await insert(
        app,
        usage(project, datetime(2001, 3, 1, 0, 0, tzinfo=UTC)),
        usage(project, datetime(2001, 3, 2, 23, 59, tzinfo=UTC)),
        usage(project, datetime(2001, 3, 3, 0, 0, tzinfo=UTC)),
    )

    async def count(**params: Any) -> int:
        resp = await client.get("/usage", params={"project": project["id"], **params}, headers=ADMIN)
        assert resp.status_code == 200, resp.text
        return int(resp.json()["totals"]["requests"])

    assert await count(since="2001-03-01", until="2001-03-02") == 2
    assert await count(since="2001-03-02", until="2001-03-02") == 1
    assert await count(since="2001-03-01T00:00:00Z", until="2001-03-03T00:00:00Z") == 2
    assert await count(since="2001-03-02T22:59:00-01:00", until="2001-03-03T00:00:01") == 2
    window = (
        await client.get(
            "/usage",
            params={"project": project["id"], "since": "2001-03-02", "until": "2001-03-02"},
            headers=ADMIN,
        )
    ).json()
    assert (window["since"], window["until"]) == ("2001-03-02T00:00:00Z", "2001-03-03T00:00:00Z")


async def test_the_default_window_is_the_last_30_days(app, client):
    project = await make_project(client)
    now = datetime.now(UTC)
    await insert(
        app,
        usage(project, now - timedelta(days=1)),
        usage(project, now - timedelta(days=29)),
        usage(project, now - timedelta(days=31)),
    )
    body = (await client.get("/usage", params={"project": project["id"]}, headers=ADMIN)).json()
    assert body["totals"]["requests"] == 2
    since, until = (datetime.fromisoformat(body[k]) for k in ("since", "until"))
    assert until - since == timedelta(days=30) and abs(until - now) < timedelta(minutes=1)


async def test_an_empty_window_has_no_rows_and_zero_totals(client):
    project = await make_project(client)
    body = (await get_usage(client, project=project["id"])).json()
    assert body["data"] == []
    assert body["totals"] == {
        "requests": 0,
        "errors": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "latency_ms_p50": None,
        "latency_ms_p95": None,
        "ttft_ms_p50": None,
    }


@pytest.mark.parametrize("role", ["viewer", "developer", "owner"])
async def test_every_project_role_may_read_its_usage_by_id_or_name(app, client, role):
    project = await make_project(client)
    await insert(app, usage(project, at(2)))
    headers = await make_key(client, project["id"], role)
    for ref in (project["id"], project["name"]):
        resp = await get_usage(client, headers, project=ref)
        assert resp.status_code == 200, resp.text
        assert resp.json()["totals"]["requests"] == 1


async def test_another_projects_usage_answers_404_and_shows_nothing(app, client):
    mine, theirs = await make_project(client), await make_project(client)
    their_key, _ = await key_id(client, theirs)
    their_deployment = await deployment(app, theirs, "theirs")
    await insert(
        app,
        usage(theirs, at(2), key_id=uuid.UUID(their_key), deployment_id=uuid.UUID(their_deployment)),
    )
    owner = await make_key(client, mine["id"], "owner")
    for ref in (theirs["id"], theirs["name"], str(uuid.uuid4()), "no-such-project"):
        resp = await get_usage(client, owner, project=ref)
        assert resp.status_code == 404, resp.text
        assert resp.headers["content-type"] == "application/problem+json"
        assert ref == theirs["id"] or theirs["id"] not in resp.text  # a name does not reveal the id
    # their key or deployment, asked about through my project, is not found either (not empty)
    for params in ({"key": their_key}, {"deployment": their_deployment}, {"deployment": "theirs"}):
        resp = await get_usage(client, owner, project=mine["id"], **params)
        assert resp.status_code == 404, (params, resp.text)
        assert theirs["id"] not in resp.text


async def test_only_admins_may_omit_the_project_and_then_see_every_project(app, client):
    one, two = await make_project(client), await make_project(client)
    await insert(app, usage(one, at(20)), usage(two, at(20)), usage(two, at(21)))
    viewer = await make_key(client, one["id"], "viewer")
    refused = await get_usage(client, viewer)
    assert refused.status_code == 422
    assert [e["field"] for e in refused.json()["errors"]] == ["query.project"]
    everything = await client.get(
        "/usage", params={"since": "2001-03-20", "until": "2001-03-21"}, headers=ADMIN
    )
    assert everything.json()["totals"]["requests"] == 3
    by_name = await get_usage(client, deployment="chat")
    assert by_name.status_code == 422 and by_name.json()["errors"][0]["field"] == "query.project"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"group_by": "day,week"}, "query.group_by.1"),
        ({"group_by": ""}, "query.group_by"),
        ({"since": "2001-03-10", "until": "2001-03-09"}, "query.until"),
        ({"since": "2001-03-10T10:00:00Z", "until": "2001-03-10T09:00:00Z"}, "query.until"),
        ({"since": "last tuesday"}, "query.since"),
        ({"until": "2001-02-30"}, "query.until"),
        ({"key": "not-a-uuid"}, "query.key"),
        ({"colour": "red"}, "query.colour"),
    ],
)
async def test_bad_query_parameters_are_422_naming_the_field(client, params, field):
    project = await make_project(client)
    resp = await client.get(
        "/usage", params={"project": project["id"], "since": SINCE, "until": UNTIL, **params}, headers=ADMIN
    )
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert [e["field"] for e in resp.json()["errors"]] == [field]


async def test_an_unknown_group_by_value_lists_the_allowed_ones(client):
    project = await make_project(client)
    resp = await get_usage(client, project=project["id"], group_by="week")
    assert "day" in resp.json()["detail"] and "endpoint" in resp.json()["detail"]
