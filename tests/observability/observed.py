"""What the observability tests compare against: the checked-in rules and dashboards, and the
series names a scrape of /metrics exposes. A plain module: `from observed import ...`."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "converge-rules.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
GRAFANA = DEPLOY / "grafana"

# The series each metric type puts in the exposition, by the family name the parser gives.
_SERIES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "unknown": ("",),
}


def exposed_names(exposition: str) -> set[str]:
    """Every series name a scrape of `exposition` can hold: the samples present, and for a
    labelled metric with no child yet (declared by its TYPE line) the names its type implies."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in _SERIES.get(family.type, ("",)))
    return names
