"""The PromQL reading that ties dashboards and rules to /metrics."""

from __future__ import annotations

import pytest

from converge.observability.promql import fill_variables, metric_names, selectors


def test_metric_names_skip_functions_labels_keywords_and_variables() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (deployment, le) (rate(converge_gateway_time_to_first_token_seconds_bucket{job=~"$job", le!="x"}[$__rate_interval])))'
        " > on (deployment) group_left (kind) deployment:converge_gateway_time_to_first_token_slo_seconds"
        " and bool 1e3 or vector(0) unless absent(up offset 5m)"
    )
    assert metric_names(expr) == {
        "converge_gateway_time_to_first_token_seconds_bucket",
        "deployment:converge_gateway_time_to_first_token_slo_seconds",
        "up",
    }


def test_names_inside_strings_and_ranges_are_not_metrics() -> None:
    expr = 'sum(rate(a_total{route="/models/{model_id}", note="b_total[5m]"}[5m:30s])) / sum(c) without (d_total)'
    assert metric_names(expr) == {"a_total", "c"}


def test_selectors_keep_their_matchers_as_written() -> None:
    found = selectors('sum(x{a="}", b=~"[y]"}) / on (a) y  {c="d"} + z[1m]')
    assert [(s.name, s.text) for s in found] == [
        ("x", 'x{a="}", b=~"[y]"}'),
        ("y", 'y  {c="d"}'),
        ("z", "z"),
    ]


def test_fill_variables_replaces_both_spellings_and_names_a_missing_one() -> None:
    expr = 'rate(x{job=~"$job", d="${deployment}"}[$__rate_interval])'
    filled = fill_variables(expr, {"job": "converge", "deployment": "p/chat", "__rate_interval": "1m"})
    assert filled == 'rate(x{job=~"converge", d="p/chat"}[1m])'
    with pytest.raises(KeyError, match=r"\$deployment"):
        fill_variables(expr, {"job": "converge", "__rate_interval": "1m"})
