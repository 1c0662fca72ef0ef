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


def test_canary_starts_up_to_its_count_beside_every_old_replica() -> None:
    old = views(("a", False, R), ("b", False, R))
    assert plan(desired=2, replicas=old, canary=1) == Plan(start=1)
    assert plan(desired=4, replicas=views(*[(i, False, R) for i in "abcd"]), canary=2) == Plan(start=2)


def test_canary_holds_at_its_count_and_never_drains_ready_old_replicas() -> None:
    held = views(("a", False, R), ("b", False, R), ("n", True, R))
    assert plan(desired=2, replicas=held, canary=1) == Plan()


def test_canary_still_stops_unready_old_replicas() -> None:
    step = plan(desired=2, replicas=views(("a", False, R), ("b", False, B), ("n", True, R)), canary=1)
    assert step == Plan(stop=("b",))


def test_promoted_canary_continues_the_rolling_update() -> None:
    held = views(("a", False, R), ("b", False, R), ("n", True, R))
    assert plan(desired=2, replicas=held) == Plan(drain=("a",))


def test_canary_is_ignored_without_old_replicas() -> None:
    assert plan(desired=3, replicas=[], canary=1) == Plan(start=3)


def test_canary_none_plans_like_before() -> None:
    for replicas in (
        views(("a", False, R), ("b", False, R)),
        views(("a", False, R), ("b", False, R), ("n", True, R)),
        views(("a", False, B), ("n", True, R)),
    ):
        assert plan(desired=2, replicas=replicas, canary=None) == plan(desired=2, replicas=replicas)


def test_conditions_report_a_paused_canary_not_a_stuck_rollout() -> None:
    held = views(("a", False, R), ("b", False, R), ("n", True, R))
    conds = {
        c.type: c for c in conditions(desired=2, revision=3, replicas=held, canary=1, deadline_exceeded=True)
    }
    progressing = conds["Progressing"]
    assert (progressing.status, progressing.reason) == (True, "CanaryPaused")
    assert (
        progressing.message
        == "1 replica of revision 3 beside 2 of the previous revision; promote to continue"
    )
    assert (conds["Degraded"].status, conds["Degraded"].reason) == (False, "AsExpected")
    unready = views(("a", False, R), ("b", False, R), ("n", True, S))
    assert conditions(desired=2, revision=3, replicas=unready, canary=1)[1].reason == "RollingUpdate"
