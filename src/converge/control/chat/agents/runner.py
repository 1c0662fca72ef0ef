"""The agent loop: OpenAI function calling through the gateway, tool calls through the toolbox.

A step is one model call (`Gateway.chat`, with the caller's key, limits, metering and the
agent's ruleset, exactly like an HTTP request) and the tool calls it asks for. The loop ends:

- `stop`: the model answered without asking for a tool;
- `max_steps`: `max_steps` model calls were made and the last one still asked for tools;
- `token_budget`: the run's prompt plus completion tokens reached `token_budget` while the
  model still wanted tools (the completion of each call is capped to what is left).

Tools asked for by a call after which the loop stops are not run (their results would reach no
model), and that call's tool-call message is not in `messages`, so the conversation it leaves is
always valid to continue; the call itself is in `turns`. The final `message` is then a plain
assistant message saying why the agent stopped.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from converge.config import Settings
from converge.control.chat.tools.base import Toolbox
from converge.gateway.api import Caller, Gateway, GatewayError
from converge.gateway.inprocess import ChatTurn
from converge.models import Agent

StopReason = Literal["stop", "max_steps", "token_budget"]
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass
class AgentRun:
    message: dict[str, Any]  # the final assistant message
    messages: list[dict[str, Any]] = field(default_factory=list)  # what the run added, in order
    steps: list[dict[str, Any]] = field(default_factory=list)  # one per tool call
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USAGE_KEYS, 0))
    stop_reason: StopReason = "stop"
    turns: list[ChatTurn] = field(default_factory=list)  # each model call's trace

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the turns' dataclasses as dicts, ids as strings)."""
        return {
            "message": self.message,
            "messages": self.messages,
            "steps": self.steps,
            "usage": self.usage,
            "stop_reason": self.stop_reason,
            "turns": [turn_record(t) for t in self.turns],
        }


def turn_record(turn: ChatTurn) -> dict[str, Any]:
    raw = asdict(turn)
    raw.pop("body", None)  # the message is kept; the raw body repeats it
    return {k: (str(v) if isinstance(v, uuid.UUID) else v) for k, v in raw.items()}


def deployment_name(gateway: Gateway, spec: dict[str, Any]) -> str:
    """The name the gateway routes the agent's chat deployment by (its id is what the spec keeps)."""
    ref = spec["chat_deployment"]
    snapshot = gateway.dataplane.snapshot if gateway.dataplane is not None else None
    route = snapshot.by_id.get(uuid.UUID(str(ref["id"]))) if snapshot is not None else None
    if route is None:
        raise GatewayError(
            503,
            f"The agent's chat deployment '{ref.get('name')}' is not serving (deleted, or not ready yet)",
            type_="server_error",
            code="deployment_unavailable",
        )
    return route.name


def ruleset_id(spec: dict[str, Any]) -> uuid.UUID | None:
    ruleset = spec.get("ruleset")
    return uuid.UUID(str(ruleset["id"])) if ruleset else None


def _added(usage: dict[str, int], more: dict[str, Any] | None) -> None:
    for key in USAGE_KEYS:
        usage[key] += int((more or {}).get(key) or 0)


def _stopped(reason: StopReason, *, spec: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    why = (
        f"it reached its limit of {spec.get('max_steps')} model calls"
        if reason == "max_steps"
        else f"it spent its token budget of {spec.get('token_budget')} tokens"
    )
    said = (last.get("content") or "").strip()
    note = f"The agent stopped before it finished: {why}."
    return {"role": "assistant", "content": f"{said}\n\n{note}" if said else note}


async def run_agent(
    *,
    agent: Agent,
    messages: list[dict[str, Any]],
    gateway: Gateway,
    caller: Caller,
    toolbox: Toolbox,
    settings: Settings,
) -> AgentRun:
    """Run the loop on `messages` (the conversation so far, without the agent's system prompt,
    which is put first). Raises GatewayError when a model call fails (over a limit, a
    guardrail refusal, the deployment down); tool failures never raise."""
    spec = agent.spec
    model = deployment_name(gateway, spec)
    system = [{"role": "system", "content": spec["system_prompt"]}] if spec.get("system_prompt") else []
    max_steps = int(spec.get("max_steps") or 1)
    budget = spec.get("token_budget")
    tools = toolbox.schemas()
    run = AgentRun(message={})
    for step in range(1, max_steps + 1):
        body: dict[str, Any] = {"model": model, "messages": [*system, *messages, *run.messages]}
        if tools:
            body["tools"] = tools
        if budget is not None:
            left = int(budget) - run.usage["total_tokens"]
            if left < settings.gateway.default_max_tokens:
                body["max_tokens"] = left
        turn = await gateway.chat(caller, body, ruleset_id=ruleset_id(spec))
        run.turns.append(turn)
        _added(run.usage, turn.usage)
        reply = dict(turn.message or {"role": "assistant", "content": ""})
        calls = reply.get("tool_calls") or []
        if not calls:
            run.message = {"role": "assistant", "content": reply.get("content") or ""}
            run.messages.append(run.message)
            run.stop_reason = "stop"
            return run
        spent = budget is not None and run.usage["total_tokens"] >= int(budget)
        if spent or step == max_steps:
            run.stop_reason = "token_budget" if spent else "max_steps"
            run.message = _stopped(run.stop_reason, spec=spec, last=reply)
            run.messages.append(run.message)
            return run
        run.messages.append({"role": "assistant", "content": reply.get("content"), "tool_calls": calls})
        for call in calls:
            function = call.get("function") or {}
            name = str(function.get("name") or "")
            outcome = await toolbox.call(name, function.get("arguments"))
            run.steps.append(
                {
                    "step": step,
                    "tool": name,
                    "tool_call_id": call.get("id"),
                    "arguments": outcome.arguments,
                    "result": outcome.result,
                    "error": outcome.error,
                    "duration_ms": outcome.duration_ms,
                }
            )
            run.messages.append(
                {"role": "tool", "tool_call_id": call.get("id"), "content": outcome.content()}
            )
    raise AssertionError("unreachable: the last step returns")  # pragma: no cover
