"""Agents (versioned specs naming the project's objects) and MCP servers. Services flush, never
commit; every change is an event.

A spec is stored resolved: each object it names is kept as {"id", "name"} (the name as it was
when the revision was written, for reading), and the loop and the toolbox use the ids, only
inside the agent's project.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import Settings
from converge.control.chat import refs
from converge.control.chat.agents import repository
from converge.control.chat.agents.runner import AgentRun, run_agent
from converge.control.chat.agents.schemas import (
    AgentCreate,
    AgentSpecIn,
    AgentUpdate,
    McpCheckRead,
    McpServerCreate,
    McpServerRead,
    McpToolRead,
    RunIn,
    ToolsIn,
)
from converge.control.chat.tools.base import function_name
from converge.control.chat.tools.mcp import McpConnection, McpFailed, McpSpec
from converge.control.chat.tools.toolbox import open_toolbox
from converge.control.deployments.service import current_spec
from converge.control.events.service import record
from converge.control.projects.principal import Principal
from converge.control.projects.service import visible_project
from converge.errors import AppError, Conflict, Forbidden, NotFound, Unprocessable
from converge.gateway.api import Gateway, GatewayError
from converge.gateway.auth import SERVES
from converge.kit.unique import flush_or_conflict
from converge.models import Agent, AgentRevision, McpServer, Project


class McpServerFailed(AppError):
    status_code, type, title = 502, "mcp-server-failed", "MCP server failed"


class ModelCallFailed(AppError):
    """A model call of the run was refused or failed; the gateway's status and code are kept."""

    type, title = "model-call-failed", "The agent's model call failed"

    def __init__(self, exc: GatewayError) -> None:
        super().__init__(exc.message, extra={"code": exc.code} if exc.code else {})
        self.status_code = exc.status if 400 <= exc.status < 600 else 502  # noqa: PLR2004


class GatewayUnavailable(AppError):
    status_code, type, title = 503, "gateway-unavailable", "Gateway unavailable"


def _missing(field: str, *, what: str, ref: str, project: Project) -> NotFound:
    return NotFound(
        f"{field}: project '{project.name}' has no {what} '{ref}' (by id or name)", extra={"field": field}
    )


# -- reading -----------------------------------------------------------------------------------


async def visible_agent(
    session: AsyncSession, principal: Principal, *, agent_id: uuid.UUID, permission: str, lock: bool = False
) -> Agent:
    """The agent if the caller sees its project (else 404, exactly like a missing one) and holds
    `permission` there (else 403)."""
    agent = await refs.get(session, Agent, object_id=agent_id, lock=lock)
    if agent is None or not principal.sees(agent.project_id):
        raise NotFound(f"Agent {agent_id} not found")
    await visible_project(session, principal, agent.project_id, permission=permission)
    return agent


async def visible_mcp_server(
    session: AsyncSession, principal: Principal, *, server_id: uuid.UUID, permission: str
) -> McpServer:
    server = await refs.get(session, McpServer, object_id=server_id)
    if server is None or not principal.sees(server.project_id):
        raise NotFound(f"MCP server {server_id} not found")
    await visible_project(session, principal, server.project_id, permission=permission)
    return server


def mcp_read(server: McpServer) -> McpServerRead:
    return McpServerRead(
        id=server.id,
        project_id=server.project_id,
        name=server.name,
        transport=server.transport,
        url=server.url,
        command=list(server.command) if server.command is not None else None,
        env=sorted(server.env or {}),
        timeout_s=server.timeout_s,
        created_by=server.created_by,
        created_at=server.created_at,
    )


# -- resolving a spec ----------------------------------------------------------------------------


async def _chat_deployment(session: AsyncSession, project: Project, *, ref: str) -> dict[str, str]:
    deployment = await refs.deployment(session, project.id, ref=ref)
    if deployment is None:
        raise _missing("chat_deployment", what="deployment", ref=ref, project=project)
    server = str((await current_spec(session, deployment)).get("server") or "")
    if "chat" not in SERVES.get(server, frozenset({"chat"})):
        raise Unprocessable(
            f"chat_deployment: deployment '{deployment.name}' runs the '{server}' server, which does not "
            "answer /v1/chat/completions; name a chat deployment (llama-cpp)",
            extra={"field": "chat_deployment"},
        )
    return {"id": str(deployment.id), "name": deployment.name}


async def _ruleset(session: AsyncSession, project: Project, *, ref: str | None) -> dict[str, str] | None:
    if ref is None:
        return None
    found = await refs.ruleset(session, project.id, ref=ref)
    if found is None:
        raise _missing("ruleset", what="ruleset", ref=ref, project=project)
    return {"id": str(found.id), "name": found.name}


