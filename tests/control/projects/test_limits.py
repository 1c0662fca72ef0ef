"""Gateway limits on projects and keys: set, read, change in place, validated, audited, evented."""

from __future__ import annotations

import uuid

import pytest
from support import ADMIN, make_key, make_project


async def _events(client, project_id: str, kind: str) -> list[dict]:
    params = {"project": project_id, "kind": kind}
    return (await client.get("/events", params=params, headers=ADMIN)).json()["items"]


async def _audit(client, project_id: str, action: str) -> list[dict]:
    params = {"project": project_id, "action": action}
    return (await client.get("/audit", params=params, headers=ADMIN)).json()["items"]


async def _issue(client, project_id: str, headers=ADMIN, **body) -> dict:
    resp = await client.post(
        f"/projects/{project_id}/keys", json={"name": "k", "role": "viewer", **body}, headers=headers
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


async def test_a_project_stores_only_the_limits_that_are_set(client):
    plain = await make_project(client)
    assert plain["limits"] == {}
    resp = await client.post(
        "/projects",
        json={"name": f"p-{uuid.uuid4().hex[:8]}", "limits": {"rpm": 60, "tpm": None}},
        headers=ADMIN,
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["limits"] == {"rpm": 60}
    read = await client.get(f"/projects/{resp.json()['id']}", headers=ADMIN)
    assert read.json()["limits"] == {"rpm": 60}
    created = await _events(client, resp.json()["id"], "project.created")
    assert created[0]["data"]["limits"] == {"rpm": 60}


async def test_updating_limits_replaces_them_clears_with_empty_and_null_leaves_them(client):
    project = await make_project(client)
    url = f"/projects/{project['id']}"
    body = {"limits": {"rpm": 10, "concurrency": 2, "monthly_tokens": 5_000_000_000}}
    set_ = await client.patch(url, json=body, headers=ADMIN)
    assert set_.json()["limits"] == {"rpm": 10, "concurrency": 2, "monthly_tokens": 5_000_000_000}
    replaced = await client.patch(url, json={"limits": {"tpm": 1000}}, headers=ADMIN)
    assert replaced.json()["limits"] == {"tpm": 1000}
    left = await client.patch(url, json={"limits": None, "description": "d"}, headers=ADMIN)
    assert left.json()["limits"] == {"tpm": 1000}
    untouched = await client.patch(url, json={"quotas": {"gpus": 1}}, headers=ADMIN)
    assert untouched.json()["limits"] == {"tpm": 1000}
    cleared = await client.patch(url, json={"limits": {}}, headers=ADMIN)
    assert cleared.json()["limits"] == {}


async def test_changing_project_limits_is_audited_and_evented(client):
    project = await make_project(client)
    await client.patch(f"/projects/{project['id']}", json={"limits": {"rpm": 5}}, headers=ADMIN)
    events = await _events(client, project["id"], "project.updated")
    assert [e["data"]["limits"] for e in events] == [{"rpm": 5}]
    audit = await _audit(client, project["id"], "project.updated")
    assert audit[0]["changes"] == {"limits": {"rpm": 5}}


@pytest.mark.parametrize(("role", "expected"), [("owner", 200), ("developer", 403), ("viewer", 403)])
async def test_project_limits_need_project_write_like_quotas(client, role, expected):
    project = await make_project(client)
    headers = await make_key(client, project["id"], role)
    resp = await client.patch(f"/projects/{project['id']}", json={"limits": {"rpm": 1}}, headers=headers)
    assert resp.status_code == expected, resp.text


@pytest.mark.parametrize("value", [0, -1, 1.5, "many"])
@pytest.mark.parametrize("name", ["rpm", "tpm", "concurrency", "monthly_tokens"])
async def test_limits_below_one_or_not_integers_are_422_naming_the_field(client, name, value):
    project = await make_project(client)
    resp = await client.patch(f"/projects/{project['id']}", json={"limits": {name: value}}, headers=ADMIN)
    assert resp.status_code == 422
    assert [e["field"] for e in resp.json()["errors"]] == [f"limits.{name}"]
    key = await client.post(
        f"/projects/{project['id']}/keys", json={"name": "k", "limits": {name: value}}, headers=ADMIN
    )
    assert key.status_code == 422
    assert [e["field"] for e in key.json()["errors"]] == [f"limits.{name}"]


async def test_unknown_limit_names_are_422(client):
    resp = await client.post(
        "/projects", json={"name": f"p-{uuid.uuid4().hex[:8]}", "limits": {"rph": 5}}, headers=ADMIN
    )
    assert resp.status_code == 422
    assert [e["field"] for e in resp.json()["errors"]] == ["limits.rph"]


async def test_keys_carry_their_limits(client):
    project = await make_project(client)
    created = await _issue(client, project["id"], limits={"rpm": 30, "concurrency": None})
    assert created["limits"] == {"rpm": 30}
    plain = await _issue(client, project["id"])
    assert plain["limits"] == {}
    listed = (await client.get(f"/projects/{project['id']}/keys", headers=ADMIN)).json()["items"]
    assert {k["id"]: k["limits"] for k in listed} == {created["id"]: {"rpm": 30}, plain["id"]: {}}
    events = await _events(client, project["id"], "key.created")
    assert {e["object_id"]: e["data"]["limits"] for e in events} == {
        created["id"]: {"rpm": 30},
        plain["id"]: {},
    }


async def test_patching_a_key_changes_limits_and_name_in_place(client):
    project = await make_project(client)
    created = await _issue(client, project["id"], limits={"rpm": 30})
    url = f"/projects/{project['id']}/keys/{created['id']}"
    resp = await client.patch(url, json={"limits": {"tpm": 900}, "name": "renamed"}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert resp.json()["limits"] == {"tpm": 900} and resp.json()["name"] == "renamed"
    assert "token" not in resp.json()
    left = await client.patch(url, json={"name": "again"}, headers=ADMIN)
    assert left.json()["limits"] == {"tpm": 900}
    cleared = await client.patch(url, json={"limits": {}}, headers=ADMIN)
    assert cleared.json()["limits"] == {} and cleared.json()["name"] == "again"
    # the same secret still authenticates
    headers = {"Authorization": f"Bearer {created['token']}"}
    assert (await client.get(f"/projects/{project['id']}", headers=headers)).status_code == 200


async def test_patching_a_key_is_audited_and_evented_without_the_secret(client):
    project = await make_project(client)
    created = await _issue(client, project["id"])
    url = f"/projects/{project['id']}/keys/{created['id']}"
    await client.patch(url, json={"limits": {"rpm": 7}}, headers=ADMIN)
    events = await _events(client, project["id"], "key.updated")
    assert [(e["object_id"], e["data"]["limits"]) for e in events] == [(created["id"], {"rpm": 7})]
    audit = await _audit(client, project["id"], "key.updated")
    assert audit[0]["changes"] == {"prefix": created["prefix"], "limits": {"rpm": 7}}
    secret = created["token"].split("_", 2)[2]
    assert secret not in str(events) and secret not in str(audit)


@pytest.mark.parametrize(("role", "expected"), [("owner", 200), ("developer", 200), ("viewer", 403)])
async def test_patching_a_key_needs_keys_write(client, role, expected):
    project = await make_project(client)
    target = await _issue(client, project["id"])
    headers = await make_key(client, project["id"], role)
    resp = await client.patch(
        f"/projects/{project['id']}/keys/{target['id']}", json={"limits": {"rpm": 1}}, headers=headers
    )
    assert resp.status_code == expected, resp.text


async def test_nobody_changes_a_key_above_their_own_role(client):
    project = await make_project(client)
    owner_key = await _issue(client, project["id"], role="owner")
    developer = await make_key(client, project["id"], "developer")
    resp = await client.patch(
        f"/projects/{project['id']}/keys/{owner_key['id']}", json={"limits": {"rpm": 1}}, headers=developer
    )
    assert resp.status_code == 403 and "above your own role" in resp.json()["detail"]


async def test_a_revoked_key_cannot_be_patched(client):
    project = await make_project(client)
    created = await _issue(client, project["id"])
    url = f"/projects/{project['id']}/keys/{created['id']}"
    await client.delete(url, headers=ADMIN)
    resp = await client.patch(url, json={"limits": {"rpm": 1}}, headers=ADMIN)
    assert resp.status_code == 409 and "revoked" in resp.json()["detail"]


async def test_a_key_is_patched_only_through_its_own_project(client):
    mine, theirs = await make_project(client), await make_project(client)
    their_key = await _issue(client, theirs["id"])
    resp = await client.patch(
        f"/projects/{mine['id']}/keys/{their_key['id']}", json={"limits": {"rpm": 1}}, headers=ADMIN
    )
    assert resp.status_code == 404
    org_key = (await client.post("/keys", json={"name": "org"}, headers=ADMIN)).json()
    via_project = await client.patch(
        f"/projects/{mine['id']}/keys/{org_key['id']}", json={"limits": {"rpm": 1}}, headers=ADMIN
    )
    assert via_project.status_code == 404


async def test_organisation_keys_take_limits_and_are_patched_by_admins_only(client):
    created = await client.post("/keys", json={"name": "org", "limits": {"concurrency": 4}}, headers=ADMIN)
    assert created.status_code == 201 and created.json()["limits"] == {"concurrency": 4}
    key_id = created.json()["id"]
    patched = await client.patch(f"/keys/{key_id}", json={"limits": {"rpm": 100}}, headers=ADMIN)
    assert patched.status_code == 200 and patched.json()["limits"] == {"rpm": 100}
    project = await make_project(client)
    owner = await make_key(client, project["id"], "owner")
    assert (await client.patch(f"/keys/{key_id}", json={"limits": {}}, headers=owner)).status_code == 403
    project_key = await _issue(client, project["id"])
    assert (
        await client.patch(f"/keys/{project_key['id']}", json={"limits": {}}, headers=ADMIN)
    ).status_code == 404
