"""The runtime that answers chat targets: a deployment, a RAG model or an agent.

Two callers use it: the gateway, for a `/v1/chat/completions` whose `model` is a virtual model
(`virtual_handler`, wired in app.py), and `/chat` sessions. Every model call goes through
`Gateway.chat` / `Gateway.chat_stream`, so it is authenticated, limited, held to rulesets and
metered under the caller's key exactly like a request from outside.

A RAG model's answer carries a `converge` field (on the completion, and on the last chunk of a
stream):

    "converge": {
      "rag_model": {"id", "name", "revision"},
      "citations": [{"n", "knowledge_base_id", "document_id", "chunk_id", "title", "source",
                     "page", "score"}],
      "retrieval": {"used": true | false, "reason": "..." (when nothing was used)}
    }

An agent's carries `{"agent": {...}, "tools": [steps], "stop_reason"}`. No database transaction
is held while a model answers (an agent's run, whose tools may read the database, excepted).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.chat.ragmodels import grounding
from converge.control.chat.ragmodels.grounding import Grounding
from converge.deps import unit_of_work
from converge.gateway.api import Caller, ChatStream, ChatTurn, Gateway, GatewayError
from converge.models import Agent, Deployment, RagModel

if TYPE_CHECKING:
    from converge.gateway.virtual import VirtualModel
    from converge.state import State

Finish = Callable[["Outcome"], Awaitable[dict[str, Any]]]
# What a chat request may carry beside model and messages: forwarded to the deployment as given
# (the gateway checks them against the server's parameter table).
RESERVED = frozenset({"model", "messages", "session_id", "ruleset", "project"})


@dataclass(frozen=True, slots=True)
class Target:
    """What answers a turn."""

    kind: str  # "deployment" | "rag_model" | "agent"
    id: uuid.UUID
    name: str
    revision: int
    project_id: uuid.UUID
    deployment_id: uuid.UUID | None  # the chat deployment that answers (for an agent, its model's)
    deployment: str  # that deployment's name: the `model` of the inner calls
    spec: dict[str, Any] = field(default_factory=dict)
    ruleset_id: uuid.UUID | None = None  # the RAG model's or agent's own
    row: Any = None  # the agent's ORM row (its runner takes it)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": str(self.id), "name": self.name, "revision": self.revision}


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)) if value else None
    except ValueError:
        return None


def _ref_id(ref: Any) -> uuid.UUID | None:
    return _uuid(ref.get("id")) if isinstance(ref, dict) else _uuid(ref)


async def _deployment_target(session: AsyncSession, row: Deployment) -> Target:
    return Target(
        kind="deployment",
        id=row.id,
        name=row.name,
        revision=row.revision,
        project_id=row.project_id,
        deployment_id=row.id,
        deployment=row.name,
    )


def rag_target(row: RagModel) -> Target:
    chat = row.spec["chat_deployment"]
    return Target(
        kind="rag_model",
        id=row.id,
        name=row.name,
        revision=row.revision,
        project_id=row.project_id,
        deployment_id=_ref_id(chat),
        deployment=chat["name"],
        spec=row.spec,
        ruleset_id=_ref_id(row.spec.get("ruleset")),
    )


def agent_target(row: Agent) -> Target:
    chat = row.spec.get("chat_deployment") or {}
    return Target(
        kind="agent",
        id=row.id,
        name=row.name,
        revision=row.revision,
        project_id=row.project_id,
        deployment_id=_ref_id(chat),
        deployment=chat.get("name", "") if isinstance(chat, dict) else str(chat),
        spec=row.spec,
        ruleset_id=_ref_id(row.spec.get("ruleset")),
        row=row,
    )


async def resolve(session: AsyncSession, *, project_id: uuid.UUID, name: str) -> Target | None:
    """The project's target of that name, as the gateway resolves `model`: a deployment (by name,
    then alias) first, then a RAG model, then an agent. Another project's answers None."""
    q = select(Deployment).where(Deployment.project_id == project_id, Deployment.deleting.is_(False))
    row = await session.scalar(q.where(Deployment.name == name)) or await session.scalar(
        q.where(Deployment.aliases.contains([name]))
    )
    if row is not None:
        return await _deployment_target(session, row)
    rag = await session.scalar(
        select(RagModel).where(RagModel.project_id == project_id, RagModel.name == name)
    )
    if rag is not None:
        return rag_target(rag)
    agent = await session.scalar(select(Agent).where(Agent.project_id == project_id, Agent.name == name))
    return agent_target(agent) if agent is not None else None


