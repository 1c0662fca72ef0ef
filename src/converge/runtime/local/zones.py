"""The one zone of a local backend: this machine's CPUs, memory and (through NVML) GPUs."""

from __future__ import annotations

import math
import os
from typing import Any

import psutil
import structlog

from converge.runtime.base import Gpu, Zone

log = structlog.get_logger(__name__)


def local_zone() -> Zone:
    return Zone(
        name="local",
        cpu=float(os.cpu_count() or 1),
        memory_bytes=psutil.virtual_memory().total,
        gpus=nvml_gpus(),
    )


def nvml_gpus() -> list[Gpu]:
    """GPUs NVML can see; none when `nvidia-ml-py` is missing, no driver, or any NVML call fails."""
    try:
        import pynvml  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...: no GPU here
        return []
    try:
        return [_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception as exc:
        log.warning("nvml_query_failed", error=str(exc))
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvml_shutdown_failed", error=str(exc))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _gpu(nvml: Any, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    return Gpu(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
        mig_profiles=_mig_profiles(nvml, handle),
    )


def _mig_profiles(nvml: Any, handle: Any) -> list[str]:
    """GPU-instance profiles such as `1g.10gb` when MIG is enabled on this GPU, else []."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # not MIG-capable
        return []
    if current != nvml.NVML_DEVICE_MIG_ENABLE:
        return []
    profiles: list[str] = []
    for profile in range(nvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, profile)
        except Exception:  # profile not supported by this GPU
            continue
        name = f"{info.sliceCount}g.{math.ceil(info.memorySizeMB / 1024)}gb"
        if name not in profiles:
            profiles.append(name)
    return profiles
