"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/embeddings and
/v1/models.

A body is parsed once with orjson and checked against the parameter table of the server that
answers it (`params.py`), then forwarded unchanged unless a parameter had to be translated or
a hook changed it.
"""

from __future__ import annotations

import orjson
from starlette.types import Receive, Send

from converge.config import GatewaySettings
from converge.gateway import params
from converge.gateway.auth import Auth, Caller
from converge.gateway.errors import bad, decode, read_body, respond
from converge.gateway.governance import Governance
from converge.gateway.upstream import Forwarder, Request

PATHS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


class OpenAI:
    def __init__(
        self, config: GatewaySettings, *, auth: Auth, governance: Governance, forwarder: Forwarder
    ) -> None:
        self.config, self.auth, self.governance, self.forwarder = config, auth, governance, forwarder

    async def infer(self, receive: Receive, send: Send, *, caller: Caller, endpoint: str, path: str) -> None:
        raw = await read_body(receive, self.config.max_body_bytes)
        body = decode(raw)
        try:
            model = params.model_of(body)
            route = self.auth.route(caller, model, endpoint)
            ask = params.read(body, endpoint=endpoint, server=route.server, model=model)
        except params.Invalid as exc:
            raise bad(exc.param, exc.message, exc.code) from None
        if ask.rewrite:  # a parameter was translated for this server
            raw = orjson.dumps(body)
        self.governance.permit(route)
        if self.governance.hooks:
            raw = await self.governance.run_hooks(caller=caller, route=route, endpoint=endpoint, body=body)
        # Reserve the worst case: the prompt (at most one token per 4 bytes of body, a generous
        # bound) plus the completion asked for (or the default), settled to the real count later.
        asked = ask.completion_limit or self.config.default_max_tokens
        completion = 0 if endpoint == "embeddings" else asked * ask.choices
        request = Request(
            caller=caller,
            route=route,
            endpoint=endpoint,
            path=path,
            body=raw,
            model=model,
            stream=ask.stream,
            include_usage=ask.include_usage is True,
            reserve=len(raw) // 4 + 1 + completion,
        )
        await self.forwarder.forward(request, receive, send)

    async def models(self, send: Send, caller: Caller, wanted: str) -> None:
        """GET /v1/models (the caller's project's deployments and aliases) or /v1/models/{name}."""
        routes = self.auth.dataplane.snapshot.listed.get(caller.project.id, [])
        entries = [
            {"id": name, "object": "model", "created": r.created, "owned_by": caller.project.name}
            for r in routes
            for name in (r.name, *r.aliases)
        ]
        if wanted:
            found = next((e for e in entries if e["id"] == wanted), None)
            if found is None:
                self.auth.route(caller, wanted)  # the 404 with its usual message
                found = {"id": wanted, "object": "model", "created": 0, "owned_by": caller.project.name}
            return await respond(send, 200, orjson.dumps(found))
        await respond(send, 200, orjson.dumps({"object": "list", "data": entries}))
