"""Leader failover: two controller processes on one database, the leader killed with SIGKILL in
the middle of a rollout, and fencing of a leader whose lease moved on.

The processes run the real app (controller role only) on a database of their own on the test
server (the session app's controller leads the shared one), with the local runtime supervising
stub replicas (real processes, started in their own sessions, so they outlive a killed
controller) in one state directory: the new leader adopts them, as it would after a crash.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from support import eventually, make_settings

from converge.control.deployments.schemas import DeploymentSpecIn
from converge.control.library.acquire import artifact_store
from converge.models import Artifact, Deployment, DeploymentRevision, LibraryModel, ModelVersion, Project
from converge.runtime.fake import FakeBackend
from converge.storage import leader
from converge.storage.db import Database, migrate_and_bootstrap, to_driver_url
from converge.workers.controller import LEADER_LOCK_KEY, ROLE, Controller

pytestmark = pytest.mark.slow

# The replica contract, as small as it gets: ready after STUB_READY_DELAY seconds, idle.
STUB = r"""
import argparse, json, os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("kind")
for flag in ("--model-path", "--model-name", "--host"):
    parser.add_argument(flag)
parser.add_argument("--port", type=int)
args, _ = parser.parse_known_args()
ready_at = time.monotonic() + float(os.environ.get("STUB_READY_DELAY", "0"))

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health/ready":
            code, body = (200, {}) if time.monotonic() >= ready_at else (503, {})
        elif self.path == "/converge/stats":
            code, body = 200, {"in_flight": 0, "queue_depth": 0}
        else:
            code, body = 404, {}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass

ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
"""

# One controller process: the app with the controller role only, on the local runtime.
CONTROLLER = r"""
import asyncio, os, sys
from pathlib import Path
from converge.app import create_app
from converge.config import Settings
from converge.runtime.local import LocalBackend, LocalConfig

async def main():
    runtime = LocalBackend(LocalConfig(
        state_dir=Path(os.environ["STATE_DIR"]),
        server_command=[sys.executable, os.environ["STUB"]],
        health_interval_s=0.1, probe_timeout_s=1.0, ready_timeout_s=30,
        drain_timeout_s=5, drain_grace_s=0.2, kill_grace_s=2, keep_replicas_on_stop=True,
    ))
    app = create_app(Settings(), on_first_key=None, runtime=runtime)
    async with app.router.lifespan_context(app):
        await asyncio.Event().wait()

asyncio.run(main())
"""

REPLICAS = 2


@pytest.fixture
def database(pg_url: str) -> Iterator[str]:
    """A fresh, migrated database on the test server, dropped afterwards."""
    name = f"f_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = urlsplit(pg_url)._replace(path=f"/{name}").geturl()
    migrate_and_bootstrap(Database(url=url))
    yield url
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def sessions(database: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_async_engine(to_driver_url(database))
    yield async_sessionmaker(engine, expire_on_commit=False)
    await engine.dispose()


def stubs(stub: Path) -> list[psutil.Process]:
    """The stub replicas alive now (zombies a killed parent left to init are not alive)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if str(stub) in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "stub_replica.py"
    path.write_text(STUB)
    yield path
    for proc in stubs(path):  # whatever happened, no replica outlives the test
        proc.kill()


def start_controller(*, database: str, data_dir: Path, stub: Path, log: Path) -> subprocess.Popen[bytes]:
    program = data_dir / "controller_main.py"
    program.write_text(CONTROLLER)
    env = {
        **os.environ,
        "CONVERGE_DATABASE_URL": database,
        "CONVERGE_DATA_DIR": str(data_dir),
        "CONVERGE_ROLES": "controller",
        "CONVERGE_GATEWAY__ENABLED": "false",
        "CONVERGE_SANDBOX__ENABLED": "false",
        "CONVERGE_LIBRARY__SEED_CATALOGUE": "false",
        "CONVERGE_DEPLOY_DEFAULTS": "false",
        "CONVERGE_CONTROLLER__STANDBY_POLL_S": "0.2",
        "CONVERGE_CONTROLLER__REQUEUE_S": "0.2",
        "STATE_DIR": str(data_dir / "runtime"),
        "STUB": str(stub),
    }
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, str(program)], env=env, stdout=out, stderr=subprocess.STDOUT)


