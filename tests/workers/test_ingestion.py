"""The ingestion worker end to end, with a real all-MiniLM-L6-v2 replica behind the gateway:
a folder of markdown, HTML and PDF files is uploaded through the API, ingested by the app's own
runner and searched; a changed document replaces its chunks, an unchanged one is skipped, a
password-protected PDF fails alone; cancel keeps what was stored and no partial document; a
job whose process died is resumed; an S3 prefix is read with the library's credentials; the
embeddings are metered to the key that asked.

Cancel and the killed process need a run whose timing the test holds: those jobs are written
straight to the table as already claimed (running, fresh heartbeat) so the app's runner leaves
them alone, and a runner of the test's own embeds through a gateway whose calls it can hold.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import obstore
import pytest
from pydantic import SecretStr
from rag_documents import encrypted_pdf, pdf_bytes
from rag_support import Replica, built, builtin_minilm, deploy, minilm_replica_process
from services import s3_server  # noqa: F401 - the fixture
from sqlalchemy import select, text, update
from support import ADMIN, eventually, make_project

from converge.config import Settings
from converge.control.library.catalogue import minilm_path
from converge.control.rag import tokens
from converge.control.rag.tokens import ModelTokenizer
from converge.models import Event, IngestionJob, KbChunk, KbDocument, KnowledgeBase
from converge.storage.artifacts import ArtifactStore
from converge.workers.ingestion import IngestionRunner

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("minilm-ingestion")]
QUESTION = "How many megawatts does the Zephyr turbine produce at peak output?"

GUIDE = """# Converge guide

Converge is a self-hosted platform for serving models on your own machines.

## Installing

Install the package with pip, then start the server with `converge serve`. The first start
creates an organisation admin key and prints it once. Keep it somewhere safe.

## Configuring

