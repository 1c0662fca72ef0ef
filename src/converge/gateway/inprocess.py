"""In-process chat with a trace: what the control plane's chat sessions, RAG models and agents
call (`Gateway.chat`, `Gateway.chat_stream`).

The body goes through the same path as an HTTP request (`OpenAI.infer`: auth was done by the
caller's `Caller`, then limits, queueing, routing, rulesets and metering under the caller's
key), with a `Trace` that the forwarder fills: the deployment and revision that served, the
ruleset applied (the explicit one, else the deployment's default), guardrail hits, tokens,
latency and time to first token. Errors raise `GatewayError` (the OpenAI envelope) with the
trace so far on `error.turn` (a refusal's hits are there).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Message

from converge.gateway.errors import GatewayError
from converge.gateway.upstream import Trace

if TYPE_CHECKING:
    from converge.gateway.auth import Caller
    from converge.gateway.openai import OpenAI

PATH = "/v1/chat/completions"


@dataclass
class ChatTurn:
    status: int
    body: dict[str, Any] | None  # the decoded answer (a stream: None; its message is `message`)
    message: dict[str, Any] | None  # role, content, tool_calls as OpenAI returns them
    usage: dict[str, int] | None
    deployment_id: uuid.UUID | None
    deployment_revision: int | None
    ruleset: dict[str, Any] | None  # {"id", "name", "version"} applied
    hits: list[dict[str, Any]] = field(default_factory=list)  # never the matched text
    latency_ms: float = 0.0
    ttft_ms: float | None = None

    @classmethod
    def of(cls, trace: Trace, *, body: dict[str, Any] | None, message: dict[str, Any] | None) -> ChatTurn:
        route = trace.route
        used = trace.prompt_tokens or trace.completion_tokens
        usage = (
            {
                "prompt_tokens": trace.prompt_tokens,
                "completion_tokens": trace.completion_tokens,
                "total_tokens": trace.prompt_tokens + trace.completion_tokens,
            }
            if used
            else None
        )
        return cls(
            status=trace.status,
            body=body,
            message=message,
            usage=usage,
            deployment_id=route.deployment_id if route is not None else None,
            deployment_revision=route.revision if route is not None else None,
            ruleset=trace.ruleset,
            hits=list(trace.hits),
            latency_ms=trace.latency_ms,
            ttft_ms=trace.ttft_ms,
        )


def _failed(status: int, data: bytes, *, turn: ChatTurn) -> GatewayError:
    try:
        error = orjson.loads(data).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        error = {}
    exc = GatewayError(
        status,
        error.get("message") or f"The gateway answered {status}",
        type_=error.get("type") or "server_error",
        param=error.get("param"),
        code=error.get("code"),
    )
    exc.turn = turn  # type: ignore[attr-defined]  # documented above: the trace of a failure
    return exc


def _attach(exc: GatewayError, trace: Trace) -> GatewayError:
    exc.turn = ChatTurn.of(trace, body=None, message=None)  # type: ignore[attr-defined]
    if exc.turn.status == 0:  # type: ignore[attr-defined]
        exc.turn.status = exc.status  # type: ignore[attr-defined]
    return exc


async def chat(
    openai: OpenAI, caller: Caller, *, body: dict[str, Any], ruleset_id: uuid.UUID | None
) -> ChatTurn:
    trace = Trace()
    status, parts = 500, list[bytes]()
    body = {**body, "stream": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    try:
        await openai.infer(
            _receive(body),
            send,
            caller=caller,
            endpoint="chat",
            path=PATH,
            ruleset_id=ruleset_id,
            trace=trace,
        )
    except GatewayError as exc:
        raise _attach(exc, trace) from None
    data = b"".join(parts)
    trace.status = trace.status or status
    if status != 200:
        raise _failed(status, data, turn=ChatTurn.of(trace, body=None, message=None))
    answer = orjson.loads(data)
    choices = answer.get("choices") or [{}]
    return ChatTurn.of(trace, body=answer, message=choices[0].get("message"))


def _receive(body: dict[str, Any]) -> Any:
    raw = orjson.dumps(body)
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:  # connected until the answer is complete (a stream's watcher waits here)
            await asyncio.get_running_loop().create_future()
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return receive


class ChatStream:
    """The chunks of a streamed answer as dicts; `turn` is complete once iteration ended.

    Always ends with the usage chunk (`choices: []`), as `stream_options.include_usage` asks."""

    def __init__(self, trace: Trace, *, queue: asyncio.Queue[bytes | None], task: asyncio.Task[None]) -> None:
        self.trace, self._queue, self._task = trace, queue, task
        self._held = b""
        self._ready: list[dict[str, Any]] = []
        self.turn: ChatTurn | None = None
        self._message: dict[str, Any] = {"role": "assistant", "content": None}
        self._calls: dict[int, dict[str, Any]] = {}
        self.error: dict[str, Any] | None = None  # an error event that ended the stream
        self.finish_reason: str | None = None

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._ready:
            data = await self._queue.get()
            if data is None:
                await self._finish()
                raise StopAsyncIteration
            self._parse(data)
        chunk = self._ready.pop(0)
        self._assemble(chunk)
        return chunk

    async def aclose(self) -> None:
        """Stop early (the upstream request is cancelled)."""
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        await self._finish()

    def _parse(self, data: bytes) -> None:
        data = (self._held + data).replace(b"\r\n", b"\n")
        *events, self._held = data.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:") and (payload := line[5:].strip()) != b"[DONE]":
                    with contextlib.suppress(orjson.JSONDecodeError):
                        chunk = orjson.loads(payload)
                        if isinstance(chunk, dict):
                            self._ready.append(chunk)

    def _assemble(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            self.error = chunk["error"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self._message["content"] = (self._message["content"] or "") + delta["content"]
            for call in delta.get("tool_calls") or ():
                entry = self._calls.setdefault(
                    call.get("index", 0),
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                entry["id"] = call.get("id") or entry["id"]
                function = call.get("function") or {}
                entry["function"]["name"] += function.get("name") or ""
                entry["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                self._message["finish_reason"] = choice["finish_reason"]

    async def _finish(self) -> None:
        if self.turn is not None:
            return
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        message = dict(self._message)
        finish = message.pop("finish_reason", None)
        if self._calls:
            message["tool_calls"] = [self._calls[i] for i in sorted(self._calls)]
        self.finish_reason = finish
        self.turn = ChatTurn.of(self.trace, body=None, message=message)


async def chat_stream(
    openai: OpenAI, caller: Caller, *, body: dict[str, Any], ruleset_id: uuid.UUID | None
) -> ChatStream:
    """Start a streamed answer: returns once its status is known (an error raises here)."""
    trace = Trace()
    options = {**(body.get("stream_options") or {}), "include_usage": True}
    body = {**body, "stream": True, "stream_options": options}
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    started: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
    status = 0
    error_body = bytearray()

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            if status == 200 and not started.done():
                started.set_result((200, b""))
        elif message["type"] == "http.response.body":
            if status == 200:
                if data := message.get("body", b""):
                    queue.put_nowait(data)
            else:
                error_body.extend(message.get("body", b""))
                if not message.get("more_body") and not started.done():
                    started.set_result((status, bytes(error_body)))

    async def run() -> None:
        try:
            await openai.infer(
                _receive(body),
                send,
                caller=caller,
                endpoint="chat",
                path=PATH,
                ruleset_id=ruleset_id,
                trace=trace,
            )
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            elif not isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            queue.put_nowait(None)
            if not started.done():
                started.set_result((status or 500, bytes(error_body)))

    task = asyncio.create_task(run())
    try:
        code, data = await started
    except GatewayError as exc:
        raise _attach(exc, trace) from None
    if code != 200:
        with contextlib.suppress(Exception):
            await task
        trace.status = trace.status or code
        raise _failed(code, data, turn=ChatTurn.of(trace, body=None, message=None))
    return ChatStream(trace, queue=queue, task=task)
