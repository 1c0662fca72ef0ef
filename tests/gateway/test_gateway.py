"""The data path: OpenAI-compatible and V2 routes, name resolution, errors, metering."""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy import select
from support import ADMIN, make_key

from converge.models import UsageRecord

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


async def test_models_lists_only_the_callers_project(env):
    mine = await env.deploy(aliases=["assistant"])
    theirs = await env.deploy(name="secret-model")
    listed = await env.client.get("/v1/models", headers=mine.key)
    assert listed.status_code == 200
    ids = {m["id"] for m in listed.json()["data"]}
    assert ids == {"chat", "assistant"}
    assert listed.json()["object"] == "list"
    one = await env.client.get("/v1/models/assistant", headers=mine.key)
    assert one.status_code == 200 and one.json()["id"] == "assistant"
    # Another project's name answers exactly like a name that does not exist.
    hidden = await env.client.post(
        "/v1/chat/completions", json={**CHAT, "model": "secret-model"}, headers=mine.key
    )
    missing = await env.client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=mine.key)
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["code"] == "model_not_found"
    assert "secret-model" not in str((await env.client.get("/v1/models", headers=mine.key)).json())
    assert theirs.upstreams[0].requests == 0


async def test_chat_goes_to_the_replica_and_is_metered(env):
    d = await env.deploy(aliases=["assistant"])
    resp = await env.client.post("/v1/chat/completions", json={**CHAT, "model": "assistant"}, headers=d.key)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"].startswith("hello from chat-0")
    assert d.upstreams[0].bodies[-1]["messages"] == CHAT["messages"]  # forwarded unchanged
    gateway = env.gateway
    await gateway.meter.once()  # flush now instead of within meter_flush_s
    async with env.state.sessions() as session:
        rows = (
            await session.scalars(select(UsageRecord).where(UsageRecord.deployment_id == uuid.UUID(d.id)))
        ).all()
    assert len(rows) == 1
    row = rows[0]
    assert (row.model, row.endpoint, row.status, row.prompt_tokens, row.completion_tokens) == (
        "assistant",
        "chat",
        200,
        7,
        5,
    )
    assert row.project_id == uuid.UUID(d.project["id"]) and row.key_id is not None
    assert row.latency_ms > 0 and row.ttft_ms is None


async def test_streaming_forwards_every_chunk(env):
    d = await env.deploy()
    d.upstreams[0].stream_chunks = 4
    async with env.client.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=d.key
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join([c async for c in r.aiter_text()])
    events = [line for line in text.splitlines() if line.startswith("data: ")]
    assert len(events) == 5 and events[-1] == "data: [DONE]"
    await env.gateway.meter.once()
    async with env.state.sessions() as session:
        row = await session.scalar(select(UsageRecord).where(UsageRecord.deployment_id == uuid.UUID(d.id)))
    assert row.stream is True and row.completion_tokens == 4 and row.ttft_ms is not None
    # One inter-token latency per stream of two or more tokens: the mean gap after the first.
    text = (await env.client.get("/metrics")).text
    label = f'deployment="{d.project["name"]}/chat"'
    assert f"converge_gateway_inter_token_latency_seconds_count{{{label}}} 1.0" in text
    assert f"converge_gateway_time_to_first_token_seconds_count{{{label}}} 1.0" in text


async def test_embeddings_and_completions_routes(env):
    emb = await env.deploy(server="embeddings", name="embed")
    resp = await env.client.post(
        "/v1/embeddings", json={"model": "embed", "input": ["a", "b"]}, headers=emb.key
    )
    assert resp.status_code == 200 and len(resp.json()["data"]) == 2
    # An embeddings model does not chat: a 400 that says why, and nothing reaches the replica.
    wrong = await env.client.post("/v1/chat/completions", json={**CHAT, "model": "embed"}, headers=emb.key)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
    assert emb.upstreams[0].requests == 1
    chat = await env.deploy()
    done = await env.client.post(
        "/v1/completions", json={"model": "chat", "prompt": "Once"}, headers=chat.key
    )
    assert done.status_code == 200


async def test_v2_infer_ready_and_metadata(env):
    d = await env.deploy(server="v2", name="iris")
    model_name = env.gateway.dataplane.snapshot.by_id[uuid.UUID(d.id)].model_name
    ready = await env.client.get("/v2/models/iris/ready", headers=d.key)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    meta = await env.client.get("/v2/models/iris", headers=d.key)
    assert meta.status_code == 200 and meta.json()["name"] == model_name
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}
    infer = await env.client.post("/v2/models/iris/infer", json=body, headers=d.key)
    assert infer.status_code == 200, infer.text
    assert infer.json()["model_name"] == model_name  # the path was rewritten to the served name
    assert (await env.client.post("/v2/models/nope/infer", json=body, headers=d.key)).status_code == 404


