"""The proxy in front of MLServer: `/v2/*` forwarded, `infer` requests checked first.

It forwards with aiohttp's client: it sits on the data path of every inference, and measured
here a bare proxy on httpx collapsed at 64 concurrent requests where aiohttp's held.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from converge.serving.common import engine_session
from converge.serving.v2.protocol import (
    V2Error,
    check_inputs,
    error_response,
    infer_path,
    parse_infer_request,
)

# Headers that describe one hop, not the message (RFC 9110 section 7.6.1), plus those the client recomputes.
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


class MLServerProxy:
    """Forwards `/v2/*` to MLServer; checks `infer` requests first (see `check_inputs`)."""

    def __init__(
        self, upstream: str, *, model_name: str, declared: list[dict[str, Any]], exact_datatype: bool
    ) -> None:
        self.upstream = upstream
        self.infer_path = infer_path(model_name)
        self.declared = declared
        self.exact_datatype = exact_datatype
        self._session: Any = None  # aiohttp.ClientSession, made on the event loop at first use

    def session(self) -> Any:
        if self._session is None or self._session.closed:
            self._session = engine_session()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def upstream_ready(self, model_name: str) -> tuple[bool, str]:
        import aiohttp

        url = f"{self.upstream}/v2/models/{model_name}/ready"
        try:
            async with self.session().get(url, timeout=aiohttp.ClientTimeout(total=3)) as response:
                return response.status == 200, f"MLServer answered {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return False, f"MLServer is unreachable: {exc or type(exc).__name__}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0917 - the ASGI signature
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        path: str = scope["path"]
        if path != "/v2" and not path.startswith("/v2/"):
            await error_response(404, f"no route {path}; this replica serves the V2 API under /v2")(
                scope, receive, send
            )
            return
        request = Request(scope, receive)
        body = await request.body()
        if request.method == "POST" and path == self.infer_path:
            try:
                parsed = parse_infer_request(body)
                if self.declared:
                    check_inputs(
                        parsed["inputs"],
                        self.declared,
                        by_name=len(self.declared) > 1,
                        exact_datatype=self.exact_datatype,
                    )
            except V2Error as exc:
                await error_response(exc.status_code, exc.message)(scope, receive, send)
                return
        await self._forward(scope, receive, send, request, body)

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, request: Request, body: bytes
    ) -> None:
        import aiohttp

        headers = {k: v for k, v in request.headers.items() if k not in HOP_HEADERS}
        content_type = headers.get("content-type", "")
        if body and (not content_type or content_type.startswith("application/x-www-form-urlencoded")):
            # V2 bodies are JSON and MLServer insists on being told so; curl -d says otherwise.
            headers["content-type"] = "application/json"
        target = self.upstream + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        try:
            async with self.session().request(
                request.method, target, data=body or None, headers=headers
            ) as upstream:
                response_headers = [
                    (k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in upstream.headers.items()
                    if k.lower() not in HOP_HEADERS or k.lower() == "content-length"
                ]
                await send(
                    {"type": "http.response.start", "status": upstream.status, "headers": response_headers}
                )
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except aiohttp.ClientConnectionError as exc:
            await error_response(503, f"the model server is unreachable: {exc}")(scope, receive, send)
        except TimeoutError:
            await error_response(504, "the model server did not answer in time")(scope, receive, send)
