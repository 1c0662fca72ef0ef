"""Health, readiness and metrics (the only routes that answer without a credential), and the
server's own log for organisation admins."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from converge.control.projects.auth import DetachedPrincipalDep
from converge.deps import StateDep
from converge.errors import PROBLEM_RESPONSES, Forbidden, NotFound, Unauthorized
from converge.kit.observability import line_time, log_path
from converge.runtime.local.logs import read_log
from converge.storage.db import current_revision

router = APIRouter(tags=["operations"])
PUBLIC_PATHS = frozenset({"/health", "/readiness", "/metrics"})
READINESS_IN_SCRAPE_S = 3.0  # a scrape refreshes converge_ready; a hanging database must not stall it


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process is up and serving."""
    return {"status": "ok"}


async def _database(state: Any) -> dict[str, Any]:
    try:
        async with state.engine.connect() as conn:
            await asyncio.wait_for(conn.execute(text("SELECT 1")), timeout=2)
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": str(exc)[:200]}


async def _migrations(state: Any) -> dict[str, Any]:
    try:
        current = await current_revision(state.engine)
    except Exception as exc:
        return {"ok": False, "error": str(exc)[:200]}
    return {"ok": current == state.head_revision, "current": current, "head": state.head_revision}


@router.get(
    "/readiness",
    responses={503: {"description": "A check failed; the body says which"}},
)
async def readiness(state: StateDep) -> JSONResponse:
    """Ready to take traffic: database reachable, migrations at head, background services up."""
    checks: dict[str, dict[str, Any]] = {
        "database": await _database(state),
        "migrations": await _migrations(state),
    }
    for service in state.services:
        checks[service.name] = {"ok": bool(service.healthy)}
        if (leader := getattr(service, "is_leader", None)) is not None:  # the console's overview
            checks[service.name]["leader"] = bool(leader)
    ok = all(c["ok"] for c in checks.values())
    state.metrics.observe_readiness({name: c["ok"] for name, c in checks.items()})
    body = {"status": "ready" if ok else "not_ready", "checks": checks}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, responses={401: PROBLEM_RESPONSES[401]})
async def metrics(request: Request, state: StateDep) -> Response:
    """Prometheus exposition format; needs `Authorization: Bearer <CONVERGE_SERVER__METRICS_TOKEN>`
    when that is set."""
    token = state.settings.server.metrics_token
    if token is not None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise Unauthorized("/metrics needs the metrics bearer token (CONVERGE_SERVER__METRICS_TOKEN)")
    try:
        await asyncio.wait_for(readiness(state), timeout=READINESS_IN_SCRAPE_S)
    except TimeoutError:
        state.metrics.ready.labels("database").set(0)
    registry = state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/ops/logs",
    response_class=StreamingResponse,
    responses={code: PROBLEM_RESPONSES[code] for code in (401, 403, 404, 422)},
)
async def logs(
    *,
    state: StateDep,
    principal: DetachedPrincipalDep,  # no database session is held while a follower waits
    tail: Annotated[int, Query(ge=0, le=10000, description="Lines from the end of the log")] = 100,
    since: Annotated[
        datetime | None,
        Query(description="Only lines written at or after this time (ISO 8601; UTC if no zone)"),
    ] = None,
    follow: Annotated[bool, Query(description="Keep streaming the lines the server writes next")] = False,
) -> StreamingResponse:
    """This server's own log, JSON lines oldest first (each with `timestamp`, `level`, `event`,
    and `request_id`/`trace_id` where a request wrote it): the last `tail` lines, then, with
    `follow`, what it writes next. `converge logs` interleaves it with replicas' logs.
    Organisation admins only."""
    if not principal.is_admin:
        raise Forbidden("Only organisation admins may read the control plane's log")
    path = log_path(state.settings.data_dir)
    if not path.is_file():
        raise NotFound(f"This server has written no log file yet ({path.name})")
    after = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since

    async def lines() -> AsyncIterator[bytes]:
        keep = after is None
        async for line in read_log(path, tail=tail, follow=follow):
            if after is not None:
                when = line_time(line)
                if when is not None:  # a line without a time (a traceback's) goes with the one before
                    keep = when >= after
            if keep:
                yield (line + "\n").encode()

    return StreamingResponse(lines(), media_type="text/plain")
