"""An hourly and monthly cost, line by line, for one replica's resources x replicas.

Every replica pays for what it holds, as Kubernetes cost allocation does: CPU cores x the
core-hour, memory GiB x the GiB-hour, and GPUs x the GPU-hour, where a MIG profile pays its
share of one GPU (never a whole one). The model's artifact is stored once, per GiB-month. A
self-hosted model is never free: a CPU replica still costs its cores and memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from converge.core.costs.catalogue import GB, GIB, PriceCatalogue, Pricing
from converge.core.costs.facts import Missing, ModelShape
from converge.core.costs.fit import (
    MAX_GPUS,
    Device,
    Fit,
    MemoryNeed,
    Step,
    UnknownName,
    choose_fit,
    devices,
    memory_need,
    need_steps,
    zone_of,
)

# What a replica gets when nobody says: the deployment API's own defaults (1 core, 2 GiB).
DEFAULT_CPU = 1.0
DEFAULT_MEMORY_BYTES = 2 * GIB
ALTERNATIVES = 5


class NeedsFacts(ValueError):
    """The memory maths is needed and the model's library record lacks facts for it."""

    def __init__(self, missing: list[Missing]) -> None:
        self.missing = missing
        super().__init__(
            "The model's library record lacks what the memory maths needs: "
            + "; ".join(f"{m.fact} ({m.needed_for})" for m in missing)
        )


class DoesNotFit(ValueError):
    def __init__(self, need: MemoryNeed, *, largest: Device | None, max_gpus: int) -> None:
        self.need = need
        where = (
            f"; the largest device offered is {largest.name} ({largest.memory_bytes / GB:g} GB)"
            if largest
            else ""
        )
        super().__init__(
            f"Nothing offered holds {need.total_bytes / GB:,.2f} GB, even split over {max_gpus} GPUs{where}:"
            " lower the context or the concurrency, or use a quantised version"
        )


@dataclass(frozen=True)
class Ask:
    """What to price. `choose`: pick the smallest device that fits (a spec); otherwise price the
    resources given exactly (a deployment's)."""

    zone: str | None = None
    spot: bool = False
    replicas: int = 1
    context: int | None = None
    concurrency: int = 1  # across all replicas; each is sized for its share
    choose: bool = True
    cpu_only: bool = False
    gpu_type: str | None = None
    mig_profile: str | None = None
    gpus: int = 0  # a fixed count; with choose, 0 lets the maths pick
    cpu: float = DEFAULT_CPU
    memory_bytes: int | None = None
    storage_bytes: int | None = None

    @property
    def pricing(self) -> Pricing:
        return "spot" if self.spot else "on_demand"

    @property
    def wants_gpu(self) -> bool:
        if self.choose:
            return not self.cpu_only
        return self.gpus > 0 or self.mig_profile is not None


@dataclass(frozen=True)
class Line:
    item: str
    quantity: float
    unit: str
    unit_price: float
    hourly: float
    monthly: float
    detail: str = ""


@dataclass
class Estimate:
    zone: str
    pricing: Pricing
    currency: str
    hours_per_month: float
    replicas: int
    context: int | None
    concurrency: int
    cpu: float
    memory_bytes: int
    gpu: Fit | None = None
    need: MemoryNeed | None = None
    lines: list[Line] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    checked: list[Fit] = field(default_factory=list)
    alternatives: list[Fit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)

    @property
    def hourly(self) -> float:
        return sum(line.hourly for line in self.lines)

    @property
    def monthly(self) -> float:
        return sum(line.monthly for line in self.lines)


def _plural(n: float, word: str) -> str:
    return f"{n:g} {word}" if n == 1 else f"{n:g} {word}s"


