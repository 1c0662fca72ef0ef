"""Rulesets in the gateway: a plain OpenAI client on a deployment with a default ruleset is
refused with the rule named and gets e-mail addresses redacted, streamed (split across chunks)
and not; hits become events without the matched text; in-process chat returns its trace."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import openai
import pytest
from scripted_llm import ScriptedLlm, chat_deployment, routed
from support import ADMIN, eventually, make_key, make_project

from converge.gateway.errors import GatewayError

SPEC = {
    "system": "Answer in one sentence.",
    "input": {"blocked_terms": ["zeus"], "redact": ["card"]},
    "output": {"redact": ["email", "card"], "blocked_terms": ["launch code"], "max_tokens": 40},
}


async def _setup(
    app: Any, client: httpx.AsyncClient, llm: ScriptedLlm, *, attach: bool = True
) -> dict[str, Any]:
    project = await make_project(client)
    deployment = await chat_deployment(app, client, project_id=project["id"], llm=llm, name="bot")
    key = await make_key(client, project["id"], "developer")
    resp = await client.post(
        "/rulesets", params={"project": project["id"]}, json={"name": "house", "spec": SPEC}, headers=ADMIN
    )
    assert resp.status_code == 201, resp.text
    ruleset = resp.json()
    await routed(app, deployment, llm)
    if attach:
        put = await client.put(f"/rulesets/{ruleset['id']}/deployments/{deployment['id']}", headers=ADMIN)
        assert put.status_code == 200, put.text
        snapshot = app.state.converge.gateway.dataplane

        def attached() -> bool:
            route = snapshot.snapshot.by_id.get(uuid.UUID(deployment["id"]))
            return route is not None and route.ruleset_id == uuid.UUID(ruleset["id"])

        await eventually(attached)
    return {"project": project, "deployment": deployment, "key": key, "ruleset": ruleset}


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_a_plain_openai_client_is_held_to_the_deployments_ruleset(
    app: Any, committed_client: httpx.AsyncClient, live_server: Any
) -> None:
    async with ScriptedLlm() as llm:
        ctx = await _setup(app, committed_client, llm)
        token = ctx["key"]["Authorization"].removeprefix("Bearer ")
        async with live_server() as srv:
            sdk = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=token, max_retries=0)
            with pytest.raises(openai.BadRequestError) as refused:
                await sdk.chat.completions.create(
                    model="bot", messages=[{"role": "user", "content": "Tell me about ZEUS"}]
                )
            assert refused.value.code == "guardrail_refused"
            assert "rule 'term:zeus' of ruleset 'house' v1" in refused.value.message
            assert llm.requests == []  # a refused request never reaches the model

            llm.reply("Mail carol@example.com for help.")
            answer = await sdk.chat.completions.create(
                model="bot", messages=[{"role": "user", "content": "My card is 4111 1111 1111 1111"}]
            )
            assert answer.choices[0].message.content == "Mail [REDACTED:email] for help."
            sent = llm.requests[-1]
            assert sent["messages"][0] == {"role": "system", "content": SPEC["system"]}
            assert sent["messages"][1]["content"] == "My card is [REDACTED:card]"
            assert sent["max_tokens"] == 40  # the ruleset's cap

            llm.reply(
                "Write to bob.smith@example.com now", chunks=["Write to bob.smi", "th@exam", "ple.com now"]
            )
            stream = await sdk.chat.completions.create(
                model="bot", messages=[{"role": "user", "content": "who?"}], stream=True, max_tokens=100
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == "Write to [REDACTED:email] now"
            assert llm.requests[-1]["max_tokens"] == 40  # the smaller of the two


async def test_an_answer_that_breaks_an_output_rule_is_refused_or_cut(
    app: Any, committed_client: httpx.AsyncClient
) -> None:
    async with ScriptedLlm() as llm:
        ctx = await _setup(app, committed_client, llm)
        body = {"model": "bot", "messages": [{"role": "user", "content": "hi"}]}
        llm.reply("The launch code is 0000")
        unary = await committed_client.post("/v1/chat/completions", json=body, headers=ctx["key"])
        assert unary.status_code == 400
        assert unary.json()["error"]["code"] == "guardrail_refused"
        assert "rule 'term:launch code'" in unary.json()["error"]["message"]

        llm.reply("Sure. The launch code is 0000", chunks=["Sure. The launch", " code is 0000"])
        streamed = await committed_client.post(
            "/v1/chat/completions", json={**body, "stream": True}, headers=ctx["key"]
        )
        events = _events(streamed.text)
        content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
        assert "launch" not in content and "0000" not in content
        last = [e for e in events if e.get("choices")][-1]
        assert last["choices"][0]["finish_reason"] == "content_filter"
        assert last["converge"]["guardrail"]["rule"] == "term:launch code"
        assert streamed.text.rstrip().endswith("data: [DONE]")


async def test_a_hit_is_an_event_and_a_metric_without_the_matched_text(
    app: Any, committed_client: httpx.AsyncClient
) -> None:
    async with ScriptedLlm() as llm:
        ctx = await _setup(app, committed_client, llm)
        llm.reply("Reach me at dave@example.com")
        body = {"model": "bot", "messages": [{"role": "user", "content": "zeus 4111111111111111"}]}
        await committed_client.post("/v1/chat/completions", json=body, headers=ctx["key"])
        body["messages"][0]["content"] = "card 4111111111111111"
        await committed_client.post("/v1/chat/completions", json=body, headers=ctx["key"])

        async def written() -> list[dict[str, Any]]:
            resp = await committed_client.get(
                "/events", params={"project": ctx["project"]["id"], "kind": "guardrail.hit"}, headers=ADMIN
            )
            items = resp.json()["items"]
            return items if len(items) >= 3 else []

        events = await eventually(written)
        seen = {(e["data"]["rule"], e["data"]["action"], e["data"]["where"]) for e in events}
        assert seen == {
            ("term:zeus", "refused", "input"),
            ("redact:card", "redacted", "input"),
            ("redact:email", "redacted", "output"),
        }
        for event in events:
            assert event["data"]["ruleset"] == "house" and event["data"]["version"] == 1
            assert event["data"]["deployment"] == "bot"
            raw = json.dumps(event)
            assert "4111" not in raw and "dave@" not in raw and "zeus 4111" not in raw
        metrics = app.state.converge.metrics.registry
        label = f"{ctx['project']['name']}/house"
        count = metrics.get_sample_value(
            "converge_gateway_guardrail_hits_total",
            {"ruleset": label, "rule": "term:zeus", "action": "refused"},
        )
        assert count == 1


async def test_in_process_chat_returns_its_trace(app: Any, committed_client: httpx.AsyncClient) -> None:
    gateway = app.state.converge.gateway
    async with ScriptedLlm() as llm:
        ctx = await _setup(app, committed_client, llm, attach=False)
        caller = await gateway.auth.caller_for(key_id=None, project_id=uuid.UUID(ctx["project"]["id"]))
        ruleset_id = uuid.UUID(ctx["ruleset"]["id"])
        body = {"model": "bot", "messages": [{"role": "user", "content": "hello"}]}

        llm.reply("plain answer eve@example.com")
        plain = await gateway.chat(caller, body)
        assert plain.status == 200 and plain.ruleset is None  # no default, none named
        assert plain.message["content"] == "plain answer eve@example.com"
        assert plain.deployment_id == uuid.UUID(ctx["deployment"]["id"])
        assert plain.deployment_revision == ctx["deployment"]["revision"]
        assert plain.usage == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        assert plain.latency_ms > 0 and plain.hits == []

        llm.reply("guarded answer eve@example.com")
        turn = await gateway.chat(caller, body, ruleset_id=ruleset_id)
        assert turn.message["content"] == "guarded answer [REDACTED:email]"
        assert turn.ruleset == {"id": str(ruleset_id), "name": "house", "version": 1}
        assert [(h["rule"], h["action"], h["where"]) for h in turn.hits] == [
            ("redact:email", "redacted", "output")
        ]

        llm.reply("streamed eve@exa" + "mple.com", chunks=["streamed eve@exa", "mple.com"])
        stream = await gateway.chat_stream(caller, body, ruleset_id=ruleset_id)
        chunks = [chunk async for chunk in stream]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
        assert stream.turn is not None
        assert stream.turn.message == {"role": "assistant", "content": "streamed [REDACTED:email]"}
        assert stream.turn.ttft_ms is not None and stream.turn.usage["total_tokens"] == 18
        assert stream.turn.hits[0]["rule"] == "redact:email"

        with pytest.raises(GatewayError) as refused:
            await gateway.chat(
                caller, {**body, "messages": [{"role": "user", "content": "zeus"}]}, ruleset_id=ruleset_id
            )
        assert refused.value.status == 400 and refused.value.code == "guardrail_refused"
        assert refused.value.turn.hits[0]["rule"] == "term:zeus"  # type: ignore[attr-defined]
        with pytest.raises(GatewayError) as early:
            await gateway.chat_stream(
                caller, {**body, "messages": [{"role": "user", "content": "Zeus"}]}, ruleset_id=ruleset_id
            )
        assert early.value.code == "guardrail_refused"
        with pytest.raises(GatewayError) as unknown:
            await gateway.chat(caller, body, ruleset_id=uuid.uuid4())
        assert unknown.value.status == 404 and unknown.value.param == "ruleset_id"
