"""What every model server shares: request counting, health and stats routes, the runner.

A `ModelHost` answers `/health/live` as soon as the HTTP server is up, loads the model in a
background thread, and only then hands inference routes to the model's own ASGI app. The
supervisor reads `/health/ready` to route traffic and `/converge/stats` to scale and drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from converge.kit.context import request_id_var
from converge.kit.service import cancel
from converge.observability import tracing

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("converge.serving")

LIVE_PATH = "/health/live"
READY_PATH = "/health/ready"
STATS_PATH = "/converge/stats"
# Draining replicas finish what they hold; the supervisor kills after its own grace period.
GRACEFUL_SHUTDOWN_S = 30


@dataclass
class RequestStats:
    """Counters behind `/converge/stats`; touched only from the event loop."""

    max_concurrency: int = 1
    in_flight: int = 0
    requests_total: int = 0

    @property
    def queue_depth(self) -> int:
        return max(0, self.in_flight - self.max_concurrency)


class InFlightMiddleware:
    """Counts requests on inference routes from arrival until their body ends.

    Pure ASGI so streaming responses pass through untouched. A request stops counting at the
    first of: the last body chunk, the client disconnecting, or the app returning or raising.
    """

    def __init__(self, app: ASGIApp, *, stats: RequestStats, paths: Iterable[str]) -> None:
        self.app = app
        self.stats = stats
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0917 - the ASGI signature
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return

        stats = self.stats
        stats.in_flight += 1
        stats.requests_total += 1
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done = True
                stats.in_flight -= 1

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                finish()
            return message

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            finish()


class TraceMiddleware:
    """On inference routes: the caller's request id (`x-request-id`) into the log context, and,
    while tracing is on, a server span that continues the caller's `traceparent` (the gateway's
    upstream span). Health and stats probes are never traced: the supervisor sends them twice a
    second."""

    def __init__(self, app: ASGIApp, *, paths: Iterable[str]) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0917 - the ASGI signature
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")[:64].decode("latin-1")
        token = request_id_var.set(given) if given.isascii() and given.isprintable() and given else None
        started = time.perf_counter()
        try:
            if tracing.ENABLED:
                await self._traced(scope, receive, send, started=started)
                return
            try:
                await self.app(scope, receive, send)
            finally:
                _access(scope, started)
        finally:
            if token is not None:
                request_id_var.reset(token)

    async def _traced(self, scope: Scope, receive: Receive, send: Send, *, started: float) -> None:
        method, path = scope["method"], scope["path"]
        active = tracing.ActiveSpan(
            f"{method} {path}",  # an inference path: one of a fixed few
            kind="server",
            headers=scope["headers"],
            attributes={"http.request.method": method, "http.route": path},
        )
        status = 500

        async def traced_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, traced_send)
        finally:
            _access(scope, started)  # inside the span: the line carries its trace id
            active.end(status=status)


def _access(scope: Scope, started: float) -> None:
    """The access line of an inference request, at debug level (`--log-level debug`)."""
    if log.isEnabledFor(logging.DEBUG):
        ms = (time.perf_counter() - started) * 1000
        log.debug("request %s %s done in %.2f ms", scope["method"], scope["path"], ms)


def engine_session(
    base_url: str | None = None, *, headers: dict[str, str] | None = None, force_close: bool = False
) -> aiohttp.ClientSession:
    """The client a replica forwards with to the engine it runs beside it (MLServer, llama-server,
    vLLM): aiohttp, as the gateway's, since it sits on the data path of every inference. No limit
    on connections, no deadline on an answer (a generation takes as long as it takes) but 5 s to
    connect to a local socket, and bytes passed through as the engine encoded them. Made on the
    event loop, at first use."""
    import aiohttp  # noqa: PLC0415 - only the proxying replicas pay for the import

    return aiohttp.ClientSession(
        base_url,
        headers=headers,
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, force_close=force_close),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    )


def openai_error(status_code: int, message: str, *, type_: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": None}}
    return JSONResponse(body, status_code=status_code)


class ModelHost:
    """Serves one model's ASGI app behind Converge's health and stats routes.

    `load` runs once, off the event loop, and returns the ASGI app that serves the loaded
    model. Until it returns, inference routes answer 503 and `/health/ready` says so. `close`,
    when given, is awaited on the event loop as the server shuts down (the clients it opened).
    """

    def __init__(
        self,
        *,
        kind: str,
        model_name: str,
        load: Callable[[], ASGIApp],
        inference_paths: Iterable[str],
        max_concurrency: int = 1,
        live_stats: Callable[[], Any] | None = None,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.kind = kind
        self._close = close
        self.live_stats = live_stats
        self.model_name = model_name
        self.stats = RequestStats(max_concurrency=max_concurrency)
        self.model_app: ASGIApp | None = None
        self.load_error: BaseException | None = None
        self.load_seconds: float | None = None
        self.on_load_failed: Callable[[], None] = lambda: None
        self._load = load
        self._control = Router(
            routes=[
                Route(LIVE_PATH, self._live, methods=["GET"]),
                Route(READY_PATH, self._ready, methods=["GET"]),
                Route(STATS_PATH, self._stats, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )
        paths = frozenset(inference_paths)
        counted = InFlightMiddleware(self._dispatch, stats=self.stats, paths=paths)
        self.app: ASGIApp = TraceMiddleware(counted, paths=paths)

    @property
    def ready(self) -> bool:
        return self.model_app is not None

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Start loading the model; the server accepts connections meanwhile."""
        task = asyncio.create_task(self._load_model(), name="load-model")
        try:
            yield
        finally:
            await cancel(task)
            if self._close is not None:
                await self._close()

    def _lifespan(self, _app: Any) -> contextlib.AbstractAsyncContextManager[None]:
        return self.lifespan()

    async def _load_model(self) -> None:
        log.info("loading %s model %r", self.kind, self.model_name)
        started = time.perf_counter()
        try:
            app = await _run_in_daemon_thread(self._load)
        except Exception as exc:
            self.load_error = exc
            log.error("model %r failed to load: %s", self.model_name, exc, exc_info=exc)
            self.on_load_failed()
            return
        self.load_seconds = time.perf_counter() - started
        self.model_app = app
        log.info("model %r ready in %.2f s", self.model_name, self.load_seconds)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or scope.get("path") in (LIVE_PATH, READY_PATH, STATS_PATH):
            await self._control(scope, receive, send)
        elif self.model_app is not None:
            await self.model_app(scope, receive, send)
        elif scope["type"] == "http":
            response = openai_error(503, "The model is still loading", type_="service_unavailable")
            response.headers["Retry-After"] = "1"
            await response(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})

    async def _live(self, _request: Request) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    async def _ready(self, _request: Request) -> JSONResponse:
        if self.model_app is not None:
            return JSONResponse({"status": "ready", "model": self.model_name})
        if self.load_error is not None:
            return JSONResponse({"status": "failed", "error": str(self.load_error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    async def _stats(self, _request: Request) -> JSONResponse:
        stats = {
            "in_flight": self.stats.in_flight,
            "queue_depth": self.stats.queue_depth,
            "requests_total": self.stats.requests_total,
            "model": self.model_name,
            "kind": self.kind,
        }
        # A server that knows its own queue (a batching one) says so; its figures win.
        live = self.live_stats() if self.live_stats else {}
        if inspect.isawaitable(live):  # one that asks its engine (llama-server's /slots)
            live = await live
        return JSONResponse(stats | live)


async def _run_in_daemon_thread(fn: Callable[[], ASGIApp]) -> ASGIApp:
    """Run `fn` in a daemon thread: a SIGTERM during a long load must not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[ASGIApp] = loop.create_future()

    def settle(outcome: ASGIApp | BaseException) -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def work() -> None:
        outcome: ASGIApp | BaseException
        try:
            outcome = fn()
        except BaseException as exc:  # handed to the loop, which logs it
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop closed while we loaded
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=work, name="model-loader", daemon=True).start()
    return await future


def granted_cpus() -> int:
    """The CPUs this replica may use: what its runtime granted (`OMP_NUM_THREADS`, which the
    local runtime and the Kubernetes pods set from the deployment's `resources.cpu`, rounded
    up), else every CPU this process may run on. A server that spreads one request over more
    threads than it was granted only makes them wait for each other."""
    granted = os.environ.get("OMP_NUM_THREADS", "")
    if granted.isdigit() and int(granted) > 0:
        return int(granted)
    try:
        return len(os.sched_getaffinity(0))  # honours CPU pinning, unlike os.cpu_count()
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def positive_int(text: str) -> int:
    """argparse type for counts such as threads and batch sizes."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object a line, in the control plane's shape (timestamp, level, logger, event),
    with the request id and trace id of the request being served when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            line["request_id"] = request_id
        found = tracing.ids()
        if found is not None:
            line["trace_id"], line["span_id"] = found
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr (the supervisor appends them to the replica's log file)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _exit_cleanly(signum: int, _frame: FrameType | None) -> None:
    # Before uvicorn installs its handlers this stops a replica that has not started serving;
    # afterwards uvicorn re-raises the signal once it has shut down gracefully. Either way a
    # requested stop is a clean exit, not death by signal.
    raise SystemExit(0)


def serve(host: ModelHost, *, bind: str, port: int) -> int:
    """Serve until SIGTERM/SIGINT (exit 0) or a failed model load (exit 1)."""
    config = uvicorn.Config(
        host.app,
        host=bind,
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)

    def stop() -> None:
        server.should_exit = True

    host.on_load_failed = stop
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    # Traces when the runtime gave this replica a collector (CONVERGE_OTEL__ENDPOINT).
    traced = tracing.configure_from_env(
        os.environ, service_name=f"converge-{host.kind}", **{"converge.model": host.model_name}
    )
    try:
        server.run()
    finally:
        if traced:
            tracing.shutdown()  # what is still queued is exported before the process ends
    return 1 if host.load_error is not None else 0
