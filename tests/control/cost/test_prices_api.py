"""/cost/prices over HTTP: read by anyone signed in, changed by organisation admins only, every
change a new audited version. Writes run in the rolled-back `client` transaction."""

from __future__ import annotations

from typing import Any

import httpx
from support import ADMIN, make_key, make_project

from converge.control.cost import service

SPOT = {"zones": {"default": {"gpus": {"H100": {"spot": 1.75}}}}}


async def current(
    client: httpx.AsyncClient, headers: dict[str, str] = ADMIN, **params: Any
) -> dict[str, Any]:
    resp = await client.get("/cost/prices", params=params, headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_every_signed_in_principal_reads_the_seeded_catalogue(client):
    project = await make_project(client)
    viewer = await make_key(client, project["id"], "viewer")
    body = await current(client, viewer)
    first = await current(client, version=1)
    assert first["created_by"] == "system" and "prices.yaml" in first["note"]
    assert first["catalogue"] == service.shipped_catalogue()
    assert {"default", "eu-west", "us-east"} <= set(body["catalogue"]["zones"])
    assert (await client.get("/cost/prices")).status_code == 401


async def test_seeding_is_idempotent(app):
    async with app.state.converge.sessions() as session:
        assert await service.seed(session) is False  # the start seeded version 1 already
        await session.rollback()


async def test_project_roles_cannot_change_prices_and_org_admins_can(client):
    project = await make_project(client)
    owner = await make_key(client, project["id"], "owner")
    resp = await client.patch("/cost/prices", json=SPOT, headers=owner)
    assert resp.status_code == 403, resp.text
    assert "cost:write" in resp.json()["detail"]
    key = await client.post("/keys", json={"name": "prices-admin", "role": "admin"}, headers=ADMIN)
    admin = {"Authorization": f"Bearer {key.json()['token']}"}
    before = await current(client)
    resp = await client.patch("/cost/prices", json=SPOT, params={"note": "spot dropped"}, headers=admin)
    assert resp.status_code == 200, resp.text
    assert resp.json()["version"] == before["version"] + 1


async def test_a_patch_is_a_new_version_the_old_one_stays_readable_and_audited(client):
    before = await current(client)
    resp = await client.patch("/cost/prices", json=SPOT, params={"note": "spot dropped"}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    after = resp.json()
    assert after["version"] == before["version"] + 1 and after["note"] == "spot dropped"
    assert after["catalogue"]["zones"]["default"]["gpus"]["H100"] == {"on_demand": 3.9, "spot": 1.75}
    assert after["catalogue"]["zones"]["us-east"] == before["catalogue"]["zones"]["us-east"]
    old = await current(client, version=before["version"])
    assert old["catalogue"] == before["catalogue"]
    assert (await current(client))["version"] == after["version"]

    listed = (await client.get("/cost/prices/versions", headers=ADMIN)).json()["items"]
    assert [v["version"] for v in listed[:2]] == [after["version"], before["version"]]
    audit = await client.get("/audit", params={"action": "price_catalogue.updated"}, headers=ADMIN)
    (entry, *_) = audit.json()["items"]
    assert entry["object_id"] == str(after["version"])
    assert entry["changes"]["changed"] == {"zones.default.gpus.H100.spot": [1.95, 1.75]}
    assert entry["changes"]["note"] == "spot dropped"


async def test_put_replaces_the_catalogue_and_an_unchanged_one_makes_no_version(client):
    before = await current(client)
    same = await client.put("/cost/prices", json=before["catalogue"], headers=ADMIN)
    assert same.status_code == 200 and same.json()["version"] == before["version"]
    smaller = dict(before["catalogue"])
    smaller["zones"] = {"default": before["catalogue"]["zones"]["default"]}
    resp = await client.put("/cost/prices", json=smaller, params={"note": "one zone"}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert set(resp.json()["catalogue"]["zones"]) == {"default"}
    assert resp.json()["version"] == before["version"] + 1


async def test_an_invalid_catalogue_is_a_422_naming_the_field_and_stores_nothing(client):
    before = await current(client)
    bad_put = dict(before["catalogue"], hours_per_month=-1)
    resp = await client.put("/cost/prices", json=bad_put, headers=ADMIN)
    assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json"
    assert [e["field"] for e in resp.json()["errors"]] == ["hours_per_month"]

    resp = await client.patch(
        "/cost/prices",
        json={"zones": {"default": {"gpus": {"B200": {"on_demand": 6, "spot": 3}}}}},
        headers=ADMIN,
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["field"] == "zones.default.gpus.B200"
    assert "not a GPU type" in resp.json()["detail"]

    resp = await client.patch("/cost/prices", json={"zones": {"default": None}}, headers=ADMIN)
    assert resp.status_code == 422, resp.text  # merge-patch null removes the zone default_zone names
    assert resp.json()["errors"][0]["field"] == "default_zone"
    assert (await current(client))["version"] == before["version"]


async def test_a_change_based_on_an_old_version_is_a_409(client):
    before = await current(client)
    first = await client.patch(
        "/cost/prices", json=SPOT, params={"base_version": before["version"]}, headers=ADMIN
    )
    assert first.status_code == 200, first.text
    stale = await client.patch(
        "/cost/prices", json={"currency": "EUR"}, params={"base_version": before["version"]}, headers=ADMIN
    )
    assert stale.status_code == 409, stale.text
    assert stale.json()["version"] == before["version"] + 1


async def test_an_unknown_version_is_404_and_a_bad_one_422(client):
    latest = await current(client)
    resp = await client.get("/cost/prices", params={"version": latest["version"] + 1000}, headers=ADMIN)
    assert resp.status_code == 404 and f"1 to {latest['version']}" in resp.json()["detail"]
    assert (await client.get("/cost/prices", params={"version": 0}, headers=ADMIN)).status_code == 422
