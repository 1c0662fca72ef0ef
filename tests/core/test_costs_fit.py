"""Memory-fit maths and estimates (core/costs): worked examples by hand, and properties."""

from __future__ import annotations

import math
from importlib.resources import files
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.core.costs import (
    GB,
    GIB,
    Ask,
    DoesNotFit,
    ModelShape,
    NeedsFacts,
    PriceCatalogue,
    UnknownName,
    choose_fit,
    devices,
    estimate,
    memory_need,
    model_shape,
    validate_catalogue,
)

SHIPPED = files("converge.control.cost") / "prices.yaml"  # package data: no control-path import
CATALOGUE = validate_catalogue(yaml.safe_load(SHIPPED.read_text()))
# What the GGUF inspector records for a Llama-2-7B F16 file (gguf_facts.inspect_gguf).
LLAMA2_7B_F16: dict[str, Any] = {
    "format": "gguf",
    "architecture": "llama",
    "parameter_count": 6_738_415_616,
    "quantization": "F16",
    "context_length": 4096,
    "extra": {"block_count": 32, "head_count": 32, "head_count_kv": 32, "embedding_length": 4096},
}


def shape_of(inspection: dict[str, Any]) -> ModelShape:
    shape = model_shape(inspection)
    assert isinstance(shape, ModelShape), shape
    return shape


def test_a_7b_fp16_model_at_8k_context_and_16_requests_gets_a_gpu_that_holds_it_with_the_working():
    # By hand: weights 6,738,415,616 x 2 bytes; KV 2 (K, V) x 32 layers x 32 KV heads x 128 head
    # dim (4096 / 32) x 2 bytes x 8192 tokens x 16 requests; overhead 10 % of both + 1 GiB.
    weights = 6_738_415_616 * 2
    kv = 2 * 32 * 32 * 128 * 2 * 8192 * 16
    need = math.ceil((weights + kv) * 1.10) + 2**30
    assert (weights, kv, need) == (13_476_831_232, 68_719_476_736, 91_489_680_589)

    result = estimate(CATALOGUE, ask=Ask(context=8192, concurrency=16), shape=shape_of(LLAMA2_7B_F16))

    assert result.need is not None and result.need.total_bytes == need
    steps = {step.name: step for step in result.steps}
    assert (
        steps["weights"].value == weights
        and "6,738,415,616 parameters x 2 bytes" in steps["weights"].expression
    )
    assert steps["kv_cache_per_token"].value == 2 * 32 * 32 * 128 * 2
    assert "32 layers x 32 KV heads x 128 head dim" in steps["kv_cache_per_token"].expression
    assert steps["kv_cache"].value == kv and "8,192 tokens" in steps["kv_cache"].expression
    assert steps["need"].value == need
    # 91.5 GB: more than an 80 GB H100 or A100 holds; the one single GPU that holds it is an H200.
    assert result.gpu is not None
    assert (result.gpu.device.name, result.gpu.count) == ("H200", 1)
    assert result.gpu.device.memory_bytes == 141 * GB >= need
    assert "91.49 GB per device <= 141 GB of 1 x H200" in steps["fit"].expression
    rejected = {f.device.name for f in result.checked if f.fits is False}
    assert {"H100", "A100-80GB", "L40S"} <= rejected
    # Priced by hand: one H200-hour, one core-hour and 2 GiB-hours, at the default zone's prices.
    hourly = 4.60 + 1 * 0.04 + 2 * 0.005
    assert result.hourly == pytest.approx(hourly)
    assert result.monthly == pytest.approx(hourly * 730)
    assert "longer than the model's own 4,096" in " ".join(result.notes)


def test_a_named_gpu_type_that_is_too_small_is_split_over_as_few_gpus_as_hold_the_model():
    result = estimate(
        CATALOGUE, ask=Ask(context=8192, concurrency=16, gpu_type="H100"), shape=shape_of(LLAMA2_7B_F16)
    )
    weights, kv = 6_738_415_616 * 2, 2 * 32 * 32 * 128 * 2 * 8192 * 16
    per_gpu = math.ceil((weights + kv) * 1.10 / 2) + 2**30  # 46.28 GB on each of two
    assert result.gpu is not None and (result.gpu.device.name, result.gpu.count) == ("H100", 2)
    assert result.gpu.need_per_device == per_gpu <= 80 * GB
    assert result.hourly == pytest.approx(2 * 3.90 + 0.04 + 2 * 0.005)