async def seed_deployment(
    sessions: async_sessionmaker[AsyncSession], data_dir: Path, database: str
) -> uuid.UUID:
    """A project, an approved version whose artifact is in the store, and a deployment of it."""
    weights = data_dir / "weights.bin"
    weights.write_bytes(f"failover weights {uuid.uuid4().hex}\n".encode())
    blob = await artifact_store(make_settings(database, data_dir)).put_file(weights)
    async with sessions() as session, session.begin():
        return await add_deployment(session, sha256=blob.sha256, size=blob.size_bytes)


async def add_deployment(session: AsyncSession, *, sha256: str, size: int) -> uuid.UUID:
    """An approved version of a new model and a deployment of it in a new project (flushed)."""
    tag = uuid.uuid4().hex[:8]
    if await session.get(Artifact, sha256) is None:
        session.add(Artifact(sha256=sha256, size_bytes=size, filename="weights.bin"))
    project = Project(name=f"p-{tag}")
    model = LibraryModel(name=f"m-{tag}", created_by="test")
    session.add_all([project, model])
    await session.flush()
    version = ModelVersion(
        model_id=model.id, version="v1", state="approved", artifact_sha256=sha256, submitted_by="test"
    )
    session.add(version)
    await session.flush()
    deployment = Deployment(
        project_id=project.id,
        name="chat",
        model_version_id=version.id,
        desired_replicas=REPLICAS,
        created_by="test",
    )
    session.add(deployment)
    await session.flush()
    session.add(
        DeploymentRevision(
            deployment_id=deployment.id, revision=1, spec=revision_spec(version.id, 1), created_by="test"
        )
    )
    await session.flush()
    return deployment.id


def revision_spec(version_id: uuid.UUID, revision: int) -> dict[str, Any]:
    spec = DeploymentSpecIn(
        model_version_id=version_id,
        resources={"cpu": 0.1, "memory_bytes": 1 << 30},
        replicas={"min": REPLICAS, "max": REPLICAS},
    ).model_dump(mode="json")
    # A new revision's replicas take a while to be ready: the rollout is still going at the kill.
    return spec | {
        "server": "embeddings",
        "model_name": "chat",
        "env": {"STUB_READY_DELAY": "2" if revision > 1 else "0"},
    }


async def status(sessions: async_sessionmaker[AsyncSession], deployment_id: uuid.UUID) -> Deployment:
    async with sessions() as session:
        row = await session.get(Deployment, deployment_id)
        assert row is not None
        return row


async def lease_holder(sessions: async_sessionmaker[AsyncSession]) -> tuple[int, str] | None:
    async with sessions() as session:
        return await leader.current(session, role=ROLE)


