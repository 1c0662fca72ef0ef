"""FakeBackend: the rolling semantics of the real backends, one observe() per tick."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from converge.runtime.base import DeploymentSpec, Observation, ReplicaPhase, ReplicaTemplate, ServerKind
from converge.runtime.fake import FakeBackend, FakeConfig


def make_spec(
    deployment_id: uuid.UUID, *, revision: int = 1, replicas: int = 2, generation: int = 0
) -> DeploymentSpec:
    return DeploymentSpec(
        deployment_id=deployment_id,
        name="chat",
        revision=revision,
        replicas=replicas,
        restart_generation=generation,
        template=ReplicaTemplate(server=ServerKind.LLAMA_CPP, model_name="m", artifact_path="/m.gguf"),
    )


def reason(obs: Observation, type_: str) -> tuple[bool, str]:
    cond = obs.condition(type_)
    assert cond is not None
    return cond.status, cond.reason


async def test_apply_makes_replicas_ready_at_once() -> None:
    backend = FakeBackend()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep))

    obs = await backend.observe(deployment_id=dep)

    assert [r.phase for r in obs.replicas] == [ReplicaPhase.READY] * 2
    assert [r.endpoint for r in obs.replicas] == [f"http://fake/{r.id}" for r in obs.replicas]
    assert reason(obs, "Ready") == (True, "ReplicasReady")
    assert reason(obs, "Progressing") == (True, "RolloutComplete")
    assert reason(obs, "Degraded") == (False, "AsExpected")
    assert backend.applied == [make_spec(dep)]


async def test_ready_after_counts_observe_calls() -> None:
    backend = FakeBackend(FakeConfig(ready_after=2))
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=1))

    first = await backend.observe(deployment_id=dep)
    second = await backend.observe(deployment_id=dep)

    assert first.replicas[0].phase == ReplicaPhase.STARTING
    assert reason(first, "Ready") == (False, "ReplicasNotReady")
    assert second.replicas[0].phase == ReplicaPhase.READY


async def test_rolling_update_keeps_desired_ready_and_waits_for_drain() -> None:
    backend = FakeBackend(FakeConfig(ready_after=1))
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep))
    old = await backend.observe(deployment_id=dep)
    await backend.apply(spec=make_spec(dep, revision=2))
    busy = old.replicas[1].id
    backend.set_load(busy, in_flight=1)

    seen = []
    for _ in range(6):
        obs = await backend.observe(deployment_id=dep)
        seen.append(obs)
        assert len(obs.ready) >= 2 and len(obs.replicas) <= 3  # unavailable 0, surge 1
    phases = {r.id: r.phase for r in seen[-1].replicas}
    assert phases[busy] == ReplicaPhase.DRAINING  # in flight: not stopped, not routed to
    assert reason(seen[-1], "Ready") == (True, "ReplicasReady")  # both new ones serve
    assert reason(seen[-1], "Progressing") == (True, "RollingUpdate")

    backend.set_load(busy, in_flight=0)
    for _ in range(3):
        obs = await backend.observe(deployment_id=dep)
    assert {(r.revision, r.phase) for r in obs.replicas} == {(2, ReplicaPhase.READY)}
    assert len(obs.replicas) == 2
    assert reason(obs, "Progressing") == (True, "RolloutComplete")


async def test_restart_generation_replaces_every_replica() -> None:
    backend = FakeBackend()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep))
    before = {r.id for r in (await backend.observe(deployment_id=dep)).replicas}

    await backend.apply(spec=make_spec(dep, generation=1))
    after = await backend.observe(deployment_id=dep)

    assert not before & {r.id for r in after.replicas}
    assert {r.generation for r in after.ready} == {1} and len(after.ready) == 2


async def test_crashed_replica_restarts_on_the_next_tick() -> None:
    backend = FakeBackend()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=1))
    replica = (await backend.observe(deployment_id=dep)).replicas[0]

    backend.crash(replica.id)
    again = (await backend.observe(deployment_id=dep)).replicas[0]

    assert again.id == replica.id and again.pid != replica.pid
    assert again.restarts == 1 and again.last_exit == "killed by SIGKILL"
    assert again.phase == ReplicaPhase.READY


async def test_failed_revision_leaves_the_old_one_serving() -> None:
    backend = FakeBackend(FakeConfig(progress_deadline=3))
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep))
    old = {r.id for r in (await backend.observe(deployment_id=dep)).replicas}
    backend.fail_revision(deployment_id=dep, revision=2)

    await backend.apply(spec=make_spec(dep, revision=2))
    for _ in range(3):
        obs = await backend.observe(deployment_id=dep)

    assert {r.id for r in obs.ready} == old
    assert reason(obs, "Progressing") == (False, "ProgressDeadlineExceeded")
    assert reason(obs, "Degraded") == (True, "ProgressDeadlineExceeded")

    await backend.apply(spec=make_spec(dep, revision=1))  # roll back
    obs = await backend.observe(deployment_id=dep)
    assert {r.id for r in obs.replicas} == old
    assert reason(obs, "Progressing") == (True, "RolloutComplete")


async def test_crash_loop_is_degraded() -> None:
    backend = FakeBackend(FakeConfig(crashloop_restarts=2))
    dep = uuid.uuid4()
    backend.fail_revision(deployment_id=dep, revision=1, crash=True)
    await backend.apply(spec=make_spec(dep, replicas=1))

    for _ in range(4):
        obs = await backend.observe(deployment_id=dep)

    assert obs.replicas[0].phase == ReplicaPhase.BACKOFF and obs.replicas[0].restarts == 3
    assert reason(obs, "Degraded") == (True, "CrashLoop")
    backend.fail_revision(deployment_id=dep, revision=1, failing=False)
    obs = await backend.observe(deployment_id=dep)
    assert reason(obs, "Degraded") == (False, "AsExpected") and len(obs.ready) == 1


async def test_scale_to_zero_and_back_and_delete() -> None:
    backend = FakeBackend()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=3))
    await backend.apply(spec=make_spec(dep, replicas=0))
    obs = await backend.observe(deployment_id=dep)
    assert obs.replicas == [] and reason(obs, "Ready") == (True, "ScaledToZero")

    await backend.apply(spec=make_spec(dep, replicas=1))
    assert len((await backend.observe(deployment_id=dep)).ready) == 1

    await backend.delete(deployment_id=dep)
    assert await backend.observe(deployment_id=dep) == Observation(deployment_id=dep)


async def test_logs_tail_and_follow() -> None:
    backend = FakeBackend()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=1))
    rid = (await backend.observe(deployment_id=dep)).replicas[0].id
    backend.write_log(rid, "hello")

    assert [line async for line in backend.logs(replica_id=rid)] == ["started revision 1", "ready", "hello"]
    assert [line async for line in backend.logs(replica_id=rid, tail=1)] == ["hello"]

    followed: list[str] = []

    async def follow() -> None:
        async for line in backend.logs(replica_id=rid, tail=0, follow=True):
            followed.append(line)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0)
    backend.write_log(rid, "later")
    async with asyncio.timeout(2):
        while followed != ["later"]:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(LookupError):
        _ = [line async for line in backend.logs(replica_id="nope")]


async def test_zones_and_unknown_deployment() -> None:
    backend = FakeBackend()
    zones = await backend.zones()
    assert [z.name for z in zones] == ["local"] and zones[0].gpus == []
    assert (await backend.observe(deployment_id=uuid.uuid4())).replicas == []


async def test_canary_holds_beside_the_old_revision_until_promoted() -> None:
    backend = FakeBackend(FakeConfig(progress_deadline=2))
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep))
    await backend.observe(deployment_id=dep)
    canary = make_spec(dep, revision=2).model_copy(update={"canary_replicas": 1})
    await backend.apply(spec=canary)

    for _ in range(4):  # well past the progress deadline: a paused canary is not stuck
        obs = await backend.observe(deployment_id=dep)

    revisions = sorted((r.revision, r.phase) for r in obs.replicas)
    assert revisions == [(1, ReplicaPhase.READY), (1, ReplicaPhase.READY), (2, ReplicaPhase.READY)]
    assert reason(obs, "Progressing") == (True, "CanaryPaused")
    assert reason(obs, "Degraded") == (False, "AsExpected")

    await backend.apply(spec=make_spec(dep, revision=2))  # promoted: canary None
    for _ in range(6):
        obs = await backend.observe(deployment_id=dep)
    assert [r.revision for r in obs.replicas] == [2, 2]
    assert reason(obs, "Progressing") == (True, "RolloutComplete")
