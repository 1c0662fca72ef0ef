"""/rulesets: versions, project isolation, attaching as a deployment's default, bad specs."""

from __future__ import annotations

from typing import Any

import httpx
from support import ADMIN, make_key, make_project

from converge.control.events import repository as events_repository
from converge.gateway import hits

SPEC = {"system": "Be brief.", "input": {"blocked_terms": ["zeus"]}, "output": {"redact": ["email"]}}


async def _ruleset(client: httpx.AsyncClient, project: dict[str, Any], **body: Any) -> dict[str, Any]:
    resp = await client.post(
        "/rulesets",
        params={"project": project["id"]},
        json={"name": "house", "spec": SPEC, **body},
        headers=ADMIN,
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


async def test_each_spec_change_is_a_new_version(client: httpx.AsyncClient) -> None:
    project = await make_project(client)
    ruleset = await _ruleset(client, project)
    assert ruleset["version"] == 1
    assert ruleset["spec"]["input"] == {"blocked_terms": ["zeus"], "patterns": [], "redact": []}
    changed = {**SPEC, "output": {"redact": ["email", "card"], "max_tokens": 64}}
    resp = await client.patch(f"/rulesets/{ruleset['id']}", json={"spec": changed}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert resp.json()["version"] == 2 and resp.json()["spec"]["output"]["max_tokens"] == 64
    same = await client.patch(f"/rulesets/{ruleset['id']}", json={"spec": changed}, headers=ADMIN)
    assert same.json()["version"] == 2  # nothing changed: no new version
    described = await client.patch(
        f"/rulesets/{ruleset['id']}", json={"description": "house rules"}, headers=ADMIN
    )
    assert described.json()["version"] == 2 and described.json()["description"] == "house rules"
    versions = (await client.get(f"/rulesets/{ruleset['id']}/versions", headers=ADMIN)).json()["items"]
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[1]["spec"]["output"]["redact"] == ["email"]
    listed = (await client.get("/rulesets", params={"project": project["id"]}, headers=ADMIN)).json()["items"]
    assert [r["id"] for r in listed] == [ruleset["id"]]


async def test_a_bad_pattern_is_a_422_naming_the_field(client: httpx.AsyncClient) -> None:
    project = await make_project(client)
    for spec, field in (
        ({"input": {"patterns": ["(unclosed"]}}, "spec.input.patterns[0].regex"),
        ({"output": {"patterns": [{"name": "slow", "regex": "(a*)*b"}]}}, "spec.output.patterns[0].regex"),
    ):
        resp = await client.post(
            "/rulesets", params={"project": project["id"]}, json={"name": "bad", "spec": spec}, headers=ADMIN
        )
        assert resp.status_code == 422, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert resp.json()["field"] == field
    listed = (await client.get("/rulesets", params={"project": project["id"]}, headers=ADMIN)).json()["items"]
    assert listed == []  # nothing half-written
    unknown = await client.post(
        "/rulesets",
        params={"project": project["id"]},
        json={"name": "bad", "spec": {"input": {"redact": ["ssn"]}}},
        headers=ADMIN,
    )
    assert unknown.status_code == 422 and "redact" in unknown.text


async def test_another_projects_ruleset_and_deployment_answer_404(client: httpx.AsyncClient) -> None:
    mine, theirs = await make_project(client), await make_project(client)
    ruleset = await _ruleset(client, theirs)
    key = await make_key(client, mine["id"], "owner")
    assert (await client.get(f"/rulesets/{ruleset['id']}", headers=key)).status_code == 404
    assert (await client.get(f"/rulesets/{ruleset['id']}/versions", headers=key)).status_code == 404
    assert (
        await client.patch(f"/rulesets/{ruleset['id']}", json={"description": "x"}, headers=key)
    ).status_code == 404
    assert (await client.delete(f"/rulesets/{ruleset['id']}", headers=key)).status_code == 404
    assert (await client.get("/rulesets", params={"project": theirs["id"]}, headers=key)).status_code == 404
    everything = (await client.get("/rulesets", headers=key)).json()["items"]
    assert ruleset["id"] not in [r["id"] for r in everything]


async def test_viewers_read_and_developers_write(client: httpx.AsyncClient) -> None:
    project = await make_project(client)
    ruleset = await _ruleset(client, project)
    viewer = await make_key(client, project["id"], "viewer")
    developer = await make_key(client, project["id"], "developer")
    assert (await client.get(f"/rulesets/{ruleset['id']}", headers=viewer)).status_code == 200
    assert (
        await client.patch(f"/rulesets/{ruleset['id']}", json={"description": "x"}, headers=viewer)
    ).status_code == 403
    made = await client.post(
        "/rulesets", params={"project": project["id"]}, json={"name": "dev-rules"}, headers=developer
    )
    assert made.status_code == 201, made.text


async def test_a_ruleset_attached_to_a_deployment_is_not_deleted(
    app: Any, committed_client: httpx.AsyncClient
) -> None:
    client = committed_client  # the deployments are made the way the scripted server needs
    from scripted_llm import ScriptedLlm, chat_deployment

    project, other = await make_project(client), await make_project(client)
    async with ScriptedLlm() as llm:
        deployment = await chat_deployment(app, client, project_id=project["id"], llm=llm, name="bot")
        foreign = await chat_deployment(app, client, project_id=other["id"], llm=llm, name="bot")
    ruleset = await _ruleset(client, project)
    url = f"/rulesets/{ruleset['id']}/deployments"
    assert (await client.put(f"{url}/{foreign['id']}", headers=ADMIN)).status_code == 404
    attached = await client.put(f"{url}/{deployment['id']}", headers=ADMIN)
    assert attached.status_code == 200, attached.text
    assert attached.json()["deployment"] == "bot"
    assert (await client.get(f"/rulesets/{ruleset['id']}", headers=ADMIN)).json()["deployments"] == [
        deployment["id"]
    ]
    refused = await client.delete(f"/rulesets/{ruleset['id']}", headers=ADMIN)
    assert refused.status_code == 409
    assert "deployment 'bot'" in refused.json()["detail"]
    assert (await client.delete(f"{url}/{deployment['id']}", headers=ADMIN)).status_code == 204
    assert (await client.delete(f"{url}/{deployment['id']}", headers=ADMIN)).status_code == 404
    assert (await client.delete(f"/rulesets/{ruleset['id']}", headers=ADMIN)).status_code == 204
    assert (await client.get(f"/rulesets/{ruleset['id']}", headers=ADMIN)).status_code == 404


def test_the_gateway_writes_events_under_the_outbox_lock() -> None:
    assert hits.EVENTS_LOCK_KEY == events_repository.EVENTS_LOCK_KEY