async def _tools(session: AsyncSession, project: Project, *, tools: ToolsIn) -> dict[str, Any]:
    out: dict[str, Any] = {"knowledge_base_search": None, "http_fetch": None, "mcp_servers": []}
    if tools.knowledge_base_search is not None:
        bases: list[dict[str, str]] = []
        for i, ref in enumerate(tools.knowledge_base_search.knowledge_bases):
            kb = await refs.knowledge_base(session, project.id, ref=ref)
            if kb is None:
                raise _missing(
                    f"tools.knowledge_base_search.knowledge_bases[{i}]",
                    what="knowledge base",
                    ref=ref,
                    project=project,
                )
            if all(b["id"] != str(kb.id) for b in bases):
                bases.append({"id": str(kb.id), "name": kb.name})
        out["knowledge_base_search"] = {"knowledge_bases": bases, "k": tools.knowledge_base_search.k}
    if tools.http_fetch is not None:
        out["http_fetch"] = {"allow": list(dict.fromkeys(tools.http_fetch.allow))}
    for i, ref in enumerate(tools.mcp_servers):
        server = await refs.mcp_server(session, project.id, ref=ref)
        if server is None:
            raise _missing(f"tools.mcp_servers[{i}]", what="MCP server", ref=ref, project=project)
        if all(s["id"] != str(server.id) for s in out["mcp_servers"]):
            out["mcp_servers"].append({"id": str(server.id), "name": server.name})
    return out


async def resolve_spec(session: AsyncSession, project: Project, *, body: AgentSpecIn) -> dict[str, Any]:
    return {
        "chat_deployment": await _chat_deployment(session, project, ref=body.chat_deployment),
        "ruleset": await _ruleset(session, project, ref=body.ruleset),
        "system_prompt": body.system_prompt,
        "tools": await _tools(session, project, tools=body.tools),
        "max_steps": body.max_steps,
        "token_budget": body.token_budget,
    }


async def _name_free(session: AsyncSession, project: Project, *, name: str) -> None:
    taken = await repository.name_in_use(session, project.id, name=name)
    if taken is not None:
        raise Conflict(
            f"name: '{name}' is already a model name in project '{project.name}' ({taken}); "
            "an agent is called by its name through /v1/chat/completions, so choose another",
            extra={"field": "name"},
        )


# -- agents ----------------------------------------------------------------------------------------


async def create(
    session: AsyncSession, principal: Principal, *, project: Project, body: AgentCreate
) -> Agent:
    await _name_free(session, project, name=body.name)
    spec = await resolve_spec(session, project, body=body)
    agent = Agent(
        project_id=project.id,
        name=body.name,
        description=body.description,
        revision=1,
        spec=spec,
        created_by=principal.subject,
    )
    session.add(agent)
    await flush_or_conflict(session, f"Project '{project.name}' already has an agent named '{body.name}'")
    session.add(AgentRevision(agent_id=agent.id, revision=1, spec=spec, author=principal.subject))
    await session.flush()
    await record(
        session,
        principal,
        action="agent.created",
        project_id=project.id,
        object_type="agent",
        object_id=agent.id,
        changes={"name": agent.name, "revision": 1, "spec": spec},
    )
    return agent


async def update(
    session: AsyncSession, principal: Principal, *, agent_id: uuid.UUID, body: AgentUpdate
) -> Agent:
    agent = await visible_agent(session, principal, agent_id=agent_id, permission="agents:write", lock=True)
    project = await visible_project(session, principal, agent.project_id, permission="agents:write")
    given = body.model_fields_set
    spec = dict(agent.spec)
    if "chat_deployment" in given:
        if body.chat_deployment is None:
            raise Unprocessable(
                "chat_deployment: an agent needs a chat deployment", extra={"field": "chat_deployment"}
            )
        spec["chat_deployment"] = await _chat_deployment(session, project, ref=body.chat_deployment)
    if "ruleset" in given:
        spec["ruleset"] = await _ruleset(session, project, ref=body.ruleset)
    if "tools" in given:
        spec["tools"] = await _tools(session, project, tools=body.tools or ToolsIn())
    if "token_budget" in given:
        spec["token_budget"] = body.token_budget
    for name in ("system_prompt", "max_steps"):
        if name in given:
            if getattr(body, name) is None:
                raise Unprocessable(f"{name}: must not be null", extra={"field": name})
            spec[name] = getattr(body, name)
    changes: dict[str, Any] = {}
    if body.description is not None and body.description != agent.description:
        agent.description = changes["description"] = body.description
    if spec != agent.spec:
        agent.revision += 1
        agent.spec = spec
        session.add(
            AgentRevision(agent_id=agent.id, revision=agent.revision, spec=spec, author=principal.subject)
        )
        changes |= {"revision": agent.revision, "spec": spec}
    await session.flush()
    if changes:
        await record(
            session,
            principal,
            action="agent.updated",
            project_id=agent.project_id,
            object_type="agent",
            object_id=agent.id,
            changes=changes,
        )
    return agent


async def delete(session: AsyncSession, principal: Principal, *, agent_id: uuid.UUID) -> None:
    agent = await visible_agent(session, principal, agent_id=agent_id, permission="agents:write", lock=True)
    name, project_id = agent.name, agent.project_id
    await repository.delete_row(session, agent)
    await record(
        session,
        principal,
        action="agent.deleted",
        project_id=project_id,
        object_type="agent",
        object_id=agent_id,
        changes={"name": name},
    )


