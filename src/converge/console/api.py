"""The web console: static ES modules served at /console, same origin as the API.

The files are public (they hold no data); every data call the page makes carries the API key
the person signed in with. Every answer under /console carries a strict Content-Security-Policy:
scripts only from this origin and never inline, so a model name that is really markup stays text
even if a page forgot to render it as such.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import PlainTextResponse, RedirectResponse
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parent / "static"
PREFIX = "/console"
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    # The files change with the installed version; a stale module next to a new one breaks the page.
    (b"cache-control", b"no-cache"),
)

router = APIRouter(include_in_schema=False)


@router.get(PREFIX)
async def console_root() -> RedirectResponse:
    """`/console` -> `/console/`: the modules are loaded relative to the folder."""
    return RedirectResponse(f"{PREFIX}/", status_code=308)


class ConsoleFiles(StaticFiles):
    """StaticFiles with the console's security headers on every answer, 404s included."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0917 - the ASGI signature
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = kept + list(SECURITY_HEADERS)
            await send(message)

        try:
            await super().__call__(scope, receive, send_with_headers)
        except HTTPException as exc:  # a missing file: answered here, so it carries the headers too
            response = PlainTextResponse(str(exc.detail), status_code=exc.status_code)
            await response(scope, receive, send_with_headers)


def mount(app: FastAPI) -> None:
    """Serve the console at /console/ (index.html for the folder itself)."""
    app.include_router(router)
    app.mount(PREFIX, ConsoleFiles(directory=STATIC_DIR, html=True), name="console")