def bill(
    catalogue: PriceCatalogue,
    *,
    zone: str,
    pricing: Pricing,
    replicas: int,
    cpu: float,
    memory_bytes: int,
    gpu: Fit | None,
    storage_bytes: int | None,
) -> list[Line]:
    """The lines: GPU (if any), CPU, memory for `replicas` replicas, then the artifact's storage."""
    prices, hours = catalogue.zones[zone], catalogue.hours_per_month
    each = f"per replica x {_plural(replicas, 'replica')}"
    label = pricing.replace("_", "-")
    lines = []

    def hourly_line(item: str, *, quantity: float, unit: str, price: float, detail: str) -> None:
        lines.append(Line(item, quantity, unit, price, quantity * price, quantity * price * hours, detail))

    if gpu is not None:
        device = gpu.device
        detail = f"{gpu.count} x {device.name} {each}"
        if device.mig_profile:
            detail += f"; {device.share_reason}"
        hourly_line(
            f"GPU {device.name} ({label})",
            quantity=float(device.share) * gpu.count * replicas,
            unit="GPU-hour",
            price=device.gpu_hourly,
            detail=detail,
        )
    hourly_line(
        f"CPU ({label})",
        quantity=cpu * replicas,
        unit="core-hour",
        price=prices.cpu_core_hour.of(pricing),
        detail=f"{_plural(cpu, 'core')} {each}",
    )
    gib = memory_bytes / GIB
    hourly_line(
        f"Memory ({label})",
        quantity=gib * replicas,
        unit="GiB-hour",
        price=prices.memory_gib_hour.of(pricing),
        detail=f"{gib:,.2f} GiB {each}",
    )
    if storage_bytes:
        stored = storage_bytes / GIB
        monthly = stored * prices.storage_gib_month
        detail = f"{stored:,.3f} GiB kept once in the artifact store; storage has one price (no spot)"
        lines.append(
            Line(
                "Storage (model artifact)",
                stored,
                "GiB-month",
                prices.storage_gib_month,
                monthly / hours,
                monthly,
                detail,
            )
        )
    return lines


def _fixed_gpu(catalogue: PriceCatalogue, *, ask: Ask, zone: str, need: MemoryNeed | None) -> Fit:
    """The device a deployment (or a spec with a count) names, checked against the need."""
    if ask.gpu_type is None:
        known = sorted(catalogue.zones[zone].gpus)
        if ask.mig_profile:
            having = [n for n in known if ask.mig_profile in catalogue.gpu_types[n].mig_profiles]
            raise UnknownName(
                kind="GPU type", name=None, known=having, where=f" to price MIG {ask.mig_profile}"
            )
        raise UnknownName(kind="GPU type", name=None, known=known, where=" to price GPUs")
    offered = devices(
        catalogue, zone=zone, pricing=ask.pricing, gpu_type=ask.gpu_type, mig_profile=ask.mig_profile
    )
    device = next(d for d in offered if d.mig_profile == ask.mig_profile)
    count = max(1, ask.gpus)
    # MIG slices do not share one model: each holds all of it. Whole GPUs split it.
    per_device = None if need is None else need.per_device(1 if device.mig_profile else count)
    return Fit(device, count, per_device)


def _gpu(catalogue: PriceCatalogue, *, ask: Ask, zone: str, need: MemoryNeed | None, result: Estimate) -> Fit:
    if not ask.choose or ask.gpus:
        fit = _fixed_gpu(catalogue, ask=ask, zone=zone, need=need)
        if fit.fits is False and need is not None:
            result.notes.append(
                f"Does not fit: each {fit.device.name} would hold {(fit.need_per_device or 0) / GB:,.2f} GB"
                f" of its {fit.device.memory_bytes / GB:g} GB"
            )
        return fit
    if need is None:
        raise NeedsFacts(result.missing)
    offered = devices(
        catalogue, zone=zone, pricing=ask.pricing, gpu_type=ask.gpu_type, mig_profile=ask.mig_profile
    )
    chosen, checked = choose_fit(need, offered)
    if chosen is None:
        raise DoesNotFit(
            need, largest=max(offered, key=lambda d: d.memory_bytes, default=None), max_gpus=MAX_GPUS
        )
    result.checked = checked
    # The cheapest option of every other GPU type that also holds the model (a split included).
    seen = {chosen.device.gpu_type}
    for fit in sorted((f for f in checked if f.fits), key=lambda f: (f.hourly, f.count)):
        if fit.device.gpu_type not in seen and len(result.alternatives) < ALTERNATIVES:
            seen.add(fit.device.gpu_type)
            result.alternatives.append(fit)
    return chosen


