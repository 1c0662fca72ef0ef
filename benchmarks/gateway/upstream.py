"""A minimal, fast OpenAI-compatible upstream with fixed answers, to isolate a proxy's own cost.

No framework: an asyncio protocol on uvloop with the httptools parser (the parser uvicorn
uses), answering from prebuilt bytes, so it costs a fraction of what any Python proxy in
front of it costs and is never the bottleneck. Keep-alive, pipelined requests and chunked
responses work; nothing else of HTTP does (no Expect: 100-continue, no upgrades).

Routes:
  POST /v1/chat/completions   fixed completion of N tokens; "stream": true gives N SSE chunks
                              (role first, then one token each, then finish_reason), a usage
                              chunk with choices=[] when stream_options.include_usage is true
                              (as OpenAI does), then `data: [DONE]`; all in one writev, or
                              one event per --paced-interval-ms when `user` is "bench-paced"
  POST /v1/completions        the same for text completions
  POST /v1/embeddings         one fixed vector per input
  GET  /v1/models             the one model
  GET  /health, /health/live, /health/ready, /converge/stats   what a Converge replica answers

    .venv/bin/python benchmarks/gateway/upstream.py --port 9001 [--tokens 16] [--token-interval-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any

import httptools
import uvloop

PROMPT_TOKENS = 12
EMBEDDING_DIM = 16
PACED_USER = "bench-paced"  # streams for this `user` are paced (see --paced-interval-ms)
CREATED = 1_700_000_000


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _response(
    status: int, body: bytes, content_type: bytes = b"application/json", keep_alive: bool = True
) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}[status]
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: " + content_type + b"\r\n",
            b"content-length: %d\r\n" % len(body),
            b"" if keep_alive else b"connection: close\r\n",
            b"\r\n",
            body,
        )
    )


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
STREAM_END = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Answers:
    """Every answer prebuilt per model name (the request's `model` is echoed, as OpenAI does)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": tokens,
            "total_tokens": PROMPT_TOKENS + tokens,
        }
        self._cache: dict[tuple[str, str], Any] = {}

    def get(self, kind: str, model: str) -> Any:
        key = (kind, model)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) > 1000:
                self._cache.clear()
            found = self._cache[key] = getattr(self, f"_build_{kind}")(model)
        return found

    def _build_chat(self, model: str) -> bytes:
        return _json(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "tok " * self.tokens},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": self.usage,
            }
        )

    def _build_chat_stream(self, model: str) -> tuple[list[bytes], bytes]:
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED, "model": model}

        def event(delta: dict[str, Any], finish: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _chunk(b"data: " + _json({**base, "choices": [choice]}) + b"\n\n")

        events = [event({"role": "assistant", "content": ""}, None)]
        events += [event({"content": "tok "}, None) for _ in range(self.tokens)]
        events.append(event({}, "stop"))
        usage = _chunk(b"data: " + _json({**base, "choices": [], "usage": self.usage}) + b"\n\n")
        return events, usage

    def _build_completion(self, model: str) -> bytes:
        return _json(
            {
                "id": "cmpl-bench",
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": [
                    {"index": 0, "text": "tok " * self.tokens, "logprobs": None, "finish_reason": "stop"}
                ],
                "usage": self.usage,
            }
        )

    def _build_completion_stream(self, model: str) -> tuple[list[bytes], bytes]:
        base = {"id": "cmpl-bench", "object": "text_completion", "created": CREATED, "model": model}

        def event(text: str, finish: str | None) -> bytes:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return _chunk(b"data: " + _json({**base, "choices": [choice]}) + b"\n\n")

        events = [event("tok ", None) for _ in range(self.tokens)] + [event("", "stop")]
        usage = _chunk(b"data: " + _json({**base, "choices": [], "usage": self.usage}) + b"\n\n")
        return events, usage

    def embeddings(self, model: str, inputs: int) -> bytes:
        vector = [round(0.01 * i, 2) for i in range(EMBEDDING_DIM)]
        return _json(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(inputs)],
                "model": model,
                "usage": {"prompt_tokens": PROMPT_TOKENS * inputs, "total_tokens": PROMPT_TOKENS * inputs},
            }
        )


