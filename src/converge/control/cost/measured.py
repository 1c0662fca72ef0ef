"""Measured cost: the replica-seconds the controller counted x the price of one replica-hour of
those resources in the catalogue in force that day, beside the requests and tokens metered.

One replica-hour is priced exactly as an estimate prices a deployment's replica (the same
`core.costs.estimate` lines, one replica, no artifact storage): GPUs (a MIG slice at its share),
CPU cores x the core-hour and GiB x the GiB-hour. A CPU-only model is never free.
"""

from __future__ import annotations

import bisect
import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.cost import repository, service
from converge.core import costs
from converge.core.costs import Ask, PriceCatalogue
from converge.models import PriceCatalogueVersion

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class ReplicaPrice:
    hourly: float  # one replica for one hour
    zone: str  # the price zone used
    catalogue_version: int
    notes: tuple[str, ...] = ()


def replica_hourly(
    catalogue: PriceCatalogue, *, version: int, zone: str, resources: dict[str, Any], spot: bool = False
) -> ReplicaPrice:
    """What one replica with `resources`, running in runtime zone `zone`, costs an hour (on
    demand, or on spot capacity).

    A runtime zone without prices of its own ("local") is priced at the catalogue's default
    zone; a GPU type the catalogue does not know is left out, and said so, rather than guessed."""
    notes: list[str] = []
    price_zone = zone if zone in catalogue.zones else catalogue.default_zone
    if price_zone != zone:
        notes.append(f"zone '{zone}' has no prices of its own: priced at '{price_zone}'")
    named = resources.get("gpu_type")
    gpu_type = costs.resolve_gpu_type(catalogue, named) if named else None
    gpus, mig = int(resources.get("gpus") or 0), resources.get("mig_profile")
    ask = Ask(
        zone=price_zone,
        replicas=1,
        choose=False,
        gpu_type=gpu_type,
        mig_profile=mig,
        gpus=gpus,
        cpu=float(resources.get("cpu") or costs.DEFAULT_CPU),
        memory_bytes=int(resources.get("memory_bytes") or costs.DEFAULT_MEMORY_BYTES),
        spot=spot,
    )
    try:
        result = costs.estimate(catalogue, ask=ask, shape=None)
    except costs.UnknownName as exc:
        notes.append(f"GPU not priced ({exc}): CPU and memory only")
        cpu_only = dataclasses.replace(ask, gpus=0, mig_profile=None, gpu_type=None)
        result = costs.estimate(catalogue, ask=cpu_only, shape=None)
    return ReplicaPrice(result.hourly, price_zone, version, tuple(notes))


class Catalogues:
    """The catalogue in force on each day: the newest version created before the day ended (the
    first version for days before it existed)."""

    def __init__(self, versions: list[PriceCatalogueVersion]) -> None:
        assert versions, "the catalogue is seeded before anything is priced"
        self._versions = versions
        self._ends = [v.created_at for v in versions]
        self._parsed: dict[int, PriceCatalogue] = {}
        self._prices: dict[tuple[int, str, str], ReplicaPrice] = {}

    def on(self, day: date) -> tuple[int, PriceCatalogue]:
        end = datetime.combine(day + timedelta(days=1), time.min, tzinfo=UTC)
        row = self._versions[max(0, bisect.bisect_left(self._ends, end) - 1)]
        if row.version not in self._parsed:
            self._parsed[row.version] = PriceCatalogue.model_validate(row.catalogue)
        return row.version, self._parsed[row.version]

    def price(self, *, day: date, zone: str, resources_key: str, resources: dict[str, Any]) -> ReplicaPrice:
        version, catalogue = self.on(day)
        key = (version, zone, resources_key)
        if key not in self._prices:
            self._prices[key] = replica_hourly(catalogue, version=version, zone=zone, resources=resources)
        return self._prices[key]

    @property
    def currency(self) -> str:
        """The newest catalogue's currency (one installation bills in one)."""
        return str(self._versions[-1].catalogue.get("currency", "USD"))


@dataclass
class DayCost:
    """One deployment's measured day."""

    day: date
    project_id: uuid.UUID
    deployment_id: uuid.UUID
    replica_seconds: float = 0.0
    cost: float = 0.0
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    catalogue_versions: set[int] = field(default_factory=set)
    notes: set[str] = field(default_factory=set)


async def catalogues(session: AsyncSession) -> Catalogues:
    await service.current(session)  # a fresh installation seeds version 1 on its first read
    return Catalogues(await repository.all_versions(session))


async def measure(
    session: AsyncSession, f: repository.CostFilter, *, today: date, prices: Catalogues | None = None
) -> list[DayCost]:
    """Every deployment-day in the window with replica-seconds or metered requests, priced."""
    prices = prices or await catalogues(session)
    days: dict[tuple[date, uuid.UUID], DayCost] = {}

    def day_of(d: date, *, project_id: uuid.UUID, deployment_id: uuid.UUID) -> DayCost:
        return days.setdefault((d, deployment_id), DayCost(d, project_id, deployment_id))

    for row in await repository.replica_days(session, f):
        price = prices.price(
            day=row.day, zone=row.zone, resources_key=row.resources_key, resources=row.resources
        )
        item = day_of(row.day, project_id=row.project_id, deployment_id=row.deployment_id)
        item.replica_seconds += row.replica_seconds
        item.cost += row.replica_seconds / SECONDS_PER_HOUR * price.hourly
        item.catalogue_versions.add(price.catalogue_version)
        item.notes.update(price.notes)
    # Yesterday's roll-up may not have run since midnight: the last two days come from the records.
    for usage in await repository.usage_days(session, f, live_from=today - timedelta(days=1)):
        if usage["deployment_id"] == repository.NO_DEPLOYMENT:
            continue  # reached no replica: nothing to divide the cost by
        item = day_of(usage["day"], project_id=usage["project_id"], deployment_id=usage["deployment_id"])
        item.requests += int(usage["requests"])
        item.errors += int(usage["errors"])
        item.prompt_tokens += int(usage["prompt_tokens"])
        item.completion_tokens += int(usage["completion_tokens"])
    return sorted(days.values(), key=lambda d: (d.day, str(d.deployment_id)))


def per_million_tokens(cost: float, tokens: int) -> float | None:
    return cost / tokens * 1_000_000 if tokens else None
