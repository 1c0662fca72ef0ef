"""The local zone: this machine's CPUs and memory, GPUs through NVML when it is there."""

from __future__ import annotations

import os
import sys
import types
from typing import Any

import psutil
import pytest

from converge.runtime.local.zones import local_zone


def test_local_zone_is_this_machine() -> None:
    zone = local_zone()
    assert zone.name == "local"
    assert zone.cpu == os.cpu_count()
    assert zone.memory_bytes == psutil.virtual_memory().total


def test_no_nvml_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails, as without nvidia-ml-py
    assert local_zone().gpus == []


def fake_nvml(*, mig: bool, fail_init: bool = False) -> types.ModuleType:
    """NVML as nvidia-ml-py exposes it, with the profile table an H100 80GB reported."""
    profiles: dict[int, tuple[int, int]] = {0: (1, 9984), 1: (2, 20096), 2: (3, 40448), 3: (4, 40448)}
    profiles |= {4: (7, 81152), 7: (1, 9984), 9: (1, 20096)}  # 7 is 1g.10gb+me

    class NVMLError(Exception):
        pass

    def init() -> None:
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    def profile_info(handle: Any, profile: int) -> Any:
        if profile not in profiles:
            raise NVMLError("Not Supported")
        slices, mem = profiles[profile]
        return types.SimpleNamespace(sliceCount=slices, memorySizeMB=mem)

    nvml = types.ModuleType("pynvml")
    nvml.__dict__.update(
        NVML_DEVICE_MIG_ENABLE=1,
        NVML_GPU_INSTANCE_PROFILE_COUNT=18,
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=85520809984),
        nvmlDeviceGetMigMode=lambda h: (1, 1) if mig else (0, 0),
        nvmlDeviceGetGpuInstanceProfileInfo=profile_info,
    )
    return nvml


def test_gpus_and_mig_profiles_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(mig=True))
    [gpu] = local_zone().gpus
    assert (gpu.index, gpu.name, gpu.memory_bytes) == (0, "NVIDIA H100 80GB HBM3", 85520809984)
    assert gpu.mig_profiles == ["1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb", "1g.20gb"]

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(mig=False))
    assert local_zone().gpus[0].mig_profiles == []


def test_nvml_without_a_driver_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(mig=False, fail_init=True))
    assert local_zone().gpus == []
