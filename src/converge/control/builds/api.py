"""HTTP for builds, on the seed's paths: POST /ai-converge/build, GET /ai-converge/builds/{status|id}."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from converge.control.builds import service
from converge.control.builds.schemas import FINAL, BuildCreate, BuildRead, BuildState
from converge.control.projects.auth import PrincipalDep
from converge.deps import SessionDep, StateDep
from converge.errors import PROBLEM_RESPONSES, BadRequest
from converge.kit.pagination import Page, PageDep, page_of, uuid_after

router = APIRouter(prefix="/ai-converge", tags=["builds"], responses=PROBLEM_RESPONSES)


def log_path(data_dir: Path, build_id: uuid.UUID) -> Path:
    return data_dir / "builds" / f"{build_id}.log"


@router.post("/build", response_model=BuildRead, status_code=202)
async def create_build(body: BuildCreate, session: SessionDep, principal: PrincipalDep) -> BuildRead:
    """Queue a build: fetch (verified), smoke-load in the target server, benchmark."""
    return BuildRead.model_validate(await service.create(session, principal, body=body))


async def _list(
    session: SessionDep, principal: PrincipalDep, page: PageDep, state: BuildState | None
) -> Page[BuildRead]:
    rows = await service.page(session, principal, limit=page.limit + 1, state=state, after=uuid_after(page))
    return page_of(rows, limit=page.limit, schema=BuildRead)


@router.get("/builds", response_model=Page[BuildRead])
async def list_builds(session: SessionDep, principal: PrincipalDep, page: PageDep) -> Page[BuildRead]:
    return await _list(session, principal, page, None)


@router.get("/builds/{build_status_or_id}", response_model=Page[BuildRead] | BuildRead)
async def get_builds(
    build_status_or_id: str, session: SessionDep, principal: PrincipalDep, page: PageDep
) -> Page[BuildRead] | BuildRead:
    """`/ai-converge/builds/running` lists builds in that state; `/ai-converge/builds/<id>` is one build."""
    if build_status_or_id in BuildState.__members__.values():
        return await _list(session, principal, page, BuildState(build_status_or_id))
    try:
        build_id = uuid.UUID(build_status_or_id)
    except ValueError as exc:
        states = ", ".join(s.value for s in BuildState)
        raise BadRequest(f"'{build_status_or_id}' is neither a build id nor a state ({states})") from exc
    return BuildRead.model_validate(
        await service.visible_build(session, principal, build_id, permission="builds:read")
    )


@router.post("/builds/{build_id}/cancel", response_model=BuildRead)
async def cancel_build(build_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> BuildRead:
    return BuildRead.model_validate(await service.cancel(session, principal, build_id=build_id))


@router.get("/builds/{build_id}/logs", response_class=StreamingResponse)
async def build_logs(
    build_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    state: StateDep,
    follow: Annotated[bool, Query(description="Keep streaming until the build ends")] = False,
) -> StreamingResponse:
    build = await service.visible_build(session, principal, build_id, permission="builds:read")
    path = log_path(state.settings.data_dir, build.id)

    async def lines() -> AsyncIterator[bytes]:
        offset = 0
        while True:
            if path.exists():
                with path.open("rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                    offset += len(chunk)
                if chunk:
                    yield chunk
            if not follow:
                return
            async with state.sessions() as s:
                current = await service.get(s, build.id)
                if current is None or current.state in FINAL:
                    if path.exists() and path.stat().st_size > offset:
                        continue
                    return
            await asyncio.sleep(0.5)

    return StreamingResponse(lines(), media_type="text/plain")
