"""HTTP for chat (the seed's Chat Manager): `POST /chat`, the caller's sessions, their messages
with each answer's trace, replay."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse

from converge.control.chat.sessions import repository, service
from converge.control.chat.sessions.schemas import (
    ChatIn,
    MessageRead,
    ReplayIn,
    ReplayRead,
    SessionDetail,
    SessionRead,
)
from converge.control.projects.auth import DetachedPrincipalDep, PrincipalDep
from converge.control.projects.service import visible_project
from converge.deps import SessionDep, StateDep
from converge.errors import PROBLEM_RESPONSES, AppError
from converge.gateway.api import GatewayError
from converge.kit.pagination import Page, PageDep, encode_cursor, int_after, page_of, uuid_after

router = APIRouter(tags=["chat"], responses=PROBLEM_RESPONSES)
SESSION_HEADER = "x-converge-session-id"
_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A chat.completion with the `converge` field (session_id, turn, trace, and a RAG "
        "model's citations), or with `stream` an SSE stream of chat.completion.chunk objects whose last "
        "one carries it",
        "content": {"application/json": {}, "text/event-stream": {}},
    },
    429: {"description": "Over the project's or key's limits", "content": _PROBLEM},
    503: {"description": "The deployment is not ready", "content": _PROBLEM},
}


@router.post("/chat", responses=ANSWERS)
async def chat(
    *,
    body: ChatIn,
    principal: DetachedPrincipalDep,
    state: StateDep,
    project: Annotated[
        uuid.UUID | None, Query(description="The project (default: the session's, or your key's)")
    ] = None,
) -> Response:
    """One turn of a session (a new one without `session_id`) with a deployment, RAG model or
    agent of the project. The conversation is trimmed, oldest first, to the model's context
    length; the user's messages and the answer are recorded together once the answer is
    complete, with the answer's trace (a failed turn records nothing)."""
    turn = await service.prepare_turn(state, principal, body=body, project_id=project)
    headers = {SESSION_HEADER: str(turn.session_id)}
    if body.stream:
        chunks = await service.stream_turn(state, principal, turn=turn)
        return StreamingResponse(_sse(chunks), media_type="text/event-stream", headers=headers)
    outcome = await service.run_turn(state, turn)
    recorded = await service.record(state, principal, turn=turn, outcome=outcome)
    completion = outcome.completion(model=turn.target.name)
    completion["converge"] = {**completion["converge"], **recorded}
    return JSONResponse(completion, headers=headers)


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    except GatewayError as exc:  # the stream had begun: the error is its last event; nothing recorded
        yield b"data: " + exc.body() + b"\n\n"
    except AppError as exc:  # recording the turn failed (the session was deleted meanwhile)
        error = {"message": exc.detail, "type": exc.type, "code": exc.extra.get("code")}
        yield b"data: " + orjson.dumps({"error": error}) + b"\n\n"
    yield b"data: [DONE]\n\n"


@router.get("/chat/sessions", response_model=Page[SessionRead])
async def list_sessions(
    *,
    session: SessionDep,
    principal: PrincipalDep,
    page: PageDep,
    project: Annotated[uuid.UUID | None, Query(description="Only this project's sessions")] = None,
) -> Page[SessionRead]:
    """Your own sessions (of this principal), oldest first."""
    if project is not None:
        await visible_project(session, principal, project, permission=service.PERMISSION)
    rows = await repository.list_for(
        session, principal=principal.subject, project_id=project, after=uuid_after(page), limit=page.limit
    )
    rows = [r for r in rows if principal.sees(r.project_id)]
    shown = rows[: page.limit]
    return Page(
        items=[SessionRead.model_validate(r) for r in shown],
        next_cursor=encode_cursor(shown[-1].id) if len(rows) > page.limit else None,
    )


@router.get("/chat/sessions/{session_id}", response_model=SessionDetail)
async def get_session(
    *, session_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> SessionDetail:
    chat = await service.visible_session(session, principal, session_id=session_id)
    count = await repository.count_messages(session, chat.id)
    return SessionDetail.model_validate({**SessionRead.model_validate(chat).model_dump(), "messages": count})


@router.get("/chat/sessions/{session_id}/messages", response_model=Page[MessageRead])
async def list_messages(
    *, session_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, page: PageDep
) -> Page[MessageRead]:
    """In order; each assistant answer carries its trace: the target and its revision, the
    deployment and its revision, the ruleset and version, retrieved chunks with scores, tool
    calls with arguments, results, durations and errors, guardrail hits, tokens and latency."""
    chat = await service.visible_session(session, principal, session_id=session_id)
    rows = await repository.messages(session, chat.id, after=int_after(page), limit=page.limit)
    return page_of(rows, limit=page.limit, schema=MessageRead, key="turn")


@router.delete("/chat/sessions/{session_id}", status_code=204, response_class=Response)
async def delete_session(*, session_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    chat = await service.visible_session(session, principal, session_id=session_id, lock=True)
    await repository.delete_session(session, chat)
    return Response(status_code=204)


@router.post("/chat/sessions/{session_id}/replay", response_model=ReplayRead)
async def replay(
    *, session_id: uuid.UUID, body: ReplayIn, principal: DetachedPrincipalDep, state: StateDep
) -> Any:
    """Re-run a recorded answer (`turn`) on the same preceding messages, against the target that
    answered it (its current revision) or another `model`; both answers side by side. Nothing is
    recorded into the session."""
    return await service.replay(state, principal, session_id=session_id, body=body)
