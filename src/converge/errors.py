"""One error family for the control path, rendered once as RFC 9457 problem+json."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import sqlalchemy.exc
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# What a database that is away raises: through SQLAlchemy, from psycopg directly (listeners,
# the meter), or a pool with no connection to give.
DATABASE_AWAY: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    psycopg.OperationalError,
)
DATABASE_RETRY_AFTER_S = 5
PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://converge.dev/problems/"
log = structlog.get_logger(__name__)


class AppError(Exception):
    status_code = 400
    type = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}


class BadRequest(AppError):
    pass


class Unauthorized(AppError):
    status_code, type, title = 401, "unauthorized", "Authentication required"


class Forbidden(AppError):
    status_code, type, title = 403, "forbidden", "Not allowed"


class NotFound(AppError):
    status_code, type, title = 404, "not-found", "Not found"


class Conflict(AppError):
    status_code, type, title = 409, "conflict", "Conflict"


class PolicyDenied(AppError):
    status_code, type, title = 409, "policy-denied", "Denied by policy"


class QuotaExceeded(AppError):
    status_code, type, title = 409, "quota-exceeded", "Quota exceeded"


class PayloadTooLarge(AppError):
    status_code, type, title = 413, "payload-too-large", "Request body too large"


class Unprocessable(AppError):
    status_code, type, title = 422, "validation-error", "Invalid request"


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON

    def render(self, content: Any) -> bytes:
        # ASCII-escaped: a detail that quotes the caller's input may hold a lone surrogate,
        # which cannot be encoded as UTF-8 and would turn a 422 into a 500.
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def problem(
    *, status: int, type_: str, title: str, detail: str, instance: str | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_BASE + type_,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return ProblemResponse(body, status_code=status, headers=headers)


def _validation_detail(errors: list[dict[str, Any]]) -> tuple[int, str, list[dict[str, Any]]]:
    if any(e.get("type") == "json_invalid" for e in errors):
        msg = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return 400, f"Malformed JSON body: {msg}".rstrip(": "), []
    shown = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        shown.append({"field": loc, "message": e.get("msg", ""), "type": e.get("type", "")})
    text = "; ".join(f"{s['field'] or '(body)'}: {s['message']}" for s in shown)
    return 422, text, shown


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        return problem(
            status=exc.status_code,
            type_=exc.type,
            title=exc.title,
            detail=exc.detail,
            instance=request.url.path,
            **exc.extra,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, detail, errors = _validation_detail(list(exc.errors()))
        extra = {"errors": errors} if errors else {}
        type_ = "malformed-json" if status == 400 else "validation-error"
        title = "Malformed JSON" if status == 400 else "Invalid request"
        return problem(
            status=status, type_=type_, title=title, detail=detail, instance=request.url.path, **extra
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {
            404: "Not found",
            405: "Method not allowed",
            401: "Authentication required",
            413: "Request body too large",
        }
        return problem(
            status=exc.status_code,
            type_={404: "not-found", 405: "method-not-allowed", 413: "payload-too-large"}.get(
                exc.status_code, "http-error"
            ),
            title=titles.get(exc.status_code, "HTTP error"),
            detail=str(exc.detail),
            instance=request.url.path,
        )

    async def _database_away(request: Request, exc: Exception) -> JSONResponse:
        # A lost or refused connection, or a pool with none left: the database is restarting
        # or unreachable. Nothing was committed; the same request can simply be sent again.
        log.warning("database_unavailable", path=request.url.path, error=str(exc).splitlines()[0][:300])
        response = problem(
            status=503,
            type_="database-unavailable",
            title="Database unavailable",
            detail="The database is unavailable right now; nothing was changed. Retry shortly.",
            instance=request.url.path,
        )
        response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_S)
        return response

    for kind in DATABASE_AWAY:
        app.add_exception_handler(kind, _database_away)

    # Starlette's last-resort handler (ServerErrorMiddleware) re-raises after sending this, and
    # uvicorn then closes the connection: it only sees what escapes `UnhandledErrors` below.
    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path)
        return internal_error(request.url.path)

    app.add_middleware(UnhandledErrors)


def internal_error(path: str) -> JSONResponse:
    return problem(
        status=500,
        type_="internal",
        title="Internal error",
        detail="An unexpected error occurred; the request id identifies it in the server log.",
        instance=path,
    )


class UnhandledErrors:
    """Turns an unexpected exception into a logged 500 problem and ends it there.

    Starlette's ServerErrorMiddleware sends the 500 and then re-raises so the server can log it;
    uvicorn answers a re-raised exception by closing the connection, so a keep-alive client's
    next request met a reset. Installed as the innermost middleware, so the access log, the
    metrics and CORS still see the 500. An exception after the response has started is left to
    propagate: half a response can only be ended by closing the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0917 - the ASGI signature
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            log.exception("unhandled_error", path=scope["path"])
            await internal_error(scope["path"])(scope, receive, send)


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Problem",
    "description": "RFC 9457 problem details",
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["type", "title", "status", "detail"],
}

PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {
        "description": desc,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    for code, desc in {
        400: "Malformed request",
        401: "Missing or invalid credential",
        403: "Not allowed",
        404: "Not found (or not visible to the caller)",
        409: "Conflict with current state",
        422: "Validation error",
    }.items()
}
