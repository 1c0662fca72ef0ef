"""Prometheus metrics of the data path, labelled by deployment ("<project>/<name>").

Counters and histograms are updated per request (a few microseconds); in-flight, queue depth,
breaker state and the meter's backlog are read from the pools and the meter only when
Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from converge.gateway.metering import Meter
    from converge.gateway.routing import Pool

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, pools: Callable[[], dict[str, Pool]]) -> None:
        self.requests = Counter(
            "converge_gateway_requests_total",
            "Inference requests by deployment, endpoint and status code",
            ["deployment", "endpoint", "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "converge_gateway_tokens_total",
            "Tokens by deployment and kind (prompt, completion)",
            ["deployment", "kind"],
            registry=registry,
        )
        self.latency = Histogram(
            "converge_gateway_request_duration_seconds",
            "Time from request to the last byte of the answer",
            ["deployment", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "converge_gateway_time_to_first_token_seconds",
            "Streaming: time from request to the first chunk",
            ["deployment"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "converge_gateway_inter_token_latency_seconds",
            "Streaming: the mean time between tokens after the first, one observation per stream"
            " of two or more completion tokens",
            ["deployment"],
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "converge_gateway_upstream_errors_total",
            "Failed attempts against replicas (retried or not), by reason",
            ["deployment", "reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "converge_gateway_rejected_total",
            "Requests refused before reaching a replica, by reason",
            ["reason"],
            registry=registry,
        )
        self.meter_dropped = Counter(
            "converge_gateway_meter_dropped_total",
            "Usage records dropped because the database was away too long",
            registry=registry,
        )
        self.guardrail_hits = Counter(
            "converge_gateway_guardrail_hits_total",
            "Guardrail hits by ruleset (<project>/<name>), rule and action (refused, redacted)",
            ["ruleset", "rule", "action"],
            registry=registry,
        )
        registry.register(_PoolCollector(pools))
        self._meter: Callable[[], Meter | None] = lambda: None
        registry.register(_MeterCollector(lambda: self._meter()))
        self._series: dict[tuple[str, str], Series] = {}

    def watch_meter(self, meter: Callable[[], Meter | None]) -> None:
        """Where the backlog gauge reads the meter (once the gateway has started one)."""
        self._meter = meter

    def series(self, deployment: str, endpoint: str) -> Series:
        """The bound children of one deployment and endpoint (labels() costs more per call)."""
        found = self._series.get((deployment, endpoint))
        if found is None:
            found = self._series[(deployment, endpoint)] = Series(self, deployment, endpoint)
        return found


class Series:
    __slots__ = (
        "_metrics",
        "_deployment",
        "_endpoint",
        "_requests",
        "latency",
        "prompt",
        "completion",
        "ttft",
        "inter_token",
    )

    def __init__(self, metrics: GatewayMetrics, deployment: str, endpoint: str) -> None:
        self._metrics, self._deployment, self._endpoint = metrics, deployment, endpoint
        self._requests: dict[int, Any] = {}
        self.latency = metrics.latency.labels(deployment, endpoint)
        self.prompt = metrics.tokens.labels(deployment, "prompt")
        self.completion = metrics.tokens.labels(deployment, "completion")
        self.ttft = metrics.ttft.labels(deployment)
        self.inter_token = metrics.inter_token.labels(deployment)

    def requests(self, status: int) -> Any:
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = self._metrics.requests.labels(
                self._deployment, self._endpoint, str(status)
            )
        return child


class _PoolCollector:
    def __init__(self, pools: Callable[[], dict[str, Pool]]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Any]:
        in_flight = GaugeMetricFamily(
            "converge_gateway_in_flight", "Requests being served by replicas", labels=["deployment"]
        )
        queued = GaugeMetricFamily(
            "converge_gateway_queue_depth", "Requests waiting for a replica slot", labels=["deployment"]
        )
        breaker = GaugeMetricFamily(
            "converge_gateway_breaker_state",
            "Circuit breaker per replica: 0 closed, 1 half-open, 2 open",
            labels=["deployment", "replica"],
        )
        for label, pool in list(self._pools().items()):
            in_flight.add_metric([label], pool.in_flight)
            queued.add_metric([label], len(pool.waiters) + pool.waking)
            for endpoint, replica in list(pool.replicas.items()):
                breaker.add_metric([label, endpoint], int(replica.state))
        yield in_flight
        yield queued
        yield breaker


class _MeterCollector:
    def __init__(self, meter: Callable[[], Meter | None]) -> None:
        self._meter = meter

    def collect(self) -> Iterator[Any]:
        backlog = GaugeMetricFamily(
            "converge_gateway_meter_backlog",
            "Usage records waiting to be written to the database, the spool's included",
        )
        meter = self._meter()
        if meter is not None:
            backlog.add_metric([], meter.backlog)
        yield backlog
