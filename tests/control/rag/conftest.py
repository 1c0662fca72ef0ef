"""Knowledge-base fixtures: a real all-MiniLM-L6-v2 replica behind the gateway.

The model is registered in the library from its installed folder (so its tokenizer.json and
sentence_bert_config.json are the version's artifacts, as with the built-in catalogue), and
deployed with the `embeddings` server in a committed project; the in-memory runtime reports the
replica started here as its endpoint, so embeddings go through the gateway exactly as a
client's would (auth, limits, metering). One replica per test process: loading torch and the
model takes a while on two cores.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from rag_support import MiniLM, Replica, built, builtin_minilm, deploy, minilm_replica_process
from support import ADMIN, make_key, make_project


@pytest.fixture(scope="session")
def minilm_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """Started as early as possible: the torch import overlaps the model's registration."""
    with minilm_replica_process(tmp_path_factory.mktemp("minilm")) as replica:
        yield replica


@pytest.fixture(scope="session")
async def minilm(app: Any, minilm_replica: Replica) -> AsyncIterator[MiniLM]:
    state = app.state.converge
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
        project = await make_project(client)
        version = await builtin_minilm(app, client)
        await built(app, project_id=project["id"], version_id=version["id"], server="embeddings")
        deployment = await deploy(client, project_id=project["id"], version_id=version["id"], name="minilm")
        await minilm_replica.ready()
        state.runtime.serve_at(uuid.UUID(deployment["id"]), [minilm_replica.url])
        deadline = asyncio.get_running_loop().time() + 30
        route = None
        while route is None or route.endpoints != (minilm_replica.url,):
            assert asyncio.get_running_loop().time() < deadline, f"not routed to the replica: {route}"
            await asyncio.sleep(0.05)
            route = state.gateway.dataplane.snapshot.by_id.get(uuid.UUID(deployment["id"]))
        key = await make_key(client, project["id"], "developer")
        try:
            yield MiniLM(app=app, project=project, deployment=deployment, version=version, key=key)
        finally:
            await client.delete(f"/deployments/{deployment['id']}", headers=ADMIN)