def test_a_small_need_takes_a_mig_slice_priced_as_its_share_of_the_gpu():
    result = estimate(
        CATALOGUE, ask=Ask(context=2048, concurrency=1, gpu_type="H100"), shape=shape_of(LLAMA2_7B_F16)
    )
    # 13.48 GB weights + 1.07 GB KV, x 1.1, + 1 GiB = 17.08 GB: over 1g.10gb, inside 1g.20gb.
    assert result.gpu is not None and result.gpu.device.name == "H100 1g.20gb"
    gpu_line = result.lines[0]
    # 1g.20gb holds 1/7 of the compute but 20/80 = 1/4 of the memory: it costs a quarter GPU.
    assert gpu_line.quantity == pytest.approx(0.25) and gpu_line.unit_price == 3.90
    assert gpu_line.hourly == pytest.approx(3.90 / 4)
    assert "max(1/7 of the compute, 20/80 GB of the memory) = 1/4" in gpu_line.detail


def test_spot_replicas_and_concurrency_shared_between_replicas():
    shape = shape_of(LLAMA2_7B_F16)
    one = estimate(CATALOGUE, ask=Ask(context=4096, concurrency=8, replicas=1), shape=shape)
    two = estimate(CATALOGUE, ask=Ask(context=4096, concurrency=8, replicas=2, spot=True), shape=shape)
    assert one.need is not None and two.need is not None
    assert two.need.kv_bytes == one.need.kv_bytes // 2  # each of two replicas holds 4 requests
    assert two.pricing == "spot" and all("(spot)" in line.item for line in two.lines)
    assert two.gpu is not None
    spot = CATALOGUE.zones["default"].gpus[two.gpu.device.gpu_type].spot
    assert two.lines[0].hourly == pytest.approx(float(two.gpu.device.share) * spot * 2)


def test_a_cpu_replica_prices_cores_and_the_memory_the_model_needs():
    shape = shape_of(LLAMA2_7B_F16)
    result = estimate(CATALOGUE, ask=Ask(context=1024, concurrency=1, cpu_only=True, cpu=4), shape=shape)
    need = math.ceil((6_738_415_616 * 2 + 524_288 * 1024) * 1.10) + 2**30
    memory = math.ceil(need / GIB) * GIB
    assert result.gpu is None and result.memory_bytes == memory
    assert [line.unit for line in result.lines] == ["core-hour", "GiB-hour"]
    assert result.hourly == pytest.approx(4 * 0.04 + memory / GIB * 0.005)


