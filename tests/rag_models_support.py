"""What the RAG-model and chat-session tests share (import as `from rag_models_support import ...`):
a committed project with the real MiniLM behind the gateway (the `minilm` fixture), a scripted
chat deployment, a knowledge base of two documents embedded by the real model, and a RAG model
over them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from rag_support import MiniLM, add_document
from scripted_llm import ScriptedLlm, chat_deployment, routed
from support import ADMIN, eventually

KEYS_TEXT = (
    "To rotate an API key, create the new key first, roll it out to every client, then revoke the old key."
)
PANTRY_TEXT = "Flour, rice and dried beans keep for months in airtight jars in the pantry."
QUESTION = "How do I rotate an API key?"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class RagWorld:
    project_id: str
    chat: dict[str, Any]  # the scripted chat deployment
    kb: dict[str, Any]
    keys_doc: str  # document ids
    pantry_doc: str
    key: dict[str, str]  # a developer key's Authorization header
    key_id: str
    token: str


async def new_key(client: httpx.AsyncClient, project_id: str, role: str = "developer") -> tuple[str, str]:
    """(id, token) of a new key of the project."""
    resp = await client.post(
        f"/projects/{project_id}/keys", json={"name": unique(role), "role": role}, headers=ADMIN
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["id"], resp.json()["token"]


async def rag_world(app: Any, client: httpx.AsyncClient, minilm: MiniLM, llm: ScriptedLlm) -> RagWorld:
    project_id = minilm.project["id"]
    chat = await chat_deployment(app, client, project_id=project_id, llm=llm, name=unique("chat"))
    await routed(app, chat, llm)
    key_id, token = await new_key(client, project_id)
    key = {"Authorization": f"Bearer {token}"}
    made = await client.post(
        "/knowledge-bases",
        params={"project": project_id},
        json={"name": unique("kb"), "embedding_deployment": "minilm"},
        headers=key,
    )
    assert made.status_code == 201, made.text
    kb = made.json()
    keys_vec, pantry_vec = await minilm.embed([KEYS_TEXT, PANTRY_TEXT])
    keys_doc = await add_document(app, kb, source="keys.md", chunks=[(KEYS_TEXT, keys_vec, {"topic": "ops"})])
    pantry_doc = await add_document(
        app, kb, source="pantry.md", chunks=[(PANTRY_TEXT, pantry_vec, {"topic": "food"})]
    )
    return RagWorld(
        project_id=project_id,
        chat=chat,
        kb=kb,
        keys_doc=keys_doc,
        pantry_doc=pantry_doc,
        key=key,
        key_id=key_id,
        token=token,
    )


async def rag_model(
    client: httpx.AsyncClient, world: RagWorld, *, headers: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    body = {
        "name": unique("rag"),
        "chat_deployment": world.chat["name"],
        "knowledge_bases": [world.kb["name"]],
        **spec,
    }
    resp = await client.post(
        "/rag/models", params={"project": world.project_id}, json=body, headers=headers or world.key
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


async def listed(client: httpx.AsyncClient, world: RagWorld, name: str) -> None:
    """Wait until the gateway lists the model for the project's key."""

    async def seen() -> bool:
        models = await client.get("/v1/models", headers=world.key)
        return name in {m["id"] for m in models.json()["data"]}

    await eventually(seen)


async def cleanup(client: httpx.AsyncClient, world: RagWorld) -> None:
    await client.delete(f"/knowledge-bases/{world.kb['id']}", headers=ADMIN)
    await client.delete(f"/deployments/{world.chat['id']}", headers=ADMIN)
