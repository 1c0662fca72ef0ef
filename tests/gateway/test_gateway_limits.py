"""Limits and budgets on the data path: 429 with Retry-After, budgets that stop traffic before
a replica sees it, and counters shared by several gateway replicas."""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client import CollectorRegistry
from support import ADMIN, eventually

from converge.gateway.api import Gateway

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


async def _key(env, project_id: str, **limits: int) -> dict[str, str]:
    return (await _key_and_scope(env, project_id, **limits))[0]


async def _key_and_scope(env, project_id: str, **limits: int) -> tuple[dict[str, str], str]:
    """A key with limits, and the scope its limit counters are kept under."""
    resp = await env.client.post(
        f"/projects/{project_id}/keys", json={"name": "limited", "limits": limits}, headers=ADMIN
    )
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}, f"k:{resp.json()['id']}"


async def _not_at_a_minute_edge() -> None:
    """Sliding windows weigh the previous minute: keep a short test inside one minute."""
    if time.time() % 60 > 45:
        await asyncio.sleep(60 - time.time() % 60 + 0.1)


async def test_over_the_request_limit_is_429_with_retry_after(env):
    await _not_at_a_minute_edge()
    d = await env.deploy()
    key = await _key(env, d.project["id"], rpm=2)
    first = await env.client.post("/v1/chat/completions", json=CHAT, headers=key)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert (await env.client.post("/v1/chat/completions", json=CHAT, headers=key)).status_code == 200
    over = await env.client.post("/v1/chat/completions", json=CHAT, headers=key)
    assert over.status_code == 429
    assert int(over.headers["retry-after"]) >= 1
    assert over.headers["x-ratelimit-remaining-requests"] == "0"
    assert over.json()["error"]["code"] == "rate_limit_exceeded"
    assert "2 requests per minute" in over.json()["error"]["message"]
    assert d.upstreams[0].requests == 2
    # Another key of the same project has its own counter.
    assert (await env.client.post("/v1/chat/completions", json=CHAT, headers=d.key)).status_code == 200


async def test_token_limit_counts_the_reservation_then_the_real_use(env):
    await _not_at_a_minute_edge()
    d = await env.deploy()
    key = await _key(env, d.project["id"], tpm=100)
    too_big = await env.client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 500}, headers=key)
    assert too_big.status_code == 429 and "lower max_tokens" in too_big.json()["error"]["message"]
    # Each request reserves ~40 tokens and settles to the 12 it used: many more than 100/40 fit.
    statuses = [
        (await env.client.post("/v1/chat/completions", json=CHAT, headers=key)).status_code for _ in range(6)
    ]
    assert statuses == [200] * 6
    assert d.upstreams[0].requests == 6


async def test_a_spent_budget_stops_requests_before_the_replica(env):
    d = await env.deploy()
    for _ in range(2):
        assert (await env.client.post("/v1/chat/completions", json=CHAT, headers=d.key)).status_code == 200
    # 24 tokens used this month; an owner sets the project's budget to exactly that.
    resp = await env.client.patch(
        f"/projects/{d.project['id']}", json={"limits": {"monthly_tokens": 24}}, headers=ADMIN
    )
    assert resp.status_code == 200, resp.text
    spent = await env.chat_until(429, CHAT, d.key)
    assert spent.status_code == 429
    assert spent.json()["error"]["code"] == "insufficient_quota"
    assert "budget is spent" in spent.json()["error"]["message"]
    assert int(spent.headers["retry-after"]) > 0
    seen = d.upstreams[0].requests
    # Every endpoint the deployment serves shares the budget: a completion is refused as well.
    again = await env.client.post("/v1/completions", json={"model": "chat", "prompt": "x"}, headers=d.key)
    assert again.status_code == 429, again.text
    assert again.json()["error"]["code"] == "insufficient_quota"
    assert again.json()["error"]["type"] == "insufficient_quota"
    assert d.upstreams[0].requests == seen  # nothing reached the replica


async def test_concurrency_limit(env):
    d = await env.deploy()
    d.upstreams[0].delay_s = 0.5
    key = await _key(env, d.project["id"], concurrency=1)

    async def served() -> bool:  # the new key has reached the gateway (one request at a time)
        return (await env.client.post("/v1/chat/completions", json=CHAT, headers=key)).status_code == 200

    await eventually(served)
    results = await asyncio.gather(
        *(env.client.post("/v1/chat/completions", json=CHAT, headers=key) for _ in range(2))
    )
    assert sorted(r.status_code for r in results) == [200, 429]
    assert (await env.client.post("/v1/chat/completions", json=CHAT, headers=key)).status_code == 200


async def test_limits_hold_across_two_gateway_replicas(env):
    """A second gateway on the same database shares the key's counters (within one sync)."""
    await _not_at_a_minute_edge()
    d = await env.deploy()
    key, scope = await _key_and_scope(env, d.project["id"], rpm=10)
    state = env.state
    other = Gateway(state.settings, registry=CollectorRegistry())
    conninfo = state.database.url.replace("postgresql+psycopg://", "postgresql://")
    await other.start(sessions=state.sessions, conninfo=conninfo)
    try:
        assert other.limiter.gateway_id != env.gateway.limiter.gateway_id
        first = [
            (await env.client.post("/v1/chat/completions", json=CHAT, headers=key)).status_code
            for _ in range(6)
        ]
        assert first == [200] * 6

        def seen_by_other() -> bool:  # A has written its counts and B has read them back
            counts = other.limiter.others
            return sum(r for (s, kind, _), (r, _t) in counts.items() if s == scope and kind == "minute") == 6

        await eventually(seen_by_other, timeout=10 * state.settings.gateway.limits_sync_s + 5)
        transport = httpx.ASGITransport(app=other)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw2") as second:
            statuses = [
                (await second.post("/v1/chat/completions", json=CHAT, headers=key)).status_code
                for _ in range(6)
            ]
        assert statuses == [200] * 4 + [429] * 2
        assert d.upstreams[0].requests == 10
    finally:
        await other.stop()
