"""deploy/prometheus: `promtool check rules` and `promtool test rules` (Debian's prometheus
package ships promtool), one firing unit test per alert, and only metrics /metrics exposes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from observed import RULE_TESTS, RULES

from converge.observability.gpu import GPU_METRICS, MEMORY_TOTAL, MEMORY_USED
from converge.observability.promql import metric_names

PROMETHEUS_SERIES = frozenset({"up"})
SEVERITIES = {"critical", "warning", "info"}


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus, or `make system-deps`)")
    return binary


def _rules(path: Path = RULES) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_check_rules_passes() -> None:
    done = _run(_promtool(), "check", "rules", str(RULES), cwd=RULES.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no unit tests in deploy/prometheus/tests/"
    done = _run(_promtool(), "test", "rules", *(str(p) for p in RULE_TESTS), cwd=RULES.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(RULE_TESTS), done.stdout


def test_the_unit_tests_catch_a_changed_alert(tmp_path: Path) -> None:
    """Rules whose ConvergeDown waits 20 minutes instead of 2 fail the checked-in tests."""
    promtool = _promtool()
    (tmp_path / "tests").mkdir()
    text = RULES.read_text()
    changed = text.replace(
        'expr: up{job=~"converge.*"} == 0\n        for: 2m',
        'expr: up{job=~"converge.*"} == 0\n        for: 20m',
    )
    assert changed != text
    (tmp_path / RULES.name).write_text(changed)
    test_file = tmp_path / "tests" / "availability.yml"
    shutil.copy(RULES.parent / "tests" / "availability.yml", test_file)
    done = _run(promtool, "test", "rules", str(test_file), cwd=tmp_path)
    assert done.returncode != 0
    assert "alertname: ConvergeDown" in done.stdout + done.stderr


def test_every_alert_has_a_firing_unit_test() -> None:
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    fired = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts - fired == set(), "alerts without a unit test in which they fire"
    assert fired - alerts == set(), "unit tests of alerts that do not exist"


def test_every_alert_has_a_severity_summary_and_runbook() -> None:
    for rule in (r for r in _rules() if "alert" in r):
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), name
        assert "Runbook:" in annotations.get("description", ""), name


async def test_rules_use_only_metrics_that_metrics_exposes(exposed_metrics: set[str]) -> None:
    rules = _rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    used = {name for rule in rules for name in metric_names(rule["expr"])}
    # The GPU metrics exist only where a GPU and NVML do (tests/kit/test_metrics_gpu.py shows
    # the collector exposes exactly these names when they do).
    unknown = used - exposed_metrics - recorded - PROMETHEUS_SERIES - GPU_METRICS
    assert not unknown, f"rules query metrics /metrics does not expose: {sorted(unknown)}"
    assert {MEMORY_USED, MEMORY_TOTAL} <= used
