"""Virtual models in the gateway: a project's RAG models and agents are listed in /v1/models
beside its deployments and answered by the handler the app sets (JSON and SSE), within the
caller's project only."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import delete
from support import ADMIN, make_key, make_project

from converge.gateway.errors import GatewayError
from converge.gateway.virtual import VirtualModel
from converge.models import Agent, RagModel


@pytest.fixture
async def virtual_rows(app: Any) -> AsyncIterator[Callable[[str], Awaitable[None]]]:
    """`await virtual_rows(project_id)` writes a RAG model and an agent row straight to the
    tables (what the gateway reads; their specs are not the gateway's business). They are
    deleted after the test: the session's database is shared, and the APIs read real specs."""
    state = app.state.converge
    made: list[uuid.UUID] = []

    async def write(project_id: str) -> None:
        made.append(uuid.UUID(project_id))
        async with state.sessions() as session, session.begin():
            session.add(RagModel(project_id=made[-1], name="docs-qa", revision=3, spec={}, created_by="t"))
            session.add(Agent(project_id=made[-1], name="helper", revision=1, spec={}, created_by="t"))
        await state.gateway.dataplane.reload()

    yield write
    async with state.sessions() as session, session.begin():
        for table in (RagModel, Agent):
            await session.execute(delete(table).where(table.project_id.in_(made)))


async def test_virtual_models_are_listed_and_dispatched(
    app: Any, committed_client: httpx.AsyncClient, virtual_rows: Callable[[str], Awaitable[None]]
) -> None:
    gateway = app.state.converge.gateway
    project, other = await make_project(committed_client), await make_project(committed_client)
    await virtual_rows(project["id"])
    key = await make_key(committed_client, project["id"], "developer")
    outsider = await make_key(committed_client, other["id"], "developer")
    seen: list[tuple[VirtualModel, dict[str, Any], Any]] = []

    async def handler(*, caller: Any, model: VirtualModel, body: dict[str, Any]) -> Any:
        seen.append((model, body, caller))
        if model.kind == "agent":
            raise GatewayError(422, "the agent cannot answer that", code="agent_failed")
        if not body.get("stream"):
            return {
                "object": "chat.completion",
                "model": model.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            }

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            for piece in ("a", "b"):
                yield {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": piece}}],
                }

        return chunks()

    previous = gateway.virtual_handler
    try:
        gateway.virtual_handler = None
        body = {"model": "docs-qa", "messages": [{"role": "user", "content": "q"}]}
        missing = await committed_client.post("/v1/chat/completions", json=body, headers=key)
        assert missing.status_code == 503 and missing.json()["error"]["code"] == "virtual_model_unavailable"

        gateway.virtual_handler = handler
        listed = (await committed_client.get("/v1/models", headers=key)).json()["data"]
        kinds = {m["id"]: m.get("kind") for m in listed}
        assert kinds["docs-qa"] == "rag_model" and kinds["helper"] == "agent"
        assert "docs-qa" not in {
            m["id"] for m in (await committed_client.get("/v1/models", headers=outsider)).json()["data"]
        }

        answer = await committed_client.post("/v1/chat/completions", json=body, headers=key)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "hi"
        model, sent, caller = seen[-1]
        assert (model.kind, model.name, model.revision) == ("rag_model", "docs-qa", 3)
        assert sent["messages"] == body["messages"] and str(caller.project.id) == project["id"]

        streamed = await committed_client.post(
            "/v1/chat/completions", json={**body, "stream": True}, headers=key
        )
        lines = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert [json.loads(line[6:])["choices"][0]["delta"]["content"] for line in lines[:-1]] == ["a", "b"]
        assert lines[-1] == "data: [DONE]"

        failed = await committed_client.post(
            "/v1/chat/completions", json={**body, "model": "helper"}, headers=key
        )
        assert failed.status_code == 422 and failed.json()["error"]["code"] == "agent_failed"

        other_project = await committed_client.post("/v1/chat/completions", json=body, headers=outsider)
        assert other_project.status_code == 404
        embeddings = await committed_client.post(
            "/v1/embeddings", json={"model": "docs-qa", "input": "x"}, headers=key
        )
        assert embeddings.status_code == 400 and embeddings.json()["error"]["param"] == "model"
    finally:
        gateway.virtual_handler = previous


async def test_a_deployment_of_the_same_name_wins(
    app: Any, committed_client: httpx.AsyncClient, virtual_rows: Callable[[str], Awaitable[None]]
) -> None:
    from scripted_llm import ScriptedLlm, chat_deployment, routed

    project = await make_project(committed_client)
    async with ScriptedLlm() as llm:
        deployment = await chat_deployment(
            app, committed_client, project_id=project["id"], llm=llm, name="docs-qa"
        )
        await routed(app, deployment, llm)
        await virtual_rows(project["id"])
        key = await make_key(committed_client, project["id"], "developer")
        llm.reply("from the deployment")
        body = {"model": "docs-qa", "messages": [{"role": "user", "content": "q"}]}
        answer = await committed_client.post("/v1/chat/completions", json=body, headers=key)
        assert answer.json()["choices"][0]["message"]["content"] == "from the deployment"
        listed = [
            m["id"]
            for m in (
                await committed_client.get("/v1/models", headers=ADMIN | {"openai-project": project["name"]})
            ).json()["data"]
        ]
        assert listed.count("docs-qa") == 1
