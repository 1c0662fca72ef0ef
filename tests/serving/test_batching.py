"""Dynamic batching of embedding requests, in-process, with an encoder the test holds and releases."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest

from converge.serving import embeddings
from converge.serving.batching import Batcher
from converge.serving.common import ModelHost
from converge.serving.encoders import Encoded

HANG_GUARD_S = 10  # only so a broken batcher fails the test instead of hanging it


class HeldEncoder:
    """Encodes each text as [len(text)]; the first batch waits until the test releases it."""

    engine = "held"

    def __init__(self, *, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def encode(self, texts: list[str]) -> Encoded:
        self.batches.append(list(texts))
        self.entered.set()
        self.release.wait(HANG_GUARD_S)
        if self.fail_on in texts:
            raise RuntimeError(f"cannot encode {self.fail_on!r}")
        return Encoded(np.array([[float(len(t))] for t in texts], dtype=np.float32), [len(t) for t in texts])


async def entered(encoder: HeldEncoder) -> None:
    assert await asyncio.to_thread(encoder.entered.wait, HANG_GUARD_S)


async def queued(batcher: Batcher, n: int) -> None:
    while batcher.waiting < n:
        await asyncio.sleep(0)


async def test_requests_that_queue_behind_a_batch_share_the_next_one() -> None:
    encoder = HeldEncoder()
    batcher = Batcher(encoder.encode, max_batch=64, max_wait_s=0)
    first = asyncio.create_task(batcher.encode(["a"]))
    await entered(encoder)
    rest = [asyncio.create_task(batcher.encode([text])) for text in ("bb", "ccc", "dddd")]
    await queued(batcher, 3)
    encoder.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *rest), HANG_GUARD_S)

    assert encoder.batches == [["a"], ["bb", "ccc", "dddd"]]
    # Every request gets its own rows and token counts back, in its own order.
    assert [r.vectors.ravel().tolist() for r in results] == [[1.0], [2.0], [3.0], [4.0]]
    assert [r.tokens for r in results] == [[1], [2], [3], [4]]
    assert (batcher.stats.batches, batcher.stats.texts, batcher.stats.largest) == (2, 4, 3)


async def test_a_batch_never_exceeds_max_batch_texts_and_only_a_large_request_is_split() -> None:
    encoder = HeldEncoder()
    batcher = Batcher(encoder.encode, max_batch=3, max_wait_s=0)
    first = asyncio.create_task(batcher.encode(["x"]))
    await entered(encoder)
    tasks = [asyncio.create_task(batcher.encode(texts)) for texts in (["a", "b"], ["cc", "d"], list("efghi"))]
    await queued(batcher, 3)
    encoder.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *tasks), HANG_GUARD_S)

    # ["cc", "d"] would fit beside ["a", "b"] only split: it waits for the next batch whole; the
    # five-text request is larger than any batch, so it fills what is left and goes on in the next.
    assert encoder.batches == [["x"], ["a", "b"], ["cc", "d", "e"], ["f", "g", "h"], ["i"]]
    assert [r.vectors.ravel().tolist() for r in results[1:]] == [[1.0, 1.0], [2.0, 1.0], [1.0] * 5]


class TwoAtOnce(HeldEncoder):
    """Blocks each pass until the test has seen two passes running at the same time."""

    def __init__(self) -> None:
        super().__init__()
        self.both = threading.Barrier(2, timeout=HANG_GUARD_S)

    def encode(self, texts: list[str]) -> Encoded:
        self.batches.append(list(texts))
        self.both.wait()  # raises BrokenBarrierError if the second pass never starts
        return Encoded(np.array([[float(len(t))] for t in texts], dtype=np.float32), [len(t) for t in texts])


async def test_workers_encode_the_parts_of_one_large_request_at_the_same_time() -> None:
    encoder = TwoAtOnce()
    batcher = Batcher(encoder.encode, max_batch=32, max_wait_s=0, workers=2)
    texts = [f"text {i:02d}" + "!" * (i % 3) for i in range(64)]
    result = await asyncio.wait_for(batcher.encode(texts), HANG_GUARD_S)

    assert sorted(map(len, encoder.batches)) == [32, 32]
    assert result.vectors.ravel().tolist() == [float(len(t)) for t in texts]  # in the request's order
    assert result.tokens == [len(t) for t in texts]


async def test_max_wait_gathers_requests_until_the_batch_is_full() -> None:
    encoder = HeldEncoder()
    encoder.release.set()
    # A wait far longer than the test: the batch runs because it filled, not because time passed.
    batcher = Batcher(encoder.encode, max_batch=3, max_wait_s=3600)
    tasks = [asyncio.create_task(batcher.encode([text])) for text in ("a", "b", "c")]
    await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD_S)

    assert encoder.batches == [["a", "b", "c"]]


async def test_a_failed_batch_fails_its_requests_and_the_next_batch_still_runs() -> None:
    encoder = HeldEncoder(fail_on="bad")
    batcher = Batcher(encoder.encode, max_batch=64, max_wait_s=0)
    first = asyncio.create_task(batcher.encode(["x"]))
    await entered(encoder)
    doomed = [asyncio.create_task(batcher.encode([text])) for text in ("bad", "innocent")]
    await queued(batcher, 2)
    encoder.release.set()
    await first
    outcomes = await asyncio.gather(*doomed, return_exceptions=True)
    after = await asyncio.wait_for(batcher.encode(["fine"]), HANG_GUARD_S)

    assert all(isinstance(o, RuntimeError) and "cannot encode 'bad'" in str(o) for o in outcomes)
    assert after.vectors.ravel().tolist() == [4.0]


async def test_a_request_abandoned_while_queued_is_never_encoded() -> None:
    encoder = HeldEncoder()
    batcher = Batcher(encoder.encode, max_batch=64, max_wait_s=0)
    first = asyncio.create_task(batcher.encode(["x"]))
    await entered(encoder)
    gone = asyncio.create_task(batcher.encode(["gone"]))
    kept = asyncio.create_task(batcher.encode(["kept"]))
    await queued(batcher, 2)
    gone.cancel()
    encoder.release.set()
    await asyncio.wait_for(asyncio.gather(first, kept), HANG_GUARD_S)

    assert encoder.batches == [["x"], ["kept"]]
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_stats_report_the_requests_queued_behind_the_running_batch() -> None:
    encoder = HeldEncoder()
    app = embeddings.create_app(encoder=encoder, model_name="mini", max_batch=64)
    host = ModelHost(
        kind="embeddings",
        model_name="mini",
        load=lambda: app,
        inference_paths=embeddings.INFERENCE_PATHS,
        live_stats=lambda: embeddings.batch_stats(app.state.batcher),
    )
    transport = httpx.ASGITransport(app=host.app)
    async with host.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://r") as client:
        while (await client.get("/health/ready")).status_code != 200:
            await asyncio.sleep(0.01)

        async def embed(text: str) -> dict[str, Any]:
            resp = await client.post("/v1/embeddings", json={"input": text})
            assert resp.status_code == 200, resp.text
            return dict(resp.json())

        first = asyncio.create_task(embed("a"))
        await entered(encoder)
        rest = [asyncio.create_task(embed(text)) for text in ("bb", "ccc")]
        await queued(app.state.batcher, 2)
        busy = (await client.get("/converge/stats")).json()
        encoder.release.set()
        answers = await asyncio.wait_for(asyncio.gather(first, *rest), HANG_GUARD_S)
        idle = (await client.get("/converge/stats")).json()

    assert (busy["in_flight"], busy["queue_depth"], busy["batch_running"]) == (3, 2, 1)
    assert (idle["in_flight"], idle["queue_depth"], idle["batches_total"], idle["batch_texts_max"]) == (
        0,
        0,
        2,
        2,
    )
    assert [a["data"][0]["embedding"] for a in answers] == [[1.0], [2.0], [3.0]]
    assert [a["usage"]["prompt_tokens"] for a in answers] == [1, 2, 3]


async def test_a_worker_goes_on_with_queued_texts_while_the_event_loop_is_busy() -> None:
    """A pass that ends takes the next queued batch in its own thread: a busy event loop (one
    serving many small requests) does not leave the cores idle between passes."""
    encoder = HeldEncoder()
    batcher = Batcher(encoder.encode, max_batch=1, max_wait_s=0)
    tasks = [asyncio.create_task(batcher.encode([text])) for text in ("a", "bb", "ccc")]
    await entered(encoder)
    await queued(batcher, 2)
    encoder.release.set()
    deadline = time.monotonic() + HANG_GUARD_S
    while len(encoder.batches) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # noqa: ASYNC251 - the point: the event loop is blocked meanwhile
    assert encoder.batches == [["a"], ["bb"], ["ccc"]]  # all three passes ran without the loop
    results = await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD_S)
    assert [r.vectors.ravel().tolist() for r in results] == [[1.0], [2.0], [3.0]]
    assert (batcher.stats.batches, batcher.stats.running) == (3, 0)
