"""`/rag/models`: create, list, get, update (a revision per change), revisions, delete; what a
spec names must be the project's own (another project's answers 404 as if absent); a name a
deployment or alias already answers to is a 409; bad input is a 422 naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from rag_models_support import unique
from rag_support import MiniLM, minilm, minilm_replica
from scripted_llm import ScriptedLlm, chat_deployment
from support import ADMIN, make_key, make_project

__all__ = ["minilm", "minilm_replica"]  # the fixtures


@pytest.fixture
async def bundle(app: Any, client: Any, minilm: MiniLM) -> dict[str, Any]:
    """A chat deployment and a knowledge base in the MiniLM project (rolled back after the test)."""
    project_id = minilm.project["id"]
    async with ScriptedLlm() as llm:
        chat = await chat_deployment(app, client, project_id=project_id, llm=llm, name=unique("chat"))
    kb = await client.post(
        "/knowledge-bases",
        params={"project": project_id},
        json={"name": unique("kb"), "embedding_deployment": "minilm"},
        headers=ADMIN,
    )
    assert kb.status_code == 201, kb.text
    return {"project": project_id, "chat": chat, "kb": kb.json()}


def _body(bundle: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return {
        "name": unique("rag"),
        "chat_deployment": bundle["chat"]["name"],
        "knowledge_bases": [bundle["kb"]["name"]],
        **overrides,
    }


async def test_create_list_get_update_revisions_delete(client: Any, bundle: dict[str, Any]) -> None:
    params = {"project": bundle["project"]}
    made = await client.post("/rag/models", params=params, json=_body(bundle), headers=ADMIN)
    assert made.status_code == 201, made.text
    model = made.json()
    assert model["revision"] == 1
    spec = model["spec"]
    assert spec["chat_deployment"] == {"id": bundle["chat"]["id"], "name": bundle["chat"]["name"]}
    assert spec["knowledge_bases"] == [{"id": bundle["kb"]["id"], "name": bundle["kb"]["name"]}]
    assert spec["retrieval"] == {"k": 5, "mode": "hybrid", "filters": {}, "min_score": 0.0}
    assert "{context}" in spec["prompt_template"] and "{question}" in spec["prompt_template"]

    listed = (await client.get("/rag/models", params=params, headers=ADMIN)).json()["items"]
    assert model["id"] in {m["id"] for m in listed}
    assert (await client.get(f"/rag/models/{model['id']}", headers=ADMIN)).json()["name"] == model["name"]

    changed = await client.patch(
        f"/rag/models/{model['id']}", json={"retrieval": {"k": 3, "min_score": 0.4}}, headers=ADMIN
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["revision"] == 2
    assert changed.json()["spec"]["retrieval"] == {"k": 3, "mode": "hybrid", "filters": {}, "min_score": 0.4}
    described = await client.patch(f"/rag/models/{model['id']}", json={"description": "ops"}, headers=ADMIN)
    assert described.json()["revision"] == 2 and described.json()["description"] == "ops"

    revisions = (await client.get(f"/rag/models/{model['id']}/revisions", headers=ADMIN)).json()
    assert [r["revision"] for r in revisions] == [2, 1]
    assert revisions[1]["spec"]["retrieval"]["k"] == 5

    assert (await client.delete(f"/rag/models/{model['id']}", headers=ADMIN)).status_code == 204
    gone = await client.get(f"/rag/models/{model['id']}", headers=ADMIN)
    assert gone.status_code == 404 and gone.headers["content-type"] == "application/problem+json"


async def test_another_projects_objects_answer_404_as_if_absent(
    app: Any, client: Any, bundle: dict[str, Any]
) -> None:
    params = {"project": bundle["project"]}
    model = (await client.post("/rag/models", params=params, json=_body(bundle), headers=ADMIN)).json()
    other = await make_project(client)
    stranger = await make_key(client, other["id"], "owner")
    assert (await client.get(f"/rag/models/{model['id']}", headers=stranger)).status_code == 404
    missing = await client.get(f"/rag/models/{model['id']}", headers=stranger)
    assert missing.json()["detail"] == f"RAG model {model['id']} not found"
    patched = await client.patch(f"/rag/models/{model['id']}", json={"description": "x"}, headers=stranger)
    assert patched.status_code == 404
    assert (await client.delete(f"/rag/models/{model['id']}", headers=stranger)).status_code == 404

    # A RAG model of the other project naming this project's base (by id) or deployment: 404.
    async with ScriptedLlm() as llm:
        their_chat = await chat_deployment(app, client, project_id=other["id"], llm=llm, name="chat")
    body = {
        "name": "borrower",
        "chat_deployment": their_chat["name"],
        "knowledge_bases": [bundle["kb"]["id"]],
    }
    borrowed = await client.post("/rag/models", params={"project": other["id"]}, json=body, headers=ADMIN)
    assert borrowed.status_code == 404 and borrowed.json()["field"] == "knowledge_bases.0"
    body = {**body, "chat_deployment": bundle["chat"]["id"], "knowledge_bases": ["nothing"]}
    borrowed = await client.post("/rag/models", params={"project": other["id"]}, json=body, headers=ADMIN)
    assert borrowed.status_code == 404 and borrowed.json()["field"] == "chat_deployment"
    listed = (await client.get("/rag/models", params={"project": other["id"]}, headers=ADMIN)).json()
    assert listed["items"] == []


async def test_a_name_a_deployment_or_alias_answers_to_is_a_409(client: Any, bundle: dict[str, Any]) -> None:
    params = {"project": bundle["project"]}
    taken = await client.post("/rag/models", params=params, json=_body(bundle, name="minilm"), headers=ADMIN)
    assert taken.status_code == 409 and "deployment 'minilm'" in taken.json()["detail"]
    alias = unique("alias")
    patched = await client.patch(
        f"/deployments/{bundle['chat']['id']}", json={"aliases": [alias]}, headers=ADMIN
    )
    assert patched.status_code == 200, patched.text
    taken = await client.post("/rag/models", params=params, json=_body(bundle, name=alias), headers=ADMIN)
    assert taken.status_code == 409 and taken.json()["field"] == "name"
    name = unique("rag")
    assert (
        await client.post("/rag/models", params=params, json=_body(bundle, name=name), headers=ADMIN)
    ).status_code == 201
    again = await client.post("/rag/models", params=params, json=_body(bundle, name=name), headers=ADMIN)
    assert again.status_code == 409


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prompt_template": "Answer: {question}"}, "prompt_template"),
        ({"retrieval": {"k": 51}}, "retrieval.k"),
        ({"retrieval": {"min_score": 1.5}}, "retrieval.min_score"),
        ({"retrieval": {"mode": "fuzzy"}}, "retrieval.mode"),
        ({"knowledge_bases": []}, "knowledge_bases"),
        ({"retrieval": {"filters": {"colour": "red"}}}, "retrieval.filters.colour"),
        ({"chat_deployment": "minilm"}, "chat_deployment"),
    ],
)
async def test_bad_input_is_a_422_naming_the_field(
    client: Any, bundle: dict[str, Any], overrides: dict[str, Any], field: str
) -> None:
    body = _body(bundle, **overrides)
    resp = await client.post("/rag/models", params={"project": bundle["project"]}, json=body, headers=ADMIN)
    assert resp.status_code == 422, resp.text
    assert field in resp.json()["detail"]
    listed = await client.get(
        "/rag/models", params={"project": bundle["project"], "limit": 500}, headers=ADMIN
    )
    assert body["name"] not in {m["name"] for m in listed.json()["items"]}


async def test_viewers_read_and_developers_write(client: Any, bundle: dict[str, Any]) -> None:
    params = {"project": bundle["project"]}
    viewer = await make_key(client, bundle["project"], "viewer")
    refused = await client.post("/rag/models", params=params, json=_body(bundle), headers=viewer)
    assert refused.status_code == 403 and "rag-models:write" in refused.json()["detail"]
    developer = await make_key(client, bundle["project"], "developer")
    made = await client.post("/rag/models", params=params, json=_body(bundle), headers=developer)
    assert made.status_code == 201, made.text
    assert (await client.get(f"/rag/models/{made.json()['id']}", headers=viewer)).status_code == 200
