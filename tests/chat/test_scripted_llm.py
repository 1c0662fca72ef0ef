"""The scripted chat server the chat, RAG and agent tests stand on: a deployment created through
the API routes to it, and it answers what the test scripted, streamed and not."""

from __future__ import annotations

import json
from typing import Any

from scripted_llm import ScriptedLlm, call, chat_deployment, routed
from support import make_key, make_project


async def test_a_deployment_routes_to_the_scripted_server(app: Any, committed_client: Any) -> None:
    async with ScriptedLlm() as llm:
        project = await make_project(committed_client)
        deployment = await chat_deployment(
            app, committed_client, project_id=project["id"], llm=llm, name="bot"
        )
        key = await make_key(committed_client, project["id"], "developer")
        await routed(app, deployment, llm)
        llm.reply("Hello there friend")
        llm.reply(tool_calls=[call("search", {"query": "keys"}, id_="call_1")])

        plain = await committed_client.post(
            "/v1/chat/completions",
            json={"model": "bot", "messages": [{"role": "user", "content": "hi"}]},
            headers=key,
        )
        assert plain.status_code == 200, plain.text
        assert plain.json()["choices"][0]["message"]["content"] == "Hello there friend"

        body = {"model": "bot", "stream": True, "messages": [{"role": "user", "content": "find"}]}
        streamed = await committed_client.post("/v1/chat/completions", json=body, headers=key)
        events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
        calls = [d["tool_calls"][0] for e in events for d in [e["choices"][0]["delta"]] if "tool_calls" in d]
        assert calls[0]["function"] == {"name": "search", "arguments": '{"query": "keys"}'}
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert [r["messages"][-1]["content"] for r in llm.requests] == ["hi", "find"]
