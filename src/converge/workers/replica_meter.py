"""Measured replica time, daily usage roll-ups and budget checks: what measured cost is made of.

The controller (the leader) hands every observation it makes to `ReplicaMeter.observe`, once per
deployment per pass. The meter adds the time since that deployment's previous observation to
each replica that was running (starting, ready or draining; a replica in backoff or failed holds
nothing), per UTC day, runtime zone and the replica's resources, in memory.

`CostMeter` writes those sums every `flush_s` (10 s by default) in one upsert that adds to the
day's row, and at stop: an idle installation writes nothing, a busy one one statement per flush.
A crash (not a stop) loses at most the last `flush_s` of replica time; a failed write keeps the
sums for the next flush, so nothing is counted twice. A gap between two observations longer than
`max_gap_s` (a stalled or new leader) counts only `max_gap_s`: time nobody saw is not billed.

Every `rollup_s` (5 min) it recomputes the usage roll-ups of today and yesterday from the
gateway's records (idempotent), then checks every project budget (see control/cost/budgets.py)
and sets `converge_project_budget_used_ratio` per project from what it found, and
`converge_deployment_cost_today` per deployment.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.control.cost import budgets, repository
from converge.control.cost.repository import ReplicaSeconds
from converge.kit.observability import Metrics
from converge.kit.service import Service
from converge.runtime.base import Observation, ReplicaPhase
from converge.storage.db import transaction

log = structlog.get_logger(__name__)
COUNTED = frozenset({ReplicaPhase.STARTING, ReplicaPhase.READY, ReplicaPhase.DRAINING})
RESOURCE_FIELDS = ("cpu", "memory_bytes", "gpus", "gpu_type", "mig_profile")


def resources_key(resources: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The resources that price a replica, and a stable digest of them (the row's key)."""
    kept = {name: resources.get(name) for name in RESOURCE_FIELDS}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    return digest, kept


@dataclass
class _Pending:
    project_id: uuid.UUID
    resources: dict[str, Any]
    seconds: float = 0.0


class ReplicaMeter:
    """Replica-seconds from observations, in memory until taken. `clock` is epoch seconds."""

    def __init__(self, *, clock: Callable[[], float] = time.time, max_gap_s: float = 60.0) -> None:
        self._clock, self._max_gap = clock, max_gap_s
        self._last: dict[uuid.UUID, float] = {}
        # (deployment, revision) -> its resources' key and priced fields, digested once
        self._revisions: dict[tuple[uuid.UUID, int], tuple[str, dict[str, Any]]] = {}
        self._pending: dict[tuple[uuid.UUID, date, str, str], _Pending] = {}

    def observe(
        self,
        *,
        project_id: uuid.UUID,
        revision: int,
        resources: dict[str, Any],
        observed: Observation,
    ) -> None:
        """Count the time since this deployment's last observation for its running replicas.

        A replica of an older revision (a rollout) is priced with that revision's resources when
        this meter saw it current, else with the current one's."""
        now = self._clock()
        deployment_id = observed.deployment_id
        last = self._last.get(deployment_id)
        self._last[deployment_id] = now
        current = self._revisions.get((deployment_id, revision))
        if current is None or current[1] != {name: resources.get(name) for name in RESOURCE_FIELDS}:
            current = self._revisions[(deployment_id, revision)] = resources_key(resources)
        if last is None:
            return  # the first sight: counting starts here
        elapsed = min(max(0.0, now - last), self._max_gap)
        if not elapsed:
            return
        day = datetime.fromtimestamp(now, UTC).date()
        for replica in observed.replicas:
            if replica.phase not in COUNTED:
                continue
            key, kept = self._revisions.get((deployment_id, replica.revision), current)
            slot = (deployment_id, day, replica.zone, key)
            pending = self._pending.setdefault(slot, _Pending(project_id, kept))
            pending.seconds += elapsed

    def take(self) -> list[ReplicaSeconds]:
        """The sums so far, emptied: write them, or `give_back` if the write failed."""
        rows = [
            ReplicaSeconds(
                deployment_id=deployment_id,
                project_id=p.project_id,
                day=day,
                zone=zone,
                resources_key=key,
                resources=p.resources,
                seconds=p.seconds,
            )
            for (deployment_id, day, zone, key), p in self._pending.items()
        ]
        self._pending = {}
        return rows

    def give_back(self, rows: list[ReplicaSeconds]) -> None:
        for row in rows:
            slot = (row.deployment_id, row.day, row.zone, row.resources_key)
            pending = self._pending.setdefault(slot, _Pending(row.project_id, row.resources))
            pending.seconds += row.seconds


class CostMeter(Service):
    name = "cost-meter"

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        flush_s: float = 10.0,
        rollup_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self._sessions, self._flush_s, self._rollup_s = sessions, flush_s, rollup_s
        self._metrics = metrics
        self.meter = ReplicaMeter(clock=clock)
        self._clock = clock

    async def _run(self) -> None:
        next_rollup = 0.0
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()
            if time.monotonic() >= next_rollup:
                next_rollup = time.monotonic() + self._rollup_s
                try:
                    await self.rollup()
                except Exception:
                    log.exception("cost_rollup_failed")

    async def stop(self) -> None:
        await super().stop()
        await self.flush()

    async def flush(self) -> int:
        """Write the replica-seconds counted since the last flush; the rows written."""
        rows = self.meter.take()
        if not rows:
            return 0
        try:
            async with transaction(self._sessions) as session:
                await repository.add_replica_seconds(session, rows)
        except Exception:
            self.meter.give_back(rows)
            log.exception("replica_meter_flush_failed", rows=len(rows))
            return 0
        return len(rows)

    async def rollup(self) -> None:
        """Today's and yesterday's usage roll-ups, then every budget."""
        today = datetime.fromtimestamp(self._clock(), UTC).date()
        for day in (today - timedelta(days=1), today):
            async with transaction(self._sessions) as session:
                await repository.recompute_usage_day(session, day)
        async with transaction(self._sessions) as session:
            used = await budgets.check_all(session, today=today)
            spent = await budgets.cost_today(session, today=today) if self._metrics is not None else {}
        if self._metrics is not None:
            self._metrics.observe_budgets(used)
            self._metrics.observe_cost_today(spent)
