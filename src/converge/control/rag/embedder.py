"""Embeddings for knowledge bases, through the gateway like any other client.

Ingestion and search call the gateway in-process (`Gateway.call`) as the key that asked for
the work (or as the project, for the bootstrap token and OIDC users): the same key and project
limits, routing and metering as `POST /v1/embeddings` from outside, so ingestion shows up in
`/usage` and cannot outrun a project's quota. No secret is stored to do it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from converge.gateway.api import Gateway, GatewayError

RETRYABLE = frozenset({429, 502, 503, 504})


class EmbeddingFailed(Exception):
    """The gateway refused or the embedding server failed; `retryable` for load and outages."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE


@dataclass(frozen=True, slots=True)
class Embedder:
    gateway: Gateway

    async def embed(
        self,
        texts: list[str],
        *,
        deployment_id: uuid.UUID,
        project_id: uuid.UUID,
        key_id: uuid.UUID | None,
    ) -> list[list[float]]:
        """One vector per text, in order. Raises `EmbeddingFailed`."""
        route = self.gateway.dataplane.snapshot.by_id.get(deployment_id) if self.gateway.dataplane else None
        if route is None or route.project_id != project_id:
            raise EmbeddingFailed(
                503, "The knowledge base's embedding deployment is not serving (not ready, or deleted)"
            )
        try:
            caller = await self.gateway.auth.caller_for(key_id=key_id, project_id=project_id)
        except GatewayError as exc:
            raise EmbeddingFailed(exc.status, exc.message) from None
        status, body = await self.gateway.call(
            caller, "/v1/embeddings", {"model": route.name, "input": texts, "encoding_format": "float"}
        )
        if status != 200:
            raise EmbeddingFailed(status, _message(body) or f"the embedding server answered {status}")
        data = sorted(body["data"], key=lambda item: item["index"])
        if len(data) != len(texts):
            raise EmbeddingFailed(502, f"asked for {len(texts)} embeddings, got {len(data)}")
        return [item["embedding"] for item in data]


def _message(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or "")
    return None
