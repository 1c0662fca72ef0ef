"""/metrics is public by default (what Prometheus expects), or needs a bearer token when one is set."""

from __future__ import annotations

from pathlib import Path

import httpx
from support import make_settings

from converge.app import create_app

TOKEN = "scrape-me-0123456789"


async def test_metrics_needs_the_token_when_one_is_set(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(pg_url, tmp_path, run_workers=False, server={"metrics_token": TOKEN})
    app = create_app(settings, on_first_key=None)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            missing = await client.get("/metrics")
            wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
            right = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            health = await client.get("/health")
    assert missing.status_code == wrong.status_code == 401
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert "METRICS_TOKEN" in missing.json()["detail"]
    assert right.status_code == 200 and "converge_" in right.text
    assert health.status_code == 200  # liveness stays public


async def test_metrics_are_public_without_a_token(client: httpx.AsyncClient) -> None:
    resp = await client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
