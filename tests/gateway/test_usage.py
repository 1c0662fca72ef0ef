"""Usage: what an answer used, and the usage chunk that ends a stream asked for with
`stream_options.include_usage`, whose numbers are the ones the gateway meters."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import openai
import orjson
from sqlalchemy import select

from converge.gateway import usage
from converge.models import UsageRecord

SAY_HI = [{"role": "user", "content": "hi"}]
STREAM = {"model": "chat", "messages": SAY_HI, "stream": True}
WITH_USAGE = {**STREAM, "stream_options": {"include_usage": True}}


def test_whole_events_keep_an_unfinished_one_back():
    assert usage.whole_events(b'data: {"a": 1}\n\ndata: [DO') == len(b'data: {"a": 1}\n\n')
    assert usage.whole_events(b"data: x\r\n\r\n") == len(b"data: x\r\n\r\n")
    assert usage.whole_events(b"data: [DO") == 0


def test_the_usage_event_carries_the_stream_s_id_and_model():
    first = b'data: {"id": "c-1", "object": "chat.completion.chunk", "created": 5, "model": "m"}\n\n'
    event = usage.usage_event(first, endpoint="chat", prompt=3, completion=2)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert orjson.loads(event[6:]) == {
        "id": "c-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    bare = orjson.loads(usage.usage_event(b"", endpoint="completions", prompt=1, completion=0)[6:])
    assert bare["object"] == "text_completion" and bare["choices"] == []


def test_streamed_tokens_are_counted_from_content_deltas():
    chunk = (
        b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n'
        b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
        b'data: {"choices": [{"delta": {"content": "b \\"content\\": c"}}]}\n\n'
        b"data: [DONE]\n\n"
    )
    assert usage.content_tokens(chunk) == 2
    assert usage.done_at(chunk) == chunk.index(b"data: [DONE]")


def _delta(text: str) -> bytes:
    chunk = {
        "id": "s-1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"delta": {"content": text}}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def test_a_stream_tally_owes_the_usage_chunk_until_done():
    tally = usage.StreamUsage(owed=True, endpoint="chat", prompt_estimate=9)
    sent = tally.feed(_delta("a") + _delta("b")[:10])  # the second event is cut short
    assert sent == _delta("a")
    sent += tally.feed(_delta("b")[10:] + b"data: [DO")
    sent += tally.feed(b"NE]\n\n") + tally.end()
    *deltas, last, done = sent.split(b"\n\n")[:-1]
    assert deltas == [_delta("a")[:-2], _delta("b")[:-2]] and done == b"data: [DONE]"
    assert orjson.loads(last[6:])["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert orjson.loads(last[6:])["id"] == "s-1"
    assert tally.used() == (9, 2)


def test_a_stream_tally_adds_nothing_unless_asked_or_when_the_upstream_counts():
    plain = usage.StreamUsage(owed=False, endpoint="chat", prompt_estimate=9)
    cut = _delta("a")[:10]
    assert plain.feed(cut) == cut and plain.end() == b""  # bytes go on as they come
    own = b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}\n\n'
    counted = usage.StreamUsage(owed=True, endpoint="chat", prompt_estimate=9)
    sent = counted.feed(_delta("a") + own + b"data: [DONE]\n\n") + counted.end()
    assert sent == _delta("a") + own + b"data: [DONE]\n\n" and counted.used() == (4, 1)
    # A stream that ends without [DONE] still ends with the usage chunk.
    unfinished = usage.StreamUsage(owed=True, endpoint="chat", prompt_estimate=9)
    unfinished.feed(_delta("a"))
    assert b'"completion_tokens":1' in unfinished.end()


async def _events(env: Any, key: dict[str, str], body: dict[str, Any], path: str = "/v1/chat/completions"):
    async with env.client.stream("POST", path, json=body, headers=key) as r:
        assert r.status_code == 200
        text = "".join([c async for c in r.aiter_text()])
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


async def _metered(env: Any, deployed: Any) -> UsageRecord:
    await env.gateway.meter.once()
    async with env.state.sessions() as session:
        return await session.scalar(
            select(UsageRecord).where(UsageRecord.deployment_id == uuid.UUID(deployed.id))
        )


async def test_include_usage_ends_the_stream_with_the_metered_usage(env):
    d = await env.deploy()
    d.upstreams[0].stream_chunks = 3
    events = await _events(env, d.key, WITH_USAGE)
    assert events[-1] == "[DONE]"
    last = orjson.loads(events[-2])
    assert last["choices"] == [] and last["id"] == "c" and last["model"] == "chat"
    used = last["usage"]
    assert used["completion_tokens"] == 3 and used["prompt_tokens"] > 0
    assert used["total_tokens"] == used["prompt_tokens"] + used["completion_tokens"]
    assert all(orjson.loads(e)["choices"] for e in events[:-2])  # one usage chunk only
    row = await _metered(env, d)
    assert (row.prompt_tokens, row.completion_tokens) == (used["prompt_tokens"], used["completion_tokens"])


async def test_without_include_usage_no_chunk_is_added(env):
    d = await env.deploy()
    d.upstreams[0].stream_chunks = 3
    for body in (STREAM, {**STREAM, "stream_options": {"include_usage": False}}):
        events = await _events(env, d.key, body)
        assert len(events) == 4 and events[-1] == "[DONE]"
        assert not any("usage" in orjson.loads(e) for e in events[:-1])


async def test_an_upstream_s_own_usage_chunk_is_the_only_one(env):
    d = await env.deploy()
    up = d.upstreams[0]
    up.stream_chunks, up.sends_usage = 2, True
    events = await _events(env, d.key, WITH_USAGE)
    with_usage = [orjson.loads(e) for e in events[:-1] if "usage" in orjson.loads(e)]
    assert [u["usage"] for u in with_usage] == [
        {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    ]
    row = await _metered(env, d)
    assert (row.prompt_tokens, row.completion_tokens) == (7, 2)


async def test_the_usage_chunk_precedes_a_done_that_arrives_in_pieces(env):
    d = await env.deploy()
    d.upstreams[0].stream_chunks, d.upstreams[0].split_done = 2, True
    events = await _events(env, d.key, WITH_USAGE)
    assert events[-1] == "[DONE]" and orjson.loads(events[-2])["usage"]["completion_tokens"] == 2


async def test_completions_streams_get_the_usage_chunk_too(env):
    d = await env.deploy()
    body = {"model": "chat", "prompt": "Once", "stream": True, "stream_options": {"include_usage": True}}
    events = await _events(env, d.key, body, "/v1/completions")
    assert orjson.loads(events[-2])["choices"] == [] and events[-1] == "[DONE]"


async def test_the_openai_sdk_reads_the_usage_chunk(env):
    d = await env.deploy()
    d.upstreams[0].stream_chunks = 4
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=env.app), base_url="http://test")
    sdk = openai.AsyncOpenAI(
        base_url="http://test/v1",
        api_key=d.key["Authorization"].removeprefix("Bearer "),
        http_client=http,
        max_retries=0,
    )
    stream = await sdk.chat.completions.create(
        model="chat", messages=SAY_HI, stream=True, stream_options={"include_usage": True}, max_tokens=3
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3 == sum(1 for c in chunks if c.choices)
    row = await _metered(env, d)
    assert (row.prompt_tokens, row.completion_tokens) == (
        chunks[-1].usage.prompt_tokens,
        chunks[-1].usage.completion_tokens,
    )


async def test_langchain_streams_usage(env):
    d = await env.deploy()
    d.upstreams[0].stream_chunks = 4
    llm = env.chat_model(d, max_tokens=2, stream_usage=True)
    total = None
    async for chunk in llm.astream("hi"):
        total = chunk if total is None else total + chunk
    assert total is not None and total.usage_metadata is not None
    assert total.usage_metadata["output_tokens"] == 2
    assert d.upstreams[0].bodies[-1]["max_tokens"] == 2
