"""The autoscaler's arithmetic, and when a deployment needs looking at again: pure functions of
what the controller remembers and what the runtime observed (no I/O)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from converge.runtime.base import Observation, ReplicaPhase


@dataclass
class _Load:
    """What the autoscaler remembers between passes (in memory: a new leader starts fresh)."""

    high_since: float | None = None
    low_since: float | None = None
    idle_since: float | None = None
    woken_at: datetime | None = None
    restarts: dict[str, int] = field(default_factory=dict)
    policy: tuple[Any, float, list[str]] | None = None  # (what was checked, when, reasons)


def autoscale(
    *, current: int, spec: dict[str, Any], observed: Observation | None, memory: _Load, now: float
) -> int:
    """The replica target for this pass, from the in-flight and queue figures replicas report."""
    replicas, auto = spec["replicas"], spec["autoscaling"]
    lo, hi = replicas["min"], replicas["max"]
    ready = observed.ready if observed else []
    load = sum(r.in_flight + r.queue_depth for r in ready)
    wanted = max(lo, min(hi, math.ceil(load / auto["target_in_flight"]))) if load else lo
    memory.idle_since = (now if memory.idle_since is None else memory.idle_since) if load == 0 else None
    to_zero = auto.get("scale_to_zero_after_s")
    if to_zero is not None and memory.idle_since is not None and now - memory.idle_since >= to_zero:
        return 0
    if current == 0:
        return current if to_zero is not None and load == 0 else max(lo, 1)
    if wanted > current:
        memory.low_since = None
        memory.high_since = now if memory.high_since is None else memory.high_since
        return min(hi, current + 1) if now - memory.high_since >= auto["scale_up_after_s"] else current
    memory.high_since = None
    if wanted < current:
        memory.low_since = now if memory.low_since is None else memory.low_since
        if now - memory.low_since >= auto["cooldown_s"]:
            memory.low_since = now
            return max(wanted, current - 1)
        return current
    memory.low_since = None
    return max(current, lo)


RESTING = frozenset({"Ready", "ScaledToZero", "Revoked"})


def autoscale_inputs(observed: Observation | None) -> int:
    """What `autoscale` reads of an observation: the load its ready replicas report."""
    return sum(r.in_flight + r.queue_depth for r in observed.ready) if observed else 0


def requeue_after(
    *,
    phase: str,
    observed: Observation,
    target: int,
    spec: dict[str, Any],
    memory: _Load,
    now: float,
    interval: float,
) -> float | None:
    """When a deployment needs looking at again though nothing is reported changed: in motion
    (a rollout, a drain, a restart), after `interval`; with an autoscaling timer running, when
    it is due; at rest, never (the watch, NOTIFY or the resync wakes it)."""
    if phase not in RESTING or any(r.phase != ReplicaPhase.READY for r in observed.replicas):
        return interval
    auto = spec["autoscaling"]
    due = []
    if memory.high_since is not None:
        due.append(memory.high_since + auto["scale_up_after_s"])
    if memory.low_since is not None:
        due.append(memory.low_since + auto["cooldown_s"])
    to_zero = auto.get("scale_to_zero_after_s")
    if to_zero is not None and memory.idle_since is not None and target > 0:
        due.append(memory.idle_since + to_zero)
    return max(0.0, min(due) - now) if due else None
