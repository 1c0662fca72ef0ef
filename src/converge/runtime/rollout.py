"""Rolling-update planning and status conditions, shared by the local and fake backends (pure).

The rules are a Kubernetes Deployment's with `maxSurge: 1, maxUnavailable: 0`, with one local
twist: a draining replica still holds memory (and maybe a GPU) until it exits, so it counts
against the surge. A rollout therefore goes: start one new replica, wait until it is ready,
drain one old replica, wait until it has exited, repeat. Unready old replicas serve nothing and
are stopped as soon as the new ones can cover for them; ready ones are drained only while the
ready count stays at or above the desired count.

A canary (`canary=N`) changes the rules while replicas of an older revision exist: at most N
of the current revision run beside the old ones, and ready old replicas are never drained, so
the old revision keeps `desired` serving until a promotion (canary None) lets the rollout go on.
The canary replicas are the surge then (desired + N processes), as they replace nothing yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from converge.runtime.base import Condition, ReplicaPhase


@dataclass(frozen=True)
class ReplicaView:
    """What planning needs to know about one replica."""

    id: str
    current: bool  # runs the desired (revision, restart_generation)
    phase: ReplicaPhase

    @property
    def ready(self) -> bool:
        return self.phase == ReplicaPhase.READY


@dataclass(frozen=True)
class Plan:
    start: int = 0  # new replicas of the desired revision to start
    drain: tuple[str, ...] = ()  # ready replicas to take out of rotation, then stop
    stop: tuple[str, ...] = ()  # replicas that serve nothing: stop now


def plan(*, desired: int, replicas: Sequence[ReplicaView], canary: int | None = None) -> Plan:
    """The next step towards `desired` ready replicas of the current revision.

    With `canary` set and old replicas present, hold at `canary` new replicas beside the old.
    """
    draining = [r for r in replicas if r.phase == ReplicaPhase.DRAINING]
    active = [r for r in replicas if r.phase != ReplicaPhase.DRAINING]
    cur = [r for r in active if r.current]
    old = [r for r in active if not r.current]
    holding = canary is not None and bool(old)
    # A canary replaces nothing, so its replicas are the surge: the old keep `desired` running.
    wanted = min(desired, canary) if holding and canary is not None else desired
    surge = max(1, wanted) if holding else 1
    drain: list[str] = []
    stop: list[str] = []

    # Too many of the current revision (scale down): the unready go first.
    surplus = len(cur) - wanted
    if surplus > 0:
        for r in sorted(cur, key=lambda r: r.ready)[:surplus]:
            (drain if r.ready else stop).append(r.id)
        cur = [r for r in cur if r.id not in drain and r.id not in stop]
    if not old:
        return Plan(start=max(0, desired - len(cur)), drain=tuple(drain), stop=tuple(stop))

    # Rolling: never more than desired + surge processes, draining ones included.
    processes = len(cur) + len(old) + len(draining) + len(drain)
    start = max(0, min(wanted - len(cur), desired + surge - processes))
    new_unavailable = sum(1 for r in cur if not r.ready) + start
    # Unready old replicas can go whenever that leaves room for the new ones to become available.
    budget = len(cur) + start + len(old) - desired - new_unavailable
    for r in [r for r in old if not r.ready][: max(0, budget)]:
        stop.append(r.id)
    # Ready old replicas drain only while availability stays >= desired (in a canary: only the
    # old revision's own ready count counts, since it alone must keep serving `desired`).
    old_ready = [r for r in old if r.ready]
    available = len(old_ready) + (0 if holding else sum(1 for r in cur if r.ready))
    for r in old_ready[: max(0, available - desired)]:
        drain.append(r.id)
    return Plan(start=start, drain=tuple(drain), stop=tuple(stop))


def is_paused(*, desired: int, replicas: Sequence[ReplicaView], canary: int | None) -> bool:
    """A canary at its full count and ready, with old replicas still serving: nothing to do
    until a promotion, so this is a resting state (not a stuck rollout)."""
    if canary is None:
        return False
    active = [r for r in replicas if r.phase != ReplicaPhase.DRAINING]
    ready_cur = sum(1 for r in active if r.current and r.ready)
    old = any(not r.current for r in active)
    return old and ready_cur >= min(desired, canary) > 0


def is_complete(*, desired: int, replicas: Sequence[ReplicaView]) -> bool:
    """Every replica runs the current revision, is ready, and there are exactly `desired`."""
    return len(replicas) == desired and all(r.current and r.ready for r in replicas)


def conditions(
    *,
    desired: int,
    revision: int,
    replicas: Sequence[ReplicaView],
    crash_loop: str | None = None,
    deadline_exceeded: bool = False,
    canary: int | None = None,
) -> list[Condition]:
    """Ready, Progressing and Degraded, with a reason and a message a person can act on.

    `crash_loop` names what is crash-looping (None when nothing is); `deadline_exceeded` says the
    rollout made no progress within the backend's deadline; `canary` is the spec's canary count.
    """
    active = [r for r in replicas if r.phase != ReplicaPhase.DRAINING]
    ready_cur = sum(1 for r in active if r.current and r.ready)
    old = sum(1 for r in active if not r.current)
    counts = f"{ready_cur}/{desired} replicas ready at revision {revision}"
    if desired == 0 and not active:
        ready = Condition(type="Ready", status=True, reason="ScaledToZero", message="no replicas desired")
    elif ready_cur >= desired and not old:
        ready = Condition(type="Ready", status=True, reason="ReplicasReady", message=counts)
    else:
        reason = "RollingUpdate" if old else "ReplicasNotReady"
        ready = Condition(type="Ready", status=False, reason=reason, message=counts)

    complete = is_complete(desired=desired, replicas=replicas)
    paused = is_paused(desired=desired, replicas=replicas, canary=canary)
    if complete:
        progressing = Condition(type="Progressing", status=True, reason="RolloutComplete", message=counts)
    elif paused:  # waiting for a person, not stuck: checked before the deadline on purpose
        old_ready = sum(1 for r in active if not r.current and r.ready)
        noun = "replica" if ready_cur == 1 else "replicas"
        progressing = Condition(
            type="Progressing",
            status=True,
            reason="CanaryPaused",
            message=f"{ready_cur} {noun} of revision {revision} beside {old_ready} of the previous "
            "revision; promote to continue",
        )
    elif deadline_exceeded:
        progressing = Condition(
            type="Progressing",
            status=False,
            reason="ProgressDeadlineExceeded",
            message=f"revision {revision} made no progress in time; {counts}",
        )
    else:
        reason = "RollingUpdate" if any(not r.current for r in replicas) else "Scaling"
        progressing = Condition(type="Progressing", status=True, reason=reason, message=counts)

    if crash_loop is not None:
        degraded = Condition(type="Degraded", status=True, reason="CrashLoop", message=crash_loop)
    elif deadline_exceeded and not complete and not paused:
        degraded = Condition(
            type="Degraded", status=True, reason="ProgressDeadlineExceeded", message=progressing.message
        )
    else:
        degraded = Condition(type="Degraded", status=False, reason="AsExpected")
    return [ready, progressing, degraded]
