"""The web console: static ES modules served at /console, same origin as the API.

The files are public (they hold no data); every data call the page makes carries the API key
the person signed in with. Every answer under /console carries a strict Content-Security-Policy:
scripts only from this origin and never inline, so a model name that is really markup stays text
even if a page forgot to render it as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from converge.config import AuthSettings

STATIC_DIR = Path(__file__).resolve().parent / "static"
PREFIX = "/console"


def content_security_policy(connect: tuple[str, ...] = ()) -> str:
    """Scripts, styles and data from this origin only; `connect` adds origins the page may
    fetch from (the identity provider, for the sign-in's discovery and token exchange)."""
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            " ".join(("connect-src 'self'", *connect)),
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


def security_headers(connect: tuple[str, ...] = ()) -> tuple[tuple[bytes, bytes], ...]:
    return (
        (b"content-security-policy", content_security_policy(connect).encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        # The files change with the installed version; a stale module next to a new one breaks the page.
        (b"cache-control", b"no-cache"),
    )


CONTENT_SECURITY_POLICY = content_security_policy()
SECURITY_HEADERS = security_headers()

router = APIRouter(include_in_schema=False)


@router.get(PREFIX)
async def console_root() -> RedirectResponse:
    """`/console` -> `/console/`: the modules are loaded relative to the folder."""
    return RedirectResponse(f"{PREFIX}/", status_code=308)


def sso_config(auth: AuthSettings) -> dict[str, Any]:
    """What the sign-in page needs to offer single sign-on (public: an issuer and a client id)."""
    if not (auth.oidc_issuer and auth.oidc_console_client_id):
        return {"enabled": False}
    return {
        "enabled": True,
        "issuer": auth.oidc_issuer.rstrip("/"),
        "client_id": auth.oidc_console_client_id,
        "scope": auth.oidc_console_scope,
    }


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class ConsoleFiles(StaticFiles):
    """StaticFiles with the console's security headers on every answer, 404s included, and
    `sso.json` (the sign-in's single sign-on settings) beside the files."""

    def __init__(self, *, sso: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sso = sso
        self.headers = security_headers((_origin(sso["issuer"]),) if sso["enabled"] else ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0917 - the ASGI signature
        headers = self.headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in headers}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = kept + list(headers)
            await send(message)

        if scope["type"] == "http" and scope["path"].removeprefix(scope.get("root_path", "")) in (
            "/sso.json",
            f"{PREFIX}/sso.json",
        ):
            await JSONResponse(self.sso)(scope, receive, send_with_headers)
            return

        try:
            await super().__call__(scope, receive, send_with_headers)
        except HTTPException as exc:  # a missing file: answered here, so it carries the headers too
            response = PlainTextResponse(str(exc.detail), status_code=exc.status_code)
            await response(scope, receive, send_with_headers)


def mount(app: FastAPI, auth: AuthSettings) -> None:
    """Serve the console at /console/ (index.html for the folder itself)."""
    app.include_router(router)
    files = ConsoleFiles(directory=STATIC_DIR, html=True, sso=sso_config(auth))
    app.mount(PREFIX, files, name="console")