def test_given_resources_are_priced_without_facts_and_say_what_is_missing():
    missing = model_shape({"format": "onnx"})
    assert isinstance(missing, list)
    ask = Ask(choose=False, cpu=2, memory_bytes=4 * GIB, storage_bytes=GIB // 2)
    result = estimate(CATALOGUE, ask=ask, shape=missing)
    assert result.need is None and result.missing == missing
    assert result.hourly == pytest.approx(2 * 0.04 + 4 * 0.005 + 0.5 * 0.08 / 730)
    assert result.lines[-1].monthly == pytest.approx(0.5 * 0.08)


def test_choosing_a_device_without_the_facts_is_refused_naming_them():
    with pytest.raises(NeedsFacts) as caught:
        estimate(CATALOGUE, ask=Ask(context=1024), shape=model_shape({"format": "gguf", "extra": {}}))
    facts = {m.fact for m in caught.value.missing}
    assert "inspection.parameter_count" in facts
    assert any("block_count" in f for f in facts) and any("head_count_kv" in f for f in facts)


def test_unknown_zone_gpu_type_and_mig_profile_list_the_known_ones():
    shape = shape_of(LLAMA2_7B_F16)
    with pytest.raises(UnknownName) as zone:
        estimate(CATALOGUE, ask=Ask(zone="mars", context=1024), shape=shape)
    assert zone.value.known == ["default", "eu-west", "us-east"]
    with pytest.raises(UnknownName) as gpu:
        estimate(CATALOGUE, ask=Ask(zone="eu-west", gpu_type="H200", context=1024), shape=shape)
    assert "H200" not in gpu.value.known and "H100" in gpu.value.known
    with pytest.raises(UnknownName) as mig:
        estimate(CATALOGUE, ask=Ask(gpu_type="L4", mig_profile="1g.10gb", context=1024), shape=shape)
    assert mig.value.kind == "MIG profile" and mig.value.known == []


def test_a_model_no_offered_device_holds_does_not_fit():
    huge = ModelShape(
        parameters=10**12, bytes_per_weight=2, weight_source="F16", kv_bytes_per_token=0, kv_source="-"
    )
    with pytest.raises(DoesNotFit, match="even split over 8 GPUs"):
        estimate(CATALOGUE, ask=Ask(context=1), shape=huge)


def test_bytes_per_weight_come_from_the_quantisation_or_the_files_own_size():
    q8 = model_shape({**LLAMA2_7B_F16, "quantization": "Q8_0"})
    mixed = model_shape({**LLAMA2_7B_F16, "quantization": "Q4_K_M", "memory_bytes": 4_081_004_224})
    hf = model_shape(
        {
            "format": "safetensors",
            "parameter_count": 1000,
            "dtypes": ["BF16"],
            "extra": {
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "hidden_size": 64,
            },
        }
    )
    assert isinstance(q8, ModelShape) and q8.bytes_per_weight == 34 / 32
    assert isinstance(mixed, ModelShape) and mixed.bytes_per_weight == 4_081_004_224 / 6_738_415_616
    assert "mixes storage types" in mixed.weight_source
    # Grouped-query attention: 2 KV heads of dim 64 / 4 = 16.
    assert isinstance(hf, ModelShape) and hf.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2


# -- properties ---------------------------------------------------------------------------------

shapes = st.builds(
    ModelShape,
    parameters=st.integers(10**6, 2 * 10**11),
    bytes_per_weight=st.sampled_from([0.5625, 1.0625, 2.0, 4.0]),
    weight_source=st.just("generated"),
    kv_bytes_per_token=st.integers(0, 2 * 10**6),
    kv_source=st.just("generated"),
)
contexts = st.integers(1, 262_144)
concurrencies = st.integers(1, 256)
pricings = st.sampled_from(["on_demand", "spot"])
zones = st.sampled_from(sorted(CATALOGUE.zones))


@settings(max_examples=200, deadline=None)
@given(shape=shapes, c1=contexts, c2=contexts, n1=concurrencies, n2=concurrencies)
def test_memory_need_is_monotone_in_context_and_concurrency(shape, c1, c2, n1, n2):
    (c1, c2), (n1, n2) = sorted((c1, c2)), sorted((n1, n2))
    assert (
        memory_need(shape, context=c1, concurrency=n1).total_bytes
        <= memory_need(shape, context=c2, concurrency=n1).total_bytes
        <= memory_need(shape, context=c2, concurrency=n2).total_bytes
    )


def _priced(
    shape: ModelShape, *, context: int, concurrency: int, zone: str, spot: bool
) -> tuple[bool, float] | None:
    """(split over several GPUs, hourly), or None when nothing holds it."""
    try:
        result = estimate(
            CATALOGUE, ask=Ask(context=context, concurrency=concurrency, zone=zone, spot=spot), shape=shape
        )
    except DoesNotFit:
        return None
    assert result.gpu is not None
    return result.gpu.count > 1, result.hourly


@settings(max_examples=150, deadline=None)
@given(
    shape=shapes, c1=contexts, c2=contexts, n1=concurrencies, n2=concurrencies, zone=zones, spot=st.booleans()
)
def test_an_estimate_never_gets_cheaper_with_more_context_or_concurrency(shape, c1, c2, n1, n2, zone, spot):
    """Within one kind of answer (one device, or a split): at the point where one device stops
    holding the model, a split of cheaper GPUs can cost less than the largest single one did
    (the estimate lists such splits as alternatives all along)."""
    (c1, c2), (n1, n2) = sorted((c1, c2)), sorted((n1, n2))
    small = _priced(shape, context=c1, concurrency=n1, zone=zone, spot=spot)
    large = _priced(shape, context=c2, concurrency=n2, zone=zone, spot=spot)
    if large is None:
        return
    assert small is not None  # what holds the larger ask holds the smaller one
    if small[0] == large[0]:
        assert small[1] <= large[1] + 1e-9


@settings(max_examples=200, deadline=None)
@given(shape=shapes, context=contexts, concurrency=concurrencies, zone=zones, pricing=pricings)
def test_a_chosen_fit_never_exceeds_its_devices_memory_and_none_cheaper_fits(
    shape, context, concurrency, zone, pricing
):
    need = memory_need(shape, context=context, concurrency=concurrency)
    chosen, checked = choose_fit(need, devices(CATALOGUE, zone=zone, pricing=pricing))
    if chosen is None:
        assert not any(f.fits for f in checked)
        return
    assert chosen.need_per_device is not None and chosen.need_per_device <= chosen.device.memory_bytes
    assert chosen.need_per_device == need.per_device(chosen.count)
    kind = [f for f in checked if f.fits and (f.count == 1) == (chosen.count == 1)]
    assert all(f.hourly >= chosen.hourly for f in kind)
    if chosen.count > 1:  # split only because no single device holds it
        assert not any(f.fits for f in checked if f.count == 1)


@settings(max_examples=200, deadline=None)
@given(
    need_gb=st.floats(0.5, 1200, allow_nan=False),
    gpu_type=st.sampled_from(sorted(CATALOGUE.gpu_types)),
    pricing=pricings,
)
def test_on_one_gpu_type_the_smallest_profile_that_fits_is_chosen(need_gb, gpu_type, pricing):
    shape = ModelShape(
        parameters=round(need_gb * GB),
        bytes_per_weight=1,
        weight_source="-",
        kv_bytes_per_token=0,
        kv_source="-",
    )
    need = memory_need(shape, context=1, concurrency=1)
    offered = devices(CATALOGUE, zone="default", pricing=pricing, gpu_type=gpu_type)
    chosen, _ = choose_fit(need, offered)
    holding = [d for d in offered if need.per_device(1) <= d.memory_bytes]
    if holding:
        assert chosen is not None and chosen.count == 1
        assert chosen.device.memory_bytes == min(d.memory_bytes for d in holding)
    elif chosen is not None:  # split over the fewest whole GPUs that hold it
        assert chosen.device.mig_profile is None
        assert need.per_device(chosen.count - 1) > chosen.device.memory_bytes


def test_the_shipped_catalogue_has_every_gpu_type_with_nvidias_mig_profiles():
    assert isinstance(CATALOGUE, PriceCatalogue)
    expected = {"H100": 80, "H200": 141, "A100-40GB": 40, "A100-80GB": 80, "L4": 24, "L40S": 48}
    assert {name: t.memory_gb for name, t in CATALOGUE.gpu_types.items()} == expected
    assert set(CATALOGUE.gpu_types["H100"].mig_profiles) == {
        "1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"
    }  # fmt: skip
    assert set(CATALOGUE.gpu_types["H200"].mig_profiles) == {
        "1g.18gb", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"
    }  # fmt: skip
    assert not CATALOGUE.gpu_types["L4"].mig_profiles and not CATALOGUE.gpu_types["L40S"].mig_profiles
    assert len(CATALOGUE.zones) >= 3 and CATALOGUE.default_zone == "default"
    assert "EXAMPLE LIST PRICES, TO BE EDITED" in SHIPPED.read_text()


def test_a_fixed_gpu_count_is_priced_as_asked_and_says_when_it_does_not_fit():
    shape = shape_of(LLAMA2_7B_F16)
    result = estimate(CATALOGUE, ask=Ask(context=8192, concurrency=16, gpu_type="L4", gpus=2), shape=shape)
    assert result.gpu is not None and (result.gpu.device.name, result.gpu.count) == ("L4", 2)
    assert result.gpu.fits is False and result.hourly == pytest.approx(2 * 0.80 + 0.04 + 0.01)
    assert "Does not fit: each L4 would hold 46.28 GB of its 24 GB" in result.notes
    with pytest.raises(UnknownName, match="Name a GPU type to price GPUs; known: A100-40GB"):
        estimate(CATALOGUE, ask=Ask(gpus=2, context=1024), shape=shape)
