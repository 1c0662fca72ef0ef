"""`/agents` CRUD: specs resolved inside the project (another project's objects are 404 as if
absent), every change a revision, names that are already model names refused, permissions."""

from __future__ import annotations

from typing import Any

import pytest
from agents_support import agent, bench, key, mcp_server, unique
from scripted_llm import ScriptedLlm
from support import ADMIN, make_project


async def test_create_update_revisions_and_delete(app: Any, committed_client: Any) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        made = await agent(client, b, system_prompt="v1", max_steps=3)
        assert made["revision"] == 1
        assert made["spec"]["chat_deployment"] == {"id": b.deployment["id"], "name": b.deployment["name"]}
        assert made["spec"]["max_steps"] == 3 and made["spec"]["token_budget"] is None

        patched = await client.patch(
            f"/agents/{made['id']}", json={"system_prompt": "v2", "token_budget": 1000}, headers=b.developer
        )
        assert patched.status_code == 200, patched.text
        assert patched.json()["revision"] == 2
        assert patched.json()["spec"]["system_prompt"] == "v2"
        # A description alone is no new revision; clearing the budget is.
        same = await client.patch(f"/agents/{made['id']}", json={"description": "d"}, headers=b.developer)
        assert same.json()["revision"] == 2 and same.json()["description"] == "d"
        cleared = await client.patch(
            f"/agents/{made['id']}", json={"token_budget": None}, headers=b.developer
        )
        assert cleared.json()["revision"] == 3 and cleared.json()["spec"]["token_budget"] is None

        revisions = (await client.get(f"/agents/{made['id']}/revisions", headers=b.developer)).json()["items"]
        assert [(r["revision"], r["spec"]["system_prompt"]) for r in revisions] == [
            (3, "v2"),
            (2, "v2"),
            (1, "v1"),
        ]
        listed = await client.get("/agents", params={"project": b.project["id"]}, headers=b.developer)
        assert [a["id"] for a in listed.json()["items"]] == [made["id"]]

        assert (await client.delete(f"/agents/{made['id']}", headers=b.developer)).status_code == 204
        assert (await client.get(f"/agents/{made['id']}", headers=b.developer)).status_code == 404


async def test_a_name_already_answering_as_a_model_is_refused(app: Any, committed_client: Any) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        body = {"name": b.deployment["name"], "chat_deployment": b.deployment["name"]}
        resp = await client.post(
            "/agents", params={"project": b.project["id"]}, json=body, headers=b.developer
        )
        assert resp.status_code == 409
        assert resp.json()["field"] == "name" and "deployment" in resp.json()["detail"]
        first = await agent(client, b)
        again = {"name": first["name"], "chat_deployment": b.deployment["name"]}
        dup = await client.post(
            "/agents", params={"project": b.project["id"]}, json=again, headers=b.developer
        )
        assert dup.status_code == 409


async def test_another_projects_objects_are_404_as_if_absent(app: Any, committed_client: Any) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        mine = await bench(app, client, llm)
        theirs = await bench(app, client, llm)
        foreign = await mcp_server(
            client, theirs.project["id"], name="theirs", transport="http", url="https://t.example/mcp"
        )
        base = {"name": unique("a"), "chat_deployment": mine.deployment["name"]}
        cases = [
            ({"chat_deployment": theirs.deployment["id"]}, "chat_deployment"),
            ({"tools": {"mcp_servers": [foreign["id"]]}}, "tools.mcp_servers[0]"),
            (
                {"tools": {"knowledge_base_search": {"knowledge_bases": ["nope"]}}},
                "tools.knowledge_base_search",
            ),
            ({"ruleset": "no-such-ruleset"}, "ruleset"),
        ]
        for extra, field in cases:
            resp = await client.post(
                "/agents",
                params={"project": mine.project["id"]},
                json={**base, **extra},
                headers=mine.developer,
            )
            assert resp.status_code == 404, (extra, resp.text)
            assert resp.json()["field"].startswith(field)
        made = await agent(client, mine)
        for path in (f"/agents/{made['id']}", f"/agents/{made['id']}/revisions"):
            assert (await client.get(path, headers=theirs.developer)).status_code == 404
        run = await client.post(
            f"/agents/{made['id']}/run",
            json={"messages": [{"role": "user", "content": "x"}]},
            headers=theirs.developer,
        )
        assert run.status_code == 404


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": 51}, "max_steps"),
        ({"token_budget": 0}, "token_budget"),
        ({"tools": {"http_fetch": {"allow": ["ftp://files.example/"]}}}, "tools.http_fetch.allow"),
        ({"tools": {"http_fetch": {"allow": ["https://u:p@x.example/"]}}}, "tools.http_fetch.allow"),
        ({"tools": {"shell": {}}}, "tools.shell"),
        ({"name": "Not A Label"}, "name"),
    ],
)
async def test_bad_specs_are_422_naming_the_field(client: Any, extra: dict[str, Any], field: str) -> None:
    project = await make_project(client)
    body = {"name": "a", "chat_deployment": "bot", **extra}
    resp = await client.post("/agents", params={"project": project["id"]}, json=body, headers=ADMIN)
    assert resp.status_code == 422, resp.text
    assert any(e["field"].startswith(field) for e in resp.json()["errors"]), resp.json()


async def test_viewers_read_agents_but_do_not_change_them(app: Any, committed_client: Any) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        viewer, _ = await key(client, b.project["id"], "viewer")
        made = await agent(client, b)
        assert (await client.get(f"/agents/{made['id']}", headers=viewer)).status_code == 200
        body = {"name": unique("v"), "chat_deployment": b.deployment["name"]}
        refused = await client.post("/agents", params={"project": b.project["id"]}, json=body, headers=viewer)
        assert refused.status_code == 403
        assert (await client.delete(f"/agents/{made['id']}", headers=viewer)).status_code == 403


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool"}],  # answers no call
        [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_1", "content": "r"}],
        [
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {}}]},
            {"role": "tool", "tool_call_id": "call_2", "content": "r"},  # not the call made
        ],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],  # nothing to answer
    ],
)
async def test_a_run_of_messages_no_model_would_take_is_422(
    app: Any, committed_client: Any, messages: list[dict[str, Any]]
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        made = await agent(client, b)
        resp = await client.post(
            f"/agents/{made['id']}/run", json={"messages": messages}, headers=b.developer
        )
        assert resp.status_code == 422, resp.text
        assert "messages" in resp.json()["detail"], resp.json()
        assert llm.requests == []  # refused before any model call
