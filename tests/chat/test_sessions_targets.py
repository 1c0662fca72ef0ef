"""`/chat` with a RAG model and with an agent, and an agent through `/v1`: a RAG turn records
the retrieved chunk ids with scores and keeps the user's own words in the session (the prompt
built from the template is only sent); an agent turn records its tool call, the tool's result
and the final answer as messages, and the call with arguments, result and duration in the trace.
"""

from __future__ import annotations

import json
from typing import Any

from rag_models_support import KEYS_TEXT, QUESTION, cleanup, listed, rag_model, rag_world
from rag_support import MiniLM, minilm, minilm_replica
from scripted_llm import ScriptedLlm, call

__all__ = ["minilm", "minilm_replica"]  # the fixtures


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_a_rag_turn_records_its_chunks_and_the_users_own_words(
    app: Any, committed_client: Any, minilm: MiniLM
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        world = await rag_world(app, client, minilm, llm)
        try:
            model = await rag_model(client, world, retrieval={"k": 1, "mode": "vector"})
            llm.reply("Create a new key, then revoke the old one [1].")
            body = {"model": model["name"], "messages": [{"role": "user", "content": QUESTION}]}
            first = await client.post("/chat", json=body, headers=world.key)
            assert first.status_code == 200, first.text
            extra = first.json()["converge"]
            assert [c["document_id"] for c in extra["citations"]] == [world.keys_doc]
            session_id = extra["session_id"]
            chunks = extra["trace"]["retrieval"]["chunks"]
            assert [c["document_id"] for c in chunks] == [world.keys_doc]
            assert 0.3 < chunks[0]["score"] == chunks[0]["similarity"] <= 1.0
            assert extra["trace"]["target"] == {
                "kind": "rag_model", "id": model["id"], "name": model["name"], "revision": 1,
            }  # fmt: skip

            llm.reply("Yes.")
            again = {
                "session_id": session_id,
                "messages": [{"role": "user", "content": "Is that all?"}],
                "stream": True,
            }
            streamed = await client.post("/chat", json=again, headers=world.key)
            events = _events(streamed.text)
            assert events[-1]["converge"]["session_id"] == session_id
            assert "citations" in events[-1]["converge"]
            sent = llm.requests[-1]["messages"]
            assert sent[0] == {"role": "user", "content": QUESTION}  # history: the words, not the prompt
            assert "Question: Is that all?" in sent[-1]["content"]

            recorded = (await client.get(f"/chat/sessions/{session_id}/messages", headers=world.key)).json()
            assert [m["content"] for m in recorded["items"] if m["role"] == "user"] == [
                QUESTION,
                "Is that all?",
            ]
            assert (
                recorded["items"][1]["trace"]["retrieval"]["chunks"][0]["chunk_id"] == chunks[0]["chunk_id"]
            )
        finally:
            await cleanup(client, world)


async def test_an_agent_turn_records_its_tool_call_and_result(
    app: Any, committed_client: Any, minilm: MiniLM
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        world = await rag_world(app, client, minilm, llm)
        try:
            spec = {
                "name": f"agent-{world.kb['name']}",
                "chat_deployment": world.chat["name"],
                "tools": {"knowledge_base_search": {"knowledge_bases": [world.kb["name"]], "k": 1}},
            }
            made = await client.post(
                "/agents", params={"project": world.project_id}, json=spec, headers=world.key
            )
            assert made.status_code == 201, made.text
            agent = made.json()
            llm.reply(
                tool_calls=[call("knowledge_base_search", {"query": "rotate an API key"}, id_="call_1")]
            )
            llm.reply("Create the new key first, then revoke the old one.")
            body = {"model": agent["name"], "messages": [{"role": "user", "content": QUESTION}]}
            resp = await client.post("/chat", json=body, headers=world.key)
            assert resp.status_code == 200, resp.text
            answer = resp.json()
            assert (
                answer["choices"][0]["message"]["content"]
                == "Create the new key first, then revoke the old one."
            )
            session_id = answer["converge"]["session_id"]
            # The tool's result (the chunk) went back to the model.
            tool_message = llm.requests[-1]["messages"][-1]
            assert tool_message["role"] == "tool" and KEYS_TEXT in tool_message["content"]

            items = (await client.get(f"/chat/sessions/{session_id}/messages", headers=world.key)).json()[
                "items"
            ]
            assert [m["role"] for m in items] == ["user", "assistant", "tool", "assistant"]
            assert items[1]["tool_calls"][0]["function"]["name"] == "knowledge_base_search"
            assert items[2]["tool_call_id"] == "call_1" and KEYS_TEXT in items[2]["content"]
            trace = items[3]["trace"]
            assert trace["target"]["kind"] == "agent" and trace["stop_reason"] == "stop"
            [step] = trace["tools"]
            assert step["tool"] == "knowledge_base_search"
            assert step["arguments"] == {"query": "rotate an API key"}
            assert KEYS_TEXT in json.dumps(step["result"]) and step["error"] in (None, "")
            assert step["duration_ms"] >= 0 and len(trace["model_calls"]) == 2

            # The same agent through /v1 as a virtual model, streamed.
            await listed(client, world, agent["name"])
            llm.reply("Plain answer.")
            streamed = await client.post(
                "/v1/chat/completions", json={**body, "stream": True}, headers=world.key
            )
            assert streamed.status_code == 200, streamed.text
            events = _events(streamed.text)
            assert (
                "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
                == "Plain answer."
            )
            assert events[-1]["converge"]["agent"]["name"] == agent["name"]
            assert events[-1]["converge"]["stop_reason"] == "stop"
        finally:
            await cleanup(client, world)
