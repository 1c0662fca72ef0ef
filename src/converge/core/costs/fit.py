"""Memory-fit maths: how many bytes a replica needs, and the smallest GPU or MIG profile that holds it.

need = weights + KV cache + overhead, where
  weights  = parameters x bytes per weight
  KV cache = 2 x layers x KV heads x head dim x bytes per element x context x concurrency
  overhead = OVERHEAD_FRACTION x (weights + KV cache) + OVERHEAD_FIXED_BYTES per device

Over N GPUs (tensor parallelism) the weights and the KV cache split N ways and every GPU keeps
its own fixed overhead. One device is preferred to several: only when none holds the model is
it split, over the fewest whole GPUs of a type that hold it. Among the options of the chosen
kind the cheapest wins, then the one with less memory, then the name. On one GPU type that is
its smallest profile that fits (a profile is priced by its share of the GPU, so a smaller one
never costs more); across types it is the cheapest, so within each kind a longer context or
more concurrency never makes an estimate cheaper ("least memory across all types" would: an
18 GB H200 slice can cost more than a 20 GB A100 one). Splits that would cost less than the
one device chosen are still worked out, and the estimate lists them as alternatives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from converge.core.costs.catalogue import GB, GIB, PriceCatalogue, Pricing, mig_share
from converge.core.costs.facts import ModelShape

# Activations, CUDA graphs and allocator slack grow with what is resident; vLLM's default
# gpu_memory_utilization (0.9) leaves the same tenth free.
OVERHEAD_FRACTION = 0.10
# The CUDA context and the server process itself, per device (measured ~0.5-1 GiB on vLLM and
# llama.cpp); a CPU replica's runtime fits the same allowance.
OVERHEAD_FIXED_BYTES = GIB
MAX_GPUS = 8  # one node: tensor parallelism beyond it crosses the network


class UnknownName(ValueError):
    """A zone, GPU type or MIG profile the catalogue does not have; `known` lists those it has."""

    def __init__(self, *, kind: str, name: str | None, known: Sequence[str], where: str = "") -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        listed = ", ".join(self.known) or "none"
        said = f"Unknown {kind} '{name}'{where}" if name is not None else f"Name a {kind}{where}"
        super().__init__(f"{said}; known: {listed}")


@dataclass(frozen=True)
class Step:
    """One line of the working: what was computed, how, and the result."""

    name: str
    expression: str
    value: float
    unit: str


@dataclass(frozen=True)
class MemoryNeed:
    weights_bytes: int
    kv_bytes: int
    overhead_fraction: float = OVERHEAD_FRACTION
    overhead_fixed_bytes: int = OVERHEAD_FIXED_BYTES

    @property
    def model_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes

    def per_device(self, devices: int = 1) -> int:
        """Bytes each of `devices` GPUs holds when the model is split over them."""
        return (
            math.ceil(self.model_bytes * (1 + self.overhead_fraction) / devices) + self.overhead_fixed_bytes
        )

    @property
    def total_bytes(self) -> int:
        return self.per_device(1)


def memory_need(shape: ModelShape, *, context: int, concurrency: int) -> MemoryNeed:
    if context < 1 or concurrency < 1:
        raise ValueError("context and concurrency must be at least 1")
    return MemoryNeed(
        weights_bytes=math.ceil(shape.parameters * shape.bytes_per_weight),
        kv_bytes=shape.kv_bytes_per_token * context * concurrency,
    )


def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def need_steps(shape: ModelShape, need: MemoryNeed, *, context: int, concurrency: int) -> list[Step]:
    overhead = need.total_bytes - need.model_bytes
    return [
        Step(
            "weights",
            f"{shape.parameters:,} parameters x {shape.bytes_per_weight:g} bytes per weight ({shape.weight_source})",
            need.weights_bytes,
            "bytes",
        ),
        Step("kv_cache_per_token", shape.kv_source, shape.kv_bytes_per_token, "bytes"),
        Step(
            "kv_cache",
            f"{shape.kv_bytes_per_token:,} bytes x {context:,} tokens of context x {concurrency:,} concurrent requests",
            need.kv_bytes,
            "bytes",
        ),
        Step(
            "overhead",
            f"{need.overhead_fraction:g} x ({_gb(need.weights_bytes)} + {_gb(need.kv_bytes)})"
            f" + {need.overhead_fixed_bytes:,} bytes fixed (runtime, CUDA context)",
            overhead,
            "bytes",
        ),
        Step(
            "need",
            f"{_gb(need.weights_bytes)} weights + {_gb(need.kv_bytes)} KV cache + {_gb(overhead)} overhead",
            need.total_bytes,
            "bytes",
        ),
    ]


@dataclass(frozen=True)
class Device:
    """A whole GPU or one MIG profile of it, with what an hour of it costs in one zone."""

    gpu_type: str
    mig_profile: str | None
    memory_bytes: int
    share: Fraction  # of one GPU's price
    gpu_hourly: float  # one whole GPU
    share_reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.gpu_type} {self.mig_profile}" if self.mig_profile else self.gpu_type

    @property
    def hourly(self) -> float:
        return float(self.share) * self.gpu_hourly


def zone_of(catalogue: PriceCatalogue, zone: str | None) -> str:
    name = zone or catalogue.default_zone
    if name not in catalogue.zones:
        raise UnknownName(kind="zone", name=name, known=list(catalogue.zones))
    return name


def devices(
    catalogue: PriceCatalogue,
    *,
    zone: str,
    pricing: Pricing,
    gpu_type: str | None = None,
    mig_profile: str | None = None,
) -> list[Device]:
    """Every device the zone prices (whole GPUs and their MIG profiles), narrowed to one GPU type
    and/or one profile. Raises UnknownName for a type or profile the zone does not offer."""
    prices = catalogue.zones[zone_of(catalogue, zone)].gpus
    if gpu_type is not None and gpu_type not in prices:
        raise UnknownName(kind="GPU type", name=gpu_type, known=list(prices), where=f" in zone '{zone}'")
    found = []
    for name in [gpu_type] if gpu_type else sorted(prices):
        kind, hourly = catalogue.gpu_types[name], prices[name].of(pricing)
        if mig_profile is None:
            found.append(Device(name, None, round(kind.memory_gb * GB), Fraction(1), hourly))
        for profile_name, profile in kind.mig_profiles.items():
            if mig_profile in (None, profile_name):
                share = mig_share(kind, profile)
                reason = (
                    f"{profile_name} is priced at max({profile.compute} of the compute,"
                    f" {profile.memory_gb:g}/{kind.memory_gb:g} GB of the memory) = {share} of one {name}"
                )
                memory = round(profile.memory_gb * GB)
                found.append(Device(name, profile_name, memory, share, hourly, reason))
    if mig_profile is not None and not found:
        scope = [gpu_type] if gpu_type else sorted(prices)
        known = {p for n in scope for p in catalogue.gpu_types[n].mig_profiles}
        where = f" on {gpu_type}" if gpu_type else f" in zone '{zone}'"
        raise UnknownName(kind="MIG profile", name=mig_profile, known=list(known), where=where)
    return found


@dataclass(frozen=True)
class Fit:
    device: Device
    count: int
    need_per_device: int | None  # None: the model's size is not known, so not checked

    @property
    def memory_bytes(self) -> int:
        return self.device.memory_bytes * self.count

    @property
    def hourly(self) -> float:
        return self.device.hourly * self.count

    @property
    def fits(self) -> bool | None:
        return None if self.need_per_device is None else self.need_per_device <= self.device.memory_bytes


def _order(fit: Fit) -> tuple[float, int, int, str]:
    return (fit.hourly, fit.memory_bytes, fit.count, fit.device.name)


def choose_fit(
    need: MemoryNeed, candidates: Sequence[Device], *, max_gpus: int = MAX_GPUS
) -> tuple[Fit | None, list[Fit]]:
    """(the fit chosen or None, every option checked, cheapest first): one device if any holds
    the model, else the fewest whole GPUs of a type (MIG slices do not share a model)."""
    singles = [Fit(d, 1, need.per_device(1)) for d in candidates]
    spread = []
    for device in (d for d in candidates if d.mig_profile is None):
        for count in range(2, max_gpus + 1):
            if need.per_device(count) <= device.memory_bytes:
                spread.append(Fit(device, count, need.per_device(count)))
                break
    fitting = [f for f in singles if f.fits] or spread
    checked = sorted(singles, key=_order) + sorted(spread, key=_order)
    return (min(fitting, key=_order) if fitting else None), checked
