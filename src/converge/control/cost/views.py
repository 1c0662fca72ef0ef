"""An estimate as the API shows it: money rounded to what a bill shows, bytes as integers."""

from __future__ import annotations

from typing import Any

from converge.control.cost.schemas import (
    DeviceFitRead,
    EstimateRead,
    LineRead,
    MemoryRead,
    MissingRead,
    ReplicaRead,
    StepRead,
    SubjectRead,
)
from converge.core.costs import Estimate, Fit

HOURLY_DIGITS = 6  # a tenth of a MIG slice of an L4 still shows
MONTHLY_DIGITS = 2


def fit_read(fit: Fit) -> DeviceFitRead:
    device = fit.device
    return DeviceFitRead(
        device=device.name,
        gpu_type=device.gpu_type,
        mig_profile=device.mig_profile,
        count=fit.count,
        memory_bytes=device.memory_bytes,
        need_bytes_per_device=fit.need_per_device,
        fits=fit.fits,
        share=str(device.share),
        hourly=round(fit.hourly, HOURLY_DIGITS),
    )


def estimate_read(result: Estimate, *, subject: dict[str, Any], catalogue_version: int) -> EstimateRead:
    need = result.need
    memory = (
        MemoryRead(
            weights_bytes=need.weights_bytes,
            kv_cache_bytes=need.kv_bytes,
            overhead_bytes=need.total_bytes - need.model_bytes,
            need_bytes=need.total_bytes,
        )
        if need is not None
        else None
    )
    return EstimateRead(
        subject=SubjectRead(**subject),
        catalogue_version=catalogue_version,
        currency=result.currency,
        zone=result.zone,
        pricing=result.pricing,
        hours_per_month=result.hours_per_month,
        replicas=result.replicas,
        context=result.context,
        concurrency=result.concurrency,
        per_replica=ReplicaRead(
            cpu=result.cpu,
            memory_bytes=result.memory_bytes,
            gpu=fit_read(result.gpu) if result.gpu else None,
        ),
        lines=[
            LineRead(
                item=line.item,
                quantity=round(line.quantity, 6),
                unit=line.unit,
                unit_price=line.unit_price,
                hourly=round(line.hourly, HOURLY_DIGITS),
                monthly=round(line.monthly, MONTHLY_DIGITS),
                detail=line.detail,
            )
            for line in result.lines
        ],
        hourly=round(result.hourly, HOURLY_DIGITS),
        monthly=round(result.monthly, MONTHLY_DIGITS),
        memory=memory,
        working=[
            StepRead(name=s.name, expression=s.expression, value=s.value, unit=s.unit) for s in result.steps
        ],
        candidates=[fit_read(f) for f in result.checked],
        alternatives=[fit_read(f) for f in result.alternatives],
        notes=result.notes,
        missing=[MissingRead(fact=m.fact, needed_for=m.needed_for) for m in result.missing],
    )