async def lock_holders(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Sessions holding the controller's advisory lock in this database (exactly one leader)."""
    async with sessions() as session:
        q = text(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()"
            " AND ((l.classid::bigint << 32) | l.objid::bigint) = :key"
        )
        return int(await session.scalar(q, {"key": LEADER_LOCK_KEY}) or 0)


async def test_killing_the_leader_mid_rollout_hands_over_without_doubling_or_losing_a_replica(
    database: str, sessions: async_sessionmaker[AsyncSession], stub: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    deployment_id = await seed_deployment(sessions, data_dir, database)
    log = tmp_path / "controllers.log"
    first = start_controller(database=database, data_dir=data_dir, stub=stub, log=log)
    procs = [first]
    peak = 0

    async def watch_peak() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(await asyncio.to_thread(stubs, stub)))
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch_peak())
    try:
        first_lease = await eventually(lambda: lease_holder(sessions), timeout=60)
        assert first_lease[1].endswith(f":{first.pid}")
        procs.append(start_controller(database=database, data_dir=data_dir, stub=stub, log=log))

        async def ready(revision: int) -> Deployment | None:
            row = await status(sessions, deployment_id)
            replicas = row.status.get("replicas", [])
            done = row.phase == "Ready" and len(replicas) == REPLICAS
            return row if done and all(r["revision"] == revision for r in replicas) else None

        await eventually(lambda: ready(1), timeout=60)
        async with sessions() as session, session.begin():
            row = await session.get(Deployment, deployment_id, with_for_update=True)
            assert row is not None
            session.add(
                DeploymentRevision(
                    deployment_id=row.id,
                    revision=2,
                    spec=revision_spec(row.model_version_id, 2),
                    created_by="test",
                )
            )
            row.revision = 2  # what PATCH does; the trigger tells the controller

        async def rolling() -> bool:
            replicas = (await status(sessions, deployment_id)).status.get("replicas", [])
            return any(r["revision"] == 2 for r in replicas) and any(r["revision"] == 1 for r in replicas)

        await eventually(rolling, timeout=30, interval=0.02)
        before = {p.pid for p in await asyncio.to_thread(stubs, stub)}
        first.send_signal(signal.SIGKILL)
        first.wait()

        async def taken_over() -> tuple[int, str] | None:
            held = await lease_holder(sessions)
            return held if held is not None and held[0] > first_lease[0] else None

        second_lease = await eventually(taken_over, timeout=60)
        assert second_lease == (first_lease[0] + 1, second_lease[1])
        assert second_lease[1].endswith(f":{procs[1].pid}")
        assert await lock_holders(sessions) == 1  # exactly one leader

        done = await eventually(lambda: ready(2), timeout=60)
        alive = {p.pid for p in await asyncio.to_thread(stubs, stub)}
        reported = {r["pid"] for r in done.status["replicas"]}
        assert reported == alive and len(alive) == REPLICAS  # none doubled, none lost, no orphan
        # The rollout went on with the replicas the killed leader started: whatever was already
        # running of revision 2 was adopted, not started a second time.
        assert before & alive, "no replica running at the kill survived the takeover"
        assert peak <= REPLICAS + 1  # never more than one surge replica, across both leaders
    finally:
        watcher.cancel()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        print(log.read_text(errors="replace")[-6000:])  # shown when the test fails


async def test_a_lease_that_moved_on_fences_the_old_holders_writes(
    app: Any, pg_url: str
) -> None:  # app: the database is migrated
    role, key = f"test-{uuid.uuid4().hex[:8]}", 0x7E57_0000 + os.getpid() % 0xFFFF
    engine = create_async_engine(to_driver_url(pg_url))
    maker = async_sessionmaker(engine, expire_on_commit=False)
    try:
        async with leader.lease(pg_url, key=key, role=role, poll_s=0.05) as old:
            pass  # its connection is gone: the lock with it
        async with leader.lease(pg_url, key=key, role=role, poll_s=0.05) as new:
            assert new.epoch == old.epoch + 1
            async with maker() as session, session.begin():
                with pytest.raises(leader.Fenced):
                    await leader.fence(session, role=role, epoch=old.epoch)
            async with maker() as session, session.begin():
                await leader.fence(session, role=role, epoch=new.epoch)  # the holder may write
    finally:
        async with maker() as session, session.begin():
            await session.execute(text("DELETE FROM leader_leases WHERE role = :r"), {"r": role})
        await engine.dispose()


async def test_a_successor_waits_for_a_write_the_old_leader_had_already_fenced(
    app: Any, pg_url: str
) -> None:  # app: the database is migrated
    """A write that passed its fence commits before the successor's epoch exists, never after."""
    role, key = f"test-{uuid.uuid4().hex[:8]}", 0x7E58_0000 + os.getpid() % 0xFFFF
    engine = create_async_engine(to_driver_url(pg_url))
    maker = async_sessionmaker(engine, expire_on_commit=False)
    try:
        async with leader.lease(pg_url, key=key, role=role, poll_s=0.05) as old:
            in_flight = maker()
            await in_flight.begin()
            await leader.fence(in_flight, role=role, epoch=old.epoch)  # passes: still current
        entered = asyncio.Event()

        async def successor() -> int:
            async with leader.lease(pg_url, key=key, role=role, poll_s=0.05) as new:
                entered.set()
                return new.epoch

        task = asyncio.create_task(successor())

        async def claim_waits_on_the_row() -> bool:
            async with maker() as s:
                q = text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    " AND query LIKE 'INSERT INTO leader_leases%'"
                )
                return bool(await s.scalar(q))

        await eventually(claim_waits_on_the_row)
        assert not entered.is_set()
        await in_flight.commit()
        await in_flight.close()
        assert await task == old.epoch + 1
    finally:
        async with maker() as session, session.begin():
            await session.execute(text("DELETE FROM leader_leases WHERE role = :r"), {"r": role})
        await engine.dispose()


