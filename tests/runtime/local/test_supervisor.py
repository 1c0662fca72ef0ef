"""LocalBackend against real child processes: a stdlib stub that honours the replica contract."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest
from support import eventually

from converge.runtime.base import (
    DeploymentSpec,
    Observation,
    ReplicaPhase,
    ReplicaTemplate,
    Resources,
    ServerKind,
)
from converge.runtime.local import LocalBackend, LocalConfig
from converge.runtime.local.ports import PortAllocator, os_free_port
from converge.runtime.local.process import spawn

pytestmark = pytest.mark.slow

T = TypeVar("T")

# The replica contract, with knobs read from the environment (ReplicaTemplate.env):
# STUB_REVISION echoed by /echo; STUB_READY_DELAY seconds before /health/ready says 200;
# STUB_NEVER_READY; STUB_EXIT_AT_ONCE exits with STUB_EXIT_CODE (default 3) before binding;
# STUB_CRASH_AFTER seconds, then exits with STUB_EXIT_CODE; STUB_WORK_S per /echo request;
# STUB_IGNORE_TERM: only SIGKILL stops it.
STUB = r"""
import argparse, json, os, signal, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("kind")
for flag in ("--model-path", "--model-name", "--host"):
    parser.add_argument(flag)
parser.add_argument("--port", type=int)
args, extra = parser.parse_known_args()
env = os.environ.get
revision = env("STUB_REVISION", "0")
exit_code = int(env("STUB_EXIT_CODE", "3"))
if env("STUB_EXIT_AT_ONCE"):
    print("stub exits at once", flush=True)
    sys.exit(exit_code)
ready_at = time.monotonic() + float(env("STUB_READY_DELAY", "0"))
work_s = float(env("STUB_WORK_S", "0.01"))
lock = threading.Lock()
stats = {"in_flight": 0, "queue_depth": 0, "requests_total": 0}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health/live":
            self.send(200, {"status": "live"})
        elif self.path == "/health/ready":
            ready = not env("STUB_NEVER_READY") and time.monotonic() >= ready_at
            self.send(200 if ready else 503, {"ready": ready})
        elif self.path == "/converge/stats":
            with lock:
                self.send(200, dict(stats))
        elif self.path == "/echo":
            with lock:
                stats["in_flight"] += 1
                stats["requests_total"] += 1
            try:
                time.sleep(work_s)
                print(f"echo {revision}", flush=True)
                self.send(200, {"revision": revision, "pid": os.getpid()})
            finally:
                with lock:
                    stats["in_flight"] -= 1
        else:
            self.send(404, {})


