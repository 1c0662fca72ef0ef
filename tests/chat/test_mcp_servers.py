"""`/mcp-servers`: who may register what (stdio is organisation-admin only), `check` starting a
server and listing its tools, clear 502s for a server that does not start or answers garbage,
and a stdio server's environment holding none of Converge's variables."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agents_support import STDIO, agent, bench, http_mcp_server, key, mcp_server, run, unique
from aiohttp import web
from scripted_llm import ScriptedLlm, call
from support import ADMIN, free_port, make_project


@pytest.fixture(scope="module")
async def mcp_url() -> AsyncIterator[str]:
    async with http_mcp_server() as url:
        yield url


@pytest.fixture
async def garbage_url() -> AsyncIterator[str]:
    """An HTTP server that answers every request with an HTML page."""

    async def page(_: web.Request) -> web.Response:
        return web.Response(text="<html><body>Not MCP</body></html>", content_type="text/html")

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", page)
    runner = web.AppRunner(application)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/mcp"
    await runner.cleanup()


async def test_only_organisation_admins_register_stdio_servers(client: Any) -> None:
    project = await make_project(client)
    owner, _ = await key(client, project["id"], "owner")
    developer, _ = await key(client, project["id"], "developer")
    params = {"project": project["id"]}
    stdio = {"name": "local", "transport": "stdio", "command": STDIO}

    refused = await client.post("/mcp-servers", params=params, json=stdio, headers=owner)
    assert refused.status_code == 403
    assert "organisation admins" in refused.json()["detail"]
    http = {"name": "remote", "transport": "http", "url": "https://tools.example/mcp"}
    assert (await client.post("/mcp-servers", params=params, json=http, headers=developer)).status_code == 403
    made = await client.post("/mcp-servers", params=params, json=http, headers=owner)
    assert made.status_code == 201, made.text
    admin = await client.post("/mcp-servers", params=params, json=stdio, headers=ADMIN)
    assert admin.status_code == 201, admin.text
    # Developers read them; a stdio server's env is shown by name only.
    listed = await client.get("/mcp-servers", params=params, headers=developer)
    assert {s["name"] for s in listed.json()["items"]} == {"local", "remote"}
    # Another project sees none of it.
    other = await make_project(client)
    stranger, _ = await key(client, other["id"], "owner")
    assert (await client.get(f"/mcp-servers/{made.json()['id']}", headers=stranger)).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"transport": "http"}, "url"),
        ({"transport": "http", "url": "ftp://x.example/mcp"}, "url"),
        ({"transport": "http", "url": "https://x.example/mcp", "command": ["/bin/true"]}, "command"),
        ({"transport": "stdio"}, "command"),
        ({"transport": "stdio", "command": ["/bin/true"], "env": {"BAD NAME": "x"}}, "env"),
    ],
)
async def test_a_malformed_server_is_refused_naming_the_field(
    client: Any, body: dict[str, Any], field: str
) -> None:
    project = await make_project(client)
    resp = await client.post(
        "/mcp-servers", params={"project": project["id"]}, json={"name": "x", **body}, headers=ADMIN
    )
    assert resp.status_code == 422, resp.text
    assert field in resp.json()["detail"]


async def test_check_lists_the_tools_over_stdio_and_http(client: Any, mcp_url: str) -> None:
    project = await make_project(client)
    for server in (
        await mcp_server(client, project["id"], name="local", transport="stdio", command=STDIO),
        await mcp_server(client, project["id"], name="remote", transport="http", url=mcp_url),
    ):
        resp = await client.post(f"/mcp-servers/{server['id']}/check", headers=ADMIN)
        assert resp.status_code == 200, resp.text
        tools = {t["name"]: t for t in resp.json()["tools"]}
        assert {"convert_units", "lookup_capital", "explode"} <= set(tools)
        assert tools["lookup_capital"]["function"] == f"mcp__{server['name']}__lookup_capital"
        assert tools["lookup_capital"]["parameters"]["required"] == ["country"]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["/nonexistent/mcp-server"], "the program '/nonexistent/mcp-server' was not found"),
        (
            [sys.executable, "-c", "print('hello, not json'); import sys; sys.exit(3)"],
            "closed the connection",
        ),
        (
            [sys.executable, "-c", "import sys; print('boom: no config', file=sys.stderr); sys.exit(1)"],
            "boom: no config",  # its stderr is quoted
        ),
    ],
)
async def test_a_stdio_server_that_does_not_start_is_a_clear_502(
    client: Any, command: list[str], expected: str
) -> None:
    project = await make_project(client)
    server = await mcp_server(
        client, project["id"], name="broken", transport="stdio", command=command, timeout_s=10
    )
    resp = await client.post(f"/mcp-servers/{server['id']}/check", headers=ADMIN)
    assert resp.status_code == 502, resp.text
    problem = resp.json()
    assert problem["mcp_server"] == "broken"
    assert problem["detail"].startswith("MCP server 'broken': ")
    assert expected in problem["detail"]


async def test_a_stdio_server_that_never_answers_times_out(client: Any) -> None:
    project = await make_project(client)
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    server = await mcp_server(
        client, project["id"], name="silent", transport="stdio", command=silent, timeout_s=1
    )
    resp = await client.post(f"/mcp-servers/{server['id']}/check", headers=ADMIN)
    assert resp.status_code == 502
    assert "did not start within 1 s" in resp.json()["detail"]


async def test_an_http_server_answering_garbage_or_nothing_is_a_clear_502(
    client: Any, garbage_url: str
) -> None:
    project = await make_project(client)
    garbage = await mcp_server(client, project["id"], name="garbage", transport="http", url=garbage_url)
    resp = await client.post(f"/mcp-servers/{garbage['id']}/check", headers=ADMIN)
    assert resp.status_code == 502
    assert "did not answer as an MCP server" in resp.json()["detail"]
    assert "text/html" in resp.json()["detail"]
    away = f"http://127.0.0.1:{free_port()}/mcp"
    gone = await mcp_server(client, project["id"], name="gone", transport="http", url=away)
    resp = await client.post(f"/mcp-servers/{gone['id']}/check", headers=ADMIN)
    assert resp.status_code == 502
    assert f"could not connect to {away}" in resp.json()["detail"]


async def test_a_run_whose_mcp_server_does_not_start_is_a_502_and_calls_no_model(
    app: Any, committed_client: Any
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        await mcp_server(
            client, b.project["id"], name="broken", transport="stdio", command=["/nonexistent/x"]
        )
        made = await agent(client, b, tools={"mcp_servers": ["broken"]})
        resp = await run(client, made["id"], "go", headers=b.developer)
        assert resp.status_code == 502
        assert "was not found" in resp.json()["detail"]
        assert llm.requests == []


async def test_a_stdio_server_inherits_none_of_convergess_environment(
    app: Any, committed_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = committed_client
    monkeypatch.setenv("CONVERGE_TEST_SECRET", "s3cret")
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        await mcp_server(
            client,
            b.project["id"],
            name="tools",
            transport="stdio",
            command=STDIO,
            env={"TOOLS_TOKEN": "abc"},
        )
        made = await agent(client, b, tools={"mcp_servers": ["tools"]})
        probe = ["CONVERGE_TEST_SECRET", "CONVERGE_DATABASE_URL", "TOOLS_TOKEN", "PATH"]
        llm.reply(tool_calls=[call("mcp__tools__env_probe", {"names": probe})])
        llm.reply("ok")
        result = (await run(client, made["id"], "env?", headers=b.developer)).json()
        seen = json.loads(result["steps"][0]["result"])
        assert seen == {
            "CONVERGE_TEST_SECRET": False,
            "CONVERGE_DATABASE_URL": False,
            "TOOLS_TOKEN": True,
            "PATH": True,
        }
        assert "CONVERGE_TEST_SECRET" in os.environ  # it was there to inherit


async def test_a_server_in_use_by_an_agent_is_not_deleted(
    app: Any, committed_client: Any, mcp_url: str
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        server = await mcp_server(client, b.project["id"], name=unique("t"), transport="http", url=mcp_url)
        made = await agent(client, b, tools={"mcp_servers": [server["name"]]})
        busy = await client.delete(f"/mcp-servers/{server['id']}", headers=b.owner)
        assert busy.status_code == 409
        assert made["name"] in busy.json()["detail"]
        patched = await client.patch(f"/agents/{made['id']}", json={"tools": {}}, headers=b.developer)
        assert patched.status_code == 200, patched.text
        assert (await client.delete(f"/mcp-servers/{server['id']}", headers=b.owner)).status_code == 204
        assert (await client.get(f"/mcp-servers/{server['id']}", headers=ADMIN)).status_code == 404
