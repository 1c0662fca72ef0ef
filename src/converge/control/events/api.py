"""HTTP for the event history, the audit log and the live SSE stream."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from pydantic import BaseModel, StringConstraints
from sse_starlette import EventSourceResponse, ServerSentEvent

from converge.control.events import repository
from converge.control.events.broadcaster import Published
from converge.control.projects.auth import PrincipalDep
from converge.control.projects.principal import Principal
from converge.deps import SessionDep, StateDep
from converge.errors import PROBLEM_RESPONSES, BadRequest, Forbidden, NotFound
from converge.kit.pagination import Page, PageDep, int_after, page_of
from converge.kit.schemas import INT64_MAX, Output

router = APIRouter(responses=PROBLEM_RESPONSES)
REPLAY_BATCH = 500


class EventRead(Output):
    id: int
    at: datetime
    kind: str
    project_id: uuid.UUID | None
    object_id: str
    data: dict[str, Any]


class AuditRead(Output):
    id: int
    at: datetime
    actor: str
    actor_kind: str
    action: str
    project_id: uuid.UUID | None
    object_type: str
    object_id: str
    request_id: str | None
    changes: dict[str, Any]


class _Filter(BaseModel):
    project_id: uuid.UUID | None
    kinds: list[str]


def _filter(principal: Principal, project: uuid.UUID | None, kind: list[str] | None) -> _Filter:
    if project is not None and not principal.sees(project):
        raise NotFound(f"Project {project} not found")
    if project is not None and not principal.can("events:read", project):
        raise Forbidden("Your role does not include 'events:read' in this project")
    return _Filter(project_id=project, kinds=[k for k in (kind or []) if k])


def _int_cursor(raw: str | None, name: str) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest(f"{name} must be an integer event id") from exc
    if not 0 <= value <= INT64_MAX:  # event ids are BIGINT identities
        raise BadRequest(f"{name} must be an event id between 0 and {INT64_MAX}")
    return value


def _since(value: datetime | None) -> datetime | None:
    """UTC unless an offset is given; within the years PostgreSQL and Python both hold."""
    if value is None:
        return None
    if not 1970 <= value.year <= 9998:
        raise BadRequest("since must be a time between the years 1970 and 9998")
    return value if value.tzinfo else value.replace(tzinfo=UTC)


ProjectQ = Annotated[uuid.UUID | None, Query(description="Only this project's events")]
KindQ = Annotated[
    list[Annotated[str, StringConstraints(max_length=128)]] | None,
    Query(max_length=32, description="Event kinds, e.g. `project` or `key.created`"),
]


@router.get("/events", response_model=Page[EventRead], tags=["events"])
async def list_events(
    session: SessionDep,
    principal: PrincipalDep,
    page: PageDep,
    project: ProjectQ = None,
    kind: KindQ = None,
    since: Annotated[
        datetime | None, Query(description="Only events at or after this time (e.g. the last 24 h)")
    ] = None,
) -> Page[EventRead]:
    f = _filter(principal, project, kind)
    after = int_after(page) or 0
    rows = await repository.list_events(
        session,
        visible=principal.visible_projects,
        project_id=f.project_id,
        kinds=f.kinds,
        after_id=after,
        since=_since(since),
        limit=page.limit + 1,
    )
    return page_of(rows, limit=page.limit, schema=EventRead)


@router.get("/audit", response_model=Page[AuditRead], tags=["audit"])
async def list_audit(
    session: SessionDep,
    principal: PrincipalDep,
    page: PageDep,
    project: ProjectQ = None,
    action: Annotated[str | None, Query(max_length=128, description="e.g. `project.created`")] = None,
) -> Page[AuditRead]:
    """Newest first. Admins see everything; owners see their projects' records."""
    if principal.is_admin:
        projects = None
    else:
        projects = {p for p in principal.roles if principal.can("audit:read", p)}
        if not projects:
            raise Forbidden("The audit log is for admins and project owners")
        if project is not None and project not in projects:
            raise NotFound(f"Project {project} not found")
    rows = await repository.list_audit(
        session,
        projects=projects,
        project_id=project,
        action=action,
        before_id=int_after(page),
        limit=page.limit + 1,
    )
    return page_of(rows, limit=page.limit, schema=AuditRead)


@router.get(
    "/sse/stream",
    tags=["events"],
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def stream(
    state: StateDep,
    principal: PrincipalDep,
    project: ProjectQ = None,
    kind: KindQ = None,
    last_event_id: Annotated[str | None, Header(description="Resume after this event id")] = None,
) -> EventSourceResponse:
    """Live events the caller may see. Reconnect with `Last-Event-ID` to replay what was missed."""
    f = _filter(principal, project, kind)
    resume = _int_cursor(last_event_id, "Last-Event-ID")
    return EventSourceResponse(
        _events(state=state, principal=principal, filter_=f, resume=resume),
        ping=state.settings.server.sse_heartbeat_s,
        headers={"X-Accel-Buffering": "no"},
    )


async def _events(
    *, state: Any, principal: Principal, filter_: _Filter, resume: int | None
) -> AsyncIterator[ServerSentEvent]:
    # Subscribe before replaying so nothing committed in between is lost; duplicates are dropped.
    sub = state.broadcaster.subscribe(
        visible=principal.visible_projects, project_id=filter_.project_id, kinds=filter_.kinds
    )
    replayed: set[int] = set()
    try:
        if resume is not None:
            after = resume
            while True:
                async with state.sessions() as session:
                    rows = await repository.list_events(
                        session,
                        visible=principal.visible_projects,
                        project_id=sub.project_id,
                        kinds=sub.kinds,
                        after_id=after,
                        limit=REPLAY_BATCH,
                    )
                for row in rows:
                    replayed.add(row.id)
                    yield _sse(Published.of(row))
                if len(rows) < REPLAY_BATCH:
                    break
                after = rows[-1].id
        yield ServerSentEvent(comment="live")
        while True:
            ev = await sub.queue.get()
            if ev is None:  # server shutting down or this client fell too far behind
                return
            if ev.id in replayed or (resume is not None and ev.id <= resume):
                continue
            yield _sse(ev)
    finally:
        state.broadcaster.unsubscribe(sub)


def _sse(ev: Published) -> ServerSentEvent:
    return ServerSentEvent(data=ev.json, id=str(ev.id), event=ev.kind)
