"""GPU metrics through NVML (the `nvidia-ml-py` package, imported as `pynvml`): memory used and
total per GPU and per MIG slice, and utilisation per GPU, read when Prometheus scrapes.

Absent, not zero, where there is no GPU: without the package, without the driver's library, or
without a device the collector yields no family at all, so a query (or an alert) about GPU
memory answers nothing instead of a reassuring 0. Labels: `gpu` (the NVML index), `mig` (the
GPU instance id of a MIG slice, "" for the whole GPU) and `profile` (the slice's profile such
as "1g.10gb", "" for the whole GPU): bounded by the hardware.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client.core import GaugeMetricFamily

log = structlog.get_logger(__name__)
MEMORY_USED = "converge_gpu_memory_used_bytes"
MEMORY_TOTAL = "converge_gpu_memory_total_bytes"
UTILIZATION = "converge_gpu_utilization_ratio"
# What only a machine with a GPU exposes (the rules' and dashboards' tests allow for their absence).
GPU_METRICS = frozenset({MEMORY_USED, MEMORY_TOTAL, UTILIZATION})
LABELS = ("gpu", "mig", "profile")


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    gpu: str
    mig: str
    profile: str
    used: int
    total: int
    utilization: float | None  # NVML reports none for MIG slices (nor for a GPU in MIG mode)

    @property
    def labels(self) -> list[str]:
        return [self.gpu, self.mig, self.profile]


class GpuCollector:
    """A Prometheus collector; NVML is loaded at the first scrape, once (`module` names it, so a
    test can hand in a fake one)."""

    def __init__(self, *, module: str = "pynvml") -> None:
        self._module = module
        self._nvml: Any = None
        self._tried = False

    def _load(self) -> Any:
        if not self._tried:
            self._tried = True
            try:
                nvml = importlib.import_module(self._module)
                nvml.nvmlInit()
            except Exception as exc:  # no package, no libnvidia-ml, no driver: no GPU metrics
                log.info("gpu_metrics_absent", reason=f"{type(exc).__name__}: {exc}"[:200])
                return None
            self._nvml = nvml
        return self._nvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._load()
        readings = list(read(nvml)) if nvml is not None else []
        if not readings:
            return
        used = GaugeMetricFamily(
            MEMORY_USED, "GPU memory in use (bytes), per GPU and MIG slice", labels=LABELS
        )
        total = GaugeMetricFamily(MEMORY_TOTAL, "GPU memory (bytes), per GPU and MIG slice", labels=LABELS)
        busy = GaugeMetricFamily(
            UTILIZATION, "Share of the last sample period a kernel ran on the GPU (0-1)", labels=LABELS
        )
        for reading in readings:
            used.add_metric(reading.labels, reading.used)
            total.add_metric(reading.labels, reading.total)
            if reading.utilization is not None:
                busy.add_metric(reading.labels, reading.utilization)
        yield used
        yield total
        if busy.samples:
            yield busy


def read(nvml: Any) -> Iterator[Reading]:
    """Every GPU NVML sees, and the MIG slices of those in MIG mode. A device that fails to
    answer is left out of this scrape (a scrape never fails because of one GPU)."""
    try:
        count = nvml.nvmlDeviceGetCount()
    except Exception:
        log.warning("gpu_metrics_unreadable", exc_info=True)
        return
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            slices = list(_mig_slices(nvml, handle, gpu=str(index)))
        except Exception:
            log.debug("gpu_unreadable", gpu=index, exc_info=True)
            continue
        yield Reading(
            gpu=str(index),
            mig="",
            profile="",
            used=int(memory.used),
            total=int(memory.total),
            utilization=_utilization(nvml, handle),
        )
        yield from slices


def _utilization(nvml: Any, handle: Any) -> float | None:
    try:
        return float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100
    except nvml.NVMLError:  # not supported (MIG mode, some boards)
        return None


def _mig_slices(nvml: Any, handle: Any, *, gpu: str) -> Iterator[Reading]:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:  # a GPU without MIG
        return
    if current != nvml.NVML_DEVICE_MIG_ENABLE:
        return
    seen: set[str] = set()
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError:  # an empty slot
            continue
        instance = str(nvml.nvmlDeviceGetGpuInstanceId(mig))
        if instance in seen:  # compute instances of one GPU instance share its memory
            continue
        seen.add(instance)
        memory = nvml.nvmlDeviceGetMemoryInfo(mig)
        yield Reading(
            gpu=gpu,
            mig=instance,
            profile=_profile(nvml.nvmlDeviceGetName(mig)),
            used=int(memory.used),
            total=int(memory.total),
            utilization=None,
        )


def _profile(name: str | bytes) -> str:
    """The profile in a MIG device's name: "NVIDIA H100 80GB HBM3 MIG 1g.10gb" -> "1g.10gb"
    (older bindings answer bytes)."""
    text = name.decode() if isinstance(name, bytes) else str(name)
    return text.rsplit("MIG ", 1)[-1].strip() if "MIG " in text else text.strip()
