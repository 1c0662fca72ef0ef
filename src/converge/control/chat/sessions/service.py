"""Chat sessions: a turn (`POST /chat`), the record of every message with each answer's trace,
and replay.

A turn reads what it needs in one short transaction (the session, its history, the target, the
retrieval for a RAG model), asks the model with no transaction open, then writes the user's
messages and the answer together in a second one: a turn that fails leaves the session exactly
as it was (a new session is not even created). Sessions belong to one principal in one project;
anyone else gets the 404 of a session that does not exist.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.chat import refs, runtime
from converge.control.chat.ragmodels.service import absent
from converge.control.chat.runtime import ChatRuntime, Outcome, Prepared, Target
from converge.control.chat.sessions import context, repository
from converge.control.chat.sessions.schemas import ChatIn, ReplayIn
from converge.control.projects.principal import Principal
from converge.control.projects.service import visible_project
from converge.control.rag.service import invalid
from converge.deps import unit_of_work
from converge.errors import AppError, Conflict, NotFound
from converge.gateway.api import Caller, GatewayError
from converge.models import ChatMessage, ChatSession, Project
from converge.models.base import utcnow
from converge.state import State

PERMISSION = "chat:use"


class ModelProblem(AppError):
    """What the gateway answered (a limit, a guardrail refusal, an upstream error), as a problem."""

    type, title = "model-error", "The model did not answer"

    def __init__(self, exc: GatewayError) -> None:
        super().__init__(exc.message, extra={"code": exc.code, "param": exc.param})
        self.status_code = exc.status
        if exc.status == 429:
            self.type, self.title = "rate-limited", "Over a limit"
        elif exc.code == "guardrail_refused":
            self.type, self.title = "guardrail-refused", "Refused by a ruleset"


class GatewayUnavailable(AppError):
    status_code, type, title = 503, "gateway-unavailable", "Gateway unavailable"


def chat_runtime(state: State) -> ChatRuntime:
    if state.gateway is None:
        raise GatewayUnavailable(
            "This server runs without the gateway (gateway.enabled=false), and chat answers through it"
        )
    return ChatRuntime(state, state.gateway)


async def visible_session(
    session: AsyncSession, principal: Principal, *, session_id: uuid.UUID, lock: bool = False
) -> ChatSession:
    """The principal's own session (anyone else's answers 404, as if it did not exist)."""
    chat = await repository.get(session, session_id, lock=lock)
    if chat is None or chat.principal != principal.subject or not principal.sees(chat.project_id):
        raise NotFound(f"Chat session {session_id} not found")
    await visible_project(session, principal, chat.project_id, permission=PERMISSION)
    return chat


def as_message(row: ChatMessage) -> dict[str, Any]:
    """A recorded message as the OpenAI API has it."""
    message: dict[str, Any] = {"role": row.role, "content": row.content}
    if row.tool_calls:
        message["tool_calls"] = row.tool_calls
    if row.tool_call_id:
        message["tool_call_id"] = row.tool_call_id
    return message


# -- a turn ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Turn:
    """A turn ready to run: where it is recorded, what answers, what it sends."""

    session_id: uuid.UUID
    new_session: dict[str, Any] | None  # the session row to create with the first turn
    project: Project
    target: Target
    caller: Caller
    new_messages: list[dict[str, Any]]
    prepared: Prepared | None  # deployments and RAG models
    conversation: list[dict[str, Any]]  # agents: the fitted conversation
    ruleset_id: uuid.UUID | None


async def _project_for(
    session: AsyncSession, principal: Principal, *, project_id: uuid.UUID | None
) -> Project:
    if project_id is None:
        if principal.is_admin or len(principal.roles) != 1:
            raise invalid("project", "name the project (?project=<id>): your credential reaches several")
        project_id = next(iter(principal.roles))
    return await visible_project(session, principal, project_id, permission=PERMISSION)


async def _target(session: AsyncSession, project: Project, *, ref: str, field: str = "model") -> Target:
    found = await runtime.resolve(session, project_id=project.id, name=ref)
    if found is None:
        raise NotFound(
            f"{field}: project '{project.name}' has no deployment, RAG model or agent named '{ref}'",
            extra={"field": field},
        )
    return found


async def _caller(state: State, principal: Principal, *, project: Project) -> Caller:
    assert state.gateway is not None
    try:
        return await state.gateway.auth.caller_for(key_id=principal.key_id, project_id=project.id)
    except GatewayError as exc:
        raise ModelProblem(exc) from None


def _answer_tokens(state: State, params: dict[str, Any]) -> int:
    asked = params.get("max_completion_tokens") or params.get("max_tokens")
    return int(asked or state.settings.gateway.default_max_tokens)


def _fitter(session: AsyncSession, state: State, *, deployment_id: uuid.UUID | None, answer: int) -> Any:
    async def fit(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        if deployment_id is None:
            return messages, 0
        budget = await context.budget(
            session, state.artifacts, deployment_id=deployment_id, answer_tokens=answer
        )
        fitted = context.fit(messages, budget)
        return fitted.messages, fitted.dropped

    return fit


async def prepare_turn(
    state: State, principal: Principal, *, body: ChatIn, project_id: uuid.UUID | None
) -> Turn:
    chat_runtime_ = chat_runtime(state)
    new_messages = [m.model_dump(exclude_none=True) for m in body.messages]
    async with unit_of_work(state) as session:
        history: list[dict[str, Any]] = []
        new_session: dict[str, Any] | None = None
        if body.session_id is not None:
            chat = await visible_session(session, principal, session_id=body.session_id)
            if project_id is not None and project_id != chat.project_id:
                raise NotFound(f"Chat session {body.session_id} not found")
            project = await visible_project(session, principal, chat.project_id, permission=PERMISSION)
            history = [as_message(m) for m in await repository.messages(session, chat.id)]
            ruleset_id = chat.ruleset_id
            if body.model is not None:
                target = await _target(session, project, ref=body.model)
            else:
                found = await runtime.load(session, kind=chat.target_kind, target_id=chat.target_id)
                if found is None:
                    raise Conflict(
                        f"The session's {chat.target_kind} no longer exists; name another 'model'",
                        extra={"field": "model"},
                    )
                target = found
            session_id = chat.id
        else:
            project = await _project_for(session, principal, project_id=project_id)
            if body.model is None:
                raise invalid(
                    "model", "name a deployment, RAG model or agent of the project to start a session"
                )
            target = await _target(session, project, ref=body.model)
            ruleset_id = None
            session_id = uuid.uuid4()
            new_session = {"title": body.title or _title(new_messages)}
        if body.ruleset is not None:
            ruleset = await refs.ruleset(session, project.id, ref=body.ruleset)
            if ruleset is None:
                raise absent(
                    "ruleset", f"project '{project.name}' has no ruleset '{body.ruleset}' (by id or name)"
                )
            ruleset_id = ruleset.id
        if new_session is not None:
            new_session |= {"target_kind": target.kind, "target_id": target.id, "ruleset_id": ruleset_id}
        caller = await _caller(state, principal, project=project)
        params = body.params()
        fit = _fitter(
            session, state, deployment_id=target.deployment_id, answer=_answer_tokens(state, params)
        )
        conversation = history + new_messages
        prepared = None
        if target.kind == "agent":
            conversation, _ = await fit(conversation)
        else:
            try:
                prepared = await chat_runtime_.prepare(
                    session,
                    target=target,
                    messages=conversation,
                    params=params,
                    caller=caller,
                    ruleset_id=ruleset_id,
                    fit=fit,
                )
            except GatewayError as exc:
                raise ModelProblem(exc) from None
    return Turn(
        session_id=session_id,
        new_session=new_session,
        project=project,
        target=target,
        caller=caller,
        new_messages=new_messages,
        prepared=prepared,
        conversation=conversation,
        ruleset_id=ruleset_id,
    )


def _title(messages: list[dict[str, Any]]) -> str:
    text = next((m.get("content") or "" for m in reversed(messages) if m["role"] == "user"), "")
    text = " ".join(str(text).split())
    return text[:77] + "..." if len(text) > 80 else text


async def run_turn(state: State, turn: Turn) -> Outcome:
    chat_runtime_ = chat_runtime(state)
    try:
        if turn.prepared is None:
            return await chat_runtime_.run_agent(
                target=turn.target, messages=turn.conversation, caller=turn.caller
            )
        return await chat_runtime_.complete(turn.prepared, caller=turn.caller)
    except GatewayError as exc:
        raise ModelProblem(exc) from None


async def record(state: State, principal: Principal, *, turn: Turn, outcome: Outcome) -> dict[str, Any]:
    """Write the turn's messages and the answer, together; the `converge` field's session part."""
    async with unit_of_work(state) as session:
        if turn.new_session is not None:
            session.add(
                ChatSession(
                    id=turn.session_id,
                    project_id=turn.project.id,
                    principal=principal.subject,
                    **turn.new_session,
                )
            )
            await session.flush()
            chat = await repository.get(session, turn.session_id, lock=True)
        else:
            chat = await repository.get(session, turn.session_id, lock=True)
            if chat is None:
                raise NotFound(f"Chat session {turn.session_id} was deleted while it answered")
            chat.target_kind, chat.target_id = turn.target.kind, turn.target.id
            chat.ruleset_id = turn.ruleset_id
        assert chat is not None
        first = await repository.next_turn(session, chat.id)
        answer = [dict(m) for m in outcome.added]
        answer[-1] = {**answer[-1], "trace": outcome.trace}
        repository.add_messages(session, chat.id, first=first, rows=turn.new_messages + answer)
        chat.updated_at = utcnow()
        await session.flush()
    answer_turn = first + len(turn.new_messages) + len(answer) - 1
    return {"session_id": str(turn.session_id), "turn": answer_turn, "trace": outcome.trace}


async def stream_turn(state: State, principal: Principal, *, turn: Turn) -> AsyncIterator[dict[str, Any]]:
    """The answer as chunks; the turn is recorded once it is complete, before the last chunk."""
    chat_runtime_ = chat_runtime(state)

    async def finish(outcome: Outcome) -> dict[str, Any]:
        return await record(state, principal, turn=turn, outcome=outcome)

    model = turn.target.name
    try:
        if turn.prepared is None:
            outcome = await chat_runtime_.run_agent(
                target=turn.target, messages=turn.conversation, caller=turn.caller
            )
            return runtime.chunks_of(outcome, model=model, finish=finish)
        return await chat_runtime_.stream(turn.prepared, caller=turn.caller, model=model, finish=finish)
    except GatewayError as exc:
        raise ModelProblem(exc) from None


# -- replay ------------------------------------------------------------------------------------


async def replay(
    state: State, principal: Principal, *, session_id: uuid.UUID, body: ReplayIn
) -> dict[str, Any]:
    """Re-run a recorded answer on the messages that preceded it (the same or another target);
    both answers side by side. Nothing is written to the session."""
    chat_runtime_ = chat_runtime(state)
    async with unit_of_work(state) as session:
        chat = await visible_session(session, principal, session_id=session_id)
        project = await visible_project(session, principal, chat.project_id, permission=PERMISSION)
        rows = await repository.messages(session, chat.id)
        answered = next((m for m in rows if m.turn == body.turn), None)
        if answered is None or answered.role != "assistant" or answered.trace is None:
            answers = [m.turn for m in rows if m.role == "assistant" and m.trace is not None]
            raise invalid(
                "turn",
                f"turn {body.turn} is not a recorded answer of this session; its answers are turns {answers}",
                answers=answers,
            )
        asked = [m for m in rows if m.turn < body.turn and m.role == "user"]
        if not asked:
            raise invalid("turn", f"no user message precedes turn {body.turn}")
        preceding = [as_message(m) for m in rows if m.turn <= asked[-1].turn]
        if body.model is not None:
            target = await _target(session, project, ref=body.model)
        else:
            recorded = answered.trace.get("target") or {}
            found = await runtime.load(
                session, kind=str(recorded.get("kind")), target_id=uuid.UUID(str(recorded.get("id")))
            )
            if found is None:
                raise Conflict(
                    f"The {recorded.get('kind')} '{recorded.get('name')}' that answered turn {body.turn} no "
                    "longer exists; replay against another 'model'",
                    extra={"field": "model"},
                )
            target = found
        caller = await _caller(state, principal, project=project)
        fit = _fitter(
            session,
            state,
            deployment_id=target.deployment_id,
            answer=state.settings.gateway.default_max_tokens,
        )
        try:
            if target.kind == "agent":
                conversation, _ = await fit(preceding)
                prepared = None
            else:
                prepared = await chat_runtime_.prepare(
                    session,
                    target=target,
                    messages=preceding,
                    params={},
                    caller=caller,
                    ruleset_id=chat.ruleset_id,
                    fit=fit,
                )
        except GatewayError as exc:
            raise ModelProblem(exc) from None
        original = {"message": as_message(answered), "trace": answered.trace, "converge": {}}
    try:
        if prepared is None:
            outcome = await chat_runtime_.run_agent(target=target, messages=conversation, caller=caller)
        else:
            outcome = await chat_runtime_.complete(prepared, caller=caller)
    except GatewayError as exc:
        raise ModelProblem(exc) from None
    return {
        "session_id": chat.id,
        "turn": body.turn,
        "messages": len(preceding),
        "original": original,
        "replay": {"message": outcome.message, "trace": outcome.trace, "converge": outcome.extra},
    }
