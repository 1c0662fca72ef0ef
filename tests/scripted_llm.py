"""A scripted OpenAI-compatible chat server for tests of the logic above a model (RAG prompts,
rulesets, chat sessions, agents' tool loops): a 135M model cannot be trusted to call tools or
follow rules, so the test says what the "model" answers, turn by turn, and reads what it was sent.

    async with ScriptedLlm() as llm:
        llm.reply("Hello there")                                    # a text answer
        llm.reply(tool_calls=[call("search", {"query": "keys"})])   # then a tool call
        deployment = await chat_deployment(app, client, project_id=..., llm=llm)
        ... requests through the gateway ...
        assert llm.requests[0]["messages"][-1]["content"] == "..."

It answers `POST /v1/chat/completions` (streaming and not, with `usage`), `/health/live` and
`/health/ready`. With no scripted reply left it answers "(no script)" so a test that asks more
than it scripted fails on its assertions rather than hanging. A plain module: import it as
`from scripted_llm import ScriptedLlm, call, chat_deployment`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import httpx
from aiohttp import web
from support import ADMIN, free_port

from converge.control.library import catalogue
from converge.models import Build

CHAT_MODEL = "smollm2-135m-instruct"  # the built-in catalogue's chat model (its version is reused)


def call(name: str, arguments: dict[str, Any] | str, *, id_: str | None = None) -> dict[str, Any]:
    """An OpenAI tool call; `arguments` as a dict (encoded) or a raw string (e.g. invalid JSON)."""
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {
        "id": id_ or f"call_{uuid.uuid4().hex[:8]}",
        "type": "function",
        "function": {"name": name, "arguments": raw},
    }


@dataclass
class Reply:
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    prompt_tokens: int = 11
    completion_tokens: int = 7
    chunks: list[str] | None = None  # how a streamed content is cut (default: by word)


@dataclass
class ScriptedLlm:
    """The server; `url` once entered. `requests` holds every decoded request body, in order."""

    model: str = "scripted"
    replies: deque[Reply] = field(default_factory=deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    def reply(
        self,
        content: str | None = None,
        *,
        tool_calls: list[dict[str, Any]] | None = None,
        chunks: list[str] | None = None,
        prompt_tokens: int = 11,
        completion_tokens: int = 7,
    ) -> None:
        self.replies.append(
            Reply(
                content=content,
                tool_calls=tool_calls,
                chunks=chunks,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        )

    async def __aenter__(self) -> ScriptedLlm:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health/live", self._ok)
        app.router.add_get("/health/ready", self._ok)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _ok(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        reply = self.replies.popleft() if self.replies else Reply(content="(no script)")
        created = int(time.time())
        ident = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        usage = {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        }
        finish = "tool_calls" if reply.tool_calls else "stop"
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": reply.content}
            if reply.tool_calls:
                message["tool_calls"] = reply.tool_calls
            return web.json_response(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": self.model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        async def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> None:
            payload = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                **extra,
            }
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())

        await chunk({"role": "assistant", "content": ""})
        if reply.content:
            pieces = reply.chunks or [w + " " for w in reply.content.split(" ")[:-1]] + [
                reply.content.split(" ")[-1]
            ]
            for piece in pieces:
                await chunk({"content": piece})
        for i, tool_call in enumerate(reply.tool_calls or []):
            await chunk({"tool_calls": [{"index": i, **tool_call}]})
        await chunk({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            payload = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
            }
            await response.write(
                f"data: {json.dumps({**payload, 'choices': [], 'usage': usage})}\n\n".encode()
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def chat_deployment(
    app: Any, client: httpx.AsyncClient, *, project_id: str, llm: ScriptedLlm, name: str = "chat"
) -> dict[str, Any]:
    """A llama-cpp deployment of the built-in chat model in the project, created through the API
    (admission, revisions, the gateway's snapshot as for any deployment), whose one replica the
    in-memory runtime reports at the scripted server. The session app's controller makes it
    Ready; callers wait for the gateway to route to it (`routed`)."""
    state = app.state.converge
    builtin = next(b for b in catalogue.BUILTINS if b.name == CHAT_MODEL)
    with mock.patch.object(catalogue, "BUILTINS", (builtin,)):
        await catalogue.seed(state.sessions, state.settings, state.artifacts)
    models = (await client.get("/models", params={"name": CHAT_MODEL}, headers=ADMIN)).json()["items"]
    model = next(m for m in models if m["name"] == CHAT_MODEL)
    version = (await client.get(f"/models/{model['id']}/versions", headers=ADMIN)).json()["items"][0]
    async with (state.session_factory or state.sessions)() as session, session.begin():
        session.add(
            Build(
                project_id=uuid.UUID(project_id),
                model_version_id=uuid.UUID(version["id"]),
                profile="cpu",
                server="llama-cpp",
                state="succeeded",
                results={},
                created_by="test",
            )
        )
    body = {
        "name": name,
        "model_version_id": version["id"],
        "server": "llama-cpp",
        "resources": {"cpu": 0.1, "memory_bytes": 1 << 20},
    }
    resp = await client.post("/deployments", params={"project": project_id}, json=body, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    deployment = resp.json()
    state.runtime.serve_at(uuid.UUID(deployment["id"]), [llm.url])
    return deployment


async def routed(app: Any, deployment: dict[str, Any], llm: ScriptedLlm, timeout: float = 30.0) -> None:
    """Wait until the gateway's snapshot routes the deployment to the scripted server."""
    import asyncio

    state = app.state.converge
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        route = state.gateway.dataplane.snapshot.by_id.get(uuid.UUID(deployment["id"]))
        if route is not None and route.endpoints == (llm.url,):
            return
        assert asyncio.get_running_loop().time() < deadline, f"not routed to the scripted server: {route}"
        await asyncio.sleep(0.05)
