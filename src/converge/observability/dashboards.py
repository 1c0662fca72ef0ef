"""Converge's Grafana dashboards: the platform overview, one deployment, the gateway, and the
library and governance. `converge render dashboards --dir deploy/grafana` writes them; a test
regenerates them and compares with the checked-in JSON, and another fails when a query selects a
metric that `/metrics` does not expose.

Queries only use what `/metrics` exposes today. Ratios and filtered series fall back to 0 where
the numerator has no series yet (`... or <denominator> * 0`), so a panel says 0, not "No data".
Metrics that issue 20 part 1 is to add (tokens/s per replica, KV cache, GPU memory, replica
restarts, build and ingestion jobs, policy denials by rule) get panels when they exist.
"""

from __future__ import annotations

from converge.observability.grafana import (
    Dashboard,
    Kind,
    Panel,
    Row,
    Target,
    Threshold,
    Unit,
    Variable,
)

RATE = "$__rate_interval"
TTFT_OBJECTIVE_S = 2.0  # deploy/prometheus: deployment:converge_gateway_time_to_first_token_slo_seconds
ERROR_RATIO_WARNING = 0.05  # deploy/prometheus: ConvergeDeploymentErrorRatio

JOB = Variable(name="job", label="job", metric="converge_http_requests_total", title="Job")
DEPLOYMENT = Variable(
    name="deployment",
    label="deployment",
    metric='converge_gateway_requests_total{job=~"$job"}',
    title="Deployment",
    multi=False,
)


def _sel(metric: str, *matchers: str) -> str:
    return f"{metric}{{{', '.join(matchers)}}}" if matchers else metric


def _rate(metric: str, *matchers: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({_sel(metric, *matchers)}[{RATE}]))"


def _ratio(metric: str, part: str, *matchers: str, by: str = "") -> str:
    """The share of `metric`'s rate whose labels also match `part`; 0, not absent, when none do."""
    whole = _rate(metric, *matchers, by=by)
    return f"({_rate(metric, *matchers, part, by=by)} or {whole} * 0) / {whole}"


def _quantile(q: float, histogram: str, *matchers: str, by: str = "") -> str:
    group = ", ".join(filter(None, (by, "le")))
    return f"histogram_quantile({q:g}, {_rate(f'{histogram}_bucket', *matchers, by=group)})"