async def load(session: AsyncSession, *, kind: str, target_id: uuid.UUID) -> Target | None:
    if kind == "rag_model":
        rag = await session.get(RagModel, target_id)
        return rag_target(rag) if rag is not None else None
    if kind == "agent":
        agent = await session.get(Agent, target_id)
        return agent_target(agent) if agent is not None else None
    row = await session.get(Deployment, target_id)
    return await _deployment_target(session, row) if row is not None and not row.deleting else None


# -- outcomes ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Prepared:
    """A turn ready to send: the inner request, and what retrieval found for it."""

    target: Target
    body: dict[str, Any]  # model = the chat deployment
    ruleset_id: uuid.UUID | None
    grounding: Grounding | None = None
    dropped: int = 0  # messages trimmed to fit the context


@dataclass(slots=True)
class Outcome:
    """What a target answered, with the turn's trace and the response's `converge` field."""

    message: dict[str, Any]
    added: list[dict[str, Any]]  # the messages the turn adds after the user's, in order
    trace: dict[str, Any]
    extra: dict[str, Any]
    usage: dict[str, Any] | None
    finish_reason: str | None
    body: dict[str, Any] | None = None

    def completion(self, *, model: str) -> dict[str, Any]:
        """A chat.completion object for the answer, with the `converge` field."""
        body = (
            dict(self.body)
            if self.body
            else _completion(self.message, usage=self.usage, finish=self.finish_reason)
        )
        return {**body, "model": model, "converge": self.extra}


def _completion(
    message: dict[str, Any], *, usage: dict[str, Any] | None, finish: str | None
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "",
        "choices": [{"index": 0, "message": message, "finish_reason": finish or "stop"}],
        "usage": usage,
    }


def turn_trace(turn: ChatTurn) -> dict[str, Any]:
    """The trace fields of one inner model call (a `ChatTurn`)."""
    return {
        "deployment": {
            "id": str(turn.deployment_id) if turn.deployment_id else None,
            "revision": turn.deployment_revision,
        },
        "ruleset": turn.ruleset,
        "guardrail_hits": list(turn.hits or []),
        "usage": turn.usage,
        "latency_ms": round(turn.latency_ms, 2) if turn.latency_ms is not None else None,
        "ttft_ms": round(turn.ttft_ms, 2) if turn.ttft_ms is not None else None,
    }


def _rag_extra(prepared: Prepared) -> dict[str, Any]:
    if prepared.target.kind != "rag_model" or prepared.grounding is None:
        return {}
    return {"rag_model": _named(prepared.target), **prepared.grounding.report()}


def _named(target: Target) -> dict[str, Any]:
    return {"id": str(target.id), "name": target.name, "revision": target.revision}


def _base_trace(prepared: Prepared) -> dict[str, Any]:
    trace: dict[str, Any] = {"target": prepared.target.describe(), "trimmed_messages": prepared.dropped}
    if prepared.grounding is not None:
        trace["retrieval"] = {
            "used": prepared.grounding.used,
            "reason": prepared.grounding.reason or None,
            "chunks": prepared.grounding.trace(),
        }
    return trace


def _refused(turn: ChatTurn) -> GatewayError:
    """A ChatTurn that did not succeed, as the error its body holds."""
    error = (turn.body or {}).get("error") if isinstance(turn.body, dict) else None
    error = error if isinstance(error, dict) else {}
    return GatewayError(
        turn.status,
        str(error.get("message") or f"The model answered {turn.status}"),
        type_=str(error.get("type") or "invalid_request_error"),
        param=error.get("param"),
        code=error.get("code"),
    )


def _gone(exc: GatewayError, target: Target) -> GatewayError:
    """A RAG model whose chat deployment was deleted says so, instead of naming a model the
    caller never asked for."""
    if exc.code != "model_not_found" or target.kind == "deployment":
        return exc
    return GatewayError(
        503,
        f"The chat deployment '{target.deployment}' of {target.kind.replace('_', ' ')} '{target.name}' "
        "does not exist any more; point it at another deployment",
        type_="server_error",
        code="deployment_unavailable",
    )


# -- the runtime -------------------------------------------------------------------------------


