"""Virtual models: a project's RAG models and agents, answered in-process, not by a replica.

The snapshot lists them beside the deployments (`GET /v1/models`; a deployment or alias of the
same name wins). A `/v1/chat/completions` naming one is authenticated and admitted against the
caller's limits as usual (one request, no tokens: the calls it makes inside are metered and
limited themselves, under the same key), then handed to `Gateway.virtual_handler`, which the
control plane sets (the gateway cannot import it). The handler returns a complete
`chat.completion` object, or an async iterator of `chat.completion.chunk` objects that are
written as server-sent events ending with `data: [DONE]`; it raises `GatewayError` for errors.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson
import structlog
from starlette.types import Send

from converge.gateway.errors import JSON, GatewayError, respond

if TYPE_CHECKING:
    from converge.gateway.auth import Caller

log = structlog.get_logger(__name__)
VirtualAnswer = dict[str, Any] | AsyncIterator[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class VirtualModel:
    id: uuid.UUID
    project_id: uuid.UUID
    kind: Literal["rag_model", "agent"]
    name: str
    revision: int
    created: int  # epoch seconds


class VirtualHandler(Protocol):
    async def __call__(
        self, *, caller: Caller, model: VirtualModel, body: dict[str, Any]
    ) -> VirtualAnswer: ...


def unavailable(model: VirtualModel) -> GatewayError:
    what = "RAG model" if model.kind == "rag_model" else "agent"
    return GatewayError(
        503,
        f"'{model.name}' is a {what}, and this gateway process has no runtime for {what}s "
        "(it answers them only where the API runs)",
        type_="server_error",
        code="virtual_model_unavailable",
    )


async def write(send: Send, answer: VirtualAnswer) -> int:
    """Write a handler's answer; the status sent."""
    if isinstance(answer, dict):
        await respond(send, 200, orjson.dumps(answer), [JSON])
        return 200
    iterator = aiter(answer)
    try:
        first = await anext(iterator)  # an error before the first chunk is still a proper status
    except StopAsyncIteration:
        first = None
    headers = [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    try:
        if first is not None:
            await send({"type": "http.response.body", "body": _event(first), "more_body": True})
            async for chunk in iterator:
                await send({"type": "http.response.body", "body": _event(chunk), "more_body": True})
    except GatewayError as exc:  # the stream had begun: the error goes as its last event
        await send(
            {"type": "http.response.body", "body": b"data: " + exc.body() + b"\n\n", "more_body": True}
        )
    except Exception:
        log.exception("virtual_model_stream_failed")
        error = GatewayError(500, "The answer failed part way", type_="server_error")
        await send(
            {"type": "http.response.body", "body": b"data: " + error.body() + b"\n\n", "more_body": True}
        )
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    return 200


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