async def test_a_controller_whose_lease_moved_on_applies_and_writes_nothing(app: Any, client: Any) -> None:
    state = app.state.converge
    async with state.session_factory() as session, session.begin():
        deployment_id = await add_deployment(session, sha256=uuid.uuid4().hex * 2, size=1)
        epoch, _ = await eventually(lambda: leader.current(session, role=ROLE))  # the session app leads
    backend = FakeBackend()
    backend.artifact_path = lambda *, sha256: f"/fake/{sha256}"  # type: ignore[method-assign]
    controller = Controller(
        sessions=state.session_factory,
        settings=state.settings,
        store=state.artifacts,
        runtime=backend,
        conninfo="-",
    )
    controller._lease = leader.Lease(role=ROLE, epoch=epoch - 1, holder="a stale leader", conn=None)  # type: ignore[arg-type]
    with pytest.raises(leader.Fenced):
        await controller.reconcile(deployment_id)
    assert backend.applied == []  # nothing reached its runtime
    before = (await status(state.session_factory, deployment_id)).status
    controller._lease = leader.Lease(role=ROLE, epoch=epoch, holder="the leader", conn=None)  # type: ignore[arg-type]
    await controller.reconcile(deployment_id)  # the same controller under the current epoch
    assert [s.deployment_id for s in backend.applied] == [deployment_id]
    assert (
        before == {}
        and (await status(state.session_factory, deployment_id)).status["target_replicas"] == REPLICAS
    )


async def test_the_local_runtime_tells_its_watchers_when_a_replica_becomes_ready_and_when_it_dies(
    stub: Path, tmp_path: Path
) -> None:
    """What lets the controller leave a deployment at rest: the supervisor reports the change."""
    from converge.runtime.base import DeploymentSpec, ReplicaPhase, ReplicaTemplate, Resources, ServerKind
    from converge.runtime.local import LocalBackend, LocalConfig

    backend = LocalBackend(
        LocalConfig(
            state_dir=tmp_path / "state",
            server_command=[sys.executable, str(stub)],
            health_interval_s=0.1,
            backoff_initial_s=0.2,
            memory_limit=False,
        )
    )
    heard: list[uuid.UUID] = []
    backend.watch(heard.append)
    deployment_id = uuid.uuid4()
    await backend.start()
    try:
        await backend.apply(
            spec=DeploymentSpec(
                deployment_id=deployment_id,
                name="watched",
                revision=1,
                replicas=1,
                template=ReplicaTemplate(
                    server=ServerKind.EMBEDDINGS,
                    model_name="watched",
                    artifact_path="/models/none",
                    resources=Resources(cpu=0.1),
                ),
            )
        )

        async def ready() -> Any:
            obs = await backend.observe(deployment_id=deployment_id)
            return obs.ready[0] if obs.ready else None

        replica = await eventually(ready, timeout=30)
        assert deployment_id in heard  # started, then ready: each a change
        heard.clear()
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGKILL)  # nothing else changes: only the supervisor can tell

        async def noticed() -> bool:
            obs = await backend.observe(deployment_id=deployment_id)
            moved = any(r.phase != ReplicaPhase.READY or r.restarts for r in obs.replicas)
            return bool(heard) and moved

        await eventually(noticed, timeout=30)
        assert set(heard) == {deployment_id}
    finally:
        await backend.stop()