server = ThreadingHTTPServer((args.host, args.port), Handler)
server.daemon_threads = False  # SIGTERM: finish the requests in flight
if env("STUB_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
if env("STUB_CRASH_AFTER"):
    threading.Timer(float(env("STUB_CRASH_AFTER")), lambda: os._exit(exit_code)).start()
print(f"stub {args.kind} {args.model_name} revision {revision} listening on {args.port}", flush=True)
server.serve_forever()
server.server_close()
print("stub stopped", flush=True)
"""

MiB = 1 << 20


def stub_processes(stub: Path) -> list[psutil.Process]:
    """Live (non-zombie) processes running the stub: what must not leak."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if str(stub) in (proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def kill_stubs(stub: Path) -> None:
    procs = stub_processes(stub)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "stub_server.py"
    path.write_text(STUB)
    yield path
    kill_stubs(path)  # whatever happened in the test, no replica outlives it


@pytest.fixture
async def make_backend(tmp_path: Path, stub: Path) -> AsyncIterator[Callable[..., LocalBackend]]:
    made: list[LocalBackend] = []

    def make(**overrides: Any) -> LocalBackend:
        values: dict[str, Any] = {
            "state_dir": tmp_path / "state",
            "server_command": [sys.executable, str(stub)],
            "health_interval_s": 0.1,
            "probe_timeout_s": 1.0,
            "ready_timeout_s": 10,
            "drain_timeout_s": 5,
            "drain_grace_s": 0.3,
            "kill_grace_s": 2,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 1,
            "keep_replicas_on_stop": True,  # most tests here are about adoption
            **overrides,
        }
        devices = values.pop("gpu_devices", ())  # this machine's GPUs: none, unless a test says so
        backend = LocalBackend(LocalConfig(**values), gpu_devices=devices)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        with contextlib.suppress(Exception):
            await backend.stop()
    kill_stubs(stub)


def make_spec(
    deployment_id: uuid.UUID,
    *,
    revision: int = 1,
    replicas: int = 2,
    env: dict[str, str] | None = None,
    memory_bytes: int = 512 * MiB,
    cpu: float = 1.0,
    gpus: int = 0,
) -> DeploymentSpec:
    return DeploymentSpec(
        deployment_id=deployment_id,
        name="Stub Chat",
        revision=revision,
        replicas=replicas,
        template=ReplicaTemplate(
            server=ServerKind.LLAMA_CPP,
            model_name="stub",
            artifact_path="/models/stub.gguf",
            env={"STUB_REVISION": str(revision), **(env or {})},
            resources=Resources(cpu=cpu, memory_bytes=memory_bytes, gpus=gpus),
        ),
    )


async def ready_at(backend: LocalBackend, dep: uuid.UUID, *, n: int, revision: int = 1) -> Observation:
    """The observation once exactly `n` replicas exist, all READY at `revision`."""

    async def check() -> Observation | None:
        obs = await backend.observe(deployment_id=dep)
        ok = len(obs.replicas) == n and all(
            r.phase == ReplicaPhase.READY and r.revision == revision for r in obs.replicas
        )
        return obs if ok else None

    return await eventually(check, timeout=15)


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def test_two_replicas_become_ready_on_distinct_ports(make_backend: Callable[..., LocalBackend]) -> None:
    backend = make_backend()
    await backend.start()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=2))

    obs = await ready_at(backend, dep, n=2)

    endpoints = {r.endpoint for r in obs.replicas}
    assert len(endpoints) == 2 and all(e and e.startswith("http://127.0.0.1:") for e in endpoints)
    assert len({r.pid for r in obs.replicas}) == 2
    ready = obs.condition("Ready")
    progressing = obs.condition("Progressing")
    assert ready and ready.status and ready.reason == "ReplicasReady"
    assert progressing and progressing.status and progressing.reason == "RolloutComplete"
    async with httpx.AsyncClient() as client:
        for endpoint in endpoints:
            assert (await client.get(f"{endpoint}/echo")).json()["revision"] == "1"


def visible_devices(pid: int | None) -> str | None:
    assert pid is not None
    return psutil.Process(pid).environ().get("CUDA_VISIBLE_DEVICES")


async def test_gpu_replicas_get_the_least_used_devices_and_cpu_replicas_none(
    make_backend: Callable[..., LocalBackend],
) -> None:
    backend = make_backend(gpu_devices=("0", "1", "2"))
    await backend.start()
    pair, single, cpu = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await backend.apply(spec=make_spec(pair, replicas=1, gpus=2))
    first = (await ready_at(backend, pair, n=1)).replicas[0]
    await backend.apply(spec=make_spec(single, replicas=2, gpus=1))
    await backend.apply(spec=make_spec(cpu, replicas=1))
    singles = (await ready_at(backend, single, n=2)).replicas
    other = (await ready_at(backend, cpu, n=1)).replicas[0]

    assert visible_devices(first.pid) == "0,1"
    # The first single-GPU replica takes the free device; the next shares the least used one.
    assert sorted(visible_devices(r.pid) or "" for r in singles) == ["0", "2"]
    assert visible_devices(other.pid) == ""  # a CPU replica sees no GPU

    # A new supervisor adopts the replicas with their devices: a new replica avoids them.
    await backend.stop()
    again = make_backend(gpu_devices=("0", "1", "2"))
    await again.start()
    await again.apply(spec=make_spec(single, replicas=3, gpus=1))
    grown = (await ready_at(again, single, n=3)).replicas
    new = next(r for r in grown if r.id not in {s.id for s in singles})
    assert visible_devices(new.pid) == "1"


