"""Converge's Grafana dashboards: the platform overview, one deployment, the gateway, the
library and governance, the controller and workers (GPUs included), and cost and engines. `converge render
dashboards --dir deploy/grafana` writes them; a test regenerates them and compares with the
checked-in JSON, and another fails when a query selects a metric that `/metrics` does not expose.

Queries only use what `/metrics` exposes. Ratios and filtered series fall back to 0 where the
numerator has no series yet (`... or <denominator> * 0`), so a panel says 0, not "No data". The
GPU panels are the exception by design: without a GPU there are no GPU series, and they say so.
The engine figures (slots, KV cache, token counters) exist only where the engine reports them
(llama.cpp), so their panels are empty for other servers.
"""

from __future__ import annotations

from converge.observability.grafana import Dashboard, Row, Target, Threshold, Unit
from converge.observability.operations import cost, workers
from converge.observability.panels import (
    DEPLOYMENT,
    ERROR_THRESHOLDS,
    JOB,
    RATE,
    TTFT_OBJECTIVE_S,
    D,
    J,
    line,
    quantile,
    rate,
    ratio,
    stat,
)


def overview() -> Dashboard:
    http, gw = "converge_http_requests_total", "converge_gateway_requests_total"
    health = Row(
        "Health",
        (
            stat(
                "Processes up",
                f"sum(up{{{J}}})",
                description="Converge processes Prometheus scrapes successfully",
            ),
            stat("API requests/s", rate(http, J), unit=Unit.REQUESTS_PER_SECOND),
            stat(
                "API 5xx ratio",
                ratio(http, 'status=~"5.."', J),
                unit=Unit.RATIO,
                thresholds=ERROR_THRESHOLDS,
            ),
            stat("Inference requests/s", f"{rate(gw, J)} or vector(0)", unit=Unit.REQUESTS_PER_SECOND),
            stat(
                "Tokens/s",
                f"{rate('converge_gateway_tokens_total', J)} or vector(0)",
                unit=Unit.PER_SECOND,
            ),
            stat(
                "Usage records dropped",
                f"sum(increase(converge_gateway_meter_dropped_total{{{J}}}[$__range]))",
                description="In the time range: usage the database never received (budgets and cost miss it)",
                thresholds=(Threshold(None, "green"), Threshold(1, "red")),
            ),
            stat(
                "Readiness checks failing",
                f"count(converge_ready{{{J}}} == 0) or vector(0)",
                description="Checks of GET /readiness failing now, across processes (database, migrations, services)",
                thresholds=(Threshold(None, "green"), Threshold(1, "red")),
            ),
            stat(
                "Controller leading",
                f'max(converge_leader{{{J}, role="controller"}}) or vector(0)',
                description="1 while one process holds the controller's lock; 0: no deployment is reconciled",
                thresholds=(Threshold(None, "red"), Threshold(1, "green")),
            ),
        ),
    )
    api = Row(
        "Control plane API",
        (
            line(
                "Requests by status",
                Target(rate(http, J, by="status"), "{{status}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            line(
                "Latency p95 by route",
                Target(quantile(0.95, "converge_http_request_duration_seconds", J, by="route"), "{{route}}"),
                unit=Unit.SECONDS,
            ),
            line(
                "Readiness checks",
                Target(f"min by (instance, check) (converge_ready{{{J}}})", "{{instance}} {{check}}"),
                description="1 passing, 0 failing: the checks of GET /readiness, recomputed at every scrape",
                minimum=0,
                maximum=1,
            ),
            line(
                "Database connection pool",
                Target(f"sum by (instance) (converge_db_pool_checked_out{{{J}}})", "{{instance}} in use"),
                Target(f"sum by (instance) (converge_db_pool_size{{{J}}})", "{{instance}} pool size"),
                Target(f"sum by (instance) (converge_db_pool_overflow{{{J}}})", "{{instance}} overflow"),
            ),
        ),
    )
    inference = Row(
        "Inference",
        (
            line(
                "Requests by deployment",
                Target(rate(gw, J, by="deployment"), "{{deployment}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            line(
                "Error ratio by deployment (5xx)",
                Target(ratio(gw, 'status=~"5.."', J, by="deployment"), "{{deployment}}"),
                unit=Unit.RATIO,
                thresholds=ERROR_THRESHOLDS,
            ),
            line(
                "In flight and queued",
                Target(f"sum(converge_gateway_in_flight{{{J}}})", "in flight"),
                Target(f"sum(converge_gateway_queue_depth{{{J}}})", "queued"),
            ),
            line(
                "Replicas by breaker state",
                Target(f"count(converge_gateway_breaker_state{{{J}}} == 0) or vector(0)", "closed"),
                Target(f"count(converge_gateway_breaker_state{{{J}}} > 0) or vector(0)", "open or half-open"),
                description="The gateway's circuit breaker per replica; open replicas get no traffic",
            ),
        ),
    )
    return Dashboard(
        uid="converge-overview",
        title="Converge / Platform overview",
        description="Is Converge up, is its API healthy, is inference flowing",
        variables=(JOB,),
        rows=(health, api, inference),
    )


def deployment() -> Dashboard:
    gw = "converge_gateway_requests_total"
    traffic = Row(
        "Traffic",
        (
            line(
                "Requests by status",
                Target(rate(gw, J, D, by="status"), "{{status}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            line(
                "Requests by endpoint",
                Target(rate(gw, J, D, by="endpoint"), "{{endpoint}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            line(
                "Error ratio (5xx)",
                Target(ratio(gw, 'status=~"5.."', J, D), "5xx"),
                description="4xx and 499 are the callers' and not counted",
                unit=Unit.RATIO,
                thresholds=ERROR_THRESHOLDS,
            ),
            line(
                "Tokens per second",
                Target(rate("converge_gateway_tokens_total", J, D, by="kind"), "{{kind}}"),
                unit=Unit.PER_SECOND,
                stacked=True,
            ),
        ),
    )
    duration, ttft = (
        "converge_gateway_request_duration_seconds",
        "converge_gateway_time_to_first_token_seconds",
    )
    latency = Row(
        "Latency",
        (
            line(
                "Request duration",
                *(Target(quantile(q, duration, J, D), f"p{q * 100:g}") for q in (0.5, 0.95, 0.99)),
                description="From the request to the answer's last byte",
                unit=Unit.SECONDS,
            ),
            line(
                "Time to first token (streaming)",
                *(Target(quantile(q, ttft, J, D), f"p{q * 100:g}") for q in (0.5, 0.95)),
                description=f"The dashed line is the objective the alert rules use ({TTFT_OBJECTIVE_S:g} s)",
                unit=Unit.SECONDS,
                thresholds=(Threshold(None, "green"), Threshold(TTFT_OBJECTIVE_S, "red")),
            ),
        ),
    )
    replicas = Row(
        "Capacity and replicas",
        (
            line(
                "In flight and queued",
                Target(f"sum(converge_gateway_in_flight{{{J}, {D}}})", "in flight"),
                Target(f"sum(converge_gateway_queue_depth{{{J}, {D}}})", "queued"),
                description="Queued: waiting for a replica slot (max_in_flight_per_replica each)",
            ),
            line(
                "Breaker state per replica",
                Target(f"max by (replica) (converge_gateway_breaker_state{{{J}, {D}}})", "{{replica}}"),
                description="0 closed, 1 half-open, 2 open (the replica gets no traffic)",
                minimum=0,
                maximum=2,
            ),
            line(
                "Replicas by phase",
                Target(f"sum by (phase) (converge_replicas{{{J}, {D}}})", "{{phase}}"),
                description="What the runtime observes (starting, ready, draining, backoff after a crash, failed)",
                stacked=True,
            ),
            line(
                "Replica restarts",
                Target(f"sum(increase(converge_replica_restarts_total{{{J}, {D}}}[{RATE}]))", "restarts"),
                description="Crashes the runtime restarted; 3 in 15 minutes is ConvergeReplicaCrashLooping",
                thresholds=(Threshold(None, "green"), Threshold(1, "orange")),
            ),
            line(
                "Failed attempts against replicas",
                Target(
                    rate("converge_gateway_upstream_errors_total", J, D, by="reason") + " or vector(0)",
                    "{{reason}}",
                ),
                description="By the status the attempt ended with (retried or not)",
                unit=Unit.PER_SECOND,
                width=24,
            ),
        ),
    )
    return Dashboard(
        uid="converge-deployment",
        title="Converge / Deployment",
        description="One deployment through the gateway: traffic, errors, latency, replicas",
        variables=(JOB, DEPLOYMENT),
        rows=(traffic, latency, replicas),
    )


def gateway() -> Dashboard:
    gw = "converge_gateway_requests_total"
    traffic = Row(
        "Traffic",
        (
            line(
                "Requests by deployment",
                Target(rate(gw, J, by="deployment"), "{{deployment}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            line(
                "Requests by endpoint",
                Target(rate(gw, J, by="endpoint"), "{{endpoint}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            line(
                "Requests by status",
                Target(rate(gw, J, by="status"), "{{status}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            line(
                "Tokens per second by deployment",
                Target(
                    rate("converge_gateway_tokens_total", J, by="deployment, kind"),
                    "{{deployment}} {{kind}}",
                ),
                unit=Unit.PER_SECOND,
            ),
        ),
    )
    refusals = Row(
        "Refusals and failures",
        (
            line(
                "Refused before a replica, by reason",
                Target(
                    rate("converge_gateway_rejected_total", J, by="reason") + " or vector(0)", "{{reason}}"
                ),
                description="Rate limits, budgets, governance and hooks, full queues",
                unit=Unit.PER_SECOND,
                stacked=True,
            ),
            line(
                "Failed attempts against replicas",
                Target(
                    rate("converge_gateway_upstream_errors_total", J, by="deployment, reason")
                    + " or vector(0)",
                    "{{deployment}} {{reason}}",
                ),
                unit=Unit.PER_SECOND,
            ),
            line(
                "Replicas not closed, by deployment",
                Target(
                    f"count by (deployment) (converge_gateway_breaker_state{{{J}}} > 0) or vector(0)",
                    "{{deployment}}",
                ),
                description="Replicas whose circuit breaker is open or half-open",
            ),
            line(
                "Usage records waiting and dropped",
                Target(f"sum by (instance) (converge_gateway_meter_backlog{{{J}}})", "{{instance}} waiting"),
                Target(
                    f"sum by (instance) (increase(converge_gateway_meter_dropped_total{{{J}}}[{RATE}]))",
                    "{{instance}} dropped",
                ),
                description="Waiting: in memory and the spool, written every second while the database takes them."
                " Dropped: when it was away longer than the meter buffers",
                thresholds=(Threshold(None, "green"), Threshold(1, "red")),
            ),
        ),
    )
    capacity = Row(
        "Latency and capacity",
        (
            line(
                "Request duration p95 by deployment",
                Target(
                    quantile(0.95, "converge_gateway_request_duration_seconds", J, by="deployment"),
                    "{{deployment}}",
                ),
                unit=Unit.SECONDS,
            ),
            line(
                "Time to first token p95 by deployment",
                Target(
                    quantile(0.95, "converge_gateway_time_to_first_token_seconds", J, by="deployment"),
                    "{{deployment}}",
                ),
                unit=Unit.SECONDS,
                thresholds=(Threshold(None, "green"), Threshold(TTFT_OBJECTIVE_S, "red")),
            ),
            line(
                "In flight by deployment",
                Target(f"sum by (deployment) (converge_gateway_in_flight{{{J}}})", "{{deployment}}"),
                stacked=True,
            ),
            line(
                "Queued by deployment",
                Target(f"sum by (deployment) (converge_gateway_queue_depth{{{J}}})", "{{deployment}}"),
                stacked=True,
            ),
        ),
    )
    return Dashboard(
        uid="converge-gateway",
        title="Converge / Gateway",
        description="The OpenAI-compatible data path across deployments",
        variables=(JOB,),
        rows=(traffic, refusals, capacity),
    )


def governance() -> Dashboard:
    http = "converge_http_requests_total"
    library = Row(
        "Library",
        (
            line(
                "Library and sources requests by route",
                Target(
                    rate(http, J, 'route=~"/models.*|/sources.*"', by="method, route"),
                    "{{method}} {{route}}",
                ),
                unit=Unit.REQUESTS_PER_SECOND,
            ),
            line(
                "Approvals, rejections and deprecations",
                Target(
                    rate(http, J, 'route=~".*/(approve|reject|deprecate)"', 'status="200"', by="route")
                    + " or vector(0)",
                    "{{route}}",
                ),
                unit=Unit.PER_SECOND,
            ),
            line(
                "Policy and ruleset changes",
                Target(
                    rate(
                        http,
                        J,
                        'route=~"/policies.*|/rulesets.*"',
                        'method=~"POST|PATCH|PUT|DELETE"',
                        by="route",
                    )
                    + " or vector(0)",
                    "{{route}}",
                ),
                unit=Unit.PER_SECOND,
                width=24,
            ),
        ),
    )
    decisions = Row(
        "Governance decisions",
        (
            line(
                "Policy denials by policy",
                Target(
                    rate("converge_policy_denials_total", J, by="scope, policy") + " or vector(0)",
                    "{{scope}} {{policy}}",
                ),
                description="Actions a deny policy refused (each refusing policy counts once)",
                unit=Unit.PER_SECOND,
            ),
            line(
                "Answered 409 by route",
                Target(rate(http, J, 'status="409"', by="route") + " or vector(0)", "{{route}}"),
                description="A policy denial, a quota or a conflict",
                unit=Unit.PER_SECOND,
            ),
            line(
                "Answered 403 by route",
                Target(rate(http, J, 'status="403"', by="route") + " or vector(0)", "{{route}}"),
                description="A role lacking the permission",
                unit=Unit.PER_SECOND,
            ),
            line(
                "Guardrail hits by ruleset and rule",
                Target(
                    rate("converge_gateway_guardrail_hits_total", J, by="ruleset, rule, action")
                    + " or vector(0)",
                    "{{ruleset}} {{rule}} {{action}}",
                ),
                unit=Unit.PER_SECOND,
            ),
            line(
                "Gateway refusals: governance, hooks, budgets, limits",
                Target(
                    rate(
                        "converge_gateway_rejected_total",
                        J,
                        'reason=~"governance|hook|insufficient_quota|rate_limit_exceeded"',
                        by="reason",
                    )
                    + " or vector(0)",
                    "{{reason}}",
                ),
                description="insufficient_quota: a monthly token budget is spent",
                unit=Unit.PER_SECOND,
            ),
        ),
    )
    return Dashboard(
        uid="converge-governance",
        title="Converge / Library and governance",
        description="What enters the library, and what policies, rulesets and budgets refuse",
        variables=(JOB,),
        rows=(library, decisions),
    )


def all_dashboards() -> dict[str, Dashboard]:
    """File name (under deploy/grafana/) to dashboard."""
    return {
        "overview.json": overview(),
        "deployment.json": deployment(),
        "gateway.json": gateway(),
        "governance.json": governance(),
        "workers.json": workers(),
        "cost.json": cost(),
    }
