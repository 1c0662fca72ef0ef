"""The price catalogue's validation (core/costs/catalogue): every problem names its field."""

from __future__ import annotations

import copy
from importlib.resources import files
from typing import Any

import pytest
import yaml

from converge.core.costs import CatalogueError, resolve_gpu_type, validate_catalogue
from converge.core.costs.catalogue import mig_share

SHIPPED: dict[str, Any] = yaml.safe_load((files("converge.control.cost") / "prices.yaml").read_text())


def problems(change: Any) -> dict[str, str]:
    data = copy.deepcopy(SHIPPED)
    change(data)
    with pytest.raises(CatalogueError) as caught:
        validate_catalogue(data)
    return {p.field: p.message for p in caught.value.problems}


def test_the_shipped_catalogue_is_valid_and_round_trips():
    catalogue = validate_catalogue(SHIPPED)
    assert validate_catalogue(catalogue.model_dump(mode="json")) == catalogue


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        (
            lambda d: d["zones"]["default"]["gpus"]["H100"].update(spot=-1),
            "zones.default.gpus.H100.spot",
            "greater than or equal to 0",
        ),
        (
            lambda d: d["zones"]["default"]["gpus"].update(B200={"on_demand": 6, "spot": 3}),
            "zones.default.gpus.B200",
            "not a GPU type",
        ),
        (
            lambda d: d["gpu_types"]["H100"]["mig_profiles"].update(
                {"7g.90gb": {"compute": "7/7", "memory_gb": 90}}
            ),
            "gpu_types.H100.mig_profiles.7g.90gb.memory_gb",
            "more than the GPU's 80 GB",
        ),
        (
            lambda d: d["gpu_types"]["L4"].update(
                mig_profiles={"1g.6gb": {"compute": "8/7", "memory_gb": 6}}
            ),
            "gpu_types.L4.mig_profiles.1g.6gb.compute",
            "not in (0, 1]",
        ),
        (
            lambda d: d["gpu_types"]["L4"].update(mig_profiles={"half": {"compute": "1/2", "memory_gb": 12}}),
            "gpu_types.L4.mig_profiles.half.[key]",
            "match pattern",
        ),
        (lambda d: d.update(default_zone="mars"), "default_zone", "'mars' is not a zone"),
        (
            lambda d: d["zones"]["default"].pop("cpu_core_hour"),
            "zones.default.cpu_core_hour",
            "Field required",
        ),
        (
            lambda d: d["zones"]["default"].update(gpu_hour=1),
            "zones.default.gpu_hour",
            "Extra inputs are not permitted",
        ),
        (
            lambda d: d["gpu_types"]["L4"].update(aliases=["NVIDIA L40S"]),
            "gpu_types.L4.aliases",
            "already names L40S",
        ),
        (
            lambda d: d["zones"]["default"]["memory_gib_hour"].update(on_demand=float("nan")),
            "zones.default.memory_gib_hour.on_demand",
            "finite",
        ),
        (lambda d: d.update(zones={}), "zones", "at least 1 item"),
    ],
    ids=lambda v: v if isinstance(v, str) and "." in v else None,
)
def test_an_invalid_catalogue_names_the_field(change, field, says):
    found = problems(change)
    assert field in found, found
    assert says in found[field]


def test_a_catalogue_that_is_not_an_object_is_refused():
    with pytest.raises(CatalogueError, match="must be a JSON object"):
        validate_catalogue(["not", "a", "catalogue"])


def test_gpu_types_resolve_by_name_or_alias_whatever_the_spelling():
    catalogue = validate_catalogue(SHIPPED)
    assert resolve_gpu_type(catalogue, "h100") == "H100"
    assert resolve_gpu_type(catalogue, "NVIDIA-H100-80GB-HBM3") == "H100"
    assert resolve_gpu_type(catalogue, "nvidia a100-sxm4-40gb") == "A100-40GB"
    assert resolve_gpu_type(catalogue, "B200") is None


def test_a_mig_profile_costs_the_larger_of_its_compute_and_memory_shares():
    catalogue = validate_catalogue(SHIPPED)
    h100, h200 = catalogue.gpu_types["H100"], catalogue.gpu_types["H200"]
    assert str(mig_share(h100, h100.mig_profiles["1g.10gb"])) == "1/7"  # 1/7 compute > 10/80 memory
    assert str(mig_share(h100, h100.mig_profiles["3g.40gb"])) == "1/2"  # 40/80 memory > 3/7 compute
    assert str(mig_share(h200, h200.mig_profiles["1g.18gb"])) == "1/7"  # 18/141 < 1/7
    assert str(mig_share(h200, h200.mig_profiles["7g.141gb"])) == "1"