class Upstream(asyncio.Protocol):
    answers: Answers
    interval_s: float = 0.0
    paced_interval_s: float = 0.001
    per_token_writes = False
    requests = 0
    models = _json(
        {
            "object": "list",
            "data": [{"id": "bench-model", "object": "model", "created": CREATED, "owned_by": "bench"}],
        }
    )
    health = _json({"status": "ready", "model": "bench-model"})

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.busy: asyncio.Task[None] | None = None
        self.pending: list[tuple[bytes, bytes, bytes, bool]] = []

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(_response(400, b'{"error":"bad request"}', keep_alive=False))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy is not None:
            self.busy.cancel()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        Upstream.requests += 1
        request = (
            self.parser.get_method(),
            self.url.split(b"?", 1)[0],
            b"".join(self.body),
            self.parser.should_keep_alive(),
        )
        if self.busy is not None:  # a paced stream is still being written: answer in order
            self.pending.append(request)
        else:
            self.handle(*request)

    def handle(self, method: bytes, path: bytes, body: bytes, keep_alive: bool) -> None:
        write = self.transport.write
        if method == b"GET":
            if path == b"/v1/models":
                write(_response(200, self.models, keep_alive=keep_alive))
            elif path in (b"/health", b"/health/live", b"/health/ready"):
                write(_response(200, self.health, keep_alive=keep_alive))
            elif path == b"/converge/stats":
                stats = {
                    "in_flight": 0,
                    "queue_depth": 0,
                    "requests_total": Upstream.requests,
                    "model": "bench-model",
                    "kind": "bench",
                }
                write(_response(200, _json(stats), keep_alive=keep_alive))
            else:
                write(_response(404, b'{"error":"not found"}', keep_alive=keep_alive))
        elif method != b"POST":
            write(_response(405, b'{"error":"method not allowed"}', keep_alive=keep_alive))
        elif path in (b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings"):
            try:
                request = json.loads(body) if body else {}
            except ValueError:
                request = None
            if not isinstance(request, dict):
                write(
                    _response(
                        400, b'{"error":{"message":"body is not a JSON object"}}', keep_alive=keep_alive
                    )
                )
            else:
                self.answer(path, request, keep_alive)
        else:
            write(_response(404, b'{"error":"not found"}', keep_alive=keep_alive))
        if not keep_alive and self.busy is None:
            self.transport.close()

    def answer(self, path: bytes, request: dict[str, Any], keep_alive: bool) -> None:
        model = str(request.get("model") or "bench-model")
        kind = "chat" if path == b"/v1/chat/completions" else "completion"
        if path == b"/v1/embeddings":
            inputs = request.get("input")
            count = (
                len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
            )
            self.transport.write(_response(200, self.answers.embeddings(model, count), keep_alive=keep_alive))
        elif not request.get("stream"):
            self.transport.write(_response(200, self.answers.get(kind, model), keep_alive=keep_alive))
        else:
            events, usage = self.answers.get(kind + "_stream", model)
            options = request.get("stream_options")
            with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            interval = self.paced_interval_s if request.get("user") == PACED_USER else self.interval_s
            if interval > 0:
                self.busy = asyncio.ensure_future(
                    self.paced(events, usage if with_usage else b"", keep_alive, interval)
                )
                return
            if self.per_token_writes:  # one send per token, as a real server emits them
                write = self.transport.write
                write(STREAM_HEAD)
                for event in events:
                    write(event)
                write(usage + STREAM_END if with_usage else STREAM_END)
            else:  # one writev for the whole answer
                self.transport.writelines([STREAM_HEAD, *events, usage if with_usage else b"", STREAM_END])

    async def paced(self, events: list[bytes], usage: bytes, keep_alive: bool, interval: float) -> None:
        write = self.transport.write
        write(STREAM_HEAD)
        for i, event in enumerate(events):
            if i:
                await asyncio.sleep(interval)
            write(event)
        write(usage + STREAM_END)
        if not keep_alive:
            self.transport.close()
        self.busy = None
        while self.pending and self.busy is None:
            self.handle(*self.pending.pop(0))


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(Upstream, host, port, backlog=4096, reuse_address=True)
    print(f"upstream listening on http://{host}:{port}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--tokens", type=int, default=16, help="completion tokens per answer")
    parser.add_argument(
        "--token-interval-ms",
        type=float,
        default=0.0,
        help="pause between streamed tokens (0: write at once)",
    )
    parser.add_argument(
        "--paced-interval-ms",
        type=float,
        default=1.0,
        help=f"pause between streamed events when the request's user is {PACED_USER!r} (the TTFT client's)",
    )
    parser.add_argument(
        "--per-token-writes",
        action="store_true",
        help="with no interval, send each streamed token on its own (default: one writev per answer)",
    )
    args = parser.parse_args()
    Upstream.answers = Answers(args.tokens)
    Upstream.interval_s = args.token_interval_ms / 1000
    Upstream.per_token_writes = args.per_token_writes
    Upstream.paced_interval_s = args.paced_interval_ms / 1000
    started = time.perf_counter()
    try:
        uvloop.run(serve(args.host, args.port))
    finally:
        print(
            f"upstream served {Upstream.requests} requests in {time.perf_counter() - started:.0f}s",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
