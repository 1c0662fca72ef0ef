"""The autoscaler's decisions, as a pure function of load, spec and time."""

from __future__ import annotations

import uuid

from converge.runtime.base import Observation, Replica, ReplicaPhase
from converge.workers.controller import _Load, autoscale

SPEC = {
    "replicas": {"min": 1, "max": 4},
    "autoscaling": {
        "target_in_flight": 2,
        "scale_up_after_s": 5,
        "cooldown_s": 30,
        "scale_to_zero_after_s": None,
    },
}


def observed(*loads: int) -> Observation:
    dep = uuid.uuid4()
    return Observation(
        deployment_id=dep,
        replicas=[
            Replica(
                id=f"r{i}",
                deployment_id=dep,
                revision=1,
                phase=ReplicaPhase.READY,
                zone="local",
                in_flight=load,
            )
            for i, load in enumerate(loads)
        ],
    )


def test_scales_up_one_step_only_after_sustained_load():
    memory = _Load()
    assert autoscale(current=1, spec=SPEC, observed=observed(6), memory=memory, now=100) == 1
    assert autoscale(current=1, spec=SPEC, observed=observed(6), memory=memory, now=104) == 1
    assert autoscale(current=1, spec=SPEC, observed=observed(6), memory=memory, now=105) == 2


def test_a_load_spike_that_ends_does_not_scale():
    memory = _Load()
    autoscale(current=1, spec=SPEC, observed=observed(6), memory=memory, now=100)
    autoscale(current=1, spec=SPEC, observed=observed(1), memory=memory, now=102)
    assert autoscale(current=1, spec=SPEC, observed=observed(6), memory=memory, now=106) == 1


def test_never_above_max_or_below_min():
    memory = _Load()
    for t in range(0, 100, 5):
        n = autoscale(current=4, spec=SPEC, observed=observed(50, 50, 50, 50), memory=memory, now=t)
        assert n == 4
    assert autoscale(current=1, spec=SPEC, observed=observed(0), memory=_Load(), now=0) == 1


def test_scales_down_after_the_cooldown():
    memory = _Load()
    assert autoscale(current=3, spec=SPEC, observed=observed(0, 0, 0), memory=memory, now=0) == 3
    assert autoscale(current=3, spec=SPEC, observed=observed(0, 0, 0), memory=memory, now=29) == 3
    assert autoscale(current=3, spec=SPEC, observed=observed(0, 0, 0), memory=memory, now=30) == 2


def test_scales_to_zero_after_the_idle_time_and_back_on_demand():
    spec = {**SPEC, "autoscaling": {**SPEC["autoscaling"], "scale_to_zero_after_s": 60}}
    memory = _Load()
    assert autoscale(current=1, spec=spec, observed=observed(0), memory=memory, now=0) == 1
    assert autoscale(current=1, spec=spec, observed=observed(0), memory=memory, now=60) == 0
    assert autoscale(current=0, spec=spec, observed=observed(), memory=memory, now=61) == 0
