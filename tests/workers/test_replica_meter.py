"""The replica meter: seconds from observations under a controllable clock (no sleeps), and
flushes that add each second once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import delete, select

from converge.models import ReplicaUsageDaily
from converge.runtime.base import Observation, Replica, ReplicaPhase
from converge.workers.replica_meter import CostMeter, ReplicaMeter, resources_key

CPU = {"cpu": 2.0, "memory_bytes": 4 << 30, "gpus": 0, "gpu_type": None, "mig_profile": None}


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def observation(
    deployment_id: uuid.UUID, *phases: ReplicaPhase, zone: str = "local", revision: int = 1
) -> Observation:
    return Observation(
        deployment_id=deployment_id,
        replicas=[
            Replica(id=f"r{i}", deployment_id=deployment_id, revision=revision, phase=p, zone=zone)
            for i, p in enumerate(phases)
        ],
    )


def seconds(rows: list, **match: object) -> float:
    return sum(r.seconds for r in rows if all(getattr(r, k) == v for k, v in match.items()))


NOON = datetime(2026, 12, 1, 12, tzinfo=UTC).timestamp()


def test_running_replicas_count_and_crashed_ones_do_not():
    clock, dep, project = Clock(NOON), uuid.uuid4(), uuid.uuid4()
    meter = ReplicaMeter(clock=clock)
    phases = (
        ReplicaPhase.STARTING,
        ReplicaPhase.READY,
        ReplicaPhase.DRAINING,
        ReplicaPhase.BACKOFF,
        ReplicaPhase.FAILED,
    )
    meter.observe(project_id=project, revision=1, resources=CPU, observed=observation(dep, *phases))
    assert meter.take() == []  # the first sight counts nothing: nobody saw the time before it
    for _ in range(3):
        clock.now += 2.5
        meter.observe(project_id=project, revision=1, resources=CPU, observed=observation(dep, *phases))
    rows = meter.take()
    assert seconds(rows) == 3 * 2.5 * 3  # three running replicas, three intervals of 2.5 s
    (row,) = rows
    assert (row.deployment_id, row.project_id, row.zone, row.day) == (dep, project, "local", clock_day(clock))
    assert row.resources == CPU and row.resources_key == resources_key(CPU)[0]
    assert meter.take() == []  # taken means emptied


def clock_day(clock: Clock):
    return datetime.fromtimestamp(clock.now, UTC).date()


def test_a_gap_counts_at_most_max_gap_and_days_split_at_midnight():
    clock = Clock(datetime(2026, 12, 1, 23, 59, 50, tzinfo=UTC).timestamp())
    dep, project = uuid.uuid4(), uuid.uuid4()
    meter = ReplicaMeter(clock=clock, max_gap_s=30)
    ready = observation(dep, ReplicaPhase.READY)
    meter.observe(project_id=project, revision=1, resources=CPU, observed=ready)
    clock.now += 5  # 23:59:55
    meter.observe(project_id=project, revision=1, resources=CPU, observed=ready)
    clock.now += 600  # a stalled leader: ten minutes nobody observed
    meter.observe(project_id=project, revision=1, resources=CPU, observed=ready)
    rows = meter.take()
    assert seconds(rows, day=datetime(2026, 12, 1).date()) == 5
    assert seconds(rows, day=datetime(2026, 12, 2).date()) == 30


def test_an_old_revisions_replicas_keep_their_own_resources_during_a_rollout():
    clock, dep, project = Clock(NOON), uuid.uuid4(), uuid.uuid4()
    bigger = {**CPU, "cpu": 8.0}
    meter = ReplicaMeter(clock=clock)
    meter.observe(
        project_id=project, revision=1, resources=CPU, observed=observation(dep, ReplicaPhase.READY)
    )
    clock.now += 10
    mixed = Observation(
        deployment_id=dep,
        replicas=[
            Replica(id="old", deployment_id=dep, revision=1, phase=ReplicaPhase.DRAINING, zone="local"),
            Replica(id="new", deployment_id=dep, revision=2, phase=ReplicaPhase.STARTING, zone="local"),
        ],
    )
    meter.observe(project_id=project, revision=2, resources=bigger, observed=mixed)
    rows = meter.take()
    assert seconds(rows, resources_key=resources_key(CPU)[0]) == 10
    assert seconds(rows, resources_key=resources_key(bigger)[0]) == 10


async def _stored(app, deployment_id: uuid.UUID) -> float:
    async with app.state.converge.sessions() as session:
        rows = await session.scalars(
            select(ReplicaUsageDaily).where(ReplicaUsageDaily.deployment_id == deployment_id)
        )
        return sum(r.replica_seconds for r in rows)


async def test_a_flush_writes_each_second_once_and_a_failed_one_keeps_them(app):
    state = app.state.converge
    clock, dep, project = Clock(NOON), uuid.uuid4(), uuid.uuid4()
    meter = CostMeter(sessions=state.sessions, clock=clock)
    ready = observation(dep, ReplicaPhase.READY, ReplicaPhase.READY)
    try:
        meter.meter.observe(project_id=project, revision=1, resources=CPU, observed=ready)
        clock.now += 4
        meter.meter.observe(project_id=project, revision=1, resources=CPU, observed=ready)
        assert await meter.flush() == 1
        assert await meter.flush() == 0  # nothing new: nothing written, nothing added again
        assert await _stored(app, dep) == 8
        clock.now += 3
        meter.meter.observe(project_id=project, revision=1, resources=CPU, observed=ready)
        assert await meter.flush() == 1
        assert await _stored(app, dep) == 14  # added to the day's row, not replacing it

        def broken() -> None:
            raise ConnectionError("database away")

        healthy, meter._sessions = meter._sessions, broken  # type: ignore[assignment]
        clock.now += 1
        meter.meter.observe(project_id=project, revision=1, resources=CPU, observed=ready)
        assert await meter.flush() == 0
        meter._sessions = healthy
        assert await meter.flush() == 1  # the failed flush's seconds, kept for this one
        assert await _stored(app, dep) == 16
    finally:
        async with state.sessions() as session, session.begin():
            await session.execute(delete(ReplicaUsageDaily).where(ReplicaUsageDaily.deployment_id == dep))
