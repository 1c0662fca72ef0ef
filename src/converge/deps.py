"""Request-scoped dependencies shared by every domain's api.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from converge.state import State


def get_state(request: Request) -> State:
    return request.app.state.converge  # type: ignore[no-any-return]


StateDep = Annotated[State, Depends(get_state)]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's unit of work: commit on success, roll back on any error.

    Tests put a `session_factory` bound to a rolled-back outer transaction in the state extras.
    """
    state = get_state(request)
    factory = state.extras.get("session_factory") or state.sessions
    async with factory() as session, session.begin():
        yield session


# scope="function": commit before the response is sent, so a client that reads right
# after a write sees it, and a failed commit is reported instead of lost.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")