async def test_killed_replica_is_restarted_with_a_new_pid(make_backend: Callable[..., LocalBackend]) -> None:
    backend = make_backend()
    await backend.start()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=2))
    victim = (await ready_at(backend, dep, n=2)).replicas[0]
    assert victim.pid is not None

    os.kill(victim.pid, signal.SIGKILL)

    async def replaced() -> Observation | None:
        obs = await backend.observe(deployment_id=dep)
        return obs if len(obs.ready) == 2 and victim.pid not in {r.pid for r in obs.ready} else None

    obs = await eventually(replaced, timeout=15)

    again = next(r for r in obs.replicas if r.id == victim.id)
    assert again.restarts == 1 and again.pid != victim.pid
    assert again.last_exit == "killed by SIGKILL"


async def test_crash_loop_is_reported_as_degraded(make_backend: Callable[..., LocalBackend]) -> None:
    backend = make_backend(backoff_initial_s=0.05, backoff_max_s=0.2, crashloop_restarts=2)
    await backend.start()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=1, env={"STUB_EXIT_AT_ONCE": "1"}))

    async def degraded() -> Observation | None:
        obs = await backend.observe(deployment_id=dep)
        cond = obs.condition("Degraded")
        return obs if cond and cond.status else None

    obs = await eventually(degraded)
    cond = obs.condition("Degraded")
    assert cond and cond.reason == "CrashLoop" and "exited with code 3" in cond.message
    assert obs.replicas[0].restarts > 2
    assert obs.replicas[0].last_exit == "exited with code 3"
    ready = obs.condition("Ready")
    assert ready and not ready.status


async def test_rolling_update_drops_no_request(make_backend: Callable[..., LocalBackend]) -> None:
    backend = make_backend()
    await backend.start()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=2))
    await ready_at(backend, dep, n=2)
    counts = {"ok": 0, "failed": 0, "most_replicas": 0}
    seen: set[str] = set()
    errors: list[str] = []
    stop = asyncio.Event()

    async def client_loop() -> None:
        # A router that re-reads the ready set before each request, as the gateway's snapshot does.
        i = 0
        async with httpx.AsyncClient(timeout=5) as client:
            while not stop.is_set():
                obs = await backend.observe(deployment_id=dep)
                counts["most_replicas"] = max(counts["most_replicas"], len(obs.replicas))
                ready = obs.ready
                assert ready, "no ready replica during the rollout"
                endpoint = ready[i % len(ready)].endpoint
                i += 1
                try:
                    resp = await client.get(f"{endpoint}/echo")
                    resp.raise_for_status()
                    seen.add(resp.json()["revision"])
                    counts["ok"] += 1
                except httpx.HTTPError as exc:
                    counts["failed"] += 1
                    errors.append(repr(exc))

    clients = [asyncio.create_task(client_loop()) for _ in range(3)]
    await asyncio.sleep(0.3)
    await backend.apply(spec=make_spec(dep, revision=2, replicas=2))
    obs = await ready_at(backend, dep, n=2, revision=2)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*clients)

    assert counts["failed"] == 0, errors[:5]
    assert counts["ok"] > 50 and seen == {"1", "2"}
    assert counts["most_replicas"] == 3  # surge 1: a draining replica counts until it has exited
    print(f"rolling update: {counts}")
    assert all(r.revision == 2 and r.phase == ReplicaPhase.READY for r in obs.replicas)
    progressing = obs.condition("Progressing")
    assert progressing and progressing.reason == "RolloutComplete"


async def test_revision_that_never_becomes_ready_leaves_the_old_one_serving(
    make_backend: Callable[..., LocalBackend],
) -> None:
    backend = make_backend(ready_timeout_s=1.5)
    await backend.start()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=2))
    before = await ready_at(backend, dep, n=2)

    await backend.apply(spec=make_spec(dep, revision=2, replicas=2, env={"STUB_NEVER_READY": "1"}))

    async def stuck() -> Observation | None:
        obs = await backend.observe(deployment_id=dep)
        cond = obs.condition("Progressing")
        return obs if cond and not cond.status else None

    obs = await eventually(stuck)
    progressing, degraded = obs.condition("Progressing"), obs.condition("Degraded")
    assert progressing and progressing.reason == "ProgressDeadlineExceeded"
    assert degraded and degraded.status and degraded.reason == "ProgressDeadlineExceeded"
    assert {(r.id, r.pid, r.revision) for r in obs.ready} == {(r.id, r.pid, 1) for r in before.replicas}

    # Rolling back to the serving revision stops the stuck replica and completes at once.
    await backend.apply(spec=make_spec(dep, revision=1, replicas=2))
    obs = await ready_at(backend, dep, n=2)
    assert {r.pid for r in obs.replicas} == {r.pid for r in before.replicas}
    progressing = obs.condition("Progressing")
    assert progressing and progressing.reason == "RolloutComplete"


