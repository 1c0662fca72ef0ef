"""Credentials at the edge: every route needs one, bad ones are refused, tenants are isolated."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update
from support import ADMIN, make_key, make_project

from converge.models import ApiKey

PUBLIC = {"/health", "/readiness", "/metrics"}


async def _operations(client):
    spec = (await client.get("/openapi.json", headers=ADMIN)).json()
    for path, item in spec["paths"].items():
        for method in item:
            yield method.upper(), path


def _fill(path: str, **values: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), str(uuid.uuid4())), path)


async def test_openapi_lists_the_auth_schemes_and_needs_a_credential(client):
    assert (await client.get("/openapi.json")).status_code == 401
    spec = (await client.get("/openapi.json", headers=ADMIN)).json()
    assert {"apiKey", "oidc"} <= set(spec["components"]["securitySchemes"])
    assert "Problem" in spec["components"]["schemas"]


@pytest.mark.parametrize("token", [None, "garbage", "cvg_000000000000_wrongsecret"])
async def test_every_route_but_health_readiness_metrics_needs_a_credential(client, token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    checked = 0
    async for method, path in _operations(client):
        resp = await client.request(method, _fill(path), headers=headers)
        if path in PUBLIC:
            assert resp.status_code == 200, (method, path)
        else:
            assert resp.status_code == 401, (method, path, resp.status_code)
            assert resp.headers["content-type"] == "application/problem+json"
            checked += 1
    assert checked >= 15


async def test_another_projects_objects_answer_404_on_every_project_route(client):
    mine, theirs = await make_project(client), await make_project(client)
    owner = await make_key(client, mine["id"], "owner")
    their_key = (
        await client.post(f"/projects/{theirs['id']}/keys", json={"name": "t"}, headers=ADMIN)
    ).json()
    their_member = (
        await client.post(
            f"/projects/{theirs['id']}/members", json={"subject": "bob", "role": "viewer"}, headers=ADMIN
        )
    ).json()
    bodies = {
        ("PATCH", "/projects/{project_id}"): {"description": "x"},
        ("POST", "/projects/{project_id}/members"): {"subject": "s", "role": "viewer"},
        ("PATCH", "/projects/{project_id}/members/{member_id}"): {"role": "viewer"},
        ("POST", "/projects/{project_id}/keys"): {"name": "x", "role": "viewer"},
        ("PATCH", "/projects/{project_id}/keys/{key_id}"): {"limits": {"rpm": 1}},
    }
    checked = 0
    async for method, path in _operations(client):
        if "{project_id}" not in path:
            continue
        url = _fill(path, project_id=theirs["id"], key_id=their_key["id"], member_id=their_member["id"])
        body = bodies.get((method, path))
        resp = await client.request(method, url, json=body, headers=owner)
        assert resp.status_code == 404, (method, path, resp.text)
        checked += 1
        # and their objects addressed through my project are not found either
        if "{key_id}" in path or "{member_id}" in path:
            url = _fill(path, project_id=mine["id"], key_id=their_key["id"], member_id=their_member["id"])
            assert (await client.request(method, url, json=body, headers=owner)).status_code == 404
    assert checked >= 8
    still = await client.get(f"/projects/{theirs['id']}/keys", headers=ADMIN)
    assert [k["revoked_at"] for k in still.json()["items"]] == [None]


async def test_malformed_json_is_400_and_changes_nothing(client):
    before = (await client.get("/projects", headers=ADMIN)).json()["items"]
    resp = await client.post(
        "/projects", content=b'{"name": "x",', headers={**ADMIN, "content-type": "application/json"}
    )
    assert resp.status_code == 400
    assert resp.headers["content-type"] == "application/problem+json"
    assert "Malformed JSON" in resp.json()["detail"]
    assert (await client.get("/projects", headers=ADMIN)).json()["items"] == before


async def test_unknown_fields_are_422_naming_the_field(client):
    resp = await client.post("/projects", json={"name": "ok-name", "colour": "red"}, headers=ADMIN)
    assert resp.status_code == 422
    assert [e["field"] for e in resp.json()["errors"]] == ["colour"]


async def test_invalid_project_name_says_what_is_allowed(client):
    resp = await client.post("/projects", json={"name": "Not Valid!"}, headers=ADMIN)
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["field"] == "name"


async def test_oversize_body_is_413(client, settings):
    big = b'{"name": "' + b"a" * (settings.server.max_body_bytes + 10) + b'"}'
    resp = await client.post("/projects", content=big, headers={**ADMIN, "content-type": "application/json"})
    assert resp.status_code == 413
    assert resp.headers["content-type"] == "application/problem+json"


async def test_duplicate_project_name_is_409(client):
    await make_project(client, "twin")
    resp = await client.post("/projects", json={"name": "twin"}, headers=ADMIN)
    assert resp.status_code == 409 and "twin" in resp.json()["detail"]


async def test_revoked_and_expired_keys_are_refused_with_the_reason(app, client):
    project = await make_project(client)
    created = (
        await client.post(
            f"/projects/{project['id']}/keys", json={"name": "k", "role": "viewer"}, headers=ADMIN
        )
    ).json()
    headers = {"Authorization": f"Bearer {created['token']}"}
    assert (await client.get(f"/projects/{project['id']}", headers=headers)).status_code == 200

    async with app.state.converge.session_factory() as session, session.begin():
        past = datetime.now(UTC) - timedelta(minutes=1)
        await session.execute(
            update(ApiKey).where(ApiKey.id == uuid.UUID(created["id"])).values(expires_at=past)
        )
    expired = await client.get(f"/projects/{project['id']}", headers=headers)
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]

    other = await make_key(client, project["id"], "viewer")
    key_id = (await client.get(f"/projects/{project['id']}/keys", headers=ADMIN)).json()["items"][-1]["id"]
    await client.delete(f"/projects/{project['id']}/keys/{key_id}", headers=ADMIN)
    revoked = await client.get(f"/projects/{project['id']}", headers=other)
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]


async def test_keys_are_stored_hashed_and_record_last_use(app, client):
    project = await make_project(client)
    created = (await client.post(f"/projects/{project['id']}/keys", json={"name": "k"}, headers=ADMIN)).json()
    assert created["token"].startswith(f"cvg_{created['prefix']}_")
    await client.get(f"/projects/{project['id']}", headers={"Authorization": f"Bearer {created['token']}"})
    async with app.state.converge.session_factory() as session:
        key = await session.get(ApiKey, uuid.UUID(created["id"]))
        assert key is not None and key.last_used_at is not None
        secret = created["token"].split("_", 2)[2]
        assert secret not in key.secret_hash and len(key.secret_hash) == 64
    listed = (await client.get(f"/projects/{project['id']}/keys", headers=ADMIN)).json()["items"]
    assert all("token" not in k for k in listed)


async def test_mutations_write_audit_and_event_in_the_same_transaction(client):
    project = await make_project(client)
    audit = (await client.get("/audit", params={"project": project["id"]}, headers=ADMIN)).json()["items"]
    events = (await client.get("/events", params={"project": project["id"]}, headers=ADMIN)).json()["items"]
    assert [a["action"] for a in audit] == ["project.created"]
    assert [e["kind"] for e in events] == ["project.created"]
    assert audit[0]["request_id"]


async def test_metrics_expose_requests_by_route_and_pool(client):
    await client.get("/health")
    text = (await client.get("/metrics")).text
    assert 'converge_http_requests_total{method="GET",route="/health",status="200"}' in text
    assert "converge_http_request_duration_seconds_bucket" in text
    assert "converge_db_pool_checked_out" in text


async def test_responses_carry_a_request_id(client):
    resp = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    assert len((await client.get("/health")).headers["x-request-id"]) == 32
