"""Routing under failure: retries on another replica, the circuit breaker, the bounded queue,
streams cancelled with their client, scale-from-zero on demand, and governance refusals."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import aiohttp
from sqlalchemy import update
from support import ADMIN, eventually
from upstream import Upstream

from converge.gateway.governance import Refusal
from converge.gateway.routing import Breaker
from converge.models import Deployment

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


async def test_killing_one_of_two_replicas_under_load_fails_no_request(env):
    d = await env.deploy(replicas=2)
    pool = env.pool(d)
    pool.breaker_open_s = 0.5  # so the test sees it close again soon
    victim = d.upstreams[1]
    for u in d.upstreams:
        u.delay_s = 0.01
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            statuses.append(
                (await env.client.post("/v1/chat/completions", json=CHAT, headers=d.key)).status_code
            )

    workers = [asyncio.create_task(load()) for _ in range(16)]
    await eventually(lambda: victim.requests >= 20 and len(statuses) >= 20)  # both replicas under load
    await victim.stop()  # like kill -9: its port refuses connections, in-flight requests break
    killed_at = len(statuses)
    breaker = pool.replicas[victim.url]

    def tripped() -> bool:
        return (
            breaker.state in (Breaker.OPEN, Breaker.HALF_OPEN) and breaker.failures >= pool.breaker_failures
        )

    await eventually(tripped)
    assert breaker.state in (Breaker.OPEN, Breaker.HALF_OPEN)
    assert breaker.failures >= pool.breaker_failures
    revived = await Upstream(name="chat-1", port=victim.port).start()  # the replica restarts
    env.upstreams.append(revived)
    # The breaker closes after the replica recovered, and the load reaches it again.
    await eventually(lambda: pool.replicas[victim.url].state is Breaker.CLOSED and revived.requests > 0)
    stop.set()
    await asyncio.gather(*workers)
    assert len(statuses) > killed_at + 20  # the load really ran across the kill
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    text = (await env.client.get("/metrics")).text
    assert "converge_gateway_upstream_errors_total" in text


async def test_503_is_retried_on_another_replica(env):
    d = await env.deploy(replicas=2)
    d.upstreams[0].mode = "503"
    statuses = [
        (await env.client.post("/v1/chat/completions", json=CHAT, headers=d.key)).status_code
        for _ in range(6)
    ]
    assert statuses == [200] * 6
    assert d.upstreams[1].requests == 6


async def test_least_outstanding_spreads_concurrent_requests(env):
    d = await env.deploy(replicas=2)
    for u in d.upstreams:
        u.delay_s = 0.2
    await asyncio.gather(
        *(env.client.post("/v1/chat/completions", json=CHAT, headers=d.key) for _ in range(8))
    )
    assert [u.requests for u in d.upstreams] == [4, 4]


async def test_a_full_queue_answers_503(env):
    d = await env.deploy()
    pool = env.pool(d)
    pool.max_per_replica, pool.queue_size = 1, 1
    d.upstreams[0].delay_s = 0.3
    results = await asyncio.gather(
        *(env.client.post("/v1/chat/completions", json=CHAT, headers=d.key) for _ in range(3))
    )
    assert sorted(r.status_code for r in results) == [200, 200, 503]
    full = next(r for r in results if r.status_code == 503)
    assert full.json()["error"]["code"] == "queue_full" and full.headers["retry-after"] == "1"


async def test_a_client_that_leaves_cancels_the_upstream_stream(env, live_server):
    d = await env.deploy()
    up = d.upstreams[0]
    up.stream_chunks, up.stream_delay_s = 200, 0.05
    async with live_server() as server, aiohttp.ClientSession() as session:
        response = await session.post(
            f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=d.key
        )
        assert response.status == 200
        first = await response.content.readany()
        assert first.startswith(b"data: ")
        response.close()  # the client goes away mid-stream
        await eventually(lambda: up.streams_cut > 0, timeout=5)  # the upstream generation was cancelled
    pool = env.pool(d)
    assert pool.in_flight == 0 and pool.replicas[up.url].state is Breaker.CLOSED


async def test_a_deployment_scaled_to_zero_is_woken_and_the_request_waits(env):
    d = await env.deploy(autoscaling={"scale_to_zero_after_s": 3600})
    async with env.state.sessions() as session, session.begin():
        await session.execute(
            update(Deployment).where(Deployment.id == uuid.UUID(d.id)).values(desired_replicas=0)
        )
    await env.until_routed(d, 0)
    resp = await env.client.post("/v1/chat/completions", json=CHAT, headers=d.key, timeout=30)
    assert resp.status_code == 200, resp.text
    events = (await env.client.get("/events", params={"project": d.project["id"]}, headers=ADMIN)).json()
    assert any(e["kind"] == "deployment.woken" for e in events["items"])


async def test_a_revoked_version_answers_403_with_the_reason(env):
    d = await env.deploy()
    revoked = await env.client.post(
        f"/models/{d.version['model_id']}/versions/{d.version['id']}/revoke",
        json={"note": "CVE-2026-0001"},
        headers=ADMIN,
    )
    assert revoked.status_code == 200, revoked.text
    resp = await env.chat_until(403, CHAT, d.key)
    assert resp.status_code == 403
    assert "revoked" in resp.json()["error"]["message"]
    assert resp.json()["error"]["type"] == "permission_error"


async def test_a_policy_that_no_longer_passes_answers_403(env):
    d = await env.deploy()
    model = (await env.client.get(f"/models/{d.version['model_id']}", headers=ADMIN)).json()
    policy = await env.client.post(
        "/policies",
        json={
            "name": f"no-{uuid.uuid4().hex[:6]}",
            "expression": f'model.name != "{model["name"]}"',
            "message": "this model is withdrawn from serving",
            "effect": "deny",
            "scope": "deployment",
        },
        headers=ADMIN,
    )
    assert policy.status_code == 201, policy.text
    try:

        async def refused():
            resp = await env.client.post("/v1/chat/completions", json=CHAT, headers=d.key)
            return resp if resp.status_code == 403 else None

        resp = await eventually(refused, timeout=15, interval=0.2)
        assert resp.status_code == 403
        assert "withdrawn from serving" in resp.json()["error"]["message"]
    finally:
        await env.client.delete(f"/policies/{policy.json()['id']}", headers=ADMIN)


async def test_hooks_can_refuse_a_request(env):
    d = await env.deploy()

    async def no_secrets(ctx):
        if "password" in str(ctx.body.get("messages")):
            return Refusal("the ruleset forbids sharing passwords", code="ruleset_violation")
        return None

    env.gateway.hooks.append(no_secrets)
    try:
        bad = {**CHAT, "messages": [{"role": "user", "content": "my password is hunter2"}]}
        refused = await env.client.post("/v1/chat/completions", json=bad, headers=d.key)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "ruleset_violation"
        assert (await env.client.post("/v1/chat/completions", json=CHAT, headers=d.key)).status_code == 200
        assert d.upstreams[0].requests == 1
    finally:
        with contextlib.suppress(ValueError):
            env.gateway.hooks.remove(no_secrets)


async def test_a_stream_that_never_starts_is_a_504_not_an_empty_200(env, monkeypatch):
    d = await env.deploy()
    d.upstreams[0].delay_s = 0.0
    d.upstreams[0].stream_delay_s = 1.0  # the first token takes longer than the gateway waits
    forwarder = env.gateway.forwarder
    monkeypatch.setattr(
        forwarder, "config", forwarder.config.model_copy(update={"first_byte_timeout_s": 0.3})
    )
    d.upstreams[0].stream_chunks = 1
    up = d.upstreams[0]

    async def slow_first_chunk(request):  # headers at once, the first event only after 1 s
        from aiohttp import web

        up.bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(1.0)
        await response.write(b"data: [DONE]\n\n")
        return response

    monkeypatch.setattr(up, "_chat", slow_first_chunk)
    await up.stop()
    await up.start()
    resp = await env.client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=d.key)
    assert resp.status_code == 504, resp.text
    assert resp.json()["error"]["code"] == "upstream_timeout"
