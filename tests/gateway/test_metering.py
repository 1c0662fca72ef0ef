"""Usage records go out in batches, in COPY's text format, whatever the model name holds."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from sqlalchemy import select

from converge.gateway.metering import PRUNE_LOCK_KEY, Meter, Spool
from converge.models import UsageRecord


def record(meter: Meter, **fields: object) -> None:
    """One usage row: a plain successful chat request unless `fields` say otherwise."""
    row: dict[str, object] = {
        "started": time.time(),
        "key_id": None,
        "deployment_id": None,
        "endpoint": "chat",
        "status": 200,
        "stream": False,
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "latency_ms": 1.0,
        "ttft_ms": None,
    }
    meter.record(**(row | fields))


def test_rows_are_copy_text_with_escapes_and_nulls():
    meter = Meter(conninfo="", interval_s=1.0, key_touch_s=60, on_dropped=lambda n: None)
    record(
        meter,
        started=1_800_000_000.25,
        project_id=uuid.UUID(int=1),
        model="a\tb\\c\nd",
        stream=True,
        completion_tokens=2,
        latency_ms=3.5,
    )
    project, line = meter.pending[0]
    fields = line.rstrip("\n").split("\t")
    assert project == uuid.UUID(int=1) and len(fields) == 12
    assert fields[0] == "2027-01-15 08:00:00.250000+00"
    assert fields[2:4] == ["\\N", "\\N"]
    assert fields[4] == "a\\tb\\\\c\\nd"
    assert fields[7] == "t" and fields[10] == "3.500" and fields[11] == "\\N"


async def test_a_batch_round_trips_through_the_database(app, committed_client):
    from support import make_project

    gateway = app.state.converge.gateway
    project = await make_project(committed_client)
    odd = f"we\\ird\tname-{uuid.uuid4().hex[:6]}"
    started = time.time()
    record(
        gateway.meter,
        started=started,
        project_id=uuid.UUID(project["id"]),
        model=odd,
        status=429,
        prompt_tokens=0,
        completion_tokens=0,
        latency_ms=0.25,
    )
    await gateway.meter.once()
    async with app.state.converge.sessions() as session:
        row = await session.scalar(select(UsageRecord).where(UsageRecord.model == odd))
    assert row is not None and row.status == 429 and row.ttft_ms is None and row.key_id is None
    assert abs(row.at.timestamp() - started) < 1e-3


async def test_usage_of_deleted_keys_deployments_and_projects_never_blocks_the_meter(app, committed_client):
    """A batch holding rows of a since-deleted project still writes everyone else's rows."""
    from support import ADMIN, eventually, make_project

    gateway = app.state.converge.gateway
    gone, kept = await make_project(committed_client), await make_project(committed_client)

    def row(project: dict, model: str) -> None:
        record(
            gateway.meter,
            project_id=uuid.UUID(project["id"]),
            key_id=uuid.uuid4(),  # keys and deployments may be gone: usage is history
            deployment_id=uuid.uuid4(),
            model=model,
        )

    tag = uuid.uuid4().hex[:8]
    row(gone, f"gone-{tag}")
    row(kept, f"kept-{tag}")
    assert (await committed_client.delete(f"/projects/{gone['id']}", headers=ADMIN)).status_code == 204
    await gateway.meter.once()
    assert not gateway.meter.pending

    async def written() -> set[str]:  # the meter's own loop may have taken the batch first
        async with app.state.converge.sessions() as session:
            rows = await session.scalars(select(UsageRecord.model).where(UsageRecord.model.like(f"%-{tag}")))
            return set(rows)

    assert await eventually(written) == {f"kept-{tag}"}


