"""HTTP for agents (`/agents`: versioned specs and runs) and the project's MCP tool servers
(`/mcp-servers`)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from converge.control.chat import refs
from converge.control.chat.agents import repository, service
from converge.control.chat.agents.schemas import (
    AgentCreate,
    AgentRead,
    AgentRevisionRead,
    AgentUpdate,
    McpCheckRead,
    McpServerCreate,
    McpServerRead,
    RunIn,
    RunRead,
)
from converge.control.projects.auth import PrincipalDep
from converge.control.projects.service import visible_project
from converge.deps import SessionDep, StateDep
from converge.errors import PROBLEM_RESPONSES
from converge.kit.pagination import Page, PageDep, encode_cursor, int_after, page_of, uuid_after
from converge.models import Agent, McpServer

router = APIRouter(prefix="/agents", tags=["agents"], responses=PROBLEM_RESPONSES)
mcp_router = APIRouter(prefix="/mcp-servers", tags=["mcp-servers"], responses=PROBLEM_RESPONSES)
_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
RUNS: dict[int | str, dict[str, Any]] = {
    429: {"description": "A model call was over the key's or project's limits", "content": _PROBLEM},
    502: {"description": "An MCP server did not start, or a model call failed", "content": _PROBLEM},
    503: {"description": "The chat deployment is not serving", "content": _PROBLEM},
}
ProjectQuery = Annotated[uuid.UUID, Query(description="The project that owns it")]


@router.post("", response_model=AgentRead, status_code=201)
async def create_agent(
    *, body: AgentCreate, session: SessionDep, principal: PrincipalDep, project: ProjectQuery
) -> AgentRead:
    """An agent: a chat deployment of the project, an optional ruleset, a system prompt, tools
    (knowledge-base search, an allow-listed HTTP GET, MCP servers' tools), a step limit and a
    token budget per run. Its name must not be a model name in the project already (409)."""
    owner = await visible_project(session, principal, project, permission="agents:write")
    agent = await service.create(session, principal, project=owner, body=body)
    return AgentRead.model_validate(agent)


@router.get("", response_model=Page[AgentRead])
async def list_agents(
    *,
    session: SessionDep,
    principal: PrincipalDep,
    page: PageDep,
    project: Annotated[uuid.UUID | None, Query(description="Only this project's agents")] = None,
) -> Page[Any]:
    if project is not None:
        await visible_project(session, principal, project, permission="agents:read")
    rows = await refs.list_for_project(
        session,
        Agent,
        project_id=project,
        visible=principal.visible_projects,
        after=uuid_after(page),
        limit=page.limit,
    )
    return page_of(rows, limit=page.limit, schema=AgentRead)


@router.get("/{agent_id}", response_model=AgentRead)
async def get_agent(*, agent_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> AgentRead:
    agent = await service.visible_agent(session, principal, agent_id=agent_id, permission="agents:read")
    return AgentRead.model_validate(agent)


@router.patch("/{agent_id}", response_model=AgentRead)
async def update_agent(
    *, agent_id: uuid.UUID, body: AgentUpdate, session: SessionDep, principal: PrincipalDep
) -> AgentRead:
    """Change fields; a change to the spec is a new revision (`ruleset` or `token_budget`
    null clears it)."""
    agent = await service.update(session, principal, agent_id=agent_id, body=body)
    return AgentRead.model_validate(agent)


@router.get("/{agent_id}/revisions", response_model=Page[AgentRevisionRead])
async def list_revisions(
    *, agent_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, page: PageDep
) -> Page[Any]:
    """Newest first."""
    agent = await service.visible_agent(session, principal, agent_id=agent_id, permission="agents:read")
    rows = await repository.revisions(session, agent.id, before=int_after(page), limit=page.limit)
    shown = rows[: page.limit]
    return Page(
        items=[AgentRevisionRead.model_validate(r) for r in shown],
        next_cursor=encode_cursor(shown[-1].revision) if len(rows) > page.limit else None,
    )


@router.delete("/{agent_id}", status_code=204, response_class=Response)
async def delete_agent(*, agent_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    await service.delete(session, principal, agent_id=agent_id)
    return Response(status_code=204)


@router.post("/{agent_id}/run", response_model=RunRead, responses=RUNS)
async def run_agent(
    *, agent_id: uuid.UUID, body: RunIn, session: SessionDep, principal: PrincipalDep, state: StateDep
) -> RunRead:
    """Run the agent once on `messages`: its model is called through the gateway as your key
    (limits, metering in /usage, the agent's ruleset), tools are called as it asks, until it
    answers or reaches its step limit or token budget. Returns the final message, every tool
    call with its arguments, result (cut to chat.tool_result_max_chars), error and duration,
    the summed usage, the stop reason and each model call's trace. Nothing is stored: chat
    sessions (`/chat`) record runs."""
    agent, result = await service.run(
        session, principal, agent_id=agent_id, body=body, gateway=state.gateway, settings=state.settings
    )
    return RunRead.model_validate({"agent_id": agent.id, "revision": agent.revision, **result.as_dict()})


# -- MCP servers -------------------------------------------------------------------------------


@mcp_router.post("", response_model=McpServerRead, status_code=201)
async def create_mcp_server(
    *, body: McpServerCreate, session: SessionDep, principal: PrincipalDep, project: ProjectQuery
) -> McpServerRead:
    """Register a project's MCP server: a streamable-HTTP `url` (project owners), or a stdio
    `command` (organisation admins only: it runs a program on the Converge host, without a
    shell, in its own process group, with none of Converge's environment)."""
    owner = await visible_project(session, principal, project, permission="mcp-servers:write")
    server = await service.create_mcp_server(session, principal, project=owner, body=body)
    return service.mcp_read(server)


@mcp_router.get("", response_model=Page[McpServerRead])
async def list_mcp_servers(
    *,
    session: SessionDep,
    principal: PrincipalDep,
    page: PageDep,
    project: Annotated[uuid.UUID | None, Query(description="Only this project's servers")] = None,
) -> Page[McpServerRead]:
    if project is not None:
        await visible_project(session, principal, project, permission="agents:read")
    rows = await refs.list_for_project(
        session,
        McpServer,
        project_id=project,
        visible=principal.visible_projects,
        after=uuid_after(page),
        limit=page.limit,
    )
    shown = rows[: page.limit]
    return Page(
        items=[service.mcp_read(r) for r in shown],
        next_cursor=encode_cursor(shown[-1].id) if len(rows) > page.limit else None,
    )


@mcp_router.get("/{server_id}", response_model=McpServerRead)
async def get_mcp_server(
    *, server_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> McpServerRead:
    server = await service.visible_mcp_server(
        session, principal, server_id=server_id, permission="agents:read"
    )
    return service.mcp_read(server)


@mcp_router.post(
    "/{server_id}/check",
    response_model=McpCheckRead,
    responses={502: {"description": "It did not start, or did not answer as MCP", "content": _PROBLEM}},
)
async def check_mcp_server(
    *, server_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, state: StateDep
) -> McpCheckRead:
    """Start the server, list its tools (with the names agents' models see), and stop it,
    within chat.mcp_start_timeout_s (and the server's own timeout_s)."""
    return await service.check_mcp_server(session, principal, server_id=server_id, settings=state.settings)


@mcp_router.delete("/{server_id}", status_code=204, response_class=Response)
async def delete_mcp_server(
    *, server_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> Response:
    """409 while an agent's current spec offers its tools."""
    await service.delete_mcp_server(session, principal, server_id=server_id)
    return Response(status_code=204)