async def test_scale_to_zero_and_back(make_backend: Callable[..., LocalBackend]) -> None:
    backend = make_backend()
    await backend.start()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=2))
    pids = [r.pid for r in (await ready_at(backend, dep, n=2)).replicas]

    await backend.apply(spec=make_spec(dep, replicas=0))
    obs = await ready_at(backend, dep, n=0)
    ready = obs.condition("Ready")
    assert ready and ready.status and ready.reason == "ScaledToZero"
    await eventually(lambda: asyncio.sleep(0, not any(alive(p) for p in pids if p)))

    await backend.apply(spec=make_spec(dep, replicas=1))
    obs = await ready_at(backend, dep, n=1)
    assert obs.replicas[0].pid not in pids


async def test_new_backend_adopts_running_replicas(
    make_backend: Callable[..., LocalBackend], stub: Path
) -> None:
    first = make_backend()
    await first.start()
    dep = uuid.uuid4()
    spec = make_spec(dep, replicas=2)
    await first.apply(spec=spec)
    before = await ready_at(first, dep, n=2)
    await first.stop()  # the controller goes away; its replicas keep serving

    second = make_backend()
    await second.start()
    adopted = await second.observe(deployment_id=dep)
    key = {(r.id, r.pid, r.endpoint) for r in before.replicas}
    assert {(r.id, r.pid, r.endpoint) for r in adopted.ready} == key
    await second.apply(spec=spec)
    await asyncio.sleep(0.5)
    after = await ready_at(second, dep, n=2)
    assert {(r.id, r.pid, r.endpoint, r.restarts) for r in after.replicas} == {(*k, 0) for k in key}
    assert {p.pid for p in stub_processes(stub)} == {r.pid for r in before.replicas}

    # Adopted ports stay taken: a third replica gets a port of its own.
    await second.apply(spec=make_spec(dep, replicas=3))
    grown = await ready_at(second, dep, n=3)
    assert len({r.endpoint for r in grown.replicas}) == 3


async def test_one_state_dir_has_one_supervisor(make_backend: Callable[..., LocalBackend]) -> None:
    first = make_backend()
    await first.start()
    with pytest.raises(RuntimeError, match="another local runtime"):
        await make_backend().start()
    await first.stop()
    await make_backend().start()


async def test_adoption_drops_stale_entries_and_kills_orphans(
    make_backend: Callable[..., LocalBackend], stub: Path, tmp_path: Path
) -> None:
    first = make_backend()
    await first.start()
    dep = uuid.uuid4()
    await first.apply(spec=make_spec(dep, replicas=1))
    kept = (await ready_at(first, dep, n=1)).replicas[0]
    await first.stop()

    # A replica of a deployment nobody wants any more, still running: an orphan.
    orphan_port = os_free_port()
    argv = [sys.executable, str(stub), "llama-cpp", "--host", "127.0.0.1", "--port", str(orphan_port)]
    orphan = spawn(argv=argv, env=dict(os.environ), log_path=tmp_path / "orphan.log")
    dead = spawn(argv=["true"], env={}, log_path=tmp_path / "dead.log")
    while dead.poll() is None:
        await asyncio.sleep(0.01)
    state_file = tmp_path / "state" / "replicas.json"
    doc = json.loads(state_file.read_text())
    real = doc["replicas"][0]
    doc["replicas"] += [
        {**real, "id": "stale-r1-000000", "pid": dead.pid, "create_time": dead.identity.create_time},
        {
            **real,
            "id": "orphan-r1-000000",
            "deployment_id": str(uuid.uuid4()),
            "pid": orphan.pid,
            "port": orphan_port,
            "create_time": orphan.identity.create_time,
            "cmdline": argv,
        },
    ]
    state_file.write_text(json.dumps(doc))

    second = make_backend()
    await second.start()

    await eventually(lambda: asyncio.sleep(0, orphan.poll() is not None))
    obs = await ready_at(second, dep, n=1)
    assert obs.replicas[0].id == kept.id and obs.replicas[0].pid == kept.pid
    await asyncio.sleep(0.3)
    ids = {r["id"] for r in json.loads(state_file.read_text())["replicas"]}
    assert ids == {kept.id}
    assert {p.pid for p in stub_processes(stub)} == {kept.pid}


