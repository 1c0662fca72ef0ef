"""Fixtures for the Kubernetes client and backend: a fake API server per test, and settings
that retry fast (tests wait for observed conditions, never for guessed times)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fake_api import FakeKubeApi
from kube_support import fast_config

from converge.runtime.kubernetes.client import KubeClient


@pytest.fixture
async def fake_api(request: pytest.FixtureRequest) -> AsyncIterator[FakeKubeApi]:
    """KServe's CRDs are served unless the test is marked `@pytest.mark.parametrize("fake_api",
    [False], indirect=True)`."""
    api = FakeKubeApi(kserve=getattr(request, "param", True), bookmark_interval_s=0.05)
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def kube(fake_api: FakeKubeApi) -> AsyncIterator[KubeClient]:
    client = KubeClient(fast_config(fake_api))
    yield client
    await client.close()
