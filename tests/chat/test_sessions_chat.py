"""`/chat` sessions against a scripted chat deployment: turns are recorded with their traces and
the history goes back to the model; streamed turns too; replay answers again without recording;
sessions are private to their principal; a failed turn writes nothing; older turns are trimmed
to the context length (a message over it is a 400 naming the limit)."""

from __future__ import annotations

import json
from typing import Any

from rag_models_support import new_key
from scripted_llm import ScriptedLlm, chat_deployment, routed
from support import ADMIN, eventually, make_key, make_project


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def _world(
    app: Any, client: Any, llm: ScriptedLlm
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], str]:
    """A project with a scripted deployment 'bot' and a developer key (its header and id)."""
    project = await make_project(client)
    deployment = await chat_deployment(app, client, project_id=project["id"], llm=llm, name="bot")
    await routed(app, deployment, llm)
    key_id, token = await new_key(client, project["id"])
    return project, deployment, {"Authorization": f"Bearer {token}"}, key_id


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def test_turns_are_recorded_with_traces_and_the_history_is_sent(
    app: Any, committed_client: Any
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        project, deployment, key, key_id = await _world(app, client, llm)
        llm.reply("Hello there")
        first = await client.post(
            "/chat", json={"model": "bot", "messages": [{"role": "system", "content": "Be brief."}, _user("hi")]},
            headers=key,
        )  # fmt: skip
        assert first.status_code == 200, first.text
        session_id = first.headers["x-converge-session-id"]
        answer = first.json()
        assert answer["choices"][0]["message"]["content"] == "Hello there"
        assert answer["converge"]["session_id"] == session_id and answer["converge"]["turn"] == 2
        trace = answer["converge"]["trace"]
        assert trace["target"] == {"kind": "deployment", "id": deployment["id"], "name": "bot", "revision": 1}
        assert trace["deployment"] == {"id": deployment["id"], "revision": 1}
        assert trace["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        assert trace["latency_ms"] > 0

        llm.reply("Streaming now")
        body = {"session_id": session_id, "messages": [_user("and again")], "stream": True}
        streamed = await client.post("/chat", json=body, headers=key)
        assert streamed.status_code == 200 and streamed.headers["x-converge-session-id"] == session_id
        events = _events(streamed.text)
        assert (
            "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) == "Streaming now"
        )
        assert events[-1]["converge"]["session_id"] == session_id and events[-1]["converge"]["turn"] == 4
        # The whole conversation went to the model, the system message first.
        assert [(m["role"], m["content"]) for m in llm.requests[-1]["messages"]] == [
            ("system", "Be brief."), ("user", "hi"), ("assistant", "Hello there"), ("user", "and again"),
        ]  # fmt: skip

        messages = (await client.get(f"/chat/sessions/{session_id}/messages", headers=key)).json()["items"]
        assert [(m["turn"], m["role"]) for m in messages] == [
            (0, "system"), (1, "user"), (2, "assistant"), (3, "user"), (4, "assistant"),
        ]  # fmt: skip
        assert messages[4]["content"] == "Streaming now"
        assert messages[4]["trace"]["deployment"]["id"] == deployment["id"]
        assert messages[4]["trace"]["usage"]["completion_tokens"] == 7
        assert messages[1]["trace"] is None and messages[2]["trace"]["target"]["name"] == "bot"

        sessions = (await client.get("/chat/sessions", params={"project": project["id"]}, headers=key)).json()
        assert [s["id"] for s in sessions["items"]] == [session_id]
        detail = (await client.get(f"/chat/sessions/{session_id}", headers=key)).json()
        assert detail["messages"] == 5 and detail["title"] == "hi" and detail["target_kind"] == "deployment"

        # /usage counts both turns under the key.
        async def metered() -> bool:
            params = {"project": project["id"], "key": key_id, "group_by": "deployment"}
            rows = (await client.get("/usage", params=params, headers=ADMIN)).json()["data"]
            return any(r["deployment"] == "bot" and r["requests"] == 2 for r in rows)

        await eventually(metered)
        assert (await client.delete(f"/chat/sessions/{session_id}", headers=key)).status_code == 204
        assert (await client.get(f"/chat/sessions/{session_id}", headers=key)).status_code == 404


async def test_replay_answers_a_recorded_turn_again_and_records_nothing(
    app: Any, committed_client: Any
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        project, _, key, _ = await _world(app, client, llm)
        second = await chat_deployment(app, client, project_id=project["id"], llm=llm, name="other-bot")
        await routed(app, second, llm)
        llm.reply("First answer")
        first = await client.post(
            "/chat", json={"model": "bot", "messages": [_user("question")]}, headers=key
        )
        session_id = first.json()["converge"]["session_id"]
        llm.reply("Second answer")
        await client.post("/chat", json={"session_id": session_id, "messages": [_user("more")]}, headers=key)

        llm.reply("Replayed answer")
        replay = await client.post(f"/chat/sessions/{session_id}/replay", json={"turn": 1}, headers=key)
        assert replay.status_code == 200, replay.text
        both = replay.json()
        assert both["original"]["message"]["content"] == "First answer"
        assert both["replay"]["message"]["content"] == "Replayed answer"
        assert both["messages"] == 1 and both["replay"]["trace"]["target"]["name"] == "bot"
        assert [m["content"] for m in llm.requests[-1]["messages"]] == ["question"]

        llm.reply("From the other model")
        other = await client.post(
            f"/chat/sessions/{session_id}/replay", json={"turn": 3, "model": "other-bot"}, headers=key
        )
        assert other.status_code == 200, other.text
        assert other.json()["original"]["message"]["content"] == "Second answer"
        assert other.json()["replay"]["trace"]["target"]["name"] == "other-bot"
        assert llm.requests[-1]["model"] == "other-bot"
        assert [m["content"] for m in llm.requests[-1]["messages"]] == ["question", "First answer", "more"]

        messages = (await client.get(f"/chat/sessions/{session_id}/messages", headers=key)).json()["items"]
        assert len(messages) == 4  # nothing recorded by either replay
        bad = await client.post(f"/chat/sessions/{session_id}/replay", json={"turn": 0}, headers=key)
        assert bad.status_code == 422 and "turn" in bad.json()["detail"]


async def test_sessions_are_private_to_their_principal(app: Any, committed_client: Any) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        project, _, key, _ = await _world(app, client, llm)
        llm.reply("Mine")
        made = await client.post("/chat", json={"model": "bot", "messages": [_user("secret")]}, headers=key)
        session_id = made.json()["converge"]["session_id"]
        colleague = await make_key(client, project["id"], "developer")  # same project, another principal
        stranger = await make_key(client, (await make_project(client))["id"], "owner")
        for other in (colleague, stranger):
            assert (await client.get(f"/chat/sessions/{session_id}", headers=other)).status_code == 404
            assert (
                await client.get(f"/chat/sessions/{session_id}/messages", headers=other)
            ).status_code == 404
            turn = {"session_id": session_id, "messages": [_user("let me in")]}
            assert (await client.post("/chat", json=turn, headers=other)).status_code == 404
            replay = await client.post(f"/chat/sessions/{session_id}/replay", json={"turn": 1}, headers=other)
            assert replay.status_code == 404
            assert (await client.delete(f"/chat/sessions/{session_id}", headers=other)).status_code == 404
            assert (await client.get("/chat/sessions", headers=other)).json()["items"] == []
        # Another project's deployment cannot be named at all.
        refused = await client.post(
            "/chat", json={"model": "bot", "messages": [_user("x")]}, headers=stranger
        )
        assert refused.status_code == 404 and refused.json()["field"] == "model"
        viewer = await make_key(client, project["id"], "viewer")
        denied = await client.post("/chat", json={"model": "bot", "messages": [_user("x")]}, headers=viewer)
        assert denied.status_code == 403 and "chat:use" in denied.json()["detail"]
        assert len(llm.requests) == 1


async def test_a_failed_turn_writes_nothing(app: Any, committed_client: Any) -> None:
    client = committed_client
    llm = ScriptedLlm()
    async with llm:
        project, _, key, _ = await _world(app, client, llm)
        llm.reply("Recorded")
        made = await client.post("/chat", json={"model": "bot", "messages": [_user("one")]}, headers=key)
        session_id = made.json()["converge"]["session_id"]
    # The scripted server is gone: the upstream is unreachable.
    for stream in (False, True):
        turn = {"session_id": session_id, "messages": [_user("two")], "stream": stream}
        failed = await client.post("/chat", json=turn, headers=key)
        assert failed.status_code >= 500 and failed.headers["content-type"] == "application/problem+json"
        new = await client.post("/chat", json={"model": "bot", "messages": [_user("new")]}, headers=key)
        assert new.status_code >= 500
    messages = (await client.get(f"/chat/sessions/{session_id}/messages", headers=key)).json()["items"]
    assert [m["content"] for m in messages] == ["one", "Recorded"]
    sessions = (await client.get("/chat/sessions", params={"project": project["id"]}, headers=key)).json()
    assert [s["id"] for s in sessions["items"]] == [session_id]


async def test_older_turns_are_trimmed_to_the_context_and_an_oversized_message_is_refused(
    app: Any, committed_client: Any
) -> None:
    client = committed_client
    async with ScriptedLlm() as llm:
        project, deployment, key, _ = await _world(app, client, llm)
        small = await client.patch(
            f"/deployments/{deployment['id']}", json={"args": ["--n-ctx", "300"]}, headers=ADMIN
        )
        assert small.status_code == 200, small.text
        await routed(app, deployment, llm)
        long = " ".join(["word"] * 60)  # about 100 tokens as estimated (60 by a tokenizer)
        system = {"role": "system", "content": "Be brief."}
        llm.reply("ok")
        body = {"model": "bot", "max_tokens": 40, "messages": [system, _user("first " + long)]}
        first = await client.post("/chat", json=body, headers=key)
        assert first.status_code == 200, first.text
        session_id = first.json()["converge"]["session_id"]
        sent = []
        for n in range(4):
            llm.reply("ok")
            turn = {"session_id": session_id, "max_tokens": 40, "messages": [_user(f"turn {n} " + long)]}
            resp = await client.post("/chat", json=turn, headers=key)
            assert resp.status_code == 200, resp.text
            sent.append(resp.json()["converge"]["trace"]["trimmed_messages"])
        messages = llm.requests[-1]["messages"]
        assert messages[0] == system  # kept whatever is trimmed
        assert messages[-1]["content"] == "turn 3 " + long
        assert not any(m["content"].startswith("first") for m in messages)  # the oldest went first
        assert sent[-1] > 0 and sent == sorted(sent)
        recorded = (await client.get(f"/chat/sessions/{session_id}/messages", headers=key)).json()["items"]
        assert len(recorded) == 11  # trimming changes what is sent, never what is recorded

        huge = {"session_id": session_id, "max_tokens": 40, "messages": [_user(" ".join(["word"] * 400))]}
        refused = await client.post("/chat", json=huge, headers=key)
        assert refused.status_code == 400, refused.text
        problem = refused.json()
        assert problem["context_length"] == 300 and str(problem["limit"]) in problem["detail"]
        after = (await client.get(f"/chat/sessions/{session_id}/messages", headers=key)).json()["items"]
        assert len(after) == 11 and len(llm.requests) == 5
