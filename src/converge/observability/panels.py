"""The pieces Converge's dashboards are made of: PromQL helpers over the Grafana variables
(`$job`, `$deployment`, `$__rate_interval`), panel shorthands, and the thresholds the alert rules
in deploy/prometheus use, so a dashboard's red line and an alert agree."""

from __future__ import annotations

from converge.observability.grafana import Kind, Panel, Target, Threshold, Unit, Variable

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


def sel(metric: str, *matchers: str) -> str:
    return f"{metric}{{{', '.join(matchers)}}}" if matchers else metric


def rate(metric: str, *matchers: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({sel(metric, *matchers)}[{RATE}]))"


def ratio(metric: str, part: str, *matchers: str, by: str = "") -> str:
    """The share of `metric`'s rate whose labels also match `part`; 0, not absent, when none do."""
    whole = rate(metric, *matchers, by=by)
    return f"({rate(metric, *matchers, part, by=by)} or {whole} * 0) / {whole}"


def quantile(q: float, histogram: str, *matchers: str, by: str = "") -> str:
    group = ", ".join(filter(None, (by, "le")))
    return f"histogram_quantile({q:g}, {rate(f'{histogram}_bucket', *matchers, by=group)})"


def line(
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


def stat(
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
