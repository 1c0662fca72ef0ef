"""Request-scoped dependencies shared by every domain's api.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from converge.state import State
from converge.storage.db import transaction


def get_state(request: Request) -> State:
    return request.app.state.converge


StateDep = Annotated[State, Depends(get_state)]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's unit of work: commit on success, roll back on any error.

    Tests set `state.session_factory` to sessions bound to a rolled-back outer transaction.
    """
    async with unit_of_work(get_state(request)) as session:
        yield session


def unit_of_work(state: State) -> AbstractAsyncContextManager[AsyncSession]:
    """A transaction of its own: the request's (above), or a short one for routes that must not
    hold one open across slow work (streaming an upload, inspecting a model)."""
    return transaction(state.session_factory or state.sessions)


# scope="function": commit before the response is sent, so a client that reads right
# after a write sees it, and a failed commit is reported instead of lost.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")