class ChatRuntime:
    """Answers targets through the gateway; one per process, built in the lifespan."""

    def __init__(self, state: State, gateway: Gateway) -> None:
        self.state, self.gateway = state, gateway

    async def prepare(
        self,
        session: AsyncSession,
        *,
        target: Target,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        caller: Caller,
        ruleset_id: uuid.UUID | None = None,
        fit: Callable[[list[dict[str, Any]]], Awaitable[tuple[list[dict[str, Any]], int]]] | None = None,
    ) -> Prepared:
        """The inner request for a deployment or RAG model: for a RAG model, the last user
        message becomes the prompt template over the retrieved sources. `fit` trims the result
        to the context (sessions); `ruleset_id` overrides the target's own."""
        found: Grounding | None = None
        outgoing = list(messages)
        if target.kind == "rag_model":
            index, question = grounding.question_of(messages)
            found = await grounding.ground(
                session, spec=target.spec, question=question, caller=caller, gateway=self.gateway
            )
            prompt = grounding.render(
                target.spec["prompt_template"], sources=found.sources, question=question
            )
            outgoing[index] = {"role": "user", "content": prompt}
        dropped = 0
        if fit is not None:
            outgoing, dropped = await fit(outgoing)
        body = {k: v for k, v in params.items() if k not in RESERVED}
        body |= {"model": target.deployment, "messages": outgoing}
        return Prepared(
            target=target,
            body=body,
            ruleset_id=ruleset_id or target.ruleset_id,
            grounding=found,
            dropped=dropped,
        )

    async def complete(self, prepared: Prepared, *, caller: Caller) -> Outcome:
        body = {k: v for k, v in prepared.body.items() if k not in ("stream", "stream_options")}
        try:
            turn = await self.gateway.chat(caller, body, ruleset_id=prepared.ruleset_id)
        except GatewayError as exc:
            raise _gone(exc, prepared.target) from None
        if turn.status != 200:
            raise _refused(turn)
        message = dict(turn.message or {"role": "assistant", "content": ""})
        choices = (turn.body or {}).get("choices") or [{}]
        trace = {**_base_trace(prepared), **turn_trace(turn)}
        return Outcome(
            message=message,
            added=[message],
            trace=trace,
            extra=_rag_extra(prepared),
            usage=turn.usage,
            finish_reason=choices[0].get("finish_reason"),
            body=turn.body,
        )

    async def stream(
        self, prepared: Prepared, *, caller: Caller, model: str, finish: Finish | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """The answer as chat.completion.chunk objects (`model` written on each), the last one
        carrying the `converge` field. Errors before the first chunk are raised here; `finish`
        runs once the answer is complete, before the last chunk goes out, and adds to its
        `converge` field (sessions record the turn there)."""
        body = {**prepared.body, "stream": True}
        try:
            upstream = await self.gateway.chat_stream(caller, body, ruleset_id=prepared.ruleset_id)
        except GatewayError as exc:
            raise _gone(exc, prepared.target) from None
        return self._relay(upstream, prepared=prepared, model=model, finish=finish)

    async def _relay(
        self, upstream: ChatStream, *, prepared: Prepared, model: str, finish: Finish | None
    ) -> AsyncIterator[dict[str, Any]]:
        held: dict[str, Any] | None = None
        finish_reason = None
        async for chunk in upstream:
            for choice in chunk.get("choices") or []:
                finish_reason = choice.get("finish_reason") or finish_reason
            if held is not None:
                yield held
            held = {**chunk, "model": model}
        turn = upstream.turn
        assert turn is not None  # complete once iteration ended
        if upstream.error is not None:  # the answer failed part way: nothing is recorded
            error = upstream.error
            raise GatewayError(
                turn.status if turn.status >= 400 else 502,
                str(error.get("message") or "The answer failed part way"),
                type_=str(error.get("type") or "server_error"),
                code=error.get("code"),
            )
        if turn.status != 200:
            raise _refused(turn)
        message = dict(turn.message or {"role": "assistant", "content": ""})
        outcome = Outcome(
            message=message,
            added=[message],
            trace={**_base_trace(prepared), **turn_trace(turn)},
            extra=_rag_extra(prepared),
            usage=turn.usage,
            finish_reason=upstream.finish_reason or finish_reason,
        )
        if finish is not None:
            outcome.extra |= await finish(outcome)
        if held is None:
            held = _chunk(model, delta={}, finish=finish_reason or "stop")
        yield {**held, "converge": outcome.extra}

    # -- agents ----------------------------------------------------------------------------------

    async def run_agent(self, *, target: Target, messages: list[dict[str, Any]], caller: Caller) -> Outcome:
        """The agents' toolbox (MCP servers started, tools listed, stopped after) and their
        function-calling loop (`agents/runner.py`); every tool call goes into the trace."""
        from converge.control.chat.agents.runner import run_agent as run
        from converge.control.chat.tools.mcp import McpFailed
        from converge.control.chat.tools.toolbox import open_toolbox

        settings = self.state.settings
        try:
            async with unit_of_work(self.state) as session:
                async with open_toolbox(
                    session,
                    agent_spec=target.spec,
                    project_id=target.project_id,
                    caller=caller,
                    gateway=self.gateway,
                    settings=settings,
                ) as toolbox:
                    result = await run(
                        agent=target.row,
                        messages=messages,
                        gateway=self.gateway,
                        caller=caller,
                        toolbox=toolbox,
                        settings=settings,
                    )
        except McpFailed as exc:  # a tool server that did not start: the run never began
            raise GatewayError(502, str(exc), type_="server_error", code="mcp_server_failed") from None
        return agent_outcome(target, result)

    # -- the gateway's virtual models ----------------------------------------------------------------

    async def virtual_handler(
        self, *, caller: Caller, model: VirtualModel, body: dict[str, Any]
    ) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        """`Gateway.virtual_handler`: a RAG model or an agent called through /v1/chat/completions."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise GatewayError(400, "'messages' must be a non-empty list of messages", param="messages")
        async with unit_of_work(self.state) as session:
            target = await load(session, kind=model.kind, target_id=model.id)
            if target is None or target.project_id != caller.project.id:
                raise GatewayError(
                    404,
                    f"The model '{model.name}' does not exist or you do not have access to it",
                    param="model",
                    code="model_not_found",
                )
            if target.kind == "rag_model":
                prepared = await self.prepare(
                    session, target=target, messages=messages, params=body, caller=caller
                )
        if target.kind == "agent":
            outcome = await self.run_agent(target=target, messages=messages, caller=caller)
            if body.get("stream"):
                return chunks_of(outcome, model=target.name)
            return outcome.completion(model=target.name)
        if body.get("stream"):
            return await self.stream(prepared, caller=caller, model=target.name)
        return (await self.complete(prepared, caller=caller)).completion(model=target.name)


def agent_outcome(target: Target, run: Any) -> Outcome:
    """An `AgentRun` as an outcome: the final message, every message it added, its steps."""
    usage = dict(run.usage or {})
    trace: dict[str, Any] = {
        "target": target.describe(),
        "tools": list(run.steps),
        "stop_reason": run.stop_reason,
        "model_calls": [turn_trace(t) for t in run.turns],
        "usage": usage,
        "guardrail_hits": [h for t in run.turns for h in (t.hits or [])],
        "latency_ms": round(sum(t.latency_ms or 0.0 for t in run.turns), 2),
    }
    if run.turns:
        last = turn_trace(run.turns[-1])
        trace |= {"deployment": last["deployment"], "ruleset": last["ruleset"], "ttft_ms": last["ttft_ms"]}
    extra = {"agent": _named(target), "tools": list(run.steps), "stop_reason": run.stop_reason}
    finish = "stop" if run.stop_reason == "stop" else "length"
    message = dict(run.message)
    return Outcome(
        message=message,
        added=list(run.messages) or [message],
        trace=trace,
        extra=extra,
        usage=usage,
        finish_reason=finish,
    )


def _chunk(model: str, *, delta: dict[str, Any], finish: str | None, ident: str = "") -> dict[str, Any]:
    return {
        "id": ident or f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def chunks_of(
    outcome: Outcome, *, model: str, finish: Finish | None = None
) -> AsyncIterator[dict[str, Any]]:
    """A complete answer (an agent's) as a stream: the role, the content, the finish."""
    ident = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    yield _chunk(model, delta={"role": "assistant", "content": ""}, finish=None, ident=ident)
    content = outcome.message.get("content") or ""
    if content:
        yield _chunk(model, delta={"content": content}, finish=None, ident=ident)
    if finish is not None:
        outcome.extra |= await finish(outcome)
    last = _chunk(model, delta={}, finish=outcome.finish_reason or "stop", ident=ident)
    if outcome.usage:
        last["usage"] = outcome.usage
    yield {**last, "converge": outcome.extra}