async def test_usage_older_than_the_retention_is_pruned_by_one_replica_at_a_time(app, committed_client):
    from support import make_project

    gateway = app.state.converge.gateway
    meter, saved = gateway.meter, (gateway.meter.retention_days, gateway.meter._next_prune)
    meter._next_prune = float("inf")  # no background round while the test looks
    project = await make_project(committed_client)
    tag = uuid.uuid4().hex[:8]
    day = 86_400.0
    for age_days, name in ((120, "old"), (91, "expired"), (89, "kept"), (0, "new")):
        record(
            meter,
            started=time.time() - age_days * day,
            project_id=uuid.UUID(project["id"]),
            model=f"{name}-{tag}",
        )
    await meter.once()  # a flush only: no pruning round is due

    async def models() -> set[str]:
        async with app.state.converge.sessions() as session:
            query = select(UsageRecord.model).where(UsageRecord.model.like(f"%-{tag}"))
            return {m.removesuffix(f"-{tag}") for m in await session.scalars(query)}

    assert await models() == {"old", "expired", "kept", "new"}
    meter.retention_days = 90
    try:
        # Another replica pruning now (it holds the lock): this one skips the round.
        async with await psycopg.AsyncConnection.connect(meter._conninfo) as other:
            await other.execute("SELECT pg_advisory_lock(%s)", (PRUNE_LOCK_KEY,))
            assert await meter.prune() == 0
            # Released here, not by closing: a closed connection's backend lets go of its locks
            # only when it has exited, which a loaded machine may not have done by the next line.
            await other.execute("SELECT pg_advisory_unlock(%s)", (PRUNE_LOCK_KEY,))
        assert await models() == {"old", "expired", "kept", "new"}
        assert await meter.prune() >= 2
    finally:
        meter.retention_days, meter._next_prune = saved
    assert await models() == {"kept", "new"}


async def test_rows_of_an_outage_survive_a_restart_through_the_spool(app, committed_client, tmp_path):
    """While the database is away every failed batch goes to the spool file; a new meter (the
    process restarted) replays it, oldest first, before its own rows."""
    from support import make_project

    state = app.state.converge
    project = uuid.UUID((await make_project(committed_client))["id"])
    spool = Spool(tmp_path / "usage.spool", max_bytes=1 << 20)
    away = Meter(
        conninfo="postgresql://postgres@/postgres?host=/nonexistent",
        interval_s=1.0,
        key_touch_s=60,
        on_dropped=lambda n: None,
        spool=spool,
    )
    tag = uuid.uuid4().hex[:8]
    for i in range(5):
        record(away, project_id=project, model=f"outage-{tag}-{i}")
    for _ in range(2):  # two failed batches: nothing is held twice, nothing is lost
        with pytest.raises(psycopg.OperationalError):
            await away._flush()
    assert away.pending == [] and len(spool.lines()) == 5

    back = Meter(
        conninfo=state.database.url, interval_s=1.0, key_touch_s=60, on_dropped=lambda n: None, spool=spool
    )
    record(back, project_id=project, model=f"outage-{tag}-after")
    await back._flush()
    await back.stop()
    assert spool.size == 0
    async with state.sessions() as session:
        rows = (
            await session.scalars(
                select(UsageRecord).where(UsageRecord.model.like(f"outage-{tag}-%")).order_by(UsageRecord.id)
            )
        ).all()
    assert [r.model for r in rows] == [f"outage-{tag}-{i}" for i in range(5)] + [f"outage-{tag}-after"]


def test_a_full_spool_drops_only_what_does_not_fit_and_counts_it(tmp_path):
    dropped: list[int] = []
    spool = Spool(tmp_path / "usage.spool", max_bytes=300)
    meter = Meter(conninfo="", interval_s=1.0, key_touch_s=60, on_dropped=dropped.append, spool=spool)
    for i in range(10):
        record(meter, project_id=uuid.UUID(int=i), model="m")
    rows, meter.pending = meter.pending, []
    meter._keep(rows)
    kept = len(spool.lines())
    assert 0 < kept < 10 and dropped == [10 - kept]
    assert spool.size <= 300


async def test_the_last_flush_at_shutdown_spools_or_counts_what_it_cannot_write(tmp_path):
    dead = "postgresql://postgres@/postgres?host=/nonexistent"
    dropped: list[int] = []
    without = Meter(conninfo=dead, interval_s=1.0, key_touch_s=60, on_dropped=dropped.append)
    spool = Spool(tmp_path / "usage.spool", max_bytes=1 << 20)
    with_spool = Meter(conninfo=dead, interval_s=1.0, key_touch_s=60, on_dropped=dropped.append, spool=spool)
    for meter in (without, with_spool):
        for _ in range(3):
            record(meter, project_id=uuid.UUID(int=7), model="m")
        await meter.stop()
    assert dropped == [3]  # counted, not silently lost
    assert len(spool.lines()) == 3 and with_spool.pending == []
