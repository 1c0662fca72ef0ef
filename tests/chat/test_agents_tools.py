"""The built-in tools: `http_fetch` holds to its allow-list (redirects included) and caps what it
reads; `knowledge_base_search` searches the agent's own project's knowledge bases through the
real MiniLM replica; tool names fit OpenAI's rule."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agents_support import agent, bench, run, unique
from aiohttp import web
from rag_support import MiniLM, add_document, minilm, minilm_replica
from scripted_llm import ScriptedLlm, call
from support import ADMIN, free_port, make_project

from converge.control.chat.tools.base import NAME_RULE, function_name
from converge.control.chat.tools.builtin import allowed
from converge.models import KnowledgeBase

__all__ = ["minilm", "minilm_replica"]  # the fixtures


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://api.example.com/docs", True),
        ("https://api.example.com/docs/a/b?q=1", True),
        ("https://API.example.com:443/docs/a", True),
        ("https://api.example.com/docs-private", False),
        ("https://api.example.com/", False),
        ("https://api.example.com.evil.net/docs/a", False),
        ("http://api.example.com/docs/a", False),
        ("https://api.example.com:8443/docs/a", False),
        ("https://user:pw@api.example.com/docs/a", False),
        ("https://files.example.com/pub/x", True),
        ("file:///etc/passwd", False),
        ("https://[::1/docs", False),
    ],
)
def test_the_allow_list_compares_scheme_host_port_and_path_segments(url: str, ok: bool) -> None:
    assert allowed(url, ["https://api.example.com/docs", "https://files.example.com/pub/"]) is ok


def test_tool_names_fit_openais_rule() -> None:
    assert function_name("mcp", "tools", "convert_units") == "mcp__tools__convert_units"
    odd = function_name("mcp", "tools", "get.weather/now")
    assert NAME_RULE.match(odd) and odd.startswith("mcp__tools__get_weather_now_")
    long = function_name("mcp", "s" * 63, "t" * 80)
    assert NAME_RULE.match(long) and len(long) == 64
    assert long != function_name("mcp", "s" * 63, "t" * 81)


@pytest.fixture
async def site() -> AsyncIterator[str]:
    async def page(_: web.Request) -> web.Response:
        return web.Response(text="The answer is 42.")

    async def big(_: web.Request) -> web.Response:
        return web.Response(text="x" * 5000)

    def redirect(to: str) -> Any:
        async def handler(_: web.Request) -> web.Response:
            raise web.HTTPFound(to)

        return handler

    application = web.Application()
    application.router.add_get("/docs/page", page)
    application.router.add_get("/docs/big", big)
    application.router.add_get("/docs/in", redirect("/docs/page"))
    application.router.add_get("/docs/out", redirect("/private"))
    application.router.add_get("/private", page)
    runner = web.AppRunner(application)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_http_fetch_fetches_inside_the_allow_list_only(
    app: Any, committed_client: Any, site: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = committed_client
    state = app.state.converge
    chat = state.settings.chat.model_copy(update={"http_fetch_max_bytes": 1000})
    monkeypatch.setattr(state, "settings", state.settings.model_copy(update={"chat": chat}))
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        made = await agent(client, b, tools={"http_fetch": {"allow": [f"{site}/docs/"]}})
        urls = [
            f"{site}/docs/page",
            f"{site}/private",
            f"{site}/docs/out",
            f"{site}/docs/in",
            f"{site}/docs/big",
        ]
        llm.reply(tool_calls=[call("http_fetch", {"url": u}) for u in urls])
        llm.reply("done")

        result = (await run(client, made["id"], "fetch", headers=b.developer)).json()

        page, private, out, inside, big = result["steps"]
        assert page["error"] is None and page["result"].endswith("The answer is 42.")
        assert page["result"].startswith(f"GET {site}/docs/page -> 200")
        assert private["result"] is None and "not under the agent's allow-list" in private["error"]
        assert (
            out["result"] is None and f"{site}/private is not under" in out["error"]
        )  # the redirect's target
        assert inside["error"] is None and inside["result"].endswith("The answer is 42.")
        assert big["error"] is None and "(first 1000 bytes)" in big["result"]
        assert big["result"].split("\n\n", 1)[1] == "x" * 1000
        offered = llm.requests[0]["tools"][0]["function"]
        assert offered["name"] == "http_fetch" and f"{site}/docs/" in offered["description"]


async def test_knowledge_base_search_returns_chunks_of_the_agents_project_only(
    app: Any, committed_client: Any, minilm: MiniLM
) -> None:
    client = committed_client
    state = app.state.converge
    project_id = minilm.project["id"]
    made_kb = await client.post(
        "/knowledge-bases",
        params={"project": project_id},
        json={"name": unique("ops"), "embedding_deployment": "minilm"},
        headers=minilm.key,
        timeout=60,
    )
    assert made_kb.status_code == 201, made_kb.text
    kb = made_kb.json()
    texts = [
        "Rotate API keys by creating the new key first, then revoking the old one.",
        "Bread needs flour.",
    ]
    vectors = await minilm.embed(texts)
    doc = await add_document(
        app, kb, source="keys.md", chunks=[(t, v, {}) for t, v in zip(texts, vectors, strict=True)]
    )
    # Another project's knowledge base: an agent here cannot name it.
    other = await make_project(client)
    async with state.sessions() as session, session.begin():
        foreign = KnowledgeBase(
            project_id=uuid.UUID(other["id"]),
            name=unique("secret"),
            embedding_deployment_id=None,
            dimension=384,
            max_tokens=256,
            chunking={"tokens": 64, "overlap": 8},
            retrieval={"k": 5, "mode": "hybrid"},
            metadata_keys=[],
            created_by="test",
        )
        session.add(foreign)
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm, project=minilm.project)
        spec = {"knowledge_base_search": {"knowledge_bases": [str(foreign.id)]}}
        refused = await client.post(
            "/agents",
            params={"project": project_id},
            json={"name": unique("a"), "chat_deployment": b.deployment["name"], "tools": spec},
            headers=b.developer,
        )
        assert refused.status_code == 404
        assert str(foreign.id) in refused.json()["detail"]

        made = await agent(
            client, b, tools={"knowledge_base_search": {"knowledge_bases": [kb["name"]], "k": 2}}
        )
        llm.reply(tool_calls=[call("knowledge_base_search", {"query": "how do I rotate an API key?"})])
        llm.reply("Create the new key first.")
        resp = await run(client, made["id"], "How do I rotate keys?", headers=b.developer)

        assert resp.status_code == 200, resp.text
        step = resp.json()["steps"][0]
        assert step["error"] is None
        results = json.loads(step["result"])["results"]
        assert results[0]["document_id"] == doc and results[0]["knowledge_base"] == kb["name"]
        assert "Rotate API keys" in results[0]["text"]
        assert {r["knowledge_base"] for r in results} == {kb["name"]}
        sent = [m for m in llm.requests[1]["messages"] if m["role"] == "tool"][0]
        assert json.loads(sent["content"])["results"][0]["chunk_id"] == results[0]["chunk_id"]
    await client.delete(f"/knowledge-bases/{kb['id']}", headers=ADMIN)
