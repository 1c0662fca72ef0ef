"""Agents and MCP servers over HTTP: what a client sends, what it reads back."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, StringConstraints, field_validator, model_validator

from converge.control.deployments.schemas import DeploymentName
from converge.kit.schemas import Input, Output

AgentName = DeploymentName  # a DNS label: it is also a `model` name in /v1/models
McpServerName = DeploymentName  # part of the tool names offered to the model (mcp__<server>__<tool>)
Ref = Annotated[str, StringConstraints(min_length=1, max_length=63)]  # a name or an id
Description = Annotated[str, StringConstraints(max_length=4096)]
SystemPrompt = Annotated[str, StringConstraints(max_length=32_768)]
UrlPrefix = Annotated[str, StringConstraints(min_length=8, max_length=2048)]
MAX_STEPS = 50
MAX_TOOL_REFS = 32


def check_http_url(value: str, *, what: str) -> str:
    """An absolute http(s) URL with a host and no credentials in it."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute http:// or https:// URL, not {value!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{what} must not carry credentials (user:password@)")
    if parts.fragment:
        raise ValueError(f"{what} must not have a #fragment")
    return value


class KnowledgeBaseSearchIn(Input):
    knowledge_bases: list[Ref] = Field(
        min_length=1,
        max_length=MAX_TOOL_REFS,
        description="Knowledge bases (names or ids) of the agent's project the tool searches",
    )
    k: int = Field(default=5, ge=1, le=50, description="Chunks returned per search (per base)")


class HttpFetchIn(Input):
    allow: list[UrlPrefix] = Field(
        min_length=1,
        max_length=MAX_TOOL_REFS,
        description="URL prefixes the tool may fetch (http or https; a redirect must stay inside them)",
    )

    @field_validator("allow")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        return [check_http_url(v, what="each allow prefix") for v in value]


class ToolsIn(Input):
    knowledge_base_search: KnowledgeBaseSearchIn | None = Field(
        default=None, description="The built-in knowledge-base search tool; omit for none"
    )
    http_fetch: HttpFetchIn | None = Field(
        default=None, description="The built-in HTTP GET tool, restricted to an allow-list"
    )
    mcp_servers: list[Ref] = Field(
        default_factory=list,
        max_length=MAX_TOOL_REFS,
        description="MCP servers (names or ids) of the project whose tools the agent is offered",
    )


class AgentSpecIn(Input):
    chat_deployment: Ref = Field(description="A deployment (name or id) of the project that serves chat")
    ruleset: Ref | None = Field(default=None, description="A ruleset (name or id) of the project")
    system_prompt: SystemPrompt = ""
    tools: ToolsIn = ToolsIn()
    max_steps: int = Field(default=8, ge=1, le=MAX_STEPS, description="Model calls per run, at most")
    token_budget: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Prompt plus completion tokens per run; none: no cap"
    )


class AgentCreate(AgentSpecIn):
    name: AgentName
    description: Description = ""


class AgentUpdate(Input):
    """Fields to change; every change that alters the spec makes a new revision."""

    description: Description | None = None
    chat_deployment: Ref | None = None
    ruleset: Ref | None = Field(default=None, description="null clears it")
    system_prompt: SystemPrompt | None = None
    tools: ToolsIn | None = None
    max_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    token_budget: int | None = Field(default=None, ge=1, le=10_000_000, description="null clears it")


class AgentRead(Output):
    id: uuid.UUID
    project_id: uuid.UUID
    name: str
    description: str
    revision: int
    spec: dict[str, Any] = Field(
        description="The current revision: chat_deployment, ruleset, system_prompt, tools, max_steps, "
        "token_budget, with ids and the names they had when it was written"
    )
    created_by: str
    created_at: datetime
    updated_at: datetime


class AgentRevisionRead(Output):
    revision: int
    spec: dict[str, Any]
    author: str
    created_at: datetime


# -- runs -----------------------------------------------------------------------------------------


class RunMessage(Input):
    role: Literal["user", "assistant", "tool", "system"]
    content: Annotated[str, StringConstraints(max_length=1 << 20)] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: Annotated[str, StringConstraints(max_length=255)] | None = None
    name: Annotated[str, StringConstraints(max_length=64)] | None = None


class RunIn(Input):
    messages: list[RunMessage] = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _a_conversation(self) -> RunIn:
        """What the OpenAI API accepts: a tool message answers a tool call of an earlier
        assistant message, and the run continues from the user's message or tool results."""
        asked: set[str] = set()
        for i, message in enumerate(self.messages):
            if message.role == "assistant":
                asked |= {str(call.get("id")) for call in message.tool_calls or [] if isinstance(call, dict)}
            elif message.role == "tool" and (
                message.tool_call_id is None or message.tool_call_id not in asked
            ):
                raise ValueError(
                    f"messages[{i}]: a tool message needs the tool_call_id of a tool call an earlier "
                    "assistant message made"
                )
        if self.messages[-1].role not in ("user", "tool"):
            raise ValueError("messages: the last message must be the user's, or the results of tool calls")
        return self


class StepRead(Output):
    step: int = Field(description="The model call (1-based) that asked for this tool call")
    tool: str
    tool_call_id: str | None = None
    arguments: Any = Field(description="The decoded arguments, or the raw text when it was not JSON")
    result: str | None = Field(description="What the model was given, cut to chat.tool_result_max_chars")
    error: str | None
    duration_ms: float


class RunRead(Output):
    agent_id: uuid.UUID
    revision: int
    message: dict[str, Any] = Field(description="The final assistant message")
    messages: list[dict[str, Any]] = Field(
        description="Every message the run added, in order: tool calls, tool results, the answer"
    )
    steps: list[StepRead]
    usage: dict[str, int]
    stop_reason: Literal["stop", "max_steps", "token_budget"]
    turns: list[dict[str, Any]] = Field(
        description="Each model call: deployment and revision, ruleset, guardrail hits, usage, latency"
    )


# -- MCP servers ------------------------------------------------------------------------------------

EnvName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
EnvValue = Annotated[str, StringConstraints(max_length=8192)]
Arg = Annotated[str, StringConstraints(min_length=0, max_length=4096)]


class McpServerCreate(Input):
    name: McpServerName
    transport: Literal["http", "stdio"]
    url: Annotated[str, StringConstraints(max_length=2048)] | None = Field(
        default=None, description="http: the streamable-HTTP endpoint, e.g. https://tools.example/mcp"
    )
    command: list[Arg] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="stdio: the program and its arguments (run without a shell); organisation admins only",
    )
    env: dict[EnvName, EnvValue] = Field(
        default_factory=dict,
        max_length=64,
        description="stdio: extra environment variables (the server inherits none of Converge's)",
    )
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="Start-up and per tool call")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value, what="url")

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value[0]:
            raise ValueError("the program (command[0]) must not be empty")
        return value


class McpServerRead(Output):
    id: uuid.UUID
    project_id: uuid.UUID
    name: str
    transport: str
    url: str | None
    command: list[str] | None
    env: list[str] = Field(description="The names of the extra environment variables (values are not shown)")
    timeout_s: float
    created_by: str
    created_at: datetime


class McpToolRead(Output):
    name: str = Field(description="The tool's name on the server")
    function: str = Field(description="The name the model is offered (mcp__<server>__<tool>)")
    description: str
    parameters: dict[str, Any]


class McpCheckRead(Output):
    ok: bool
    tools: list[McpToolRead]
    took_ms: float
