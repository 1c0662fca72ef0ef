"""GPU metrics through NVML: absent (no family at all, not 0) without the package, without the
driver or without a device; and, through a FAKE NVML module put in sys.modules in place of
`pynvml` (no GPU here), memory per GPU and MIG slice and utilisation where NVML reports it."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from converge.observability.gpu import GPU_METRICS, GpuCollector

GB = 1_000_000_000


def _scrape(collector: GpuCollector) -> dict[str, dict[tuple[str, str, str], float]]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    found: dict[str, dict[tuple[str, str, str], float]] = {}
    for family in text_string_to_metric_families(text):
        series = found.setdefault(family.name, {})
        for s in family.samples:
            series[(s.labels["gpu"], s.labels["mig"], s.labels["profile"])] = s.value
    return found


class NVMLError(Exception):
    pass


@dataclass
class _Memory:
    total: int
    used: int
    free: int = 0


@dataclass
class _Rates:
    gpu: int
    memory: int = 0


@dataclass
class _Gpu:
    memory: _Memory
    utilization: int | None  # None: NVML answers NOT_SUPPORTED
    mig: list[tuple[int, str, _Memory] | None] | None = None  # per slot: (GPU instance, name, memory)
    broken: bool = False


def fake_nvml(gpus: list[_Gpu], *, init_fails: bool = False) -> types.ModuleType:
    """A FAKE of the `pynvml` module (nvidia-ml-py): the calls GpuCollector makes, answering
    from `gpus` as NVML would, errors included."""
    nvml: Any = types.ModuleType("pynvml")
    nvml.NVMLError = NVMLError
    nvml.NVML_DEVICE_MIG_ENABLE = 1

    def init() -> None:
        if init_fails:
            raise NVMLError("NVML Shared Library Not Found")

    def handle(index: int) -> Any:
        if gpus[index].broken:
            raise NVMLError("GPU is lost")
        return ("gpu", index)

    def utilization(h: Any) -> _Rates:
        value = gpus[h[1]].utilization
        if value is None:
            raise NVMLError("Not Supported")
        return _Rates(gpu=value)

    def memory(h: Any) -> _Memory:
        return gpus[h[1]].memory if h[0] == "gpu" else h[5]

    def mig_mode(h: Any) -> tuple[int, int]:
        if gpus[h[1]].mig is None:
            raise NVMLError("Not Supported")
        return (1, 1)

    def mig_device(h: Any, slot: int) -> Any:
        entry = gpus[h[1]].mig[slot]  # type: ignore[index]
        if entry is None:
            raise NVMLError("Not Found")
        return ("mig", h[1], slot, *entry)  # (kind, gpu, slot, GPU instance, name, memory)

    nvml.nvmlInit = init
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = handle
    nvml.nvmlDeviceGetMemoryInfo = memory
    nvml.nvmlDeviceGetUtilizationRates = utilization
    nvml.nvmlDeviceGetMigMode = mig_mode
    nvml.nvmlDeviceGetMaxMigDeviceCount = lambda h: len(gpus[h[1]].mig or [])
    nvml.nvmlDeviceGetMigDeviceHandleByIndex = mig_device
    nvml.nvmlDeviceGetGpuInstanceId = lambda h: h[3]
    nvml.nvmlDeviceGetName = lambda h: h[4]
    return nvml


def nvml_works() -> bool:
    """Whether the real NVML library (nvidia-ml-py, a dependency) finds a driver here."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: a machine without a GPU
        return False
    pynvml.nvmlShutdown()
    return True


def test_without_the_nvml_package_there_are_no_gpu_series(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert _scrape(GpuCollector()) == {}


def test_without_the_driver_or_without_a_device_there_are_no_gpu_series(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(
        sys.modules, "pynvml", fake_nvml([_Gpu(_Memory(80 * GB, 1 * GB), 5)], init_fails=True)
    )
    assert _scrape(GpuCollector()) == {}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([]))
    assert _scrape(GpuCollector()) == {}


async def test_the_apps_scrape_has_no_gpu_series_on_a_machine_without_nvml(client: Any) -> None:
    if nvml_works():
        pytest.skip("NVML answers on this machine: it has a GPU, whose series the scrape shows")
    scrape = (await client.get("/metrics")).text
    assert "converge_db_pool_size" in scrape  # a real scrape
    assert "converge_gpu_" not in scrape  # not even a HELP line


def test_a_fake_nvml_gives_memory_per_gpu_and_mig_slice_and_utilisation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = [
        _Gpu(_Memory(total=80 * GB, used=20 * GB), utilization=37),
        _Gpu(  # in MIG mode: no utilisation; slot 1 is a second compute instance of GPU instance 3
            _Memory(total=80 * GB, used=45 * GB),
            utilization=None,
            mig=[
                (3, "NVIDIA H100 80GB HBM3 MIG 1g.10gb", _Memory(total=10 * GB, used=9 * GB)),
                (3, "NVIDIA H100 80GB HBM3 MIG 1g.10gb", _Memory(total=10 * GB, used=9 * GB)),
                None,
                (5, b"NVIDIA H100 80GB HBM3 MIG 3g.40gb", _Memory(total=40 * GB, used=36 * GB)),
            ],
        ),
        _Gpu(_Memory(total=80 * GB, used=0), utilization=0, broken=True),  # left out, not a failed scrape
    ]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(gpus))
    found = _scrape(GpuCollector())
    assert set(found) == GPU_METRICS
    assert found["converge_gpu_memory_total_bytes"] == {
        ("0", "", ""): 80 * GB,
        ("1", "", ""): 80 * GB,
        ("1", "3", "1g.10gb"): 10 * GB,
        ("1", "5", "3g.40gb"): 40 * GB,
    }
    assert found["converge_gpu_memory_used_bytes"] == {
        ("0", "", ""): 20 * GB,
        ("1", "", ""): 45 * GB,
        ("1", "3", "1g.10gb"): 9 * GB,
        ("1", "5", "3g.40gb"): 36 * GB,
    }
    assert found["converge_gpu_utilization_ratio"] == {("0", "", ""): 0.37}


def test_the_readings_are_taken_at_every_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [_Gpu(_Memory(total=80 * GB, used=20 * GB), utilization=10)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(gpus))
    collector = GpuCollector()
    assert _scrape(collector)["converge_gpu_memory_used_bytes"] == {("0", "", ""): 20 * GB}
    gpus[0].memory, gpus[0].utilization = _Memory(total=80 * GB, used=60 * GB), 90
    found = _scrape(collector)
    assert found["converge_gpu_memory_used_bytes"] == {("0", "", ""): 60 * GB}
    assert found["converge_gpu_utilization_ratio"] == {("0", "", ""): 0.9}
