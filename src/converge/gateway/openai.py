"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/embeddings and
/v1/models.

A body is parsed once with orjson and checked against the parameter table of the server that
answers it (`params.py`), then forwarded unchanged unless a parameter had to be translated, a
hook changed it or a ruleset applies (`guard.py`). A chat request naming a RAG model or an
agent goes to the virtual-model handler instead (`virtual.py`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Receive, Send

from converge.config import GatewaySettings
from converge.gateway import params
from converge.gateway.auth import Auth, Caller
from converge.gateway.errors import bad, decode, read_body, respond
from converge.gateway.governance import Governance
from converge.gateway.guard import Guardrails
from converge.gateway.limits import Rejection
from converge.gateway.upstream import Forwarder, Request, Trace, rejected
from converge.gateway.virtual import VirtualHandler, VirtualModel, unavailable, write

if TYPE_CHECKING:
    from converge.gateway.dataplane import Route

PATHS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


class OpenAI:
    def __init__(
        self,
        config: GatewaySettings,
        *,
        auth: Auth,
        governance: Governance,
        forwarder: Forwarder,
        guardrails: Guardrails,
        virtual_handler: Callable[[], VirtualHandler | None] = lambda: None,
    ) -> None:
        self.config, self.auth, self.governance, self.forwarder = config, auth, governance, forwarder
        self.guardrails = guardrails
        self.virtual_handler = virtual_handler  # read per request: the app may set it later

    async def infer(
        self,
        receive: Receive,
        send: Send,
        *,
        caller: Caller,
        endpoint: str,
        path: str,
        ruleset_id: uuid.UUID | None = None,
        trace: Trace | None = None,
    ) -> None:
        """One request. In-process callers may name a ruleset (instead of the deployment's
        default) and pass a `trace` to read what served them."""
        raw = await read_body(receive, self.config.max_body_bytes)
        body = decode(raw)
        try:
            model = params.model_of(body)
            route = self._route(caller, model, endpoint)
            if isinstance(route, VirtualModel):
                return await self._virtual(send, caller=caller, model=route, body=body)
            ask = params.read(body, endpoint=endpoint, server=route.server, model=model)
        except params.Invalid as exc:
            raise bad(exc.param, exc.message, exc.code) from None
        if ask.rewrite:  # a parameter was translated for this server
            raw = orjson.dumps(body)
        if trace is not None:
            trace.route = route
        self.governance.permit(route)
        if self.governance.hooks:
            raw = await self.governance.run_hooks(caller=caller, route=route, endpoint=endpoint, body=body)
        guard = None
        if route.ruleset_id is not None or ruleset_id is not None:
            ruleset = await self.guardrails.ruleset(route, ruleset_id)
            if ruleset is not None:
                guard = self.guardrails.guard(ruleset, caller=caller, route=route)
                if trace is not None:
                    trace.ruleset, trace.hits = ruleset.ref, guard.hits
                guard.request(body, endpoint=endpoint, ask=ask)
                raw = orjson.dumps(body)
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
            guard=guard,
            trace=trace,
        )
        await self.forwarder.forward(request, receive, send)

    def _route(self, caller: Caller, model: str, endpoint: str) -> Route | VirtualModel:
        """The deployment (or alias) of that name, else a RAG model or agent, else the 404."""
        snapshot = self.auth.dataplane.snapshot
        if model not in snapshot.routes.get(caller.project.id, {}):
            virtual = snapshot.virtual.get(caller.project.id, {}).get(model)
            if virtual is not None:
                if endpoint != "chat":
                    raise bad(
                        "model",
                        f"'{model}' is a {virtual.kind.replace('_', ' ')}: it answers /v1/chat/completions only",
                        "unsupported_endpoint",
                    )
                return virtual
        return self.auth.route(caller, model, endpoint)

    async def _virtual(
        self, send: Send, *, caller: Caller, model: VirtualModel, body: dict[str, Any]
    ) -> None:
        handler = self.virtual_handler()
        if handler is None:
            raise unavailable(model)
        # One request against the caller's limits (a spent budget or rpm answers 429 here);
        # nothing stays held: the calls the handler makes are admitted and metered themselves.
        limiter = self.forwarder.limiter
        admitted = limiter.check(caller.scopes, 0, time.time())
        if isinstance(admitted, Rejection):
            raise rejected(admitted)
        limiter.settle(admitted, 0)
        answer = await handler(caller=caller, model=model, body=body)
        await write(send, answer)

    async def models(self, send: Send, caller: Caller, wanted: str) -> None:
        """GET /v1/models (the caller's project's deployments and aliases, then its RAG models
        and agents whose names no deployment takes) or /v1/models/{name}."""
        snapshot = self.auth.dataplane.snapshot
        routes = snapshot.listed.get(caller.project.id, [])
        entries = [
            {"id": name, "object": "model", "created": r.created, "owned_by": caller.project.name}
            for r in routes
            for name in (r.name, *r.aliases)
        ]
        taken = snapshot.routes.get(caller.project.id, {})
        entries += [
            {
                "id": v.name,
                "object": "model",
                "created": v.created,
                "owned_by": caller.project.name,
                "kind": v.kind,
            }
            for v in snapshot.virtual.get(caller.project.id, {}).values()
            if v.name not in taken
        ]
        if wanted:
            found = next((e for e in entries if e["id"] == wanted), None)
            if found is None:
                self.auth.route(caller, wanted)  # the 404 with its usual message
                found = {"id": wanted, "object": "model", "created": 0, "owned_by": caller.project.name}
            return await respond(send, 200, orjson.dumps(found))
        await respond(send, 200, orjson.dumps({"object": "list", "data": entries}))
