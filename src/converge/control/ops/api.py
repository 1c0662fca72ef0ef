"""Health, readiness and metrics: the only routes that answer without a credential."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from converge.deps import StateDep
from converge.errors import PROBLEM_RESPONSES, Unauthorized
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