Settings come from environment variables prefixed with CONVERGE_. Nested settings use a double
underscore, such as CONVERGE_GATEWAY__ENABLED. The data directory holds the database.
"""

HANDBOOK = """<!doctype html><html><head><title>Tea handbook</title>
<script>var tracking = "turbine megawatts";</script></head><body>
<nav><a href="/">Home</a> <a href="/shop">Shop</a></nav>
<h1>Brewing tea</h1><p>Green tea wants water below boiling, around eighty degrees, for two
minutes. Black tea takes boiling water and four minutes.</p>
<section><h2>Storing tea</h2><p>Keep leaves in an airtight tin, away from light and strong
smells. Whole leaves keep their flavour for about a year.</p></section>
</body></html>"""

REPORT_PAGES = [
    "Annual report of the Northwind energy cooperative.\nMembers met four times this year.",
    "The Zephyr turbine produces 42 megawatts at peak output.\nIt was commissioned in March on the north ridge.",
    "Finances: the cooperative ended the year with a small surplus.\nThe board thanks all volunteers.",
]


async def deploy_minilm(app: Any, client: httpx.AsyncClient, project_id: str) -> dict[str, Any]:
    version = await builtin_minilm(app, client)
    await built(app, project_id=project_id, version_id=version["id"], server="embeddings")
    return await deploy(client, project_id=project_id, version_id=version["id"], name="minilm")


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    with minilm_replica_process(tmp_path_factory.mktemp("minilm")) as started:
        yield started


class Env:
    """A committed project with a routed MiniLM deployment and a developer key."""

    def __init__(
        self, app: Any, client: httpx.AsyncClient, project: dict[str, Any], deployment: dict[str, Any]
    ):
        self.app, self.client, self.project, self.deployment = app, client, project, deployment
        self.state = app.state.converge
        self.key: dict[str, str] = {}
        self.key_id = ""

    async def kb(self, **chunking: int) -> dict[str, Any]:
        body = {
            "name": f"kb-{uuid.uuid4().hex[:8]}",
            "embedding_deployment": "minilm",
            "chunking": chunking or {"tokens": 64, "overlap": 8},
        }
        resp = await self.client.post(
            "/knowledge-bases", params={"project": self.project["id"]}, json=body, headers=self.key
        )
        assert resp.status_code == 201, resp.text
        return resp.json()

    async def upload(self, kb: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        parts = [("files", (name, data, "application/octet-stream")) for name, data in files.items()]
        resp = await self.client.post(
            f"/knowledge-bases/{kb['id']}/ingestions", files=parts, headers=self.key
        )
        assert resp.status_code == 202, resp.text
        return resp.json()

    async def finished(self, kb: dict[str, Any], job_id: str, timeout: float = 180) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            job = (
                await self.client.get(f"/knowledge-bases/{kb['id']}/ingestions/{job_id}", headers=ADMIN)
            ).json()
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        return await eventually(done, timeout=timeout, interval=0.2)

    async def ingest(self, kb: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return await self.finished(kb, (await self.upload(kb, files))["id"])

    async def documents(self, kb: dict[str, Any]) -> dict[str, dict[str, Any]]:
        resp = await self.client.get(
            f"/knowledge-bases/{kb['id']}/documents", params={"limit": 100}, headers=ADMIN
        )
        return {d["source"]: d for d in resp.json()["items"]}

    async def chunks(self, kb: dict[str, Any]) -> list[KbChunk]:
        async with self.state.sessions() as session:
            rows = await session.scalars(
                select(KbChunk).where(KbChunk.kb_id == uuid.UUID(kb["id"])).order_by(KbChunk.id)
            )
            return list(rows.all())

    async def claimed_job(self, kb: dict[str, Any], files: dict[str, bytes]) -> uuid.UUID:
        """A job as a runner has just claimed it: running, fresh heartbeat, files in the store."""
        entries = []
        for name, data in files.items():
            blob = await self.state.artifacts.put_stream(_one(data))
            entries.append(
                {
                    "name": name,
                    "key": ArtifactStore.object_key(blob.sha256),
                    "bytes": len(data),
                    "sha256": blob.sha256,
                }
            )
        return await self.job_row(kb, {"kind": "upload", "files": entries})

    async def job_row(self, kb: dict[str, Any], source: dict[str, Any]) -> uuid.UUID:
        now = datetime.now(UTC)
        async with self.state.sessions() as session, session.begin():
            job = IngestionJob(
                kb_id=uuid.UUID(kb["id"]),
                project_id=uuid.UUID(kb["project_id"]),
                state="running",
                source=source,
                progress={},
                errors=[],
                key_id=uuid.UUID(self.key_id),
                created_by="test",
                started_at=now,
                heartbeat_at=now,
            )
            session.add(job)
        return job.id

    def runner(self, *, gateway: Any = None, settings: Settings | None = None, **rag: Any) -> IngestionRunner:
        base = settings or self.state.settings
        tuned = base.model_copy(update={"rag": base.rag.model_copy(update={"poll_interval_s": 0.05, **rag})})
        return IngestionRunner(
            sessions=self.state.sessions,
            settings=tuned,
            store=self.state.artifacts,
            gateway=gateway if gateway is not None else self.state.gateway,
        )

    async def job(self, job_id: uuid.UUID) -> IngestionJob:
        async with self.state.sessions() as session:
            job = await session.get(IngestionJob, job_id)
            assert job is not None
            return job


@pytest.fixture(scope="module")
async def env(app: Any, replica: Replica) -> AsyncIterator[Env]:
    state = app.state.converge
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120
    ) as client:
        project = await make_project(client)
        deployment = await deploy_minilm(app, client, project["id"])
        await replica.ready()
        state.runtime.serve_at(uuid.UUID(deployment["id"]), [replica.url])

        def routed() -> bool:
            route = state.gateway.dataplane.snapshot.by_id.get(uuid.UUID(deployment["id"]))
            return route is not None and tuple(route.endpoints) == (replica.url,)  # not the fake's own

        e = Env(app, client, project, deployment)
        made = await client.post(
            f"/projects/{project['id']}/keys", json={"name": "ingest", "role": "developer"}, headers=ADMIN
        )
        e.key, e.key_id = {"Authorization": f"Bearer {made.json()['token']}"}, made.json()["id"]
        await eventually(routed, timeout=30)
        await eventually(lambda: _key_known(state, e.key_id), timeout=30)
        try:
            yield e
        finally:
            await client.delete(f"/deployments/{deployment['id']}", headers=ADMIN)


def _key_known(state: Any, key_id: str) -> bool:
    return any(str(k.id) == key_id for k in state.gateway.dataplane.snapshot.keys.values())


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


@pytest.fixture(scope="module")
def minilm_tokenizer() -> ModelTokenizer:
    path = minilm_path()
    assert path is not None
    return ModelTokenizer.from_files({n: (path / n).read_bytes() for n in tokens.WANTED})


class Has:
    """Equal to any string that contains `part`."""

    def __init__(self, part: str) -> None:
        self.part = part

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.part in other

    def __repr__(self) -> str:
        return f"<a text containing {self.part!r}>"


class HeldGateway:
    """The real gateway, except that embedding calls after the first `free` wait for `release`."""

    def __init__(self, gateway: Any, *, free: int) -> None:
        self._gateway, self.free = gateway, free
        self.dataplane, self.auth = gateway.dataplane, gateway.auth
        self.calls = 0
        self.holding, self.release = asyncio.Event(), asyncio.Event()

    async def call(self, caller: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        self.calls += 1
        if self.calls > self.free:
            self.holding.set()
            await self.release.wait()
        return await self._gateway.call(caller, path, body)


class ScriptedGateway:
    """The real gateway behind a script: the first answers are given (503s), and a batch with
    a text containing REFUSE is refused with a 400, as a server refuses a text it cannot read."""

    def __init__(self, gateway: Any, *, answers: list[tuple[int, Any]]) -> None:
        self._gateway, self.answers = gateway, list(answers)
        self.dataplane, self.auth = gateway.dataplane, gateway.auth
        self.batches: list[list[str]] = []

    async def call(self, caller: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        self.batches.append(list(body["input"]))
        if self.answers:
            return self.answers.pop(0)
        if any("REFUSE" in text for text in body["input"]):
            return 400, {"error": {"message": "this input is refused"}}
        return await self._gateway.call(caller, path, body)


# -- the folder ------------------------------------------------------------------------------------


async def test_a_folder_of_markdown_html_and_pdf_answers_a_question_from_the_one_that_holds_it(
    env: Env, minilm_tokenizer: ModelTokenizer
):
    kb = await env.kb(tokens=64, overlap=8)
    records = b'{"text": "Oolong sits between green and black tea.", "metadata": {"kind": "tea-fact"}}\n'
    files = {
        "guide.md": GUIDE.encode(),
        "handbook.html": HANDBOOK.encode(),
        "report.pdf": pdf_bytes(REPORT_PAGES, title="Northwind annual report"),
        "locked.pdf": encrypted_pdf(["The Zephyr turbine produces 42 megawatts."]),
        "facts.jsonl": records,
    }
    job = await env.ingest(kb, files)

    assert job["state"] == "succeeded", job
    assert job["errors"] == [{"document": "locked.pdf", "reason": Has("password-protected PDF")}]
    progress = job["progress"]
    assert (progress["documents_total"], progress["documents_done"]) == (5, 5)
    assert progress["chunks_total"] == progress["chunks_done"] > 4
    assert "1 of 5 documents failed" in job["reason"]

    documents = await env.documents(kb)
    assert set(documents) == {"guide.md", "handbook.html", "report.pdf", "facts.jsonl"}
    report = documents["report.pdf"]
    assert (report["title"], report["media_type"], report["pages"]) == (
        "Northwind annual report",
        "application/pdf",
        3,
    )
    assert documents["handbook.html"]["title"] == "Tea handbook"
    assert report["content_hash"] == hashlib.sha256(files["report.pdf"]).hexdigest()

    # Every chunk within the base's 64 tokens by MiniLM's own count, and keeps where it came from.
    chunks = await env.chunks(kb)
    assert sum(d["chunk_count"] for d in documents.values()) == len(chunks)
    for c in chunks:
        assert c.tokens == minilm_tokenizer.count(c.text) <= 64
    by_doc = {d["id"]: source for source, d in documents.items()}
    assert {c.page for c in chunks if by_doc[str(c.document_id)] == "report.pdf"} == {1, 2, 3}
    assert ["Converge guide", "Configuring"] in [c.heading_path for c in chunks]
    assert not any("tracking" in c.text or "Shop" in c.text for c in chunks)  # script and nav dropped
    kb_row = (await env.client.get(f"/knowledge-bases/{kb['id']}", headers=ADMIN)).json()
    assert kb_row["metadata_keys"] == ["kind"] and kb_row["last_ingested_at"]

    # The question is answered by the report's second page, first.
    for mode in ("vector", "hybrid"):
        resp = await env.client.post(
            f"/knowledge-bases/{kb['id']}/search",
            json={"query": QUESTION, "k": 3, "mode": mode},
            headers=env.key,
        )
        assert resp.status_code == 200, resp.text
        top = resp.json()["results"][0]
        assert (top["source"], top["page"]) == ("report.pdf", 2), resp.json()
        assert "42 megawatts" in top["text"]

    # The uploaded files are gone from the store once the job ended.
    for entry in job["source"]["files"]:
        assert not await env.state.artifacts.exists(entry["sha256"])

    # Events on the stream's outbox; the embeddings metered to the key that asked.
    async with env.state.sessions() as session:
        kinds = set((await session.scalars(select(Event.kind).where(Event.object_id == job["id"]))).all())
    assert {"ingestion.queued", "ingestion.running", "ingestion.progress", "ingestion.succeeded"} <= kinds

    async def metered() -> dict[str, Any] | None:
        resp = await env.client.get(
            "/usage",
            params={"project": env.project["id"], "key": env.key_id, "group_by": "endpoint"},
            headers=ADMIN,
        )
        body = resp.json()
        return body if body["totals"]["requests"] >= 2 else None  # the base's bind probe + the batches

    usage = await eventually(metered, timeout=30, interval=0.5)
    assert {row["endpoint"] for row in usage["data"]} == {"embeddings"}
    assert usage["totals"]["prompt_tokens"] >= sum(c.tokens for c in chunks)


async def test_a_changed_document_replaces_its_chunks_and_an_unchanged_one_is_skipped(env: Env):
    kb = await env.kb(tokens=64, overlap=8)
    first = await env.ingest(kb, {"a.md": GUIDE.encode(), "b.html": HANDBOOK.encode()})
    assert first["state"] == "succeeded" and first["errors"] == []
    before = {c.id: c for c in await env.chunks(kb)}
    docs = await env.documents(kb)

    changed = (
        GUIDE.replace("double\nunderscore", "double underscore (two _ characters)")
        + "\n## Upgrading\n\nRun `converge db upgrade` while Converge is stopped.\n"
    )
    second = await env.ingest(
        kb, {"a.md": changed.encode(), "b.html": HANDBOOK.encode(), "copy-of-b.html": HANDBOOK.encode()}
    )

    assert second["state"] == "succeeded" and second["errors"] == [], second
    assert second["progress"]["skipped_unchanged"] == 1 and second["progress"]["skipped_duplicate"] == 1
    after = await env.chunks(kb)
    now = await env.documents(kb)
    assert set(now) == {"a.md", "b.html"}  # the copy is a duplicate of b.html, not a document
    assert (
        now["a.md"]["id"] == docs["a.md"]["id"]
        and now["a.md"]["content_hash"] != docs["a.md"]["content_hash"]
    )
    a_chunks = [c for c in after if str(c.document_id) == docs["a.md"]["id"]]
    assert now["a.md"]["chunk_count"] == len(a_chunks)
    assert all(c.id not in before for c in a_chunks)  # replaced, not added to
    assert any("converge db upgrade" in c.text for c in a_chunks)
    assert sorted(c.ordinal for c in a_chunks) == list(range(len(a_chunks)))
    b_before = sorted(i for i, c in before.items() if str(c.document_id) == docs["b.html"]["id"])
    assert b_before == sorted(c.id for c in after if str(c.document_id) == docs["b.html"]["id"])  # untouched


async def test_a_failed_batch_is_retried_without_duplicates_and_a_refused_text_fails_its_document(env: Env):
    kb = await env.kb(tokens=64, overlap=8)
    files = {
        "a.txt": b"Alpha passage about harbours.",
        "b.txt": b"REFUSE: a passage the server will not embed.",
        "c.txt": b"Gamma passage about lighthouses.",
    }
    job_id = await env.claimed_job(kb, files)
    busy = (503, {"error": {"message": "all replicas are busy"}})
    scripted = ScriptedGateway(env.state.gateway, answers=[busy, busy])
    await env.runner(gateway=scripted, embed_retries=3).run(job_id)

    job = await env.job(job_id)
    assert job.state == "succeeded", job.reason
    assert job.errors == [
        {"document": "b.txt", "reason": Has("embedding refused (400): this input is refused")}
    ]
    # One batch across the three documents, twice busy, once refused, then each document alone.
    assert [len(b) for b in scripted.batches] == [3, 3, 3, 1, 1, 1]
    documents = await env.documents(kb)
    assert set(documents) == {"a.txt", "c.txt"}
    chunks = await env.chunks(kb)
    assert len(chunks) == sum(d["chunk_count"] for d in documents.values()) == 2  # no duplicate from a retry


# -- cancel and a process that died -----------------------------------------------------------------


async def test_cancel_keeps_the_documents_stored_and_no_partial_one(env: Env):
    kb = await env.kb(tokens=32, overlap=4)
    files = {
        "one.txt": b"A single short passage about kettles.",
        "long.md": (
            "# Long\n\n" + " ".join(f"Sentence {i} talks about long documents." for i in range(40))
        ).encode(),
        "three.txt": b"Another passage, never reached.",
    }
    job_id = await env.claimed_job(kb, files)
    held = HeldGateway(env.state.gateway, free=1)
    # Batches of 2: the first holds one.txt and the start of long.md; the second is held.
    run = asyncio.create_task(env.runner(gateway=held, embed_batch=2, embed_concurrency=1).run(job_id))
    await asyncio.wait_for(held.holding.wait(), 60)

    resp = await env.client.post(f"/knowledge-bases/{kb['id']}/ingestions/{job_id}/cancel", headers=env.key)
    assert resp.status_code == 200, resp.text
    await asyncio.sleep(0.5)  # the runner hears of it within its 0.05 s poll
    held.release.set()
    await asyncio.wait_for(run, 60)

    job = await env.job(job_id)
    assert job.state == "cancelled" and job.finished_at is not None
    assert job.reason == "cancelled: 1 of 3 documents stored, none in part"
    assert set(await env.documents(kb)) == {"one.txt"}  # stored before the cancel; long.md never half
    assert len(await env.chunks(kb)) == 1
    assert job.progress["documents_done"] == 1
    async with env.state.sessions() as session:
        kinds = (await session.scalars(select(Event.kind).where(Event.object_id == str(job_id)))).all()
    assert "ingestion.cancelled" in kinds


async def test_a_job_whose_process_died_is_resumed_and_skips_what_was_stored(env: Env):
    kb = await env.kb(tokens=64, overlap=8)
    files = {
        "first.txt": b"The first document is about rivers.",
        "second.txt": b"The second document is about mountains.",
        "third.txt": b"The third document is about forests.",
    }
    job_id = await env.claimed_job(kb, files)
    held = HeldGateway(env.state.gateway, free=1)
    run = asyncio.create_task(env.runner(gateway=held, embed_batch=1, embed_concurrency=1).run(job_id))
    await asyncio.wait_for(held.holding.wait(), 60)
    await eventually(lambda: _stored(env, kb, 1), timeout=30)
    run.cancel()  # the process dies: no final state, no more heartbeats
    with pytest.raises(asyncio.CancelledError):
        await run
    assert (await env.job(job_id)).state == "running"

    # Three heartbeats later the app's own runner takes it over.
    async with env.state.sessions() as session, session.begin():
        stale = datetime.now(UTC) - timedelta(hours=1)
        await session.execute(
            update(IngestionJob).where(IngestionJob.id == job_id).values(heartbeat_at=stale)
        )

    async def resumed() -> IngestionJob | None:
        job = await env.job(job_id)
        return job if job.state != "running" else None

    job = await eventually(resumed, timeout=120, interval=0.2)
    assert job.state == "succeeded", job.reason
    assert job.progress["skipped_unchanged"] == 1 and job.progress["documents_done"] == 3
    assert set(await env.documents(kb)) == set(files)
    assert len(await env.chunks(kb)) == 3
    async with env.state.sessions() as session:
        running = (
            await session.scalars(
                select(Event.data).where(Event.object_id == str(job_id), Event.kind == "ingestion.running")
            )
        ).all()
    assert any(data.get("resumed") for data in running)


async def _stored(env: Env, kb: dict[str, Any], n: int) -> bool:
    async with env.state.sessions() as session:
        count = await session.scalar(
            text("SELECT count(*) FROM kb_documents WHERE kb_id = :kb"), {"kb": uuid.UUID(kb["id"])}
        )
    return count == n


# -- sources ---------------------------------------------------------------------------------------


async def test_an_s3_prefix_is_read_with_the_library_credentials(env: Env, s3_server: dict[str, str]):  # noqa: F811
    bucket = ArtifactStore.s3(**s3_server).store
    prefix = f"kb-{uuid.uuid4().hex[:8]}"
    await obstore.put_async(bucket, f"{prefix}/notes/guide.md", GUIDE.encode())
    await obstore.put_async(bucket, f"{prefix}/report.pdf", pdf_bytes(REPORT_PAGES))
    await obstore.put_async(bucket, f"{prefix}/image.png", b"\x89PNG\r\n\x1a\n")
    library = env.state.settings.library.model_copy(
        update={
            "s3_endpoint": s3_server["endpoint"],
            "s3_access_key_id": s3_server["access_key_id"],
            "s3_secret_access_key": SecretStr(s3_server["secret_access_key"]),
        }
    )
    settings = env.state.settings.model_copy(update={"library": library})
    kb = await env.kb()
    url = f"s3://{s3_server['bucket']}/{prefix}"
    job_id = await env.job_row(kb, {"kind": "s3", "url": url})

    await env.runner(settings=settings).run(job_id)

    job = await env.job(job_id)
    assert job.state == "succeeded", job.reason
    assert set(await env.documents(kb)) == {f"{url}/notes/guide.md", f"{url}/report.pdf"}
    assert job.errors == [{"document": f"{url}/image.png", "reason": Has("unsupported file type")}]

    missing = await env.job_row(kb, {"kind": "s3", "url": f"s3://{s3_server['bucket']}/nothing-here"})
    await env.runner(settings=settings).run(missing)
    assert (await env.job(missing)).state == "failed"
    assert "holds no documents" in (await env.job(missing)).reason


async def test_without_a_gateway_the_job_fails_with_the_reason(env: Env):
    kb = await env.kb()
    job_id = await env.claimed_job(kb, {"a.txt": b"text"})
    state = env.state
    await IngestionRunner(
        sessions=state.sessions, settings=state.settings, store=state.artifacts, gateway=None
    ).run(job_id)
    job = await env.job(job_id)
    assert job.state == "failed" and "runs no gateway" in job.reason
    async with env.state.sessions() as session:
        assert (
            await session.scalar(
                select(KnowledgeBase.last_ingested_at).where(KnowledgeBase.id == uuid.UUID(kb["id"]))
            )
            is None
        )
        assert not (
            await session.scalars(select(KbDocument).where(KbDocument.kb_id == uuid.UUID(kb["id"])))
        ).all()
