"""What a revision's stored spec becomes for the runtime: its server's command line and how
many of its replicas run the canary. Pure functions of the spec, beside the controller that
applies them."""

from __future__ import annotations

from typing import Any

from converge.models import Deployment
from converge.runtime.base import ServerKind


def canary_replicas(deployment: Deployment, spec: dict[str, Any], *, target: int) -> int | None:
    """How many replicas of a canary revision run beside the old ones: the weight's share of the
    target (at least one, or there is no canary), until the revision is promoted."""
    weight = (spec.get("rollout") or {}).get("canary_weight")
    if weight is None or not 0 < weight < 100 or deployment.promoted_revision == deployment.revision:
        return None
    return max(1, round(target * weight / 100))


def server_args(spec: dict[str, Any]) -> tuple[str, ...]:
    """The spec's server args, plus a thread count that matches the replica's CPU allowance:
    llama.cpp threads spin while they wait, so one per granted core, never all the machine's;
    and, for a deployment given GPUs, every layer offloaded to them, or (vLLM) the model split
    over them (the spec's own args win)."""
    args = list(spec.get("args", []))
    if spec["server"] == ServerKind.LLAMA_CPP:
        if "--n-threads" not in args:
            args += ["--n-threads", str(max(1, int(spec["resources"]["cpu"])))]
        if "--n-gpu-layers" not in args and has_gpu(spec["resources"]):
            args += ["--n-gpu-layers", "-1"]
    gpus = int(spec["resources"].get("gpus") or 0)
    if spec["server"] == ServerKind.VLLM and gpus > 1 and "--tensor-parallel-size" not in args:
        args += ["--tensor-parallel-size", str(gpus)]  # one model split over the replica's GPUs
    return tuple(args)


def has_gpu(resources: dict[str, Any]) -> bool:
    return bool(resources.get("gpus")) or resources.get("mig_profile") is not None
