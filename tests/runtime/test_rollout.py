"""rollout.plan: surge 1, unavailable 0, a draining replica counts until it has exited."""

from __future__ import annotations

from converge.runtime.base import ReplicaPhase
from converge.runtime.rollout import Plan, ReplicaView, conditions, plan

R, S, B, D = ReplicaPhase.READY, ReplicaPhase.STARTING, ReplicaPhase.BACKOFF, ReplicaPhase.DRAINING


def views(*specs: tuple[str, bool, ReplicaPhase]) -> list[ReplicaView]:
    return [ReplicaView(id=i, current=c, phase=p) for i, c, p in specs]


def test_fresh_deployment_starts_all_replicas() -> None:
    assert plan(desired=3, replicas=[]) == Plan(start=3)


def test_rollout_starts_one_new_replica_first() -> None:
    assert plan(desired=2, replicas=views(("a", False, R), ("b", False, R))) == Plan(start=1)


def test_ready_new_replica_lets_one_old_drain() -> None:
    step = plan(desired=2, replicas=views(("a", False, R), ("b", False, R), ("n", True, R)))
    assert step == Plan(drain=("a",))


def test_draining_replica_holds_the_surge() -> None:
    step = plan(desired=2, replicas=views(("a", False, D), ("b", False, R), ("n", True, R)))
    assert step == Plan()


def test_new_revision_not_ready_keeps_every_old_replica() -> None:
    step = plan(desired=2, replicas=views(("a", False, R), ("b", False, B), ("n", True, B)))
    assert step == Plan()  # even the crashed old one: removing it could not make room


def test_unready_old_replicas_go_first_when_new_ones_cover() -> None:
    step = plan(desired=1, replicas=views(("a", False, B), ("n", True, R)))
    assert step == Plan(stop=("a",))


def test_scale_down_takes_unready_replicas_first() -> None:
    step = plan(desired=1, replicas=views(("a", True, R), ("b", True, S), ("c", True, R)))
    assert step == Plan(drain=("a",), stop=("b",))


def test_scale_to_zero_during_rollout_removes_everything() -> None:
    step = plan(desired=0, replicas=views(("a", False, R), ("n", True, S)))
    assert step == Plan(drain=("a",), stop=("n",))


def test_conditions_report_a_stuck_rollout() -> None:
    conds = conditions(
        desired=1, revision=2, replicas=views(("a", False, R), ("n", True, S)), deadline_exceeded=True
    )
    by_type = {c.type: (c.status, c.reason) for c in conds}
    assert by_type == {
        "Ready": (False, "RollingUpdate"),
        "Progressing": (False, "ProgressDeadlineExceeded"),
        "Degraded": (True, "ProgressDeadlineExceeded"),
    }
