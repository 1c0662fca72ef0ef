"""Logs (structlog, JSON), Prometheus metrics and the ASGI middleware that feeds both.

`Metrics` is one process's registry: the API's own series, and what the background services
(controller, build and ingestion runners) and readiness report through it. Labels are bounded by
the installation (deployment "<project>/<name>", server kind, outcome, policy name), never by a
request: no ids, no raw user strings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
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


# How long reconciling one deployment takes (a database read, apply, observe, a status write).
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Builds (fetch, smoke-load, benchmark) and ingestion jobs: seconds to an hour.
JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


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
        self.ready = Gauge(
            "converge_ready",
            "1 while a readiness check passes, 0 while it fails (the checks of GET /readiness)",
            ["check"],
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "converge_reconcile_duration_seconds",
            "Controller: reconciling one deployment (read, apply, observe, status)",
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "converge_reconcile_errors_total",
            "Controller: reconciles of a deployment that failed (the next pass retries)",
            registry=self.registry,
        )
        self.replicas = Gauge(
            "converge_replicas",
            "Replicas the runtime observes, by deployment (<project>/<name>) and phase; the leading controller's view",
            ["deployment", "phase"],
            registry=self.registry,
        )
        self.replica_restarts = Counter(
            "converge_replica_restarts_total",
            "Replica restarts the runtime reported (a crash, restarted), by deployment (<project>/<name>)",
            ["deployment"],
            registry=self.registry,
        )
        self.build_duration = Histogram(
            "converge_build_duration_seconds",
            "Finished builds, from start to finish, by server kind and outcome (succeeded, failed, cancelled)",
            ["server", "outcome"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.ingestion_duration = Histogram(
            "converge_ingestion_job_duration_seconds",
            "Finished runs of ingestion jobs by outcome (succeeded, failed, cancelled)",
            ["outcome"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.chunks_embedded = Counter(
            "converge_ingestion_chunks_embedded_total",
            "Chunks ingestion jobs embedded",
            registry=self.registry,
        )
        self.policy_denials = Counter(
            "converge_policy_denials_total",
            "Actions refused by a deny policy, by scope (registration, approval, deployment) and policy name",
            ["scope", "policy"],
            registry=self.registry,
        )
        self._phases: dict[str, tuple[str, ...]] = {}  # deployment -> the phases it has series for
        self._checks: set[str] = set()  # the readiness checks with a series

    def observe_readiness(self, checks: Mapping[str, bool]) -> None:
        """Every check /readiness computed (a check it no longer makes loses its series)."""
        for check, ok in checks.items():
            self.ready.labels(check).set(1 if ok else 0)
        for gone in self._checks - set(checks):
            self.ready.remove(gone)
        self._checks = set(checks)

    def observe_replicas(self, deployment: str, phases: Mapping[str, int]) -> None:
        """The replicas of one deployment by phase (every phase, 0 included, so a phase that
        empties reads 0 rather than its last value); its restart counter exists from now on."""
        for phase, count in phases.items():
            self.replicas.labels(deployment, phase).set(count)
        self._phases[deployment] = tuple(phases)
        self.replica_restarts.labels(deployment)

    def count_restarts(self, deployment: str, restarts: int) -> None:
        if restarts > 0:
            self.replica_restarts.labels(deployment).inc(restarts)

    def forget_deployment(self, deployment: str) -> None:
        """A deleted deployment's series go with it (the label set stays that of live ones)."""
        for phase in self._phases.pop(deployment, ()):
            self.replicas.remove(deployment, phase)
        with contextlib.suppress(KeyError):
            self.replica_restarts.remove(deployment)

    def forget_replicas(self) -> None:
        """No longer leading: the replica counts are the next leader's to report."""
        self.replicas.clear()
        self._phases.clear()

    def observe_build(self, *, server: str, outcome: str, seconds: float) -> None:
        self.build_duration.labels(server, outcome).observe(max(0.0, seconds))

    def observe_ingestion(self, *, outcome: str, seconds: float, chunks: int) -> None:
        self.ingestion_duration.labels(outcome).observe(max(0.0, seconds))
        if chunks > 0:
            self.chunks_embedded.inc(chunks)

    def watch_leaders(self, services: Callable[[], Iterable[Any]]) -> None:
        """`converge_leader{role}`: 1 while this process holds a leader-elected service's lock
        (the services with an `is_leader` flag), 0 while it stands by."""
        self.registry.register(_LeaderCollector(services))

    def watch_pool(self, pool_status: Callable[[], dict[str, int]]) -> None:
        class PoolCollector:
            def collect(self) -> Any:
                stats = pool_status()
                for name, value in stats.items():
                    g = GaugeMetricFamily(f"converge_db_pool_{name}", f"Database connection pool: {name}")
                    g.add_metric([], value)
                    yield g

        self.registry.register(PoolCollector())


class _LeaderCollector:
    def __init__(self, services: Callable[[], Iterable[Any]]) -> None:
        self._services = services

    def collect(self) -> Iterator[Any]:
        leader = GaugeMetricFamily(
            "converge_leader",
            "1 while this process leads the role (holds its lock), 0 while it stands by",
            labels=["role"],
        )
        for service in list(self._services()):
            flag = getattr(service, "is_leader", None)
            if isinstance(flag, bool):
                leader.add_metric([service.name], 1 if flag else 0)
        yield leader


# The metrics of the app serving this request (set by RequestContextMiddleware), for code a
# request runs that has no other way to them, such as admission counting its policy denials.
metrics_var: ContextVar[Metrics | None] = ContextVar("metrics", default=None)


def count_policy_denials(*, scope: str, policies: Iterable[str]) -> None:
    """One denial per deny policy that refused the action (policy names: admins', bounded)."""
    metrics = metrics_var.get()
    if metrics is not None:
        for policy in policies:
            metrics.policy_denials.labels(scope, policy).inc()


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