CONTROLLER = r"""
import asyncio, os, sys
from converge.runtime.base import DeploymentSpec
from converge.runtime.local import LocalBackend, LocalConfig


async def main():
    backend = LocalBackend(LocalConfig.model_validate_json(sys.argv[1]))
    spec = DeploymentSpec.model_validate_json(sys.argv[2])
    await backend.start()
    await backend.apply(spec=spec)
    while len((await backend.observe(deployment_id=spec.deployment_id)).ready) < spec.replicas:
        await asyncio.sleep(0.05)
    os._exit(0)  # a controller crash: no stop(), no clean-up


asyncio.run(main())
"""


async def test_replicas_of_a_crashed_controller_are_adopted_and_supervised(
    make_backend: Callable[..., LocalBackend], stub: Path
) -> None:
    backend = make_backend()
    dep = uuid.uuid4()
    spec = make_spec(dep, replicas=2)
    controller = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONTROLLER, backend.config.model_dump_json(), spec.model_dump_json()
    )
    async with asyncio.timeout(20):
        assert await controller.wait() == 0

    await backend.start()
    before = await ready_at(backend, dep, n=2)
    assert all(psutil.Process(r.pid).ppid() != os.getpid() for r in before.replicas if r.pid)
    assert {p.pid for p in stub_processes(stub)} == {r.pid for r in before.replicas}

    # Not our children: exits are noticed through the process table, and still restarted.
    victim = before.replicas[0]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)

    async def replaced() -> Observation | None:
        obs = await backend.observe(deployment_id=dep)
        return obs if len(obs.ready) == 2 and victim.pid not in {r.pid for r in obs.ready} else None

    obs = await eventually(replaced, timeout=15)
    again = next(r for r in obs.replicas if r.id == victim.id)
    assert again.restarts == 1 and again.last_exit and "status unknown" in again.last_exit


async def test_replica_that_ignores_sigterm_is_killed(make_backend: Callable[..., LocalBackend]) -> None:
    backend = make_backend(kill_grace_s=0.3)
    await backend.start()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=1, env={"STUB_IGNORE_TERM": "1"}))
    replica = (await ready_at(backend, dep, n=1)).replicas[0]

    async with asyncio.timeout(10):
        await backend.delete(deployment_id=dep)

    assert replica.pid and not alive(replica.pid)
    lines = [line async for line in backend.logs(replica_id=replica.id, tail=5)]
    assert "stopped (killed by SIGKILL)" in lines[-1]


async def test_delete_leaves_no_process(make_backend: Callable[..., LocalBackend], stub: Path) -> None:
    backend = make_backend()
    await backend.start()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=2))
    pids = [r.pid for r in (await ready_at(backend, dep, n=2)).replicas]

    async with asyncio.timeout(10):
        await backend.delete(deployment_id=dep)

    assert not any(alive(p) for p in pids if p)
    assert stub_processes(stub) == []
    assert (await backend.observe(deployment_id=dep)).replicas == []
    assert json.loads((backend.config.state_dir / "replicas.json").read_text())["replicas"] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prlimit and /proc are Linux's")
async def test_memory_limit_is_applied(make_backend: Callable[..., LocalBackend]) -> None:
    backend = make_backend()
    await backend.start()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=1, memory_bytes=300 * MiB))
    pid = (await ready_at(backend, dep, n=1)).replicas[0].pid

    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    data = next(line for line in limits if line.startswith("Max data size")).split()
    assert data[3:5] == [str(600 * MiB), str(600 * MiB)]  # soft, hard: 2x memory_bytes


