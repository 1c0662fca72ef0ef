"""Which of this machine's GPUs a local replica sees (`CUDA_VISIBLE_DEVICES`).

A replica given `resources.gpus` = n sees the n devices that the fewest running replicas use
(ties: the lowest index), so two one-GPU deployments on a two-GPU machine get one GPU each
instead of both landing on GPU 0; a replica with no GPUs sees none. Devices are shared rather
than waited for when there are more GPU replicas than GPUs (a rolling update starts the new
replica beside the old one, which frees its device once drained): a replica never waits on
another to start. The devices are CUDA's view: the supervisor's own `CUDA_VISIBLE_DEVICES` when
it has one (a machine shared by other programs), else every GPU NVML counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from converge.runtime.base import Resources
from converge.runtime.local.zones import nvml_gpus

ENV = "CUDA_VISIBLE_DEVICES"


def machine_devices(environ: Mapping[str, str]) -> tuple[str, ...]:
    given = environ.get(ENV)
    if given is not None:
        return tuple(d.strip() for d in given.split(",") if d.strip())
    return tuple(str(gpu.index) for gpu in nvml_gpus())


def wanted(resources: Resources) -> int:
    """Devices one replica takes: its GPUs, or the one GPU a MIG slice is cut from."""
    return resources.gpus or (1 if resources.mig_profile is not None else 0)


def choose(n: int, *, devices: tuple[str, ...], in_use: Iterable[str]) -> tuple[str, ...]:
    """The `n` devices (at most all of them) that the fewest replicas use, in device order."""
    if n <= 0 or not devices:
        return ()
    load = Counter(in_use)
    picked = sorted(devices, key=lambda d: (load[d], devices.index(d)))[:n]
    return tuple(sorted(picked, key=devices.index))
