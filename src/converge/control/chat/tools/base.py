"""What an agent's model is offered: tools with OpenAI function schemas, and the box that runs them.

A tool call never raises into the agent loop: invalid JSON arguments, an unknown tool, a tool
that fails or runs past its timeout all come back as an `Outcome` with `error` set, which the
loop hands to the model as the tool's result (and records), as the issue asks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from converge.observability import tracing

# OpenAI's rule for function names.
NAME_RULE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_INVALID = re.compile(r"[^a-zA-Z0-9_-]")
MAX_NAME = 64


class ToolFailed(Exception):
    """A tool's own failure, with a message meant for the model (and the run's record)."""


@dataclass(frozen=True, slots=True)
class Tool:
    name: str  # the function name the model sees
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments object
    run: Callable[[dict[str, Any]], Awaitable[str]]
    timeout_s: float
    source: str = "builtin"  # "builtin" or "mcp:<server name>"

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    result: str | None  # what the tool returned, cut to the limit
    error: str | None
    duration_ms: float
    arguments: Any  # decoded, or the raw text when it did not decode

    def content(self) -> str:
        """The tool message the model is sent."""
        if self.error is not None:
            return json.dumps({"error": self.error})
        return self.result or ""


def function_name(*parts: str) -> str:
    """`mcp__<server>__<tool>` within OpenAI's rule (letters, digits, _ and -, at most 64): other
    characters become `_`, and a name changed that way or too long keeps its start and gains a
    hash of the whole."""
    raw = "__".join(parts)
    name = _INVALID.sub("_", raw)
    if len(name) > MAX_NAME or name != raw:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = name[: MAX_NAME - 9] + "_" + digest  # sanitised names stay apart: `a.b` is not `a_b`
    return name


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [truncated: {len(text)} characters in all]"


@dataclass
class Toolbox:
    """The tools one agent run may call, by function name."""

    tools: dict[str, Tool] = field(default_factory=dict)
    result_max_chars: int = 4000

    def add(self, tool: Tool) -> None:
        name = tool.name
        if name in self.tools:  # two MCP tools sanitised to one name: keep both, apart
            name = function_name(tool.name, str(len(self.tools)))
        self.tools[name] = Tool(
            name=name,
            description=tool.description,
            parameters=tool.parameters,
            run=tool.run,
            timeout_s=tool.timeout_s,
            source=tool.source,
        )

    def schemas(self) -> list[dict[str, Any]]:
        """The `tools` parameter of a chat completion."""
        return [tool.schema() for tool in self.tools.values()]

    async def call(self, name: str, arguments: str | None) -> Outcome:
        """Run one tool call the model asked for; its failure is the outcome's error, never raised."""
        with tracing.span("agent.tool_call", **{"gen_ai.tool.name": name}) as span:
            outcome = await self._call(name, arguments)
            if span is not None:
                span.set_attribute("converge.duration_ms", outcome.duration_ms)
                if outcome.error is not None:
                    span.set_attribute("error.type", "tool_error")
                    span.set_attribute("converge.tool_error", outcome.error[:500])
            return outcome

    async def _call(self, name: str, arguments: str | None) -> Outcome:
        started = time.perf_counter()

        def done(*, result: str | None = None, error: str | None = None, args: Any = arguments) -> Outcome:
            cut = truncate(result, self.result_max_chars) if result is not None else None
            return Outcome(
                result=cut,
                error=error,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                arguments=args,
            )

        tool = self.tools.get(name)
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "none"
            return done(error=f"unknown tool '{name}'; the tools are: {known}")
        try:
            decoded = json.loads(arguments) if arguments and arguments.strip() else {}
        except ValueError as exc:
            return done(error=f"the arguments are not valid JSON ({exc}); send a JSON object")
        if not isinstance(decoded, dict):
            return done(error="the arguments must be a JSON object", args=decoded)
        try:
            async with asyncio.timeout(tool.timeout_s):
                result = await tool.run(decoded)
        except TimeoutError:
            return done(error=f"the tool '{name}' did not answer within {tool.timeout_s:g} s", args=decoded)
        except ToolFailed as exc:
            return done(error=str(exc), args=decoded)
        except Exception as exc:  # a tool's bug is the model's error result, never the run's 500
            return done(error=f"the tool '{name}' failed: {type(exc).__name__}: {exc}", args=decoded)
        return done(result=result, args=decoded)
