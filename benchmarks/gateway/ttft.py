"""Time to first token through a target, one streaming request at a time (concurrency 1).

wrk times whole responses only, so this small client times the first SSE `data:` event: one
blocking keep-alive socket and the httptools response parser, so its own cost per request
is a few tens of microseconds and the same for every target (an asyncio client cost more,
and more through a proxy, where it competed with it for the CPUs).

The upstream paces streams whose `user` field is `bench-paced` (one event per
--paced-interval-ms): the first event leaves the upstream at once and the rest follow, so a
proxy that buffers a stream shows it here as a TTFT close to the whole stream's time. Between
two paced streams a proxy idles for the whole stream, so each request meets cold CPU caches (and,
on a virtual machine, a halted vCPU to wake). `paced=False` sends unpaced streams back to back
instead (the upstream writes each whole answer at once): the same cost with the proxy kept busy,
as the wrk figures at concurrency 1 are.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from typing import Any
from urllib.parse import urlsplit

import httptools

PACED_USER = "bench-paced"


def stream_body(model: str, *, paced: bool = True) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if paced:
        body["user"] = PACED_USER
    return json.dumps(body, separators=(",", ":")).encode()


class _Response:
    def __init__(self) -> None:
        self.status = 0
        self.keep_alive = False
        self.first_data: float | None = None
        self.complete = False
        self.body = bytearray()
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # Asked here: once the message is complete the parser has reset and always says False.
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body += body
        if self.first_data is None and b"data:" in self.body:
            self.first_data = time.perf_counter()

    def on_message_complete(self) -> None:
        self.complete = True


class Client:
    """One keep-alive connection, blocking: at concurrency 1 nothing is cheaper or steadier."""

    def __init__(self, url: str, token: str | None) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
        self.headers = f"Host: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
        if token:
            self.headers += f"Authorization: Bearer {token}\r\n"
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def stream(self, body: bytes, timeout_s: float = 30.0) -> tuple[int, float, float, bytes]:
        """(status, ttft_s, total_s, body) of one request."""
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = (
            f"POST {self.path} HTTP/1.1\r\n{self.headers}Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        response = _Response()
        started = time.perf_counter()
        self.sock.sendall(request)
        while not response.complete:
            data = self.sock.recv(65536)
            if not data:
                self.close()
                raise ConnectionError("the server closed the connection mid-response")
            response.parser.feed_data(data)
        ended = time.perf_counter()
        if not response.keep_alive:
            self.close()
        first = response.first_data if response.first_data is not None else ended
        return response.status, first - started, ended - started, bytes(response.body)


def _pct(samples: list[float], p: int) -> float:
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1]


def measure(
    url: str, token: str | None, model: str, *, requests: int, warmup: int = 10, paced: bool = True
) -> dict[str, Any]:
    client = Client(url, token)
    body = stream_body(model, paced=paced)
    ttft: list[float] = []
    total: list[float] = []
    errors = 0
    last_error = ""
    try:
        for i in range(warmup + requests):
            try:
                status, first, whole, content = client.stream(body)
            except (OSError, httptools.HttpParserError) as exc:
                errors += 1
                last_error = repr(exc)
                client.close()
                continue
            if status != 200 or b"[DONE]" not in content:
                errors += 1
                last_error = f"{status} {content[:200]!r}"
                continue
            if i >= warmup:
                ttft.append(first * 1000)
                total.append(whole * 1000)
    finally:
        client.close()
    if not ttft:
        return {"requests": 0, "errors": errors, "last_error": last_error}
    out: dict[str, Any] = {
        "requests": len(ttft),
        "errors": errors,
        "ttft_p50_ms": round(_pct(ttft, 50), 3),
        "ttft_p99_ms": round(_pct(ttft, 99), 3),
        "stream_p50_ms": round(_pct(total, 50), 3),
    }
    if paced:  # the first event came well before the last: the target streams, it does not buffer
        out["streams_through"] = _pct(ttft, 50) < _pct(total, 50) / 2
    if last_error:
        out["last_error"] = last_error
    return out
