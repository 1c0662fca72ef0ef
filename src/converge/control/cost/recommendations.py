"""GET /cost/recommendations: where a project's deployments could cost less, each with why and
the numbers.

- right_size: the estimate's memory fit (weights + KV cache for the model's context x the
  in-flight target + overhead) holds in a cheaper GPU or MIG profile than the one deployed.
- scale_to_zero: replicas ran all day but requests came in few of those hours (from metering),
  and the deployment never scales to zero.
- quantised_variant: another approved version of the same library model stores fewer bytes
  per weight (Q4/Q8/int8 where the deployment runs F16, say), and its memory fit needs a
  cheaper GPU, MIG profile or, on CPUs, less memory.
- consolidate: replicas that each hold a whole GPU of one type in one zone, whose memory fits
  together would fill fewer of them (first-fit decreasing): shared as MIG slices or time-sliced.
- spot: a deployment of a project marked `development` runs at on-demand prices where the same
  resources on spot capacity cost less (interruptions are what development can afford).

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
from converge.control.cost.schemas import AdviceKind, RecommendationRead, RecommendationsRead
from converge.control.projects.principal import Principal
from converge.core import costs
from converge.core.costs import GB, Ask, PriceCatalogue
from converge.models import Deployment, ModelVersion, Project

WINDOW_DAYS = 7
IDLE_SHARE = 0.25  # requests in at most this share of the hours it ran: mostly idle
SCALE_TO_ZERO_AFTER_S = 300
MIN_SAVING = 0.01  # a cheaper option must save at least 1 % to be worth a redeploy
DAYS_PER_MONTH = 30


def _device(resources: dict[str, Any]) -> str:
    if resources.get("mig_profile"):
        return f"{resources.get('gpu_type') or '?'} MIG {resources['mig_profile']}"
    return f"{resources.get('gpus') or 0} x {resources.get('gpu_type') or '?'}"


def _need_text(result: costs.Estimate, concurrency: int) -> str:
    """The memory fit of one replica, term by term, as the advice quotes it."""
    need = result.need
    assert need is not None and result.context is not None
    return (
        f"{need.total_bytes / GB:,.2f} GB (weights {need.weights_bytes / GB:,.2f} GB + KV cache"
        f" {need.kv_bytes / GB:,.2f} GB for {result.context:,} tokens x {concurrency} in flight + overhead)"
    )


def _advice(  # noqa: PLR0913, PLR0917 - the fields of one piece of advice
    kind: AdviceKind,
    deployment: Deployment,
    why: str,
    *,
    current_hourly: float,
    proposed_hourly: float | None,
    monthly_savings: float,
    numbers: dict[str, Any],
) -> RecommendationRead:
    """Advice about one deployment, named as the report names it."""
    return RecommendationRead(
        kind=kind,
        project_id=deployment.project_id,
        deployment_id=deployment.id,
        deployment=deployment.name,
        why=why,
        current_hourly=current_hourly,
        proposed_hourly=proposed_hourly,
        monthly_savings=monthly_savings,
        numbers=numbers,
    )


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
        f"Each replica needs {_need_text(result, concurrency)}, which {device} ({best.device.memory_bytes / GB:g} GB) holds; the deployment runs on"
        f" {_device(resources)} at {current.hourly:.4f} an hour a replica, {device} would cost {proposed:.4f}"
    )
    return _advice(
        "right_size",
        deployment,
        why,
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
    return _advice(
        "scale_to_zero",
        deployment,
        why,
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


def _smaller_variants(
    version: ModelVersion, shape: costs.ModelShape, *, variants: list[ModelVersion]
) -> list[tuple[ModelVersion, costs.ModelShape]]:
    out = []
    for v in variants:
        if v.id == version.id:
            continue
        found = costs.model_shape(v.inspection or {})
        if isinstance(found, costs.ModelShape) and found.bytes_per_weight < shape.bytes_per_weight:
            out.append((v, found))
    return out


def _quantised_variant(  # noqa: PLR0913 - the deployment's whole context
    catalogue: PriceCatalogue,
    *,
    version_number: int,
    deployment: Deployment,
    spec: dict[str, Any],
    version: ModelVersion,
    variants: list[ModelVersion],
    current: measured.ReplicaPrice,
    replica_hours_month: float,
) -> RecommendationRead | None:
    shape = costs.model_shape(version.inspection or {})
    if not isinstance(shape, costs.ModelShape):
        return None
    resources = spec.get("resources") or {}
    gpu = bool(resources.get("gpus") or resources.get("mig_profile"))
    concurrency = math.ceil((spec.get("autoscaling") or {}).get("target_in_flight", 1))
    cpu = float(resources.get("cpu") or costs.DEFAULT_CPU)
    best: tuple[float, ModelVersion, costs.Estimate, str] | None = None
    for variant, vshape in _smaller_variants(version, shape, variants=variants):
        if gpu:
            ask = Ask(zone=current.zone, concurrency=concurrency, cpu=cpu,
                      memory_bytes=int(resources.get("memory_bytes") or costs.DEFAULT_MEMORY_BYTES))  # fmt: skip
        else:
            ask = Ask(zone=current.zone, concurrency=concurrency, cpu=cpu, cpu_only=True)
        try:
            result = costs.estimate(catalogue, ask=ask, shape=vshape)
        except (costs.UnknownName, costs.NeedsFacts, costs.DoesNotFit):
            continue
        if gpu:
            assert result.gpu is not None
            cheapest = min([result.gpu, *result.alternatives], key=lambda f: (f.hourly, f.count))
            hourly = result.hourly - result.gpu.hourly + cheapest.hourly
            device = f"{cheapest.count} x {cheapest.device.name}"
        else:
            smaller = {
                **resources,
                "memory_bytes": min(
                    result.memory_bytes, int(resources.get("memory_bytes") or 0) or result.memory_bytes
                ),
            }
            hourly = measured.replica_hourly(
                catalogue, version=version_number, zone=current.zone, resources=smaller
            ).hourly
            device = f"{smaller['memory_bytes'] / costs.GIB:g} GiB of memory"
        if best is None or hourly < best[0]:
            best = (hourly, variant, result, device)
    if best is None or best[0] >= current.hourly * (1 - MIN_SAVING):
        return None
    hourly, variant, result, device = best
    assert result.need is not None
    quantisation = (variant.inspection or {}).get("quantization") or "fewer bytes per weight"
    why = (
        f"Version {variant.version} of this model is approved and stores {quantisation}; a replica needs"
        f" {_need_text(result, concurrency)}, which {device} holds: {hourly:.4f} an hour a replica instead of {current.hourly:.4f}"
        f" for version {version.version} on {_device(resources) if gpu else 'its current memory'}"
    )
    return _advice(
        "quantised_variant",
        deployment,
        why,
        current_hourly=round(current.hourly, 6),
        proposed_hourly=round(hourly, 6),
        monthly_savings=round((current.hourly - hourly) * replica_hours_month, 2),
        numbers={
            "current_version": version.version,
            "proposed_version": variant.version,
            "proposed_version_id": str(variant.id),
            "quantization": str(quantisation),
            "need_bytes": result.need.total_bytes,
            "proposed_device": device,
            "replica_hours_per_month": round(replica_hours_month, 2),
        },
    )


def _consolidate(
    catalogue: PriceCatalogue,
    *,
    version_number: int,
    placed: list[tuple[Deployment, dict[str, Any], int, str]],
) -> list[RecommendationRead]:
    """`placed`: (deployment, spec, memory need of one replica, price zone) for replicas on whole GPUs."""
    groups: dict[tuple[str, str], list[tuple[Deployment, dict[str, Any], int]]] = {}
    for d, spec, need, zone in placed:
        resources = spec.get("resources") or {}
        groups.setdefault((zone, str(resources.get("gpu_type") or "")), []).append((d, spec, need))
    out = []
    for (zone, gpu_type), members in groups.items():
        try:
            (device,) = [x for x in costs.devices(catalogue, zone=zone, pricing="on_demand", gpu_type=gpu_type or None)
                         if x.mig_profile is None]  # fmt: skip
        except (costs.UnknownName, ValueError):
            continue
        replicas = [(need, d) for d, spec, need in members for _ in range(max(1, d.desired_replicas))
                    if int((spec.get("resources") or {}).get("gpus") or 0) == 1 and need <= device.memory_bytes]  # fmt: skip
        if len(replicas) < 2:
            continue
        bins: list[int] = []  # memory used on each shared GPU
        for need, _ in sorted(replicas, key=lambda r: -r[0]):
            for i, used in enumerate(bins):
                if used + need <= device.memory_bytes:
                    bins[i] += need
                    break
            else:
                bins.append(need)
        if len(bins) >= len(replicas):
            continue
        saved_gpus = len(replicas) - len(bins)
        saving = saved_gpus * device.gpu_hourly * catalogue.hours_per_month
        names = sorted({d.name for _, d in replicas})
        host = max(members, key=lambda m: m[2])[0]
        why = (
            f"{len(replicas)} replicas ({', '.join(names)}) each hold a whole {gpu_type} in zone {zone} but need"
            f" {sum(n for n, _ in replicas) / GB:,.2f} GB together: {len(bins)} {gpu_type}"
            f" ({device.memory_bytes / GB:g} GB each) hold them all, shared as MIG slices or time-sliced,"
            f" {saved_gpus} GPU{'s' if saved_gpus > 1 else ''} fewer at {device.gpu_hourly:.4f} an hour each"
        )
        out.append(
            RecommendationRead(
                kind="consolidate",
                project_id=host.project_id,
                deployment_id=host.id,
                deployment=host.name,
                why=why,
                current_hourly=round(len(replicas) * device.gpu_hourly, 6),
                proposed_hourly=round(len(bins) * device.gpu_hourly, 6),
                monthly_savings=round(saving, 2),
                numbers={
                    "deployments": ", ".join(names),
                    "replicas": len(replicas),
                    "gpus_now": len(replicas),
                    "gpus_shared": len(bins),
                    "need_bytes": sum(n for n, _ in replicas),
                    "gpu_memory_bytes": device.memory_bytes,
                    "catalogue_version": version_number,
                },
            )
        )
    return out


def _spot(  # noqa: PLR0913 - the deployment's whole context
    catalogue: PriceCatalogue,
    *,
    project: Project,
    deployment: Deployment,
    resources: dict[str, Any],
    current: measured.ReplicaPrice,
    zone: str,
    replica_hours_month: float,
) -> RecommendationRead | None:
    if project.environment != "development":
        return None
    spot = measured.replica_hourly(
        catalogue, version=current.catalogue_version, zone=zone, resources=resources, spot=True
    )
    if spot.hourly >= current.hourly * (1 - MIN_SAVING):
        return None
    saving = (current.hourly - spot.hourly) * replica_hours_month
    why = (
        f"Project '{project.name}' is a development project, so interruptions are acceptable; its replicas"
        f" ({_device(resources) if resources.get('gpus') or resources.get('mig_profile') else 'CPU only'})"
        f" cost {current.hourly:.4f} an hour each on demand in zone {current.zone} and {spot.hourly:.4f} on spot"
        f" capacity, for {replica_hours_month:,.1f} replica-hours a month"
    )
    return _advice(
        "spot",
        deployment,
        why,
        current_hourly=round(current.hourly, 6),
        proposed_hourly=round(spot.hourly, 6),
        monthly_savings=round(saving, 2),
        numbers={
            "environment": project.environment,
            "zone": current.zone,
            "on_demand_hourly": round(current.hourly, 6),
            "spot_hourly": round(spot.hourly, 6),
            "replica_hours_per_month": round(replica_hours_month, 2),
        },
    )


def _need_one_replica(spec: dict[str, Any], version: ModelVersion) -> int | None:
    shape = costs.model_shape(version.inspection or {})
    if not isinstance(shape, costs.ModelShape) or not shape.context_length:
        return None
    concurrency = math.ceil((spec.get("autoscaling") or {}).get("target_in_flight", 1))
    return costs.memory_need(shape, context=shape.context_length, concurrency=concurrency).total_bytes


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
    not_checked: list[str] = []
    rows = await repository.project_deployments(session, project_id)
    projects = await repository.projects_by_id(session, {d.project_id for d, _, _ in rows})
    variants = await repository.servable_versions(session, {v.model_id for _, _, v in rows})
    on_whole_gpus: list[tuple[Deployment, dict[str, Any], int, str]] = []
    for deployment, spec, version in rows:
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
        variant = _quantised_variant(
            catalogue,
            version_number=version_number,
            deployment=deployment,
            spec=spec,
            version=version,
            variants=variants.get(version.model_id, []),
            current=current,
            replica_hours_month=per_month,
        )
        if variant is not None:
            data.append(variant)
        if resources.get("gpus") and not resources.get("mig_profile"):
            need = _need_one_replica(spec, version)
            if need is not None:
                on_whole_gpus.append((deployment, spec, need, current.zone))
        idle = _scale_to_zero(
            deployment=deployment,
            spec=spec,
            days=days,
            active=active.get(deployment.id, 0),
            hourly=current.hourly,
        )
        if idle is not None:
            data.append(idle)
        spot = _spot(
            catalogue,
            project=projects[deployment.project_id],
            deployment=deployment,
            resources=resources,
            current=current,
            zone=zone,
            replica_hours_month=per_month,
        )
        if spot is not None:
            data.append(spot)
    data += _consolidate(catalogue, version_number=version_number, placed=on_whole_gpus)
    data.sort(key=lambda r: -r.monthly_savings)
    return RecommendationsRead(
        project_id=project_id,
        currency=prices.currency,
        catalogue_version=version_number,
        window_days=WINDOW_DAYS,
        data=data,
        not_checked=not_checked,
    )
