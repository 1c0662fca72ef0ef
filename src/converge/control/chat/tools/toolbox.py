"""`open_toolbox`: the tools of one agent spec, ready to call, and closed again afterwards."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import Settings
from converge.control.chat.agents import repository
from converge.control.chat.tools import builtin
from converge.control.chat.tools.base import Toolbox
from converge.control.chat.tools.mcp import McpConnection, McpFailed, McpSpec
from converge.gateway.api import Caller, Gateway

__all__ = ["McpFailed", "Toolbox", "open_toolbox"]


def _ids(refs: list[dict[str, Any]] | None) -> list[uuid.UUID]:
    return [uuid.UUID(str(ref["id"])) for ref in refs or []]


@asynccontextmanager
async def open_toolbox(
    session: AsyncSession,
    *,
    agent_spec: dict[str, Any],
    project_id: uuid.UUID,
    caller: Caller,
    gateway: Gateway,
    settings: Settings,
) -> AsyncIterator[Toolbox]:
    """Start the spec's MCP servers (all at once, each within chat.mcp_start_timeout_s), list
    their tools, and yield the box with the built-in tools beside them; every server is stopped
    on exit. A server that fails to start raises `McpFailed` (nothing is left running).

    Only objects of `project_id` are used: a knowledge base or MCP server the spec names that
    is gone (or was never the project's) is simply not offered."""
    chat = settings.chat
    box = Toolbox(result_max_chars=chat.tool_result_max_chars)
    tools = agent_spec.get("tools") or {}
    search = tools.get("knowledge_base_search")
    if search:
        bases = await repository.knowledge_bases(session, project_id, ids=_ids(search.get("knowledge_bases")))
        if bases:
            box.add(
                builtin.knowledge_base_search(
                    session,
                    bases=bases,
                    k=int(search.get("k") or 5),
                    gateway=gateway,
                    caller=caller,
                    timeout_s=chat.tool_timeout_s,
                )
            )
    rows = await repository.mcp_servers_by_id(session, project_id, ids=_ids(tools.get("mcp_servers")))
    connections = [McpConnection(McpSpec.of(row)) for row in rows]
    http: httpx.AsyncClient | None = None
    try:
        if tools.get("http_fetch"):
            http = httpx.AsyncClient(
                timeout=httpx.Timeout(chat.http_fetch_timeout_s), follow_redirects=False, trust_env=False
            )
            box.add(builtin.http_fetch(allow=list(tools["http_fetch"]["allow"]), settings=chat, http=http))
        started = await asyncio.gather(
            *(c.start(timeout_s=min(chat.mcp_start_timeout_s, c.spec.timeout_s)) for c in connections),
            return_exceptions=True,
        )
        failures = [r for r in started if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        for connection in connections:
            for tool in connection.offered(timeout_s=chat.tool_timeout_s):
                box.add(tool)
        yield box
    finally:
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
        if http is not None:
            await http.aclose()
