"""A RAG model answering through the gateway: the real MiniLM embeds the question and the
chunks, a scripted chat model answers, and the test reads the prompt it was sent. Citations name
the document the answer came from; a minimum score above everything answers without sources and
says so; streamed and not; the official OpenAI SDK lists the RAG model and chats with it; the
inner calls are metered under the caller's key."""

from __future__ import annotations

import json
from typing import Any

import openai
from rag_models_support import KEYS_TEXT, PANTRY_TEXT, QUESTION, cleanup, listed, rag_model, rag_world
from rag_support import MiniLM, minilm, minilm_replica
from scripted_llm import ScriptedLlm
from support import ADMIN, eventually

from converge.control.chat.ragmodels.grounding import NO_SOURCES

__all__ = ["minilm", "minilm_replica"]  # the fixtures


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_a_rag_model_answers_from_its_knowledge_base_with_citations(
    app: Any, committed_client: Any, minilm: MiniLM
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        world = await rag_world(app, client, minilm, llm)
        try:
            model = await rag_model(client, world, retrieval={"k": 2, "mode": "hybrid", "min_score": 0.3})
            await listed(client, world, model["name"])
            llm.reply("Create the new key, roll it out, then revoke the old one [1].")
            body = {"model": model["name"], "messages": [{"role": "user", "content": QUESTION}]}
            resp = await client.post("/v1/chat/completions", json=body, headers=world.key)
            assert resp.status_code == 200, resp.text
            answer = resp.json()
            assert answer["model"] == model["name"]
            assert answer["choices"][0]["message"]["content"].startswith("Create the new key")

            # The chat deployment was sent the template over the retrieved chunk and the question.
            sent = llm.requests[-1]
            assert sent["model"] == world.chat["name"]
            prompt = sent["messages"][-1]["content"]
            assert KEYS_TEXT in prompt and f"Question: {QUESTION}" in prompt and "[1] keys" in prompt
            assert PANTRY_TEXT not in prompt  # below min_score 0.3 for this question

            extra = answer["converge"]
            assert extra["rag_model"] == {"id": model["id"], "name": model["name"], "revision": 1}
            assert extra["retrieval"]["used"] is True
            assert [c["document_id"] for c in extra["citations"]] == [world.keys_doc]
            citation = extra["citations"][0]
            assert citation["n"] == 1 and citation["source"] == "keys.md"
            assert citation["knowledge_base_id"] == world.kb["id"] and citation["title"] == "keys"

            # Streamed: the same citations on the last chunk, the content in the chunks before it.
            llm.reply("Rotate by creating a new key first.")
            streamed = await client.post(
                "/v1/chat/completions", json={**body, "stream": True}, headers=world.key
            )
            assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
            events = _events(streamed.text)
            assert all(e["model"] == model["name"] for e in events)
            text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
            assert text == "Rotate by creating a new key first."
            assert [c["document_id"] for c in events[-1]["converge"]["citations"]] == [world.keys_doc]
            assert all("converge" not in e for e in events[:-1])
        finally:
            await cleanup(client, world)


async def test_a_min_score_above_every_chunk_answers_without_sources_and_says_so(
    app: Any, committed_client: Any, minilm: MiniLM
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        world = await rag_world(app, client, minilm, llm)
        try:
            model = await rag_model(client, world, retrieval={"mode": "vector", "min_score": 0.99})
            await listed(client, world, model["name"])
            body = {"model": model["name"], "messages": [{"role": "user", "content": QUESTION}]}
            for stream in (False, True):
                llm.reply("I do not know.")
                resp = await client.post(
                    "/v1/chat/completions", json={**body, "stream": stream}, headers=world.key
                )
                assert resp.status_code == 200, resp.text
                extra = _events(resp.text)[-1]["converge"] if stream else resp.json()["converge"]
                assert extra["citations"] == []
                assert extra["retrieval"]["used"] is False
                assert "min_score 0.99" in extra["retrieval"]["reason"]
                prompt = llm.requests[-1]["messages"][-1]["content"]
                assert NO_SOURCES in prompt and KEYS_TEXT not in prompt and QUESTION in prompt
        finally:
            await cleanup(client, world)


async def test_the_openai_sdk_lists_and_chats_with_a_rag_model_metered_under_the_key(
    app: Any, committed_client: Any, minilm: MiniLM, live_server: Any
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm, live_server() as server:
        world = await rag_world(app, client, minilm, llm)
        try:
            model = await rag_model(client, world, retrieval={"k": 1})
            await listed(client, world, model["name"])
            sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=world.token, max_retries=0)
            assert model["name"] in {m.id async for m in sdk.models.list()}

            llm.reply("Revoke the old key last.")
            messages = [{"role": "user", "content": QUESTION}]
            chat = await sdk.chat.completions.create(model=model["name"], messages=messages)
            assert chat.choices[0].message.content == "Revoke the old key last."
            extra = (chat.model_extra or {})["converge"]
            assert [c["document_id"] for c in extra["citations"]] == [world.keys_doc]

            llm.reply("Stream it.")
            stream = await sdk.chat.completions.create(model=model["name"], messages=messages, stream=True)
            chunks = [c async for c in stream]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Stream it."
            last = (chunks[-1].model_extra or {})["converge"]
            assert [c["document_id"] for c in last["citations"]] == [world.keys_doc]

            # The question's embeddings and the chat calls are metered under the key that asked.
            async def metered() -> dict[str, Any] | None:
                usage = await client.get(
                    "/usage",
                    params={"project": world.project_id, "key": world.key_id, "group_by": "deployment"},
                    headers=ADMIN,
                )
                rows = {r["deployment"]: r for r in usage.json()["data"]}
                chat_row, embed_row = rows.get(world.chat["name"]), rows.get("minilm")
                if chat_row and embed_row and chat_row["requests"] >= 2 and embed_row["requests"] >= 2:
                    return rows
                return None

            rows = await eventually(metered)
            assert rows[world.chat["name"]]["completion_tokens"] >= 14  # two scripted answers of 7
        finally:
            await cleanup(client, world)
