"""The dashboards in deploy/grafana/ are the generator's output, and query only what /metrics
exposes."""

from __future__ import annotations

from pathlib import Path

from observed import GRAFANA, exposed_names
from typer.testing import CliRunner

from converge.cli.main import app as cli
from converge.observability.dashboards import all_dashboards
from converge.observability.gpu import GPU_METRICS
from converge.observability.grafana import dump
from converge.observability.promql import metric_names

# Series Prometheus makes for every target itself; not in /metrics, always there.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
REGENERATE = "converge render dashboards --dir deploy/grafana"


def test_checked_in_dashboards_are_the_generators_output() -> None:
    built = all_dashboards()
    on_disk = {p.name for p in GRAFANA.glob("*.json")}
    assert on_disk == set(built), (
        f"deploy/grafana/ holds other files than the generator makes: run {REGENERATE}"
    )
    for name, dashboard in built.items():
        assert (GRAFANA / name).read_text() == dump(dashboard), f"{name} is stale: run {REGENERATE}"


def test_render_dashboards_writes_the_same_files(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["render", "dashboards", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name, dashboard in all_dashboards().items():
        assert (tmp_path / name).read_text() == dump(dashboard)


def test_dashboards_have_unique_uids_and_the_six_views() -> None:
    boards = all_dashboards().values()
    assert len({b.uid for b in boards}) == len(boards)
    assert {b.title for b in boards} == {
        "Converge / Platform overview",
        "Converge / Deployment",
        "Converge / Gateway",
        "Converge / Library and governance",
        "Converge / Controller and workers",
        "Converge / Cost and engines",
    }


async def test_every_panel_queries_metrics_that_metrics_exposes(exposed_metrics: set[str]) -> None:
    assert "converge_gateway_time_to_first_token_seconds_bucket" in exposed_metrics  # the scrape is real
    unknown = []
    for name, dashboard in all_dashboards().items():
        queries = [*dashboard.queries(), *(("variable " + v.name, v.metric) for v in dashboard.variables)]
        for title, expr in queries:
            # GPU series exist only where a GPU and NVML do (not on the machine the tests run on).
            missing = metric_names(expr) - exposed_metrics - PROMETHEUS_SERIES - GPU_METRICS
            if missing:
                unknown.append(f"{name} / {title}: {sorted(missing)}")
    assert not unknown, "panels query metrics /metrics does not expose:\n" + "\n".join(unknown)


def test_the_check_fails_on_a_metric_the_app_does_not_expose() -> None:
    exposition = (
        "# HELP converge_x_seconds x\n# TYPE converge_x_seconds histogram\n"
        "# HELP converge_y_total y\n# TYPE converge_y_total counter\n"
    )
    exposed = exposed_names(exposition)
    assert {"converge_x_seconds_bucket", "converge_x_seconds_count", "converge_y_total"} <= exposed
    expr = "sum(rate(converge_y_total[5m])) / sum(rate(converge_x_seconds_count[5m])) + converge_gone_total"
    assert metric_names(expr) - exposed == {"converge_gone_total"}