def _line(
    title: str,
    *targets: Target,
    description: str = "",
    unit: Unit = Unit.SHORT,
    stacked: bool = False,
    thresholds: tuple[Threshold, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
    width: int = 12,
) -> Panel:
    return Panel(
        title=title,
        targets=targets,
        description=description,
        unit=unit,
        stacked=stacked,
        thresholds=thresholds,
        minimum=minimum,
        maximum=maximum,
        width=width,
    )


def _stat(
    title: str,
    expr: str,
    *,
    description: str = "",
    unit: Unit = Unit.SHORT,
    thresholds: tuple[Threshold, ...] = (),
) -> Panel:
    return Panel(
        title=title,
        targets=(Target(expr, instant=True),),
        description=description,
        kind=Kind.STAT,
        unit=unit,
        thresholds=thresholds,
        width=4,
        height=4,
    )


ERROR_THRESHOLDS = (Threshold(None, "green"), Threshold(ERROR_RATIO_WARNING, "red"))
J = 'job=~"$job"'
D = 'deployment=~"$deployment"'


def overview() -> Dashboard:
    http, gw = "converge_http_requests_total", "converge_gateway_requests_total"
    health = Row(
        "Health",
        (
            _stat(
                "Processes up",
                f"sum(up{{{J}}})",
                description="Converge processes Prometheus scrapes successfully",
            ),
            _stat("API requests/s", _rate(http, J), unit=Unit.REQUESTS_PER_SECOND),
            _stat(
                "API 5xx ratio",
                _ratio(http, 'status=~"5.."', J),
                unit=Unit.RATIO,
                thresholds=ERROR_THRESHOLDS,
            ),
            _stat("Inference requests/s", f"{_rate(gw, J)} or vector(0)", unit=Unit.REQUESTS_PER_SECOND),
            _stat(
                "Tokens/s",
                f"{_rate('converge_gateway_tokens_total', J)} or vector(0)",
                unit=Unit.PER_SECOND,
            ),
            _stat(
                "Usage records dropped",
                f"sum(increase(converge_gateway_meter_dropped_total{{{J}}}[$__range]))",
                description="In the time range: usage the database never received (budgets and cost miss it)",
                thresholds=(Threshold(None, "green"), Threshold(1, "red")),
            ),
        ),
    )
    api = Row(
        "Control plane API",
        (
            _line(
                "Requests by status",
                Target(_rate(http, J, by="status"), "{{status}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            _line(
                "Latency p95 by route",
                Target(_quantile(0.95, "converge_http_request_duration_seconds", J, by="route"), "{{route}}"),
                unit=Unit.SECONDS,
            ),
            _line(
                "Readiness probes answered 503",
                Target(_ratio(http, 'status="503"', J, 'route="/readiness"', by="instance"), "{{instance}}"),
                description="Share of /readiness probes failing (database, migrations or a service down)",
                unit=Unit.RATIO,
                minimum=0,
                maximum=1,
            ),
            _line(
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
            _line(
                "Requests by deployment",
                Target(_rate(gw, J, by="deployment"), "{{deployment}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            _line(
                "Error ratio by deployment (5xx)",
                Target(_ratio(gw, 'status=~"5.."', J, by="deployment"), "{{deployment}}"),
                unit=Unit.RATIO,
                thresholds=ERROR_THRESHOLDS,
            ),
            _line(
                "In flight and queued",
                Target(f"sum(converge_gateway_in_flight{{{J}}})", "in flight"),
                Target(f"sum(converge_gateway_queue_depth{{{J}}})", "queued"),
            ),
            _line(
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
            _line(
                "Requests by status",
                Target(_rate(gw, J, D, by="status"), "{{status}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            _line(
                "Requests by endpoint",
                Target(_rate(gw, J, D, by="endpoint"), "{{endpoint}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            _line(
                "Error ratio (5xx)",
                Target(_ratio(gw, 'status=~"5.."', J, D), "5xx"),
                description="4xx and 499 are the callers' and not counted",
                unit=Unit.RATIO,
                thresholds=ERROR_THRESHOLDS,
            ),
            _line(
                "Tokens per second",
                Target(_rate("converge_gateway_tokens_total", J, D, by="kind"), "{{kind}}"),
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
            _line(
                "Request duration",
                *(Target(_quantile(q, duration, J, D), f"p{q * 100:g}") for q in (0.5, 0.95, 0.99)),
                description="From the request to the answer's last byte",
                unit=Unit.SECONDS,
            ),
            _line(
                "Time to first token (streaming)",
                *(Target(_quantile(q, ttft, J, D), f"p{q * 100:g}") for q in (0.5, 0.95)),
                description=f"The dashed line is the objective the alert rules use ({TTFT_OBJECTIVE_S:g} s)",
                unit=Unit.SECONDS,
                thresholds=(Threshold(None, "green"), Threshold(TTFT_OBJECTIVE_S, "red")),
            ),
        ),
    )
    replicas = Row(
        "Capacity and replicas",
        (
            _line(
                "In flight and queued",
                Target(f"sum(converge_gateway_in_flight{{{J}, {D}}})", "in flight"),
                Target(f"sum(converge_gateway_queue_depth{{{J}, {D}}})", "queued"),
                description="Queued: waiting for a replica slot (max_in_flight_per_replica each)",
            ),
            _line(
                "Breaker state per replica",
                Target(f"max by (replica) (converge_gateway_breaker_state{{{J}, {D}}})", "{{replica}}"),
                description="0 closed, 1 half-open, 2 open (the replica gets no traffic)",
                minimum=0,
                maximum=2,
            ),
            _line(
                "Failed attempts against replicas",
                Target(
                    _rate("converge_gateway_upstream_errors_total", J, D, by="reason") + " or vector(0)",
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
            _line(
                "Requests by deployment",
                Target(_rate(gw, J, by="deployment"), "{{deployment}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            _line(
                "Requests by endpoint",
                Target(_rate(gw, J, by="endpoint"), "{{endpoint}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            _line(
                "Requests by status",
                Target(_rate(gw, J, by="status"), "{{status}}"),
                unit=Unit.REQUESTS_PER_SECOND,
                stacked=True,
            ),
            _line(
                "Tokens per second by deployment",
                Target(
                    _rate("converge_gateway_tokens_total", J, by="deployment, kind"),
                    "{{deployment}} {{kind}}",
                ),
                unit=Unit.PER_SECOND,
            ),
        ),
    )
    refusals = Row(
        "Refusals and failures",
        (
            _line(
                "Refused before a replica, by reason",
                Target(
                    _rate("converge_gateway_rejected_total", J, by="reason") + " or vector(0)", "{{reason}}"
                ),
                description="Rate limits, budgets, governance and hooks, full queues",
                unit=Unit.PER_SECOND,
                stacked=True,
            ),
            _line(
                "Failed attempts against replicas",
                Target(
                    _rate("converge_gateway_upstream_errors_total", J, by="deployment, reason")
                    + " or vector(0)",
                    "{{deployment}} {{reason}}",
                ),
                unit=Unit.PER_SECOND,
            ),
            _line(
                "Replicas not closed, by deployment",
                Target(
                    f"count by (deployment) (converge_gateway_breaker_state{{{J}}} > 0) or vector(0)",
                    "{{deployment}}",
                ),
                description="Replicas whose circuit breaker is open or half-open",
            ),
            _line(
                "Usage records dropped",
                Target(
                    f"sum by (instance) (increase(converge_gateway_meter_dropped_total{{{J}}}[{RATE}]))",
                    "{{instance}}",
                ),
                description="Dropped when the database was away longer than the meter buffers",
                thresholds=(Threshold(None, "green"), Threshold(1, "red")),
            ),
        ),
    )
    capacity = Row(
        "Latency and capacity",
        (
            _line(
                "Request duration p95 by deployment",
                Target(
                    _quantile(0.95, "converge_gateway_request_duration_seconds", J, by="deployment"),
                    "{{deployment}}",
                ),
                unit=Unit.SECONDS,
            ),
            _line(
                "Time to first token p95 by deployment",
                Target(
                    _quantile(0.95, "converge_gateway_time_to_first_token_seconds", J, by="deployment"),
                    "{{deployment}}",
                ),
                unit=Unit.SECONDS,
                thresholds=(Threshold(None, "green"), Threshold(TTFT_OBJECTIVE_S, "red")),
            ),
            _line(
                "In flight by deployment",
                Target(f"sum by (deployment) (converge_gateway_in_flight{{{J}}})", "{{deployment}}"),
                stacked=True,
            ),
            _line(
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
            _line(
                "Library and sources requests by route",
                Target(
                    _rate(http, J, 'route=~"/models.*|/sources.*"', by="method, route"),
                    "{{method}} {{route}}",
                ),
                unit=Unit.REQUESTS_PER_SECOND,
            ),
            _line(
                "Approvals, rejections and deprecations",
                Target(
                    _rate(http, J, 'route=~".*/(approve|reject|deprecate)"', 'status="200"', by="route")
                    + " or vector(0)",
                    "{{route}}",
                ),
                unit=Unit.PER_SECOND,
            ),
            _line(
                "Policy and ruleset changes",
                Target(
                    _rate(
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
            _line(
                "Answered 409 by route",
                Target(_rate(http, J, 'status="409"', by="route") + " or vector(0)", "{{route}}"),
                description="A policy denial, a quota or a conflict (a denial count per policy rule is pending)",
                unit=Unit.PER_SECOND,
            ),
            _line(
                "Answered 403 by route",
                Target(_rate(http, J, 'status="403"', by="route") + " or vector(0)", "{{route}}"),
                description="A role lacking the permission",
                unit=Unit.PER_SECOND,
            ),
            _line(
                "Guardrail hits by ruleset and rule",
                Target(
                    _rate("converge_gateway_guardrail_hits_total", J, by="ruleset, rule, action")
                    + " or vector(0)",
                    "{{ruleset}} {{rule}} {{action}}",
                ),
                unit=Unit.PER_SECOND,
            ),
            _line(
                "Gateway refusals: governance, hooks, budgets, limits",
                Target(
                    _rate(
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
    }