def _fit_step(fit: Fit) -> Step:
    per = fit.need_per_device or 0
    split = f" split over {fit.count} GPUs" if fit.count > 1 and not fit.device.mig_profile else ""
    return Step(
        "fit",
        f"{per / GB:,.2f} GB per device{split} <= {fit.device.memory_bytes / GB:g} GB of {fit.count} x {fit.device.name}"
        if fit.fits
        else f"{per / GB:,.2f} GB per device > {fit.device.memory_bytes / GB:g} GB of {fit.device.name}: does not fit",
        fit.device.memory_bytes,
        "bytes",
    )


def estimate(catalogue: PriceCatalogue, *, ask: Ask, shape: ModelShape | list[Missing] | None) -> Estimate:
    """Price `ask` for a model of `shape` (or the facts missing for it; None: not a model's ask).

    Raises UnknownName (zone, GPU type, MIG profile), NeedsFacts (a choice to make without the
    facts for it) and DoesNotFit (nothing offered holds the model)."""
    zone = zone_of(catalogue, ask.zone)
    model = shape if isinstance(shape, ModelShape) else None
    missing = list(shape) if isinstance(shape, list) else []
    context = ask.context or (model.context_length if model else None)
    if model is not None and context is None:
        missing.append(Missing("inspection.context_length", "KV cache: the context length (or pass context)"))
    result = Estimate(
        zone=zone,
        pricing=ask.pricing,
        currency=catalogue.currency,
        hours_per_month=catalogue.hours_per_month,
        replicas=ask.replicas,
        context=context,
        concurrency=ask.concurrency,
        cpu=ask.cpu,
        memory_bytes=ask.memory_bytes or DEFAULT_MEMORY_BYTES,
        missing=missing,
    )
    if model is not None and context is not None:
        share = math.ceil(ask.concurrency / max(ask.replicas, 1))
        result.need = memory_need(model, context=context, concurrency=share)
        result.steps = need_steps(model, result.need, context=context, concurrency=share)
        if share != ask.concurrency:
            result.notes.append(
                f"{ask.concurrency} concurrent requests over {ask.replicas} replicas: {share} each"
            )
        if model.context_length and context > model.context_length:
            result.notes.append(
                f"The context {context:,} is longer than the model's own {model.context_length:,}"
            )
    if ask.wants_gpu:
        result.gpu = _gpu(catalogue, ask=ask, zone=zone, need=result.need, result=result)
        if result.gpu.fits is not None:
            result.steps.append(_fit_step(result.gpu))
    else:
        _cpu_memory(ask, result)
    result.lines = bill(
        catalogue,
        zone=zone,
        pricing=ask.pricing,
        replicas=ask.replicas,
        cpu=result.cpu,
        memory_bytes=result.memory_bytes,
        gpu=result.gpu,
        storage_bytes=ask.storage_bytes,
    )
    return result


def _cpu_memory(ask: Ask, result: Estimate) -> None:
    """A CPU replica holds the model in its memory: a spec gets what it needs, whole GiB."""
    need = result.need
    if ask.memory_bytes is None:
        if need is None:
            raise NeedsFacts(result.missing)
        result.memory_bytes = math.ceil(need.total_bytes / GIB) * GIB
        result.steps.append(
            Step(
                "memory", f"{need.total_bytes:,} bytes rounded up to whole GiB", result.memory_bytes, "bytes"
            )
        )
    elif need is not None:
        fits = need.total_bytes <= ask.memory_bytes
        verdict = "<=" if fits else "> : does not fit in"
        result.steps.append(
            Step(
                "fit",
                f"{need.total_bytes / GB:,.2f} GB {verdict} the replica's {ask.memory_bytes / GIB:g} GiB of memory",
                ask.memory_bytes,
                "bytes",
            )
        )
        if not fits:
            result.notes.append(f"Does not fit: the model needs {need.total_bytes / GB:,.2f} GB of memory")
