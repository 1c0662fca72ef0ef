"""Logs (structlog, JSON) and Prometheus metrics; `kit/middleware.py` is the ASGI middleware
that feeds both per request.

`Metrics` is one process's registry: the API's own series, and what the background services
(controller, build and ingestion runners) and readiness report through it. Labels are bounded by
the installation (deployment "<project>/<name>", server kind, outcome, policy name), never by a
request: no ids, no raw user strings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from converge.observability import tracing


def configure_logging(level: str = "INFO", *, json_logs: bool = True) -> None:
    """Logs on stderr: JSON lines (or, for a person at a terminal, structlog's console lines),
    each with the request id and trace id of the request that wrote it; and the same lines as
    JSON in the log file `log_to_file` opens (what GET /ops/logs and `converge logs` read)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_TeeLoggerFactory(console=not json_logs),
        cache_logger_on_first_use=True,
    )


def add_trace_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """`trace_id` and `span_id` of the span the line is written in (only while tracing is on)."""
    if tracing.ENABLED:
        found = tracing.ids()
        if found is not None:
            event.setdefault("trace_id", found[0])
            event.setdefault("span_id", found[1])
    return event


def log_path(data_dir: Path) -> Path:
    """Where a Converge process keeps its own log (JSON lines)."""
    return data_dir / "logs" / "converge.log"


_NOTE = re.compile(r"^\[converge (\d{4}-\d\d-\d\dT[\d:.]+Z)\] ")


def line_time(line: str) -> datetime | None:
    """When a log line was written: the `timestamp` of a JSON line (the control plane's and the
    replicas'), or the stamp of a supervisor note (`[converge <time>] ...`); None for other text
    (a native library's own output)."""
    text = line.lstrip()
    stamp: Any = None
    if text.startswith("{"):
        with contextlib.suppress(ValueError):
            decoded = json.loads(text)
            stamp = decoded.get("timestamp") if isinstance(decoded, dict) else None
    elif text.startswith("[converge "):
        found = _NOTE.match(text)
        stamp = found.group(1) if found else None
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


# A log file is rotated (once, to converge.log.1) when it grows past this.
MAX_LOG_BYTES = 64 << 20


