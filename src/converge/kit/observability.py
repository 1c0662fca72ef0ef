"""Logs (structlog, JSON), Prometheus metrics and the ASGI middleware that feeds both."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from converge.kit.context import request_id_var


def configure_logging(level: str = "INFO", *, json_logs: bool = True) -> None:
    renderer: Any = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class Metrics:
    """One registry per app instance, so two apps in one process (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "converge_http_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "converge_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

    def watch_pool(self, pool_status: Callable[[], dict[str, int]]) -> None:
        class PoolCollector:
            def collect(self) -> Any:
                stats = pool_status()
                for name, value in stats.items():
                    g = GaugeMetricFamily(f"converge_db_pool_{name}", f"Database connection pool: {name}")
                    g.add_metric([], value)
                    yield g

        self.registry.register(PoolCollector())


def _route_template(scope: Scope) -> str:
    # The router records the matched route in the scope; label by its template, never the raw
    # path, so ids in URLs cannot blow up the metric's cardinality.
    return getattr(scope.get("route"), "path", "unmatched")


class RequestContextMiddleware:
    """Request id, access log, metrics and the body-size limit, as plain ASGI (no per-request
    BaseHTTPMiddleware task) so it stays cheap and never buffers streaming responses."""

    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, unlimited_suffixes: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.unlimited = unlimited_suffixes
        self.log = structlog.get_logger("converge.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0917 - the ASGI signature
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        # A client's id is kept only if it is printable ASCII (it is logged, stored and echoed);
        # latin-1 decodes any header bytes, so an odd one is replaced rather than a 500.
        given = headers.get(b"x-request-id", b"")[:64].decode("latin-1")
        rid = given if given and given.isascii() and given.isprintable() else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        structlog.contextvars.bind_contextvars(request_id=rid)
        status = 500
        start = time.perf_counter()
        # Uploads stream to disk and enforce their own, much larger limit.
        limited = not (self.unlimited and scope["path"].endswith(self.unlimited))

        if limited and int(headers.get(b"content-length", b"0") or 0) > self.max_body:
            await self._too_large(send)
            status = 413
            self._observe(scope, status, start)
            return

        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if limited and message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge(self.max_body)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, counting_receive, send_with_id)
        except _BodyTooLarge:
            # Only reached by an app that lets the exception escape, before it answered.
            status = 413
            await self._too_large(send)
        finally:
            self._observe(scope, status, start)
            structlog.contextvars.unbind_contextvars("request_id")
            request_id_var.reset(token)

    def _observe(self, scope: Scope, status: int, start: float) -> None:
        elapsed = time.perf_counter() - start
        route = _route_template(scope)
        method = scope["method"]
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.latency.labels(method, route).observe(elapsed)
        if status >= 500:
            self.log.warning(
                "request", method=method, path=scope["path"], status=status, ms=round(elapsed * 1e3, 2)
            )
        else:
            self.log.debug(
                "request", method=method, path=scope["path"], status=status, ms=round(elapsed * 1e3, 2)
            )

    async def _too_large(self, send: Send) -> None:
        body = json.dumps(
            {
                "type": "https://converge.dev/problems/payload-too-large",
                "title": "Request body too large",
                "status": 413,
                "detail": f"The request body exceeds the limit of {self.max_body} bytes",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(HTTPException):
    """Raised from `receive`, inside the app: an HTTPException, because FastAPI passes those on
    from body parsing (to the problem+json handler) and turns any other error there into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body exceeds the limit of {limit} bytes")