async def test_v2_with_a_hook_answers_a_body_that_is_no_json_object_with_a_400(env):
    """A hook reads the body, so the gateway parses it: what is not a JSON object is the
    caller's mistake (400 in the OpenAI envelope, naming the body), never a 500."""
    d = await env.deploy(server="v2", name="iris")
    seen: list[dict] = []

    async def look(ctx):
        seen.append(ctx.body)
        ctx.body["parameters"] = {"checked": True}  # what a hook changes is what gets forwarded
        return None

    env.gateway.hooks.append(look)
    try:
        for content in (b"{not json", b"[1, 2]"):
            bad = await env.client.post("/v2/models/iris/infer", content=content, headers=d.key)
            assert bad.status_code == 400, bad.text
            error = bad.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == "body"
        assert seen == [] and d.upstreams[0].requests == 0
        body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1.0]}]}
        good = await env.client.post("/v2/models/iris/infer", json=body, headers=d.key)
        assert good.status_code == 200, good.text
        assert seen == [{**body, "parameters": {"checked": True}}]
        assert d.upstreams[0].bodies == [{**body, "parameters": {"checked": True}}]
    finally:
        env.gateway.hooks.remove(look)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "chat"}, "messages"),
        ({"model": "chat", "messages": []}, "messages"),
        ({"model": "chat", "messages": ["hi"]}, "messages[0]"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "stream": "yes"}, "stream"),
    ],
)
async def test_malformed_bodies_name_the_field(env_one, body, param):
    d, client = env_one
    resp = await client.post("/v1/chat/completions", json=body, headers=d.key)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert d.upstreams[0].requests == 0


async def test_not_json_and_credentials(env):
    d = await env.deploy()
    bad = await env.client.post("/v1/chat/completions", content=b"{not json", headers=d.key)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "body"
    assert (await env.client.post("/v1/chat/completions", json=CHAT)).status_code == 401
    wrong = {"Authorization": "Bearer cvg_000000000000_nope"}
    resp = await env.client.post("/v1/chat/completions", json=CHAT, headers=wrong)
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    assert d.upstreams[0].requests == 0


async def test_a_key_created_a_moment_ago_works_at_once(env):
    d = await env.deploy()
    fresh = await make_key(env.client, d.project["id"], "viewer")
    resp = await env.client.post("/v1/chat/completions", json=CHAT, headers=fresh)
    assert resp.status_code == 200, resp.text


async def test_a_revoked_key_is_refused_within_moments(env):
    d = await env.deploy()
    created = await env.client.post(f"/projects/{d.project['id']}/keys", json={"name": "k"}, headers=ADMIN)
    headers = {"Authorization": f"Bearer {created.json()['token']}"}
    assert (await env.client.post("/v1/chat/completions", json=CHAT, headers=headers)).status_code == 200
    await env.client.delete(f"/projects/{d.project['id']}/keys/{created.json()['id']}", headers=ADMIN)
    resp = await env.chat_until(401, CHAT, headers)
    assert resp.status_code == 401


async def test_org_keys_choose_the_project_by_header(env):
    d = await env.deploy()
    resp = await env.client.post(
        "/v1/chat/completions", json=CHAT, headers={**ADMIN, "OpenAI-Project": d.project["name"]}
    )
    assert resp.status_code == 200
    nowhere = await env.client.post(
        "/v1/chat/completions", json=CHAT, headers={**ADMIN, "OpenAI-Project": "no-such"}
    )
    assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "project_not_found"


@pytest.mark.parametrize(("mode", "status"), [("500", 502), ("garbage", 502)])
async def test_bad_upstream_answers_are_502(env, mode, status):
    d = await env.deploy()
    d.upstreams[0].mode = mode
    resp = await env.client.post("/v1/chat/completions", json=CHAT, headers=d.key)
    assert resp.status_code == status
    assert resp.json()["error"]["type"] == "server_error"
    assert "127.0.0.1" not in resp.text  # never names the replica


async def test_unreachable_is_503_and_slow_is_504(env, monkeypatch):
    d = await env.deploy()
    await d.upstreams[0].stop()
    down = await env.client.post("/v1/chat/completions", json=CHAT, headers=d.key)
    assert down.status_code == 503 and down.json()["error"]["code"] == "upstream_unavailable"
    slow = await env.deploy()
    slow.upstreams[0].delay_s = 1.0
    import aiohttp

    monkeypatch.setattr(
        env.gateway.forwarder, "unary_timeout", aiohttp.ClientTimeout(sock_connect=1, sock_read=0.2)
    )
    late = await env.client.post("/v1/chat/completions", json=CHAT, headers=slow.key)
    assert late.status_code == 504 and late.json()["error"]["code"] == "upstream_timeout"


async def test_metrics_by_deployment(env):
    d = await env.deploy()
    await env.client.post("/v1/chat/completions", json=CHAT, headers=d.key)
    text = (await env.client.get("/metrics")).text
    label = f'deployment="{d.project["name"]}/chat"'
    assert f'converge_gateway_requests_total{{{label},endpoint="chat",status="200"}} 1.0' in text
    assert f'converge_gateway_tokens_total{{{label},kind="completion"}} 5.0' in text
    assert f"converge_gateway_breaker_state{{{label}" in text
    assert "converge_gateway_queue_depth" in text


@pytest.fixture
async def env_one(env) -> tuple:
    return await env.deploy(), env.client


_ = httpx


async def test_a_library_approver_key_is_no_inference_credential(env):
    """Governing the library is not using models: an approver's organisation key gets 401 on
    the data path in every project, exactly like an unknown key."""
    deployed = await env.deploy()
    approver = await env.approver()
    body = {"model": deployed.name, "messages": [{"role": "user", "content": "hi"}]}
    headers = {**approver, "OpenAI-Project": deployed.project["name"]}
    resp = await env.client.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert deployed.upstreams[0].requests == 0
