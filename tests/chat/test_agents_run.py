"""`POST /agents/{id}/run`: the function-calling loop through the real gateway (a scripted chat
deployment) and the test MCP server's tools over stdio and streamable HTTP; tool errors go back
to the model as results; the step limit and the token budget stop the loop with their reason;
the model calls are metered under the caller's key."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agents_support import STDIO, agent, bench, http_mcp_server, mcp_server, run, tool_messages, unique
from scripted_llm import ScriptedLlm, call
from support import ADMIN, eventually


@pytest.fixture(scope="module")
async def mcp_url() -> AsyncIterator[str]:
    async with http_mcp_server() as url:
        yield url


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_an_agent_completes_a_two_tool_task_with_an_mcp_servers_tools(
    app: Any, committed_client: Any, mcp_url: str, transport: str
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        if transport == "stdio":  # organisation admins only
            server = await mcp_server(client, b.project["id"], name="tools", transport="stdio", command=STDIO)
        else:  # a project owner may register an HTTP server
            server = await mcp_server(
                client, b.project["id"], headers=b.owner, name="tools", transport="http", url=mcp_url
            )
        made = await agent(client, b, system_prompt="You convert units.", tools={"mcp_servers": ["tools"]})
        assert made["spec"]["tools"]["mcp_servers"] == [{"id": server["id"], "name": "tools"}]
        llm.reply(
            tool_calls=[call("mcp__tools__convert_units", {"value": 5, "from_unit": "km", "to_unit": "mi"})]
        )
        llm.reply(tool_calls=[call("mcp__tools__lookup_capital", {"country": "Peru"})])
        llm.reply("5 km is 3.1069 mi, and the capital of Peru is Lima.")

        resp = await run(
            client, made["id"], "Convert 5 km to miles; and Peru's capital?", headers=b.developer
        )

        assert resp.status_code == 200, resp.text
        result = resp.json()
        assert result["stop_reason"] == "stop"
        assert result["message"] == {
            "role": "assistant",
            "content": "5 km is 3.1069 mi, and the capital of Peru is Lima.",
        }
        steps = result["steps"]
        assert [(s["step"], s["tool"], s["arguments"], s["result"], s["error"]) for s in steps] == [
            (
                1,
                "mcp__tools__convert_units",
                {"value": 5, "from_unit": "km", "to_unit": "mi"},
                "5 km = 3.1069 mi",
                None,
            ),
            (2, "mcp__tools__lookup_capital", {"country": "Peru"}, "Lima", None),
        ]
        assert all(s["duration_ms"] >= 0 for s in steps)
        # The model was offered the server's tools, with the system prompt first ...
        first = llm.requests[0]
        offered = {t["function"]["name"] for t in first["tools"]}
        assert {"mcp__tools__convert_units", "mcp__tools__lookup_capital", "mcp__tools__explode"} <= offered
        assert first["messages"][0] == {"role": "system", "content": "You convert units."}
        # ... and got each result in the next request, answering its tool call.
        second, third = llm.requests[1], llm.requests[2]
        assert tool_messages(second) == [
            {"role": "tool", "tool_call_id": steps[0]["tool_call_id"], "content": "5 km = 3.1069 mi"}
        ]
        assert tool_messages(third)[-1] == {
            "role": "tool",
            "tool_call_id": steps[1]["tool_call_id"],
            "content": "Lima",
        }
        assert [m["role"] for m in result["messages"]] == [
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
        ]
        # Three model calls, each traced, their tokens summed (the scripted server counts 11 + 7).
        assert len(result["turns"]) == 3
        assert all(t["deployment_id"] == b.deployment["id"] for t in result["turns"])
        assert result["usage"] == {"prompt_tokens": 33, "completion_tokens": 21, "total_tokens": 54}

        # /usage shows the agent's model calls under the key that ran it.
        async def metered() -> dict[str, Any] | None:
            resp = await client.get(
                "/usage",
                params={"project": b.project["id"], "key": b.developer_key_id, "group_by": "endpoint"},
                headers=ADMIN,
            )
            body = resp.json()
            return body if body["totals"]["requests"] >= 3 else None

        usage = await eventually(metered, timeout=30, interval=0.2)
        assert {row["endpoint"] for row in usage["data"]} == {"chat"}
        assert usage["totals"]["requests"] == 3
        assert usage["totals"]["total_tokens"] == 54


async def test_a_chat_session_with_the_agent_records_both_mcp_calls_and_replays_the_turn(
    app: Any, committed_client: Any, mcp_url: str
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        await mcp_server(
            client, b.project["id"], headers=b.owner, name="tools", transport="http", url=mcp_url
        )
        made = await agent(client, b, tools={"mcp_servers": ["tools"]})
        llm.reply(
            tool_calls=[call("mcp__tools__convert_units", {"value": 2, "from_unit": "km", "to_unit": "mi"})]
        )
        llm.reply(tool_calls=[call("mcp__tools__lookup_capital", {"country": "Peru"})])
        llm.reply("2 km is 1.2427 mi; Lima.")
        question = {"role": "user", "content": "2 km in miles, and Peru's capital?"}
        body = {"model": made["name"], "messages": [question]}
        resp = await client.post("/chat", json=body, headers=b.developer)
        assert resp.status_code == 200, resp.text
        session_id = resp.json()["converge"]["session_id"]

        listed = await client.get(f"/chat/sessions/{session_id}/messages", headers=b.developer)
        items = listed.json()["items"]
        assert [m["role"] for m in items] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
        calls = [
            m["tool_calls"][0]["function"] for m in items if m["role"] == "assistant" and m["tool_calls"]
        ]
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
            ("mcp__tools__convert_units", {"value": 2, "from_unit": "km", "to_unit": "mi"}),
            ("mcp__tools__lookup_capital", {"country": "Peru"}),
        ]
        assert [m["content"] for m in items if m["role"] == "tool"] == ["2 km = 1.2427 mi", "Lima"]
        trace = items[-1]["trace"]
        assert [(t["tool"], t["result"], t["error"]) for t in trace["tools"]] == [
            ("mcp__tools__convert_units", "2 km = 1.2427 mi", None),
            ("mcp__tools__lookup_capital", "Lima", None),
        ]
        assert trace["target"] == {"kind": "agent", "id": made["id"], "name": made["name"], "revision": 1}

        llm.reply("Lima, and 1.24 mi.")  # the replayed turn, answered at once this time
        replay = await client.post(
            f"/chat/sessions/{session_id}/replay", json={"turn": items[-1]["turn"]}, headers=b.developer
        )
        assert replay.status_code == 200, replay.text
        both = json.dumps(replay.json())
        assert "2 km is 1.2427 mi; Lima." in both and "Lima, and 1.24 mi." in both
        again = await client.get(f"/chat/sessions/{session_id}/messages", headers=b.developer)
        assert len(again.json()["items"]) == len(items)  # a replay records nothing


async def test_invalid_arguments_unknown_tools_and_a_failing_tool_come_back_to_the_model_as_errors(
    app: Any, committed_client: Any
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        await mcp_server(client, b.project["id"], name="tools", transport="stdio", command=STDIO)
        made = await agent(client, b, tools={"mcp_servers": ["tools"]})
        llm.reply(
            tool_calls=[
                call("mcp__tools__convert_units", '{"value": 5, "from_unit": "km"'),  # cut short
                call("mcp__tools__explode", {"reason": "today"}),
                call("no_such_tool", {}),
                call("mcp__tools__convert_units", {"value": 1, "from_unit": "kg", "to_unit": "km"}),
            ]
        )
        llm.reply("I could not do it.")

        resp = await run(client, made["id"], "go", headers=b.developer)

        assert resp.status_code == 200, resp.text
        result = resp.json()
        assert result["stop_reason"] == "stop"
        steps = result["steps"]
        assert [s["result"] for s in steps] == [None, None, None, None]
        assert "not valid JSON" in steps[0]["error"]
        assert steps[0]["arguments"] == '{"value": 5, "from_unit": "km"'  # the raw text, recorded
        assert steps[1]["error"] == "Error executing tool explode: the explode tool failed today"
        assert steps[2]["error"].startswith("unknown tool 'no_such_tool'")
        assert "cannot convert mass to length" in steps[3]["error"]
        sent = tool_messages(llm.requests[1])
        assert [json.loads(m["content"])["error"] for m in sent] == [s["error"] for s in steps]
        assert [m["tool_call_id"] for m in sent] == [s["tool_call_id"] for s in steps]


async def test_the_step_limit_stops_the_loop_with_its_reason(app: Any, committed_client: Any) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        made = await agent(client, b, max_steps=2, tools={"mcp_servers": []})
        for _ in range(3):
            llm.reply("still working", tool_calls=[call("lookup", {"q": "x"})])

        result = (await run(client, made["id"], "go", headers=b.developer)).json()

        assert result["stop_reason"] == "max_steps"
        assert len(llm.requests) == 2  # no third model call
        assert len(result["turns"]) == 2
        # The first call's tool ran (an error: the agent has no such tool); the second's did not.
        assert [s["step"] for s in result["steps"]] == [1]
        assert result["message"]["content"].endswith("it reached its limit of 2 model calls.")
        assert "tool_calls" not in result["messages"][-1]
        assert [m["role"] for m in result["messages"]] == ["assistant", "tool", "assistant"]


async def test_the_token_budget_stops_the_loop_and_caps_the_completion(
    app: Any, committed_client: Any
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        made = await agent(client, b, token_budget=30)
        for _ in range(3):
            llm.reply(tool_calls=[call("lookup", {"q": "x"})])  # 18 tokens each

        result = (await run(client, made["id"], "go", headers=b.developer)).json()

        assert result["stop_reason"] == "token_budget"
        assert len(llm.requests) == 2
        assert "max_tokens" not in llm.requests[0] or llm.requests[0]["max_tokens"] >= 30
        assert llm.requests[1]["max_tokens"] == 30 - 18  # what was left of the budget
        assert result["usage"]["total_tokens"] == 36
        assert "token budget of 30 tokens" in result["message"]["content"]


async def test_an_agent_without_tools_just_answers(app: Any, committed_client: Any) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        made = await agent(client, b, name=unique("plain"))
        llm.reply("Hello!")
        result = (await run(client, made["id"], "hi", headers=b.developer)).json()
        assert result["message"]["content"] == "Hello!"
        assert result["steps"] == [] and result["stop_reason"] == "stop"
        assert "tools" not in llm.requests[0]


async def test_the_agents_ruleset_holds_its_model_calls(app: Any, committed_client: Any) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        spec = {"system": "Be brief.", "input": {"blocked_terms": ["zeus"]}, "output": {"redact": ["email"]}}
        ruleset = await client.post(
            "/rulesets",
            params={"project": b.project["id"]},
            json={"name": unique("rs"), "spec": spec},
            headers=ADMIN,
        )
        assert ruleset.status_code == 201, ruleset.text
        made = await agent(client, b, ruleset=ruleset.json()["name"])
        assert made["spec"]["ruleset"] == {"id": ruleset.json()["id"], "name": ruleset.json()["name"]}

        refused = await run(client, made["id"], "tell me about zeus", headers=b.developer)
        assert refused.status_code == 400, refused.text
        assert refused.json()["code"] == "guardrail_refused"
        assert llm.requests == []  # refused before the model was called

        llm.reply("Write to ops@example.com")
        answered = (await run(client, made["id"], "who do I ask?", headers=b.developer)).json()
        assert "ops@example.com" not in answered["message"]["content"]
        assert "[REDACTED:email]" in answered["message"]["content"]
        turn = answered["turns"][0]
        assert turn["ruleset"]["id"] == ruleset.json()["id"]
        assert [(h["rule"], h["action"]) for h in turn["hits"]] == [("redact:email", "redacted")]


async def test_a_tool_that_runs_past_its_timeout_is_an_error_result(
    app: Any, committed_client: Any, mcp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = committed_client
    state = app.state.converge
    chat = state.settings.chat.model_copy(update={"tool_timeout_s": 0.5})
    monkeypatch.setattr(state, "settings", state.settings.model_copy(update={"chat": chat}))
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        await mcp_server(client, b.project["id"], name="tools", transport="http", url=mcp_url)
        made = await agent(client, b, tools={"mcp_servers": ["tools"]})
        llm.reply(tool_calls=[call("mcp__tools__sleep", {"seconds": 3})])
        llm.reply("It took too long.")

        result = (await run(client, made["id"], "wait", headers=b.developer)).json()

        step = result["steps"][0]
        assert step["error"] == "the tool 'mcp__tools__sleep' did not answer within 0.5 s"
        assert step["result"] is None and step["duration_ms"] < 3000
        assert json.loads(tool_messages(llm.requests[1])[0]["content"]) == {"error": step["error"]}
        assert result["stop_reason"] == "stop" and result["message"]["content"] == "It took too long."


async def test_a_long_result_is_cut_to_the_setting_for_the_model_and_the_record(
    app: Any, committed_client: Any, mcp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = committed_client
    state = app.state.converge
    chat = state.settings.chat.model_copy(update={"tool_result_max_chars": 8})
    monkeypatch.setattr(state, "settings", state.settings.model_copy(update={"chat": chat}))
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        await mcp_server(client, b.project["id"], name="tools", transport="http", url=mcp_url)
        made = await agent(client, b, tools={"mcp_servers": ["tools"]})
        llm.reply(
            tool_calls=[call("mcp__tools__convert_units", {"value": 5, "from_unit": "km", "to_unit": "mi"})]
        )
        llm.reply("ok")

        result = (await run(client, made["id"], "convert", headers=b.developer)).json()

        cut = "5 km = 3... [truncated: 16 characters in all]"
        assert result["steps"][0]["result"] == cut
        assert tool_messages(llm.requests[1])[0]["content"] == cut


async def test_a_keys_rate_limit_holds_for_agents_through_v1_and_chat(
    app: Any, committed_client: Any
) -> None:
    """Limits apply to everything that answers through the gateway: the virtual model's own
    request and the model calls inside it count against the key like any client's."""
    client = committed_client
    async with ScriptedLlm() as llm:
        b = await bench(app, client, llm)
        made = await agent(client, b)
        resp = await client.post(
            f"/projects/{b.project['id']}/keys",
            json={"name": unique("limited"), "role": "developer", "limits": {"rpm": 2}},
            headers=ADMIN,
        )
        assert resp.status_code == 201, resp.text
        limited = {"Authorization": f"Bearer {resp.json()['token']}"}

        async def known() -> bool:  # the new key has reached the gateway's snapshot
            r = await client.get("/v1/models", headers=limited)
            return r.status_code == 200

        await eventually(known, timeout=30)
        llm.reply("first")
        body = {"model": made["name"], "messages": [{"role": "user", "content": "hi"}]}
        first = await client.post("/v1/chat/completions", json=body, headers=limited)
        assert first.status_code == 200, first.text  # the outer request and one model call: 2 of 2
        again = await client.post("/v1/chat/completions", json=body, headers=limited)
        assert again.status_code == 429 and again.json()["error"]["code"] == "rate_limit_exceeded"
        session = await client.post("/chat", json=body, headers=limited)
        assert session.status_code == 429, session.text
        assert len(llm.requests) == 1  # nothing over the limit reached the model
