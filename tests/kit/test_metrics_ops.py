"""Readiness, leadership and the meter's backlog as metrics: converge_ready per check as the
scrape computes it, converge_leader per leader-elected service, and the usage rows waiting in
memory and in the spool (one the database refuses, one a restart finds)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support import eventually, free_port

from converge.gateway.metering import Meter, Spool
from converge.gateway.metrics import GatewayMetrics


def _samples(exposition: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == name
    }


class _Stub:
    """A background service as /readiness and the leader gauge see one."""

    def __init__(self, name: str, *, healthy: bool, is_leader: bool | None = None) -> None:
        self.name, self.healthy = name, healthy
        if is_leader is not None:
            self.is_leader = is_leader


async def test_each_readiness_check_is_a_gauge_that_a_failing_service_sets_to_zero(app, client):
    ready = _samples((await client.get("/metrics")).text, "converge_ready")
    assert ready[(("check", "database"),)] == 1
    assert ready[(("check", "migrations"),)] == 1
    assert ready[(("check", "controller"),)] == 1
    services = app.state.converge.services
    stopped = _Stub(f"stopped-{uuid.uuid4().hex[:6]}", healthy=False)
    services.append(stopped)
    try:
        ready = _samples((await client.get("/metrics")).text, "converge_ready")  # no probe asked
        assert ready[(("check", stopped.name),)] == 0
        assert ready[(("check", "database"),)] == 1
        assert (await client.get("/readiness")).status_code == 503
    finally:
        services.remove(stopped)
    ready = _samples((await client.get("/metrics")).text, "converge_ready")
    assert ready[(("check", "controller"),)] == 1
    assert (("check", stopped.name),) not in ready  # a check no longer made has no series


async def test_the_leader_gauge_is_1_on_the_leading_controller_and_0_on_a_standby(app, client):
    async def leading() -> dict[Any, float] | None:
        found = _samples((await client.get("/metrics")).text, "converge_leader")
        return found if found.get((("role", "controller"),)) == 1 else None

    await eventually(leading, timeout=20)
    services = app.state.converge.services
    standby = _Stub(f"standby-{uuid.uuid4().hex[:6]}", healthy=True, is_leader=False)
    services.append(standby)
    try:
        found = _samples((await client.get("/metrics")).text, "converge_leader")
    finally:
        services.remove(standby)
    assert found[(("role", standby.name),)] == 0
    assert (("role", "build-runner"),) not in found  # not leader-elected: no series


def _record(meter: Meter) -> None:
    meter.record(
        started=time.time(),
        project_id=uuid.uuid4(),
        key_id=None,
        deployment_id=None,
        model="m",
        endpoint="chat/completions",
        status=200,
        stream=False,
        prompt_tokens=3,
        completion_tokens=5,
        latency_ms=12.0,
        ttft_ms=None,
    )


async def test_the_backlog_counts_rows_in_memory_then_in_the_spool_and_after_a_restart(tmp_path: Path):
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry, lambda: {})
    path = tmp_path / "usage.spool"
    # A database that refuses every connection: each batch goes to the spool.
    meter = Meter(
        conninfo=f"postgresql://127.0.0.1:{free_port()}/x?connect_timeout=1",
        interval_s=0.05,
        key_touch_s=60,
        on_dropped=metrics.meter_dropped.inc,
        spool=Spool(path, max_bytes=1 << 20),
    )
    assert registry.get_sample_value("converge_gateway_meter_backlog") is None  # no meter yet
    metrics.watch_meter(lambda: meter)
    for _ in range(3):
        _record(meter)
    assert registry.get_sample_value("converge_gateway_meter_backlog") == 3  # in memory
    await meter.start()
    try:
        await eventually(lambda: meter.spool is not None and meter.spool.rows == 3 and not meter.pending)
        _record(meter)
        assert registry.get_sample_value("converge_gateway_meter_backlog") == 4  # spool and memory
    finally:
        await meter.stop()  # its last flush fails too: the row joins the spool
    assert Spool(path, max_bytes=1 << 20).rows == 4  # what a restarted gateway finds
    assert registry.get_sample_value("converge_gateway_meter_dropped_total") == 0


async def test_the_session_apps_scrape_exposes_the_meter_backlog(app, client):
    backlog = _samples((await client.get("/metrics")).text, "converge_gateway_meter_backlog")
    assert set(backlog) == {()} and backlog[()] >= 0
