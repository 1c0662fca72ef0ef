"""After any error response the keep-alive connection still serves the next request.

Each test speaks HTTP/1.1 over one raw socket to a real uvicorn server, so a connection the
server closed (or reset) after an error shows up as exactly that, not as a client retry.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from typing import Any

import pytest
from fastapi import FastAPI
from support import ADMIN, LiveServer, free_port

from converge.errors import install_error_handlers
from converge.kit.middleware import RequestContextMiddleware
from converge.kit.observability import Metrics


class Connection:
    """One keep-alive HTTP/1.1 connection, blocking (run it with asyncio.to_thread)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def request(self, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        return self._response()

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def _response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._read()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body


def _get(path: str, headers: dict[str, str] | None = None) -> str:
    extra = "".join(f"{k}: {v}\n" for k, v in (headers or {}).items())
    return f"GET {path} HTTP/1.1\nHost: test\n{extra}"


def _post(
    path: str, body: bytes, headers: dict[str, str] | None = None, *, chunked: bool = False
) -> tuple[str, bytes]:
    extra = "".join(f"{k}: {v}\n" for k, v in (headers or {}).items())
    if chunked:
        framed = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in _parts(body)) + b"0\r\n\r\n"
        return f"POST {path} HTTP/1.1\nHost: test\nTransfer-Encoding: chunked\n{extra}", framed
    return f"POST {path} HTTP/1.1\nHost: test\nContent-Length: {len(body)}\n{extra}", body


def _parts(body: bytes, size: int = 65536) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


async def _exchange(port: int, steps: list[tuple[str, bytes]]) -> list[tuple[int, dict[str, str], bytes]]:
    def run() -> list[tuple[int, dict[str, str], bytes]]:
        conn = Connection(port)
        try:
            return [conn.request(head, body) for head, body in steps]
        finally:
            conn.close()

    return await asyncio.to_thread(run)


# --- an unexpected exception -------------------------------------------------------------------


def _failing_app(metrics: Metrics | None = None) -> FastAPI:
    """The error handling and middleware of the real app around a route that is a bug."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug")

    @app.get("/fine")
    async def fine() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(RequestContextMiddleware, metrics=metrics or Metrics(), max_body_bytes=1024)
    return app


async def test_after_an_unexpected_exception_the_connection_serves_the_next_request():
    async with LiveServer(_failing_app(), free_port()) as server:
        (status, headers, body), (after, _, _) = await _exchange(
            server.port, [(_get("/bug"), b""), (_get("/fine"), b"")]
        )

    assert status == 500
    assert headers["content-type"].startswith("application/problem+json")
    assert json.loads(body)["type"].endswith("/internal")
    assert headers.get("connection") != "close"
    assert after == 200


async def test_the_500_carries_the_request_id_and_is_counted():
    metrics = Metrics()
    async with LiveServer(_failing_app(metrics), free_port()) as server:
        [(status, headers, _)] = await _exchange(
            server.port, [(_get("/bug", {"X-Request-ID": "rid-1"}), b"")]
        )

    assert status == 500
    assert headers["x-request-id"] == "rid-1"
    labels = {"method": "GET", "route": "/bug", "status": "500"}
    assert metrics.registry.get_sample_value("converge_http_requests_total", labels) == 1


# --- the real app's 4xx answers ----------------------------------------------------------------


def _error_requests(limit: int) -> list[tuple[str, bytes]]:
    auth = {"Authorization": ADMIN["Authorization"], "Content-Type": "application/json"}
    over = json.dumps({"name": "x", "description": "a" * (limit + 10)}).encode()
    return [
        (_get("/projects"), b""),  # 401: no credential
        (_get("/no-such-route", auth), b""),  # 404
        _post("/projects", b"{not json", auth),  # 400, body read
        _post("/projects", json.dumps({"name": "UPPER"}).encode(), auth),  # 422
        _post("/projects", over, auth),  # 413 from Content-Length, body never read
        _post("/projects", over, auth, chunked=True),  # 413 while reading a chunked body
        (_get("/projects?cursor=%C3%A9", auth), b""),  # 400 bad cursor
        (_get("/audit?action=a%00b", auth), b""),  # 422 NUL in a query parameter
    ]


@pytest.mark.parametrize(
    "index", range(8), ids=["401", "404", "400", "422", "413", "413-chunked", "cursor", "nul"]
)
async def test_after_an_error_answer_the_same_connection_serves_the_next_request(
    live_server, settings, index
):
    step = _error_requests(settings.server.max_body_bytes)[index]
    expected = [401, 404, 400, 422, 413, 413, 400, 422][index]

    async with live_server() as server:
        (status, headers, _), (after, _, body) = await _exchange(server.port, [step, (_get("/health"), b"")])

    assert status == expected
    assert headers["content-type"].startswith("application/problem+json")
    assert after == 200, body


async def test_a_connection_survives_a_run_of_different_errors(client, live_server, settings):
    # `client` puts the app on a rolled-back transaction: the project below does not outlive the test.
    steps = _error_requests(settings.server.max_body_bytes)
    name = f"p-{uuid.uuid4().hex[:10]}"
    steps.append(
        _post("/projects", json.dumps({"name": name}).encode(), {**ADMIN, "Content-Type": "application/json"})
    )

    async with live_server() as server:
        answers: list[Any] = await _exchange(server.port, steps)

    assert [status for status, _, _ in answers] == [401, 404, 400, 422, 413, 413, 400, 422, 201]
