"""The metric names a real scrape of the test app's /metrics exposes."""

from __future__ import annotations

import httpx
import pytest
from observed import exposed_names


@pytest.fixture
async def exposed_metrics(client: httpx.AsyncClient) -> set[str]:
    resp = await client.get("/metrics")
    assert resp.status_code == 200, resp.text
    return exposed_names(resp.text)
