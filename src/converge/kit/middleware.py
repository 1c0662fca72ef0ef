"""The request middleware: request id, access log, metrics, the body-size limit and, while
tracing is on, the request's server span (plain ASGI, see `RequestContextMiddleware`)."""

from __future__ import annotations

import json
import time
import uuid

import structlog
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from converge.kit.context import request_id_var
from converge.kit.observability import Metrics, metrics_var
from converge.observability import tracing


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
        metrics_token = metrics_var.set(self.metrics)
        method = scope["method"]
        # Named by its route template once routing has matched it (see _route_template).
        traced = (
            tracing.ActiveSpan(
                method, kind="server", headers=scope["headers"], attributes={"http.request.method": method}
            )
            if tracing.ENABLED
            else None
        )

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
                if traced is not None:
                    message["headers"].append((b"traceparent", traced.traceparent()))
            await send(message)

        try:
            await self.app(scope, counting_receive, send_with_id)
        except _BodyTooLarge:
            # Only reached by an app that lets the exception escape, before it answered.
            status = 413
            await self._too_large(send)
        finally:
            self._observe(scope, status, start)
            if traced is not None:
                route = _route_template(scope)
                traced.set(**{"http.route": route})
                traced.end(status=status, name=f"{method} {route}")
            structlog.contextvars.unbind_contextvars("request_id")
            metrics_var.reset(metrics_token)
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
