"""Knowledge bases over HTTP: create (dimension read from the real MiniLM through the gateway),
list, get, update, delete; documents; ingestion jobs (uploads checked as they stream, S3
prefixes); search and probe; bad input named by field; and two projects that never see each
other's bases."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import psycopg
import pytest
from rag_support import MiniLM, add_document, built, builtin_version, deploy
from sqlalchemy import select, text, update
from support import ADMIN, make_key, make_project

from converge.config import RagSettings
from converge.control.rag import repository as rag_repository
from converge.models import AuditRecord, IngestionJob, KbDocument, KnowledgeBase
from converge.storage import vectors


async def make_kb(client, minilm: MiniLM, **body: Any) -> dict[str, Any]:
    payload = {"name": f"kb-{uuid.uuid4().hex[:8]}", "embedding_deployment": minilm.deployment["id"], **body}
    resp = await client.post(
        "/knowledge-bases", params={"project": minilm.project["id"]}, json=payload, headers=ADMIN
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


def _sessions(app):
    return app.state.converge.session_factory


# -- create ------------------------------------------------------------------------------------


async def test_create_reads_the_dimension_and_token_limit_from_the_model(app, client, minilm):
    kb = await make_kb(client, minilm, description="handbook")
    assert kb["dimension"] == 384  # read from MiniLM itself, through the gateway
    assert kb["max_tokens"] == 256  # sentence_bert_config.json's max_seq_length
    assert kb["chunking"] == {"tokens": 256, "overlap": 32}
    assert kb["retrieval"] == {"k": 5, "mode": "hybrid"}
    assert kb["embedding_deployment"] == "minilm"
    assert kb["stats"] == {"documents": 0, "chunks": 0, "bytes": 0}
    assert kb["index"] == {"state": "exact", "ef_search": 40}
    assert kb["metadata_keys"] == [] and kb["probe"] is None and kb["last_ingested_at"] is None
    async with _sessions(app)() as session:
        exists = await session.scalar(
            text("SELECT to_regclass(:n) IS NOT NULL"), {"n": vectors.partition_name(uuid.UUID(kb["id"]))}
        )
        audit = await session.scalar(
            select(AuditRecord).where(
                AuditRecord.action == "knowledge_base.created", AuditRecord.object_id == kb["id"]
            )
        )
    assert exists, "the base's kb_chunks partition is made with it"
    assert audit is not None and audit.changes["dimension"] == 384
    # By name works as well as by id; the same name twice in a project is a 409.
    named = await make_kb(client, minilm, embedding_deployment="minilm", chunking={"tokens": 128})
    assert named["chunking"] == {"tokens": 128, "overlap": 32}
    again = await client.post(
        "/knowledge-bases",
        params={"project": minilm.project["id"]},
        json={"name": named["name"], "embedding_deployment": "minilm"},
        headers=ADMIN,
    )
    assert again.status_code == 409 and named["name"] in again.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        ({"name": "Not A Label"}, "name", "pattern"),
        ({"embedding_deployment": "nope"}, "embedding_deployment", "no deployment 'nope'"),
        ({"chunking": {"tokens": 300}}, "chunking.tokens", "at most 256"),
        ({"chunking": {"tokens": 64, "overlap": 64}}, "chunking.overlap", "fewer than chunking.tokens (64)"),
        ({"retrieval": {"k": 0}}, "retrieval.k", "greater than or equal to 1"),
        ({"retrieval": {"k": 101}}, "retrieval.k", "less than or equal to 100"),
        ({"retrieval": {"mode": "fuzzy"}}, "retrieval.mode", "vector"),
        ({"surprise": 1}, "surprise", "Extra inputs"),
    ],
)
async def test_create_refuses_bad_input_naming_the_field(client, minilm, body, field, needle):
    payload = {"name": f"kb-{uuid.uuid4().hex[:8]}", "embedding_deployment": "minilm", **body}
    resp = await client.post(
        "/knowledge-bases", params={"project": minilm.project["id"]}, json=payload, headers=ADMIN
    )
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert field in [e["field"] for e in problem.get("errors", [])] or problem.get("field") == field, problem
    assert needle in problem["detail"], problem


async def test_a_deployment_that_does_not_embed_or_is_not_ready_is_refused(app, client, minilm):
    # Another server kind (SmolLM2 on llama-cpp): named as the field, with the kind it runs.
    smollm2 = await builtin_version(app, client, "smollm2-135m-instruct")
    await built(app, project_id=minilm.project["id"], version_id=smollm2["id"], server="llama-cpp")
    chat = await deploy(
        client,
        project_id=minilm.project["id"],
        version_id=smollm2["id"],
        name="chat",
        server="llama-cpp",
    )
    resp = await client.post(
        "/knowledge-bases",
        params={"project": minilm.project["id"]},
        json={"name": "kb-chat", "embedding_deployment": chat["id"]},
        headers=ADMIN,
    )
    assert resp.status_code == 422 and resp.json()["field"] == "embedding_deployment"
    assert "'llama-cpp'" in resp.json()["detail"] and "/v1/embeddings" in resp.json()["detail"]
    # An embeddings deployment with no replica serving: the dimension cannot be read yet.
    idle = await deploy(client, project_id=minilm.project["id"], version_id=minilm.version["id"], name="idle")
    resp = await client.post(
        "/knowledge-bases",
        params={"project": minilm.project["id"]},
        json={"name": "kb-idle", "embedding_deployment": "idle"},
        headers=ADMIN,
    )
    assert resp.status_code == 503, resp.text
    assert "not ready" in resp.json()["detail"] and "idle" in resp.json()["detail"]
    assert idle["id"]
    # A deployment of another project is not found from this one.
    other = await make_project(client)
    resp = await client.post(
        "/knowledge-bases",
        params={"project": other["id"]},
        json={"name": "kb-x", "embedding_deployment": minilm.deployment["id"]},
        headers=ADMIN,
    )
    assert resp.status_code == 422 and resp.json()["field"] == "embedding_deployment"


# -- list, get, update ---------------------------------------------------------------------------


async def test_list_is_paginated_and_scoped_to_the_project(client, minilm):
    made = [await make_kb(client, minilm) for _ in range(3)]
    ids, cursor = [], None
    while True:
        params = {"project": minilm.project["id"], "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/knowledge-bases", params=params, headers=ADMIN)).json()
        ids += [kb["id"] for kb in page["items"]]
        assert all("stats" in kb for kb in page["items"])
        if not (cursor := page["next_cursor"]):
            break
    assert {kb["id"] for kb in made} <= set(ids) and len(ids) == len(set(ids))
    other = await make_project(client)
    assert (await client.get("/knowledge-bases", params={"project": other["id"]}, headers=ADMIN)).json()[
        "items"
    ] == []
    bad = await client.get("/knowledge-bases", params={"cursor": "%%%"}, headers=ADMIN)
    assert bad.status_code == 400


async def test_get_shows_counts_and_update_changes_what_it_may(app, client, minilm):
    kb = await make_kb(client, minilm)
    [vector] = await minilm.embed(["hello"])
    await add_document(
        app, kb, source="a.md", chunks=[("alpha", vector, {"lang": "en"}), ("beta", vector, {})]
    )
    got = (await client.get(f"/knowledge-bases/{kb['id']}", headers=ADMIN)).json()
    assert got["stats"] == {"documents": 1, "chunks": 2, "bytes": 9}
    assert got["metadata_keys"] == ["lang"]

    patch = await client.patch(
        f"/knowledge-bases/{kb['id']}",
        json={"description": "new", "chunking": {"overlap": 16}, "retrieval": {"mode": "vector"}},
        headers=ADMIN,
    )
    assert patch.status_code == 200, patch.text
    assert patch.json()["description"] == "new"
    assert patch.json()["chunking"] == {"tokens": 256, "overlap": 16}
    assert patch.json()["retrieval"] == {"k": 5, "mode": "vector"}
    too_many = await client.patch(
        f"/knowledge-bases/{kb['id']}", json={"chunking": {"tokens": 512}}, headers=ADMIN
    )
    assert too_many.status_code == 422 and too_many.json()["field"] == "chunking.tokens"
    assert too_many.json()["limit"] == 256

    # Rebinding is allowed to a model of the same dimension only: 409 naming both.
    async with _sessions(app)() as session, session.begin():
        await session.execute(
            update(KnowledgeBase).where(KnowledgeBase.id == uuid.UUID(kb["id"])).values(dimension=768)
        )
    rebind = await client.patch(
        f"/knowledge-bases/{kb['id']}", json={"embedding_deployment": "minilm"}, headers=ADMIN
    )
    assert rebind.status_code == 409, rebind.text
    assert "384" in rebind.json()["detail"] and "768" in rebind.json()["detail"]
    async with _sessions(app)() as session, session.begin():
        await session.execute(
            update(KnowledgeBase).where(KnowledgeBase.id == uuid.UUID(kb["id"])).values(dimension=384)
        )
    same = await client.patch(
        f"/knowledge-bases/{kb['id']}", json={"embedding_deployment": "minilm"}, headers=ADMIN
    )
    assert same.status_code == 200 and same.json()["dimension"] == 384


# -- delete --------------------------------------------------------------------------------------


async def test_delete_removes_documents_chunks_jobs_and_uploaded_files(app, client, minilm):
    kb = await make_kb(client, minilm)
    [vector] = await minilm.embed(["x"])
    await add_document(app, kb, source="a.md", chunks=[("alpha", vector, {})])
    content = f"# unique {uuid.uuid4().hex}\n".encode()
    job = await client.post(
        f"/knowledge-bases/{kb['id']}/ingestions", files=[("files", ("notes.md", content))], headers=ADMIN
    )
    assert job.status_code == 202, job.text
    store = app.state.converge.artifacts
    digest = hashlib.sha256(content).hexdigest()
    assert await store.exists(digest)

    resp = await client.delete(f"/knowledge-bases/{kb['id']}", headers=ADMIN)
    assert resp.status_code == 204
    kb_id = uuid.UUID(kb["id"])
    async with _sessions(app)() as session:
        partition = await session.scalar(
            text("SELECT to_regclass(:n) IS NOT NULL"), {"n": vectors.partition_name(kb_id)}
        )
        documents = await session.scalar(select(KbDocument.id).where(KbDocument.kb_id == kb_id))
        jobs = await session.scalar(select(IngestionJob.id).where(IngestionJob.kb_id == kb_id))
        chunks = await session.scalar(text("SELECT count(*) FROM kb_chunks WHERE kb_id = :k"), {"k": kb_id})
    assert not partition and documents is None and jobs is None and chunks == 0
    assert not await store.exists(digest), "the upload is removed once the delete commits"
    assert (await client.get(f"/knowledge-bases/{kb['id']}", headers=ADMIN)).status_code == 404
    assert (await client.delete(f"/knowledge-bases/{kb['id']}", headers=ADMIN)).status_code == 404


# -- documents -----------------------------------------------------------------------------------


async def test_documents_are_listed_read_and_deleted_with_their_chunks(app, client, minilm):
    kb = await make_kb(client, minilm)
    [vector] = await minilm.embed(["x"])
    ids = [
        await add_document(app, kb, source=f"d{i}.md", chunks=[("alpha", vector, {})] * 2) for i in range(3)
    ]
    first = (
        await client.get(f"/knowledge-bases/{kb['id']}/documents", params={"limit": 2}, headers=ADMIN)
    ).json()
    rest = (
        await client.get(
            f"/knowledge-bases/{kb['id']}/documents", params={"cursor": first["next_cursor"]}, headers=ADMIN
        )
    ).json()
    assert [d["id"] for d in first["items"] + rest["items"]] == sorted(ids) and rest["next_cursor"] is None
    one = (await client.get(f"/knowledge-bases/{kb['id']}/documents/{ids[0]}", headers=ADMIN)).json()
    assert one["source"] == "d0.md" and one["chunk_count"] == 2 and one["metadata"] == {}

    assert (
        await client.delete(f"/knowledge-bases/{kb['id']}/documents/{ids[0]}", headers=ADMIN)
    ).status_code == 204
    assert (
        await client.get(f"/knowledge-bases/{kb['id']}/documents/{ids[0]}", headers=ADMIN)
    ).status_code == 404
    async with _sessions(app)() as session:
        left = await session.scalar(
            text("SELECT count(*) FROM kb_chunks WHERE document_id = :d"), {"d": uuid.UUID(ids[0])}
        )
        audit = await session.scalar(
            select(AuditRecord).where(
                AuditRecord.action == "document.deleted", AuditRecord.object_id == ids[0]
            )
        )
    assert left == 0 and audit is not None
    got = (await client.get(f"/knowledge-bases/{kb['id']}", headers=ADMIN)).json()
    assert got["stats"]["documents"] == 2 and got["stats"]["chunks"] == 4


# -- ingestions ----------------------------------------------------------------------------------


async def test_uploads_queue_a_job_that_lists_and_cancels(app, client, minilm):
    kb = await make_kb(client, minilm)
    files = [
        ("files", ("guide.md", b"# Guide\n\nHello.\n")),
        ("files", ("docs/page.html", b"<h1>Page</h1><p>Hi</p>")),
        ("files", ("lines.jsonl", b'{"text": "one", "metadata": {"lang": "en"}}\n')),
    ]
    first = await client.post(f"/knowledge-bases/{kb['id']}/ingestions", files=files, headers=minilm.key)
    assert first.status_code == 202, first.text
    job = first.json()
    assert job["state"] == "queued" and job["source"]["kind"] == "upload"
    assert [f["name"] for f in job["source"]["files"]] == ["guide.md", "docs/page.html", "lines.jsonl"]
    assert job["source"]["files"][0]["sha256"] == hashlib.sha256(b"# Guide\n\nHello.\n").hexdigest()
    assert job["source"]["files"][0]["bytes"] == 16
    async with _sessions(app)() as session:
        row = await session.get(IngestionJob, uuid.UUID(job["id"]))
        key_id = (
            (
                await session.execute(
                    text("SELECT id FROM api_keys WHERE project_id = :p"),
                    {"p": uuid.UUID(minilm.project["id"])},
                )
            )
            .scalars()
            .all()
        )
    assert row is not None and row.key_id in key_id, "the job is metered to the key that asked"

    second = await client.post(
        f"/knowledge-bases/{kb['id']}/ingestions", json={"url": "s3://bucket-1/docs/"}, headers=ADMIN
    )
    assert second.status_code == 202 and second.json()["source"] == {
        "kind": "s3",
        "url": "s3://bucket-1/docs/",
    }
    listed = (
        await client.get(f"/knowledge-bases/{kb['id']}/ingestions", params={"limit": 1}, headers=ADMIN)
    ).json()
    assert [j["id"] for j in listed["items"]] == [second.json()["id"]]  # newest first
    older = (
        await client.get(
            f"/knowledge-bases/{kb['id']}/ingestions", params={"cursor": listed["next_cursor"]}, headers=ADMIN
        )
    ).json()
    assert [j["id"] for j in older["items"]] == [job["id"]]

    cancelled = await client.post(f"/knowledge-bases/{kb['id']}/ingestions/{job['id']}/cancel", headers=ADMIN)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["cancel_requested"] is True
    again = await client.post(f"/knowledge-bases/{kb['id']}/ingestions/{job['id']}/cancel", headers=ADMIN)
    assert again.status_code == 409
    got = await client.get(f"/knowledge-bases/{kb['id']}/ingestions/{job['id']}", headers=ADMIN)
    assert got.json()["state"] == "cancelled"


async def test_uploads_are_checked_while_they_stream(app, client, minilm, monkeypatch):
    state = app.state.converge
    monkeypatch.setattr(
        state,
        "settings",
        state.settings.model_copy(update={"rag": RagSettings(max_file_bytes=1000, max_files=2)}),
    )
    kb = await make_kb(client, minilm)
    url = f"/knowledge-bases/{kb['id']}/ingestions"
    store = state.artifacts
    first = f"first {uuid.uuid4().hex}".encode()

    # An unsupported type: 415 naming the file and the types ingestion reads; the file before
    # it, already stored, is removed again.
    resp = await client.post(
        url, files=[("files", ("a.md", first)), ("files", ("evil.exe", b"MZ"))], headers=ADMIN
    )
    assert resp.status_code == 415, resp.text
    assert (
        resp.json()["file"] == "evil.exe"
        and ".pdf" in resp.json()["allowed"]
        and "evil.exe" in resp.json()["detail"]
    )
    assert not await store.exists(hashlib.sha256(first).hexdigest())

    resp = await client.post(url, files=[("files", ("big.txt", b"x" * 1001))], headers=ADMIN)
    assert resp.status_code == 413 and resp.json()["file"] == "big.txt" and resp.json()["limit"] == 1000
    assert "1000" in resp.json()["detail"]
    resp = await client.post(url, files=[("files", (f"{i}.txt", b"x")) for i in range(3)], headers=ADMIN)
    assert resp.status_code == 413 and resp.json()["limit"] == 2
    resp = await client.post(
        url, files=[("files", ("a.txt", b"x")), ("files", ("a.txt", b"y"))], headers=ADMIN
    )
    assert resp.status_code == 422 and "twice" in resp.json()["detail"]
    resp = await client.post(url, files=[("attachment", ("a.txt", b"x"))], headers=ADMIN)
    assert resp.status_code == 422 and resp.json()["field"] == "attachment"
    resp = await client.post(
        url, data={"files": "not a file"}, files=[("other", ("a.txt", b""))], headers=ADMIN
    )
    assert resp.status_code == 422
    resp = await client.post(url, content=b"plain", headers={**ADMIN, "content-type": "text/plain"})
    assert resp.status_code == 415 and "multipart/form-data" in resp.json()["detail"]
    truncated = b'--b\r\nContent-Disposition: form-data; name="files"; filename="t.txt"\r\n\r\nhalf'
    resp = await client.post(
        url, content=truncated, headers={**ADMIN, "content-type": "multipart/form-data; boundary=b"}
    )
    assert resp.status_code == 400 and "Truncated" in resp.json()["detail"]
    empty = b"--b--\r\n"
    resp = await client.post(
        url, content=empty, headers={**ADMIN, "content-type": "multipart/form-data; boundary=b"}
    )
    assert resp.status_code == 422 and resp.json()["field"] == "files"

    for bad in ("http://bucket/x", "s3://", "s3://b/x?y=1", "s3://UPPER_case/x"):
        resp = await client.post(url, json={"url": bad}, headers=ADMIN)
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "url", (bad, resp.text)
    resp = await client.post(url, json={"url": "s3://b/x", "extra": 1}, headers=ADMIN)
    assert resp.status_code == 422
    jobs = (await client.get(url, headers=ADMIN)).json()["items"]
    assert jobs == [], "no refused upload queued anything"


# -- search and probe ----------------------------------------------------------------------------

PASSAGES = {
    "cats.md": "Cats are small domesticated felines that purr and chase mice.",
    "rockets.md": "A rocket engine burns propellant to produce thrust for spaceflight.",
    "bread.md": "Bake the bread dough in a hot oven until the crust turns golden brown.",
}


async def test_search_finds_the_passage_that_answers_with_the_real_model(app, client, minilm):
    kb = await make_kb(client, minilm)
    embedded = await minilm.embed(list(PASSAGES.values()))
    for (source, passage), vector in zip(PASSAGES.items(), embedded, strict=True):
        await add_document(app, kb, source=source, chunks=[(passage, vector, {"topic": source[:-3]})])
    url = f"/knowledge-bases/{kb['id']}/search"
    for mode in ("vector", "hybrid"):
        resp = await client.post(
            url, json={"query": "How do spacecraft get thrust?", "mode": mode, "k": 2}, headers=minilm.key
        )
        assert resp.status_code == 200, resp.text
        found = resp.json()
        assert found["mode"] == mode and found["exact"] is True and len(found["results"]) == 2
        top = found["results"][0]
        assert top["source"] == "rockets.md" and top["heading_path"] == ["Guide", "rockets.md"]
        assert top["text"] == PASSAGES["rockets.md"] and top["metadata"] == {"topic": "rockets"}
    keyword = (await client.post(url, json={"query": "oven", "mode": "keyword"}, headers=ADMIN)).json()
    assert [r["source"] for r in keyword["results"]] == ["bread.md"]
    filtered = (
        await client.post(url, json={"query": "thrust", "filters": {"topic": "cats"}}, headers=ADMIN)
    ).json()
    assert {r["source"] for r in filtered["results"]} == {"cats.md"}


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        ({"query": ""}, "query", "at least 1 character"),
        ({"query": "   "}, "query", "at least 1 character"),
        ({"query": "word " * 300}, "query", "at most 256"),
        ({"query": "q", "k": 0}, "k", "greater than or equal to 1"),
        ({"query": "q", "k": 101}, "k", "less than or equal to 100"),
        ({"query": "q", "mode": "semantic"}, "mode", "vector"),
        ({"query": "q", "filters": {"color": "red"}}, "filters.color", "known fields: topic"),
        ({"query": "q", "filters": {"topic": ["a"]}}, "filters.topic", "valid"),
    ],
)
async def test_search_refuses_bad_input_naming_the_field(app, client, minilm, body, field, needle):
    kb = await make_kb(client, minilm)
    [vector] = await minilm.embed(["x"])
    await add_document(app, kb, source="a.md", chunks=[("alpha", vector, {"topic": "a"})])
    resp = await client.post(f"/knowledge-bases/{kb['id']}/search", json=body, headers=ADMIN)
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    fields = [e["field"] for e in problem.get("errors", [])]
    assert any(f == field or f.startswith(field) for f in fields), problem
    assert needle in problem["detail"], problem


async def test_probe_measures_recall_and_needs_write(app, client, minilm):
    kb = await make_kb(client, minilm)
    embedded = await minilm.embed(list(PASSAGES.values()))
    for (source, passage), vector in zip(PASSAGES.items(), embedded, strict=True):
        await add_document(app, kb, source=source, chunks=[(passage, vector, {})])
    viewer = await make_key(client, minilm.project["id"], "viewer")
    denied = await client.post(f"/knowledge-bases/{kb['id']}/probe", json={}, headers=viewer)
    assert denied.status_code == 403
    resp = await client.post(
        f"/knowledge-bases/{kb['id']}/probe", json={"queries": 3, "k": 2}, headers=minilm.key
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["recall"] == 1.0 and resp.json()["k"] == 2
    shown = (await client.get(f"/knowledge-bases/{kb['id']}", headers=viewer)).json()
    assert shown["probe"]["k"] == 2
    for body in ({"queries": 0}, {"queries": 501}, {"k": 0}, {"k": 101}):
        assert (
            await client.post(f"/knowledge-bases/{kb['id']}/probe", json=body, headers=ADMIN)
        ).status_code == 422


# -- permissions and isolation -------------------------------------------------------------------


async def test_another_projects_key_sees_nothing_of_a_base(app, client, minilm):
    kb = await make_kb(client, minilm)
    [vector] = await minilm.embed(["x"])
    doc = await add_document(app, kb, source="a.md", chunks=[("alpha", vector, {})])
    job = (
        await client.post(
            f"/knowledge-bases/{kb['id']}/ingestions", json={"url": "s3://bucket/x"}, headers=ADMIN
        )
    ).json()
    other = await make_project(client)
    stranger = await make_key(client, other["id"], "owner")
    base = f"/knowledge-bases/{kb['id']}"
    missing = f"/knowledge-bases/{uuid.uuid4()}"
    for method, path, body in [
        ("GET", "", None),
        ("PATCH", "", {"description": "mine"}),
        ("DELETE", "", None),
        ("POST", "/search", {"query": "alpha", "mode": "keyword"}),
        ("POST", "/probe", {}),
        ("GET", "/documents", None),
        ("GET", f"/documents/{doc}", None),
        ("DELETE", f"/documents/{doc}", None),
        ("GET", "/ingestions", None),
        ("GET", f"/ingestions/{job['id']}", None),
        ("POST", f"/ingestions/{job['id']}/cancel", None),
        ("POST", "/ingestions", {"url": "s3://bucket/y"}),
    ]:
        theirs = await client.request(method, base + path, json=body, headers=stranger)
        nothing = await client.request(method, missing + path, json=body, headers=stranger)
        assert theirs.status_code == nothing.status_code == 404, (method, path, theirs.text)
        assert theirs.json()["detail"].replace(kb["id"], "?") == nothing.json()["detail"].replace(
            missing.rsplit("/", 1)[1], "?"
        ), (method, path)
    listed = await client.get("/knowledge-bases", headers=stranger)
    assert listed.json()["items"] == []
    assert (
        await client.get("/knowledge-bases", params={"project": minilm.project["id"]}, headers=stranger)
    ).status_code == 404
    mine = (await client.get("/knowledge-bases", headers=minilm.key)).json()["items"]
    assert kb["id"] in [k["id"] for k in mine] and {k["project_id"] for k in mine} == {minilm.project["id"]}
    # The base is untouched.
    assert (await client.get(base, headers=ADMIN)).json()["stats"]["documents"] == 1


async def test_viewers_read_and_search_but_do_not_change(app, client, minilm):
    kb = await make_kb(client, minilm)
    viewer = await make_key(client, minilm.project["id"], "viewer")
    assert (await client.get(f"/knowledge-bases/{kb['id']}", headers=viewer)).status_code == 200
    ok = await client.post(
        f"/knowledge-bases/{kb['id']}/search", json={"query": "x", "mode": "keyword"}, headers=viewer
    )
    assert ok.status_code == 200 and ok.json()["results"] == []
    for method, path, body in [
        ("PATCH", "", {"description": "v"}),
        ("DELETE", "", None),
        ("POST", "/ingestions", {"url": "s3://bucket/y"}),
    ]:
        resp = await client.request(method, f"/knowledge-bases/{kb['id']}{path}", json=body, headers=viewer)
        assert resp.status_code == 403, (method, path, resp.text)
    create = await client.post(
        "/knowledge-bases",
        params={"project": minilm.project["id"]},
        json={"name": "kb-viewer", "embedding_deployment": "minilm"},
        headers=viewer,
    )
    assert create.status_code == 403 and "knowledge-bases:write" in create.json()["detail"]


async def test_a_base_is_made_while_searches_hold_the_chunk_table(client, minilm, pg_url, monkeypatch):
    """Its partition is made alone and attached, which readers and writers do not block: a long
    search of another base (a transaction holding the chunk table) does not hold creation up."""
    monkeypatch.setattr(rag_repository, "DDL_LOCK_TIMEOUT", "200ms")
    async with await psycopg.AsyncConnection.connect(pg_url) as holder:
        await holder.execute("LOCK TABLE kb_chunks IN ACCESS SHARE MODE")  # what a search takes
        made = await client.post(
            "/knowledge-bases",
            params={"project": minilm.project["id"]},
            json={"name": f"kb-{uuid.uuid4().hex[:8]}", "embedding_deployment": "minilm"},
            headers=ADMIN,
        )
        await holder.rollback()
    assert made.status_code == 201, made.text


async def test_a_base_is_not_deleted_while_the_chunk_table_is_held(client, minilm, pg_url, monkeypatch):
    """Dropping a partition needs the chunk table to itself: behind a long transaction it gives
    up with a 503 (and changes nothing) instead of queueing every search of every base behind it."""
    kb = await make_kb(client, minilm)
    monkeypatch.setattr(rag_repository, "DDL_LOCK_TIMEOUT", "200ms")
    async with await psycopg.AsyncConnection.connect(pg_url) as holder:
        await holder.execute("LOCK TABLE kb_chunks IN ACCESS SHARE MODE")
        resp = await client.delete(f"/knowledge-bases/{kb['id']}", headers=ADMIN)
        await holder.rollback()
    assert resp.status_code == 503 and "busy" in resp.json()["detail"], resp.text
    assert (await client.get(f"/knowledge-bases/{kb['id']}", headers=ADMIN)).status_code == 200
