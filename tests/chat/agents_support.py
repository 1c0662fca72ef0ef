"""What the agent and MCP tests share: the test MCP server (stdio argv, a streamable-HTTP process),
a project with a scripted chat deployment and keys, and small request helpers."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from scripted_llm import ScriptedLlm, chat_deployment, routed
from support import ADMIN, eventually, free_port, make_project

SERVER = Path(__file__).with_name("mcp_tools_server.py")
STDIO = [sys.executable, str(SERVER), "stdio"]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def http_mcp_server() -> AsyncIterator[str]:
    """The test MCP server over streamable HTTP in its own process; yields its /mcp URL."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SERVER),
        "http",
        "--port",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def listening() -> bool:
            assert proc.returncode is None, "the test MCP server exited"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            return True

        await eventually(listening, timeout=30)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@dataclass
class Bench:
    """A committed project with a scripted chat deployment the gateway routes to."""

    project: dict[str, Any]
    deployment: dict[str, Any]
    llm: ScriptedLlm
    developer: dict[str, str]  # Authorization header of a developer key
    developer_key_id: str
    owner: dict[str, str]


async def key(client: httpx.AsyncClient, project_id: str, role: str) -> tuple[dict[str, str], str]:
    resp = await client.post(
        f"/projects/{project_id}/keys", json={"name": unique(role), "role": role}, headers=ADMIN
    )
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}, resp.json()["id"]


async def bench(
    app: Any, client: httpx.AsyncClient, llm: ScriptedLlm, project: dict[str, Any] | None = None
) -> Bench:
    project = project or await make_project(client)
    deployment = await chat_deployment(app, client, project_id=project["id"], llm=llm, name=unique("bot"))
    developer, developer_id = await key(client, project["id"], "developer")
    owner, _ = await key(client, project["id"], "owner")
    await routed(app, deployment, llm)
    return Bench(
        project=project,
        deployment=deployment,
        llm=llm,
        developer=developer,
        developer_key_id=developer_id,
        owner=owner,
    )


async def mcp_server(
    client: httpx.AsyncClient, project_id: str, *, headers: dict[str, str] = ADMIN, **body: Any
) -> dict[str, Any]:
    resp = await client.post("/mcp-servers", params={"project": project_id}, json=body, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def agent(
    client: httpx.AsyncClient, b: Bench, *, headers: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    body = {"name": unique("agent"), "chat_deployment": b.deployment["name"], **spec}
    resp = await client.post(
        "/agents", params={"project": b.project["id"]}, json=body, headers=headers or b.developer
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


async def run(
    client: httpx.AsyncClient, agent_id: str, text: str, *, headers: dict[str, str]
) -> httpx.Response:
    return await client.post(
        f"/agents/{agent_id}/run",
        json={"messages": [{"role": "user", "content": text}]},
        headers=headers,
        timeout=60,
    )


def tool_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in request["messages"] if m["role"] == "tool"]