async def run(
    session: AsyncSession,
    principal: Principal,
    *,
    agent_id: uuid.UUID,
    body: RunIn,
    gateway: Gateway | None,
    settings: Settings,
) -> tuple[Agent, AgentRun]:
    """One run of the agent on the given conversation, as the caller's key (its limits and
    metering; the bootstrap token and OIDC users run as the project)."""
    agent = await visible_agent(session, principal, agent_id=agent_id, permission="inference:use")
    if gateway is None:
        raise GatewayUnavailable(
            "This server runs without the gateway (gateway.enabled=false), and agents call their model "
            "through it; enable the gateway"
        )
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
        caller = await gateway.auth.caller_for(key_id=principal.key_id, project_id=agent.project_id)
        async with open_toolbox(
            session,
            agent_spec=agent.spec,
            project_id=agent.project_id,
            caller=caller,
            gateway=gateway,
            settings=settings,
        ) as toolbox:
            result = await run_agent(
                agent=agent,
                messages=messages,
                gateway=gateway,
                caller=caller,
                toolbox=toolbox,
                settings=settings,
            )
    except GatewayError as exc:
        raise ModelCallFailed(exc) from exc
    except McpFailed as exc:
        raise McpServerFailed(str(exc), extra={"mcp_server": exc.server}) from exc
    return agent, result


# -- MCP servers -------------------------------------------------------------------------------


async def create_mcp_server(
    session: AsyncSession, principal: Principal, *, project: Project, body: McpServerCreate
) -> McpServer:
    if body.transport == "stdio":
        if not principal.can_org("mcp-servers:stdio"):
            raise Forbidden(
                "A stdio MCP server runs a program on the Converge host, so only organisation admins "
                "register one ('mcp-servers:stdio'); register a streamable-HTTP server (transport 'http') instead"
            )
        if not body.command:
            raise Unprocessable("command: a stdio server needs its argv, e.g. [\"/usr/bin/my-mcp\", \"--flag\"]",
                                extra={"field": "command"})  # fmt: skip
        if body.url is not None:
            raise Unprocessable("url: a stdio server has no url", extra={"field": "url"})
    else:
        if not body.url:
            raise Unprocessable(
                "url: an http server needs its streamable-HTTP endpoint URL", extra={"field": "url"}
            )
        if body.command is not None or body.env:
            raise Unprocessable(
                "command: only a stdio server has a command and env", extra={"field": "command"}
            )
    server = McpServer(
        project_id=project.id,
        name=body.name,
        transport=body.transport,
        url=body.url,
        command=body.command,
        env=dict(body.env),
        timeout_s=body.timeout_s,
        created_by=principal.subject,
    )
    session.add(server)
    await flush_or_conflict(
        session, f"Project '{project.name}' already has an MCP server named '{body.name}'"
    )
    await record(
        session,
        principal,
        action="mcp_server.created",
        project_id=project.id,
        object_type="mcp_server",
        object_id=server.id,
        # The env's values may be the server's credentials: only their names are recorded.
        changes={"name": server.name, "transport": server.transport, "url": server.url,
                 "command": server.command, "env": sorted(server.env)},
    )  # fmt: skip
    return server


async def delete_mcp_server(session: AsyncSession, principal: Principal, *, server_id: uuid.UUID) -> None:
    server = await visible_mcp_server(session, principal, server_id=server_id, permission="mcp-servers:write")
    if server.transport == "stdio" and not principal.can_org("mcp-servers:stdio"):
        raise Forbidden("Only organisation admins remove a stdio MCP server ('mcp-servers:stdio')")
    users = await repository.agents_using_mcp_server(session, server.project_id, server_id=server.id)
    if users:
        raise Conflict(
            f"MCP server '{server.name}' is offered to the agents {', '.join(users)}; remove it from their "
            "tools first",
            extra={"agents": users},
        )
    name, project_id = server.name, server.project_id
    await repository.delete_row(session, server)
    await record(
        session,
        principal,
        action="mcp_server.deleted",
        project_id=project_id,
        object_type="mcp_server",
        object_id=server_id,
        changes={"name": name},
    )


async def check_mcp_server(
    session: AsyncSession, principal: Principal, *, server_id: uuid.UUID, settings: Settings
) -> McpCheckRead:
    """Start the server, list its tools, stop it. A failure is a 502 naming what failed."""
    server = await visible_mcp_server(session, principal, server_id=server_id, permission="agents:read")
    spec = McpSpec.of(server)
    started = time.perf_counter()
    connection = McpConnection(spec)
    try:
        await connection.start(timeout_s=min(settings.chat.mcp_start_timeout_s, spec.timeout_s))
        tools = [
            McpToolRead(
                name=t.name,
                function=function_name("mcp", spec.name, t.name),
                description=t.description or "",
                parameters=t.input_schema if isinstance(t.input_schema, dict) else {},
            )
            for t in connection.tools
        ]
    except McpFailed as exc:
        raise McpServerFailed(str(exc), extra={"mcp_server": spec.name}) from exc
    finally:
        await connection.close()
    return McpCheckRead(ok=True, tools=tools, took_ms=round((time.perf_counter() - started) * 1000, 2))
