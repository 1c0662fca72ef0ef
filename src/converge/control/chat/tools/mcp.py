"""MCP servers' tools, through the official `mcp` SDK (2.x) client: stdio or streamable HTTP.

Each connection lives in a task of its own that enters the SDK's client, lists the tools,
and then waits to be closed: the SDK's cancel scopes are entered and left in one task, so a
toolbox may be opened in one task and closed in another (a streamed answer's generator), and
starting is bounded by a plain timeout around a future.

A stdio server is a program on the Converge host. It runs without a shell (argv as given), in a
new session and process group that the SDK kills (SIGTERM, then SIGKILL, to the whole group)
when the connection closes, with a minimal environment: the SDK's short list (HOME, LOGNAME,
PATH, SHELL, TERM, USER) and the server's own `env`, never Converge's variables (its database
URL, secret key, bootstrap token). It still runs as the Converge process's user: it can read
what that user can read and reach what the host's network reaches, which is why only
organisation admins may register one. Its stderr goes to a temporary file, whose end is quoted
when it fails to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError

from converge.control.chat.tools.base import Tool, ToolFailed, function_name
from converge.models import McpServer

MAX_PAGES = 20  # tools/list pages read from one server
STDERR_TAIL = 600
CLOSE_TIMEOUT_S = 10.0  # the SDK's own shutdown is bounded (about 6 s for a stdio server)


class McpFailed(Exception):
    """A server that did not start, did not list its tools, or answered garbage."""

    def __init__(self, server: str, message: str) -> None:
        super().__init__(f"MCP server '{server}': {message}")
        self.server, self.message = server, message


@dataclass(frozen=True, slots=True)
class McpSpec:
    """What a connection needs of the row (no ORM object crosses into its task)."""

    id: uuid.UUID
    name: str
    transport: str
    url: str | None
    command: tuple[str, ...]
    env: dict[str, str]
    timeout_s: float

    @classmethod
    def of(cls, row: McpServer) -> McpSpec:
        return cls(
            id=row.id,
            name=row.name,
            transport=row.transport,
            url=row.url,
            command=tuple(row.command or ()),
            env=dict(row.env or {}),
            timeout_s=float(row.timeout_s),
        )


@dataclass
class McpConnection:
    spec: McpSpec
    tools: list[Any] = field(default_factory=list)  # mcp_types.Tool
    client: Client | None = None
    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Future[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _stderr: IO[str] | None = None

    async def start(self, *, timeout_s: float) -> None:
        """Connect and list the tools within `timeout_s`; raises McpFailed."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._task = asyncio.create_task(self._hold(), name=f"mcp:{self.spec.name}")
        done, _ = await asyncio.wait(
            {self._ready, self._task}, timeout=timeout_s, return_when="FIRST_COMPLETED"
        )
        if self._ready in done:
            self._ready.result()  # raises what _hold set
            return
        if not done:
            await self.close()
            raise McpFailed(self.spec.name, self._with_stderr(f"did not start within {timeout_s:g} s"))
        await self.close()
        raise McpFailed(self.spec.name, self._with_stderr("closed the connection while starting"))

    async def _hold(self) -> None:
        assert self._ready is not None
        try:
            async with Client(self._transport(), mode="auto") as client:
                self.tools = await _list_tools(client)
                self.client = client
                self._ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                failed = McpFailed(self.spec.name, self._with_stderr(describe(exc, self.spec)))
                self._ready.set_exception(failed)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.client = None

    def _transport(self) -> Any:
        if self.spec.transport == "http":
            assert self.spec.url is not None
            return self.spec.url  # the SDK's streamable-HTTP client
        self._stderr = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")  # noqa: SIM115
        program, *args = self.spec.command
        params = StdioServerParameters(command=program, args=list(args), env=dict(self.spec.env))
        return stdio_client(params, errlog=self._stderr)

    def _with_stderr(self, message: str) -> str:
        if self._stderr is None:
            return message
        with contextlib.suppress(Exception):
            self._stderr.flush()
            self._stderr.seek(0)
            tail = self._stderr.read()[-STDERR_TAIL:].strip()
            if tail:
                return f"{message}; its stderr ends: {tail}"
        return message

    async def close(self) -> None:
        self._stop.set()
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), CLOSE_TIMEOUT_S)
            except (TimeoutError, Exception):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._ready is not None and self._ready.done() and not self._ready.cancelled():
            self._ready.exception()  # retrieved: no "never retrieved" warning
        if self._stderr is not None:
            self._stderr.close()

    def offered(self, *, timeout_s: float) -> Iterator[Tool]:
        """The server's tools as the model sees them: `mcp__<server>__<tool>`."""
        for listed in self.tools:
            yield Tool(
                name=function_name("mcp", self.spec.name, listed.name),
                description=(listed.description or listed.title or listed.name)[:1024],
                parameters=_parameters(listed.input_schema),
                run=self._caller(listed.name),
                timeout_s=min(timeout_s, self.spec.timeout_s),
                source=f"mcp:{self.spec.name}",
            )

    def _caller(self, tool: str) -> Any:
        async def run(arguments: dict[str, Any]) -> str:
            client = self.client
            if client is None:
                raise ToolFailed(f"MCP server '{self.spec.name}' is no longer connected")
            try:
                result = await client.call_tool(tool, arguments)
            except MCPError as exc:
                raise ToolFailed(f"MCP server '{self.spec.name}' refused the call: {exc}") from exc
            text = _text(result)
            if result.is_error:
                raise ToolFailed(text or f"the tool '{tool}' failed (no message)")
            return text

        return run


async def _list_tools(client: Client) -> list[Any]:
    tools: list[Any] = []
    cursor = None
    for _ in range(MAX_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools += page.tools
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def _parameters(schema: Any) -> dict[str, Any]:
    """An MCP input schema as OpenAI's `parameters` (an object schema, always)."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return {"type": "object", "properties": {}}
    return {k: v for k, v in schema.items() if k != "title"}


def _text(result: Any) -> str:
    parts = []
    for item in result.content or []:
        kind = getattr(item, "type", "")
        if kind == "text":
            parts.append(item.text)
        else:
            parts.append(f"[{kind} content not shown]")
    if not parts and result.structured_content is not None:
        return json.dumps(result.structured_content, ensure_ascii=False)
    return "\n".join(parts)


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, which the SDK's task groups raise."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def describe(exc: BaseException, spec: McpSpec) -> str:
    """What failed, in words a person can act on."""
    found = leaves(exc)
    first = found[0]
    program = spec.command[0] if spec.command else ""
    if isinstance(first, FileNotFoundError):
        return f"the program '{program}' was not found (command[0] must be a path or on PATH)"
    if isinstance(first, PermissionError):
        return f"the program '{program}' may not be run (not executable)"
    if isinstance(first, MCPError):
        if "connection closed" in str(first).lower():
            return (
                "the server closed the connection before it answered (it exited, or it is not an MCP server)"
            )
        return f"it did not answer as an MCP server: {first}"
    name = type(first).__name__
    if spec.transport == "http" and ("Connect" in name or isinstance(first, OSError)):
        return f"could not connect to {spec.url}: {first or name}"
    return f"it failed while starting: {name}: {first}"