class LogFile:
    """An append-only JSON-lines log, rotated once past `max_bytes`; safe from several threads."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_LOG_BYTES) -> None:
        self.path, self.max_bytes = path, max_bytes
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._file = self._open()

    def _open(self) -> IO[str]:
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_size > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def write(self, line: str) -> None:
        with self._lock:
            if self._file.closed:
                return
            self._file.write(line + "\n")
            self._file.flush()  # a follower (GET /ops/logs?follow=true) sees it now
            if self._file.tell() > self.max_bytes:
                self._file.close()
                self._file = self._open()

    def close(self) -> None:
        with self._lock:
            self._file.close()


_log_files: list[LogFile] = []  # the last one opened gets the lines (two apps in one process: tests)


def log_to_file(path: Path) -> LogFile:
    """From now on every log line also goes to `path`, as JSON, until `stop_logging_to`."""
    sink = LogFile(path)
    _log_files.append(sink)
    return sink


def stop_logging_to(sink: LogFile) -> None:
    with contextlib.suppress(ValueError):
        _log_files.remove(sink)
    sink.close()


class _TeeLogger:
    """structlog's final logger: the event to stderr (JSON, or console lines) and, as JSON, to
    the log file when one is open."""

    def __init__(self, *, console: bool) -> None:
        self._json = structlog.processors.JSONRenderer()
        self._console = structlog.dev.ConsoleRenderer() if console else None

    def msg(self, **event: Any) -> None:
        line: str | None = None
        if self._console is None or _log_files:
            rendered = self._json(None, "msg", dict(event))
            line = rendered if isinstance(rendered, str) else rendered.decode()
        if _log_files:
            assert line is not None
            _log_files[-1].write(line)
        text = line if self._console is None else self._console(None, "msg", event)
        print(text, file=sys.stderr, flush=True)

    debug = info = warning = warn = error = err = critical = fatal = exception = failure = log = msg


class _TeeLoggerFactory:
    def __init__(self, *, console: bool) -> None:
        self.console = console

    def __call__(self, *_args: Any) -> _TeeLogger:
        return _TeeLogger(console=self.console)


# How long reconciling one deployment takes (a database read, apply, observe, a status write).
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Builds (fetch, smoke-load, benchmark) and ingestion jobs: seconds to an hour.
JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


def _set_all(gauge: Gauge, values: Mapping[str, float], *, had: set[str]) -> set[str]:
    """A one-label gauge set to exactly `values`: the labels no longer there lose their series."""
    for label, value in values.items():
        gauge.labels(label).set(value)
    for gone in had - set(values):
        gauge.remove(gone)
    return set(values)


class EngineFigures(Protocol):
    slots_busy: int | None
    slots_total: int | None
    kv_cache_usage_ratio: float | None
    tokens_generated_total: int | None
    prompt_tokens_total: int | None
    prompt_tokens_cached_total: int | None


ENGINE_TOKENS = {  # converge_engine_tokens_total{kind}: the engine's own counter of each
    "generated": "tokens_generated_total",
    "prompt": "prompt_tokens_total",
    "prompt_cached": "prompt_tokens_cached_total",
}


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
        self.engine_slots = Gauge(
            "converge_engine_slots",
            "Inference slots of a deployment's ready replicas, by deployment (<project>/<name>) and"
            " state (busy, total), where the engine reports them (llama.cpp); the leader's view",
            ["deployment", "state"],
            registry=self.registry,
        )
        self.engine_kv_cache = Gauge(
            "converge_engine_kv_cache_usage_ratio",
            "The fullest KV cache among a deployment's ready replicas (0-1), where the engine reports it",
            ["deployment"],
            registry=self.registry,
        )
        self.engine_tokens = Counter(
            "converge_engine_tokens_total",
            "Tokens the engines of a deployment's replicas counted, by kind (generated, prompt,"
            " prompt_cached: prompt tokens served from the KV cache), where the engine reports them",
            ["deployment", "kind"],
            registry=self.registry,
        )
        self._engines: set[str] = set()
        self._engine_counts: dict[
            tuple[str, str], dict[str, int]
        ] = {}  # (deployment, replica) -> last counts
        self.budget_used = Gauge(
            "converge_project_budget_used_ratio",
            "Measured cost this month over the project's monthly budget in money (1 = spent), by"
            " project; set by the cost meter's budget check (every cost.rollup_s)",
            ["project"],
            registry=self.registry,
        )
        self._budgets: set[str] = set()
        self.cost_today = Gauge(
            "converge_deployment_cost_today",
            "Measured cost of a deployment's replicas today (UTC) so far, in the price catalogue's"
            " currency (replica-seconds x prices), by deployment; the cost meter's, every cost.rollup_s",
            ["deployment"],
            registry=self.registry,
        )
        self._costed: set[str] = set()
        self.key_expiry = Gauge(
            "converge_api_key_next_expiry_timestamp_seconds",
            "When the soonest-expiring live API key of a project (or `organisation`) expires, in"
            " Unix seconds; the leading controller's check (every few minutes)",
            ["project"],
            registry=self.registry,
        )
        self._expiring: set[str] = set()
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

    def observe_engine(self, deployment: str, replicas: Iterable[tuple[str, EngineFigures]]) -> None:
        """Slots, KV cache and token counters of the deployment's ready replicas whose engine
        reports them ((replica id, `runtime.base.EngineStats`)); a deployment whose replicas
        report nothing has no series (absent, not zero). Each replica's counters add what they
        grew by since the last look (all of it after a restart, when they start again from 0);
        what a replica had counted before this process first saw it is not added."""
        pairs = list(replicas)
        for replica_id, engine in pairs:
            last = self._engine_counts.setdefault((deployment, replica_id), {})
            for kind, name in ENGINE_TOKENS.items():
                now = getattr(engine, name)
                if now is None:
                    continue
                before = last.get(kind)
                series = self.engine_tokens.labels(deployment, kind)
                if before is not None:  # the first sight only sets the baseline
                    series.inc(now if now < before else now - before)  # below: restarted from 0
                last[kind] = now
        engines = [engine for _, engine in pairs]
        busy = [e.slots_busy for e in engines if e.slots_busy is not None]
        total = [e.slots_total for e in engines if e.slots_total is not None]
        kv = [e.kv_cache_usage_ratio for e in engines if e.kv_cache_usage_ratio is not None]
        if not (busy or total or kv):
            self._forget_engine(deployment)
            return
        self.engine_slots.labels(deployment, "busy").set(sum(busy))
        self.engine_slots.labels(deployment, "total").set(sum(total))
        self.engine_kv_cache.labels(deployment).set(max(kv, default=0.0))
        self._engines.add(deployment)

    def _forget_engine(self, deployment: str) -> None:
        if deployment in self._engines:
            self._engines.discard(deployment)
            for state in ("busy", "total"):
                self.engine_slots.remove(deployment, state)
            self.engine_kv_cache.remove(deployment)
        for kind in ENGINE_TOKENS:
            with contextlib.suppress(KeyError):
                self.engine_tokens.remove(deployment, kind)
        for key in [k for k in self._engine_counts if k[0] == deployment]:
            del self._engine_counts[key]

    def count_restarts(self, deployment: str, restarts: int) -> None:
        if restarts > 0:
            self.replica_restarts.labels(deployment).inc(restarts)

    def forget_deployment(self, deployment: str) -> None:
        """A deleted deployment's series go with it (the label set stays that of live ones)."""
        for phase in self._phases.pop(deployment, ()):
            self.replicas.remove(deployment, phase)
        self._forget_engine(deployment)
        with contextlib.suppress(KeyError):
            self.replica_restarts.remove(deployment)

    def forget_replicas(self) -> None:
        """No longer leading: the replica counts are the next leader's to report."""
        self.replicas.clear()
        self._phases.clear()
        self.observe_key_expiry({})  # the next leader's to report
        self.engine_slots.clear()
        self.engine_kv_cache.clear()
        self._engines.clear()
        self._engine_counts.clear()  # counters stay: a counter never goes back

    def observe_budgets(self, used: Mapping[str, float]) -> None:
        """Every project budget's use (a budget removed since loses its series)."""
        self._budgets = _set_all(self.budget_used, used, had=self._budgets)

    def observe_cost_today(self, spent: Mapping[str, float]) -> None:
        self._costed = _set_all(self.cost_today, spent, had=self._costed)

    def observe_key_expiry(self, next_expiry: Mapping[str, float]) -> None:
        """The soonest live key expiry per project (a project with none left loses its series)."""
        self._expiring = _set_all(self.key_expiry, next_expiry, had=self._expiring)

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