async def test_a_replica_gets_as_many_threads_as_cpus_granted(
    make_backend: Callable[..., LocalBackend],
) -> None:
    backend = make_backend()
    await backend.start()
    granted, pinned = uuid.uuid4(), uuid.uuid4()
    await backend.apply(spec=make_spec(granted, replicas=1, cpu=1.5))
    await backend.apply(spec=make_spec(pinned, replicas=1, cpu=4, env={"OMP_NUM_THREADS": "1"}))

    def environ(pid: int) -> dict[str, str]:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return dict(item.decode().split("=", 1) for item in raw if b"=" in item)

    assert environ((await ready_at(backend, granted, n=1)).replicas[0].pid or 0)["OMP_NUM_THREADS"] == "2"
    assert environ((await ready_at(backend, pinned, n=1)).replicas[0].pid or 0)["OMP_NUM_THREADS"] == "1"


async def test_logs_tail_and_follow(make_backend: Callable[..., LocalBackend]) -> None:
    backend = make_backend()
    await backend.start()
    dep = uuid.uuid4()
    await backend.apply(spec=make_spec(dep, replicas=1))
    replica = (await ready_at(backend, dep, n=1)).replicas[0]

    lines = [line async for line in backend.logs(replica_id=replica.id, tail=100)]
    assert any("stub llama-cpp stub revision 1 listening" in line for line in lines)
    assert [line async for line in backend.logs(replica_id=replica.id, tail=1)] == lines[-1:]

    followed: list[str] = []

    async def follow() -> None:
        async for line in backend.logs(replica_id=replica.id, tail=0, follow=True):
            followed.append(line)

    task = asyncio.create_task(follow())
    async with httpx.AsyncClient() as client:
        await client.get(f"{replica.endpoint}/echo")
    await eventually(lambda: asyncio.sleep(0, "echo 1" in followed))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with pytest.raises(LookupError):
        _ = [line async for line in backend.logs(replica_id="no-such-replica")]


class _Impostor(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


async def test_port_clash_restarts_the_replica_on_another_port(
    make_backend: Callable[..., LocalBackend],
) -> None:
    # Another server grabs the port between our pick and the replica's bind, and answers 200.
    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    taken = impostor.server_address[1]
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    try:
        backend = make_backend()
        picks = iter([taken])
        backend._ports = PortAllocator(candidate=lambda: next(picks, None) or os_free_port())
        await backend.start()
        dep = uuid.uuid4()
        await backend.apply(spec=make_spec(dep, replicas=1))

        replica = (await ready_at(backend, dep, n=1)).replicas[0]
        assert replica.endpoint != f"http://127.0.0.1:{taken}" and replica.restarts >= 1
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{replica.endpoint}/echo")).json()["revision"] == "1"
    finally:
        impostor.shutdown()
        impostor.server_close()


def test_port_allocator_never_hands_out_a_reserved_port() -> None:
    picks = iter([5000, 5000, 5001, 5001, 5002])
    ports = PortAllocator(candidate=lambda: next(picks))
    ports.reserve(5000)
    assert ports.allocate() == 5001
    assert ports.allocate() == 5002
    ports.release(5001)
    assert ports.reserved == {5000, 5002}
    with socket.socket() as s:  # the default candidate is a port the OS says is free
        s.bind(("127.0.0.1", PortAllocator().allocate()))


async def test_stopping_the_supervisor_stops_its_replicas_by_default(
    make_backend: Callable[..., LocalBackend], stub: Path
) -> None:
    first = make_backend(keep_replicas_on_stop=False)
    await first.start()
    dep = uuid.uuid4()
    await first.apply(spec=make_spec(dep, replicas=2))
    before = await ready_at(first, dep, n=2)
    await first.stop()
    assert not [p for p in stub_processes(stub) if p.pid in {r.pid for r in before.replicas}]

    # The deployment is still recorded: the next start brings its replicas back, new ones.
    second = make_backend(keep_replicas_on_stop=False)
    await second.start()
    after = await ready_at(second, dep, n=2)
    assert not {r.pid for r in after.replicas} & {r.pid for r in before.replicas}
