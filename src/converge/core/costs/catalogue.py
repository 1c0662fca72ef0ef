"""The price catalogue: GPU types and their MIG profiles (hardware facts), and per zone what an
hour of each resource costs, on demand and on spot. Validated here, stored by the control path.

`validate_catalogue` is the one door: anything that is not a catalogue raises `CatalogueError`
with every problem, each naming the field (dotted, e.g. `zones.default.gpus.H100.spot`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

GB = 10**9  # GPU memory is sold in decimal gigabytes
GIB = 2**30  # CPU memory and storage are priced per binary gigabyte
Pricing = Literal["on_demand", "spot"]

GpuName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")]
ZoneName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
# NVIDIA's MIG profile names: compute slices "g", then memory "gb", optionally "+me" (media engines).
MigName = Annotated[str, StringConstraints(pattern=r"^[1-7]g\.[0-9]{1,3}gb(\+me)?$")]
Alias = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._()/+-]{0,63}$")]
Money = Annotated[float, Field(ge=0, le=1_000_000)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MigProfile(_Strict):
    compute: str = Field(description="Share of the GPU's compute, e.g. 1/7")
    memory_gb: float = Field(gt=0, le=10_000)

    @field_validator("compute", mode="before")
    @classmethod
    def _share(cls, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError("must be a fraction such as 1/7 or a number in (0, 1]")
        try:
            share = Fraction(str(value).replace(" ", "")).limit_denominator(1000)
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"{value!r} is not a fraction such as 1/7") from exc
        if not 0 < share <= 1:
            raise ValueError(f"{value!r} is not in (0, 1]")
        return str(value).replace(" ", "") if isinstance(value, str) else str(share)

    @property
    def compute_share(self) -> Fraction:
        return Fraction(self.compute).limit_denominator(1000)


class GpuType(_Strict):
    memory_gb: float = Field(gt=0, le=10_000)
    aliases: list[Alias] = Field(default_factory=list, max_length=16)
    mig_profiles: dict[MigName, MigProfile] = Field(default_factory=dict)


class Price(_Strict):
    on_demand: Money
    spot: Money

    def of(self, pricing: Pricing) -> float:
        return self.on_demand if pricing == "on_demand" else self.spot


class Zone(_Strict):
    cpu_core_hour: Price
    memory_gib_hour: Price
    storage_gib_month: Money
    gpus: dict[GpuName, Price] = Field(default_factory=dict)


class PriceCatalogue(_Strict):
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] = "USD"
    hours_per_month: float = Field(default=730, gt=0, le=744)
    default_zone: ZoneName = "default"
    gpu_types: dict[GpuName, GpuType] = Field(default_factory=dict)
    zones: dict[ZoneName, Zone] = Field(min_length=1)


@dataclass(frozen=True)
class CatalogueProblem:
    field: str
    message: str


class CatalogueError(ValueError):
    def __init__(self, problems: list[CatalogueProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))


def validate_catalogue(data: Mapping[str, Any] | Any) -> PriceCatalogue:
    """The catalogue `data` describes, or CatalogueError naming each bad field."""
    if not isinstance(data, Mapping):
        raise CatalogueError([CatalogueProblem("(body)", "the catalogue must be a JSON object")])
    try:
        catalogue = PriceCatalogue.model_validate(dict(data))
    except ValidationError as exc:
        raise CatalogueError(
            [
                CatalogueProblem(".".join(str(p) for p in e["loc"]) or "(body)", e["msg"])
                for e in exc.errors(include_url=False)
            ]
        ) from None
    problems = _cross_checks(catalogue)
    if problems:
        raise CatalogueError(problems)
    return catalogue


def _cross_checks(catalogue: PriceCatalogue) -> list[CatalogueProblem]:
    problems = []
    if catalogue.default_zone not in catalogue.zones:
        known = ", ".join(sorted(catalogue.zones))
        problems.append(
            CatalogueProblem("default_zone", f"'{catalogue.default_zone}' is not a zone ({known})")
        )
    for zone_name, zone in catalogue.zones.items():
        for gpu in zone.gpus:
            if gpu not in catalogue.gpu_types:
                known = ", ".join(sorted(catalogue.gpu_types)) or "none"
                problems.append(
                    CatalogueProblem(
                        f"zones.{zone_name}.gpus.{gpu}", f"not a GPU type in gpu_types ({known})"
                    )
                )
    seen: dict[str, str] = {}
    for name, gpu_type in catalogue.gpu_types.items():
        for profile_name, profile in gpu_type.mig_profiles.items():
            if profile.memory_gb > gpu_type.memory_gb:
                problems.append(
                    CatalogueProblem(
                        f"gpu_types.{name}.mig_profiles.{profile_name}.memory_gb",
                        f"{profile.memory_gb:g} GB is more than the GPU's {gpu_type.memory_gb:g} GB",
                    )
                )
        for alias in [name, *gpu_type.aliases]:
            key = normalise(alias)
            if seen.get(key, name) != name:
                problems.append(
                    CatalogueProblem(f"gpu_types.{name}.aliases", f"'{alias}' already names {seen[key]}")
                )
            seen[key] = name
    return problems


def normalise(name: str) -> str:
    """GPU names compare without case, spaces, dashes or underscores ("NVIDIA H100 80GB HBM3")."""
    return re.sub(r"[\s_-]+", "", name).lower()


def resolve_gpu_type(catalogue: PriceCatalogue, name: str) -> str | None:
    """The catalogue's name for a GPU type given by its name or an alias, or None."""
    wanted = normalise(name)
    for type_name, gpu_type in catalogue.gpu_types.items():
        if wanted in {normalise(n) for n in [type_name, *gpu_type.aliases]}:
            return type_name
    return None


def mig_share(gpu_type: GpuType, profile: MigProfile) -> Fraction:
    """The part of a GPU a profile is priced at: the larger of its compute and memory shares."""
    memory_share = Fraction(str(profile.memory_gb)) / Fraction(str(gpu_type.memory_gb))
    return max(profile.compute_share, memory_share)
