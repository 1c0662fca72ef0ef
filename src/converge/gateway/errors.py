"""The OpenAI error envelope, and the raw ASGI reads and replies every gateway route shares.

``{"error": {"message", "type", "param", "code"}}`` on every route, V2 included: unknown model
404, malformed body 400 naming the field, over a limit 429 with Retry-After, upstream timeout
504, unreachable 503, bad upstream answer 502.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import Receive, Send

JSON = (b"content-type", b"application/json")


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )


def bad(param: str, message: str, code: str = "invalid_value") -> GatewayError:
    """A 400 naming the part of the request that is wrong."""
    return GatewayError(400, message, param=param, code=code)


def decode(raw: bytes) -> Any:
    """A request body as JSON, or a 400 that says it is none."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad("body", f"The request body is not valid JSON: {exc}") from None


async def read_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"The request body is larger than {limit} bytes", code="body_too_large")
        parts.append(chunk)
    return b"".join(parts)


async def respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = headers if headers is not None else [JSON]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
