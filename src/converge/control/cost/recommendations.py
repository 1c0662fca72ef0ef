"""GET /cost/recommendations: where a project's deployments could cost less, each with why and
the numbers.

- right_size: the estimate's memory fit (weights + KV cache for the model's context x the
  in-flight target + overhead) holds in a cheaper GPU or MIG profile than the one deployed.
- scale_to_zero: replicas ran all day but requests came in few of those hours (from metering),
  and the deployment never scales to zero.

Savings are per month from the measured replica-hours of the last `WINDOW_DAYS` days (a
deployment with none measured is counted at its current replicas, all month).
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.cost import measured, repository
from converge.control.cost.report import project_of
from converge.control.cost.schemas import RecommendationRead, RecommendationsRead
from converge.control.projects.principal import Principal
from converge.core import costs
from converge.core.costs import GB, Ask, PriceCatalogue
from converge.models import Deployment, ModelVersion

WINDOW_DAYS = 7
IDLE_SHARE = 0.25  # requests in at most this share of the hours it ran: mostly idle
SCALE_TO_ZERO_AFTER_S = 300
MIN_SAVING = 0.01  # a cheaper option must save at least 1 % to be worth a redeploy
DAYS_PER_MONTH = 30


def _device(resources: dict[str, Any]) -> str:
    if resources.get("mig_profile"):
        return f"{resources.get('gpu_type') or '?'} MIG {resources['mig_profile']}"
    return f"{resources.get('gpus') or 0} x {resources.get('gpu_type') or '?'}"


def _right_size(
    catalogue: PriceCatalogue,
    *,
    deployment: Deployment,
    spec: dict[str, Any],
    version: ModelVersion,
    current: measured.ReplicaPrice,
    replica_hours_month: float,
) -> RecommendationRead | str | None:
    resources = spec.get("resources") or {}
    shape = costs.model_shape(version.inspection or {})
    if not isinstance(shape, costs.ModelShape):
        missing = ", ".join(m.fact for m in shape) or "the model's facts"
        return f"{deployment.name}: right-size not checked, the library record lacks {missing}"
    concurrency = math.ceil((spec.get("autoscaling") or {}).get("target_in_flight", 1))
    ask = Ask(
        zone=current.zone,
        concurrency=concurrency,
        cpu=float(resources.get("cpu") or costs.DEFAULT_CPU),
        memory_bytes=int(resources.get("memory_bytes") or costs.DEFAULT_MEMORY_BYTES),
    )
    try:
        result = costs.estimate(catalogue, ask=ask, shape=shape)
    except (costs.UnknownName, costs.NeedsFacts, costs.DoesNotFit) as exc:
        return f"{deployment.name}: right-size not checked ({exc})"
    assert result.gpu is not None and result.need is not None
    best = min([result.gpu, *result.alternatives], key=lambda f: (f.hourly, f.count))
    proposed = result.hourly - result.gpu.hourly + best.hourly
    if proposed >= current.hourly * (1 - MIN_SAVING):
        return None
    saving = (current.hourly - proposed) * replica_hours_month
    device = f"{best.count} x {best.device.name}"
    why = (
        f"Each replica needs {result.need.total_bytes / GB:,.2f} GB (weights {result.need.weights_bytes / GB:,.2f} GB"
        f" + KV cache {result.need.kv_bytes / GB:,.2f} GB for {result.context:,} tokens x {concurrency} in flight"
        f" + overhead), which {device} ({best.device.memory_bytes / GB:g} GB) holds; the deployment runs on"
        f" {_device(resources)} at {current.hourly:.4f} an hour a replica, {device} would cost {proposed:.4f}"
    )
    return RecommendationRead(
        kind="right_size",
        project_id=deployment.project_id,
        deployment_id=deployment.id,
        deployment=deployment.name,
        why=why,
        current_hourly=round(current.hourly, 6),
        proposed_hourly=round(proposed, 6),
        monthly_savings=round(saving, 2),
        numbers={
            "need_bytes": result.need.total_bytes,
            "context": result.context,
            "concurrency": concurrency,
            "current_device": _device(resources),
            "proposed_device": device,
            "replica_hours_per_month": round(replica_hours_month, 2),
        },
    )


def _scale_to_zero(
    *, deployment: Deployment, spec: dict[str, Any], days: list[measured.DayCost], active: int, hourly: float
) -> RecommendationRead | None:
    if (spec.get("autoscaling") or {}).get("scale_to_zero_after_s") is not None:
        return None
    ran = [d for d in days if d.replica_seconds > 0]
    if not ran:
        return None
    hours = 24 * len(ran)  # the days it ran, whole (replicas run all day unless scaled)
    share = active / hours
    if share > IDLE_SHARE:
        return None
    cost = sum(d.cost for d in ran)
    saving = cost * (1 - share) * DAYS_PER_MONTH / len(ran)
    why = (
        f"Requests came in {active} of the {hours} hours it ran over the last {len(ran)} days"
        f" ({share:.0%}), while its replicas cost {cost:.4f}; with autoscaling.scale_to_zero_after_s"
        f" = {SCALE_TO_ZERO_AFTER_S} it stops when idle and wakes on the next request"
    )
    return RecommendationRead(
        kind="scale_to_zero",
        project_id=deployment.project_id,
        deployment_id=deployment.id,
        deployment=deployment.name,
        why=why,
        current_hourly=round(hourly, 6),
        proposed_hourly=None,
        monthly_savings=round(saving, 2),
        numbers={
            "active_hours": active,
            "hours_ran": hours,
            "active_share": round(share, 4),
            "replica_seconds": round(sum(d.replica_seconds for d in ran), 3),
            "cost": round(cost, 6),
        },
    )


async def recommend(
    session: AsyncSession, principal: Principal, *, project_ref: str | None, today: date | None = None
) -> RecommendationsRead:
    project = await project_of(session, principal, ref=project_ref)
    project_id = project.id if project else None
    today = today or datetime.now(UTC).date()
    since = today - timedelta(days=WINDOW_DAYS - 1)
    prices = await measured.catalogues(session)
    version_number, catalogue = prices.on(today)
    f = repository.CostFilter(since=since, until=today + timedelta(days=1), project_id=project_id)
    by_deployment: dict[uuid.UUID, list[measured.DayCost]] = {}
    for day in await measured.measure(session, f, today=today, prices=prices):
        by_deployment.setdefault(day.deployment_id, []).append(day)
    active = await repository.active_hours(
        session, project_id=project_id, since=datetime.combine(since, time.min, tzinfo=UTC)
    )
    data: list[RecommendationRead] = []
    not_checked = ["spot: no project setting marks a project as development, so none is advised spot"]
    for deployment, spec, version in await repository.project_deployments(session, project_id):
        resources = spec.get("resources") or {}
        zone = next(iter(spec.get("zones") or ["local"]))
        current = measured.replica_hourly(catalogue, version=version_number, zone=zone, resources=resources)
        days = by_deployment.get(deployment.id, [])
        seconds = sum(d.replica_seconds for d in days)
        per_month = (
            seconds / measured.SECONDS_PER_HOUR * DAYS_PER_MONTH / WINDOW_DAYS
            if seconds
            else deployment.desired_replicas * catalogue.hours_per_month
        )
        if resources.get("gpus") or resources.get("mig_profile"):
            found = _right_size(
                catalogue,
                deployment=deployment,
                spec=spec,
                version=version,
                current=current,
                replica_hours_month=per_month,
            )
            if isinstance(found, str):
                not_checked.append(found)
            elif found is not None:
                data.append(found)
        idle = _scale_to_zero(
            deployment=deployment,
            spec=spec,
            days=days,
            active=active.get(deployment.id, 0),
            hourly=current.hourly,
        )
        if idle is not None:
            data.append(idle)
    data.sort(key=lambda r: -r.monthly_savings)
    return RecommendationsRead(
        project_id=project_id,
        currency=prices.currency,
        catalogue_version=version_number,
        window_days=WINDOW_DAYS,
        data=data,
        not_checked=not_checked,
    )
