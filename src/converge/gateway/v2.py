"""The Open Inference (V2) routes of a deployment: /v2/models/{name}[/versions/{v}][/ready|/infer].

An inference body is forwarded as bytes, unparsed, unless hooks want to see it; the path is
rewritten to the name the replicas serve. Errors use the OpenAI envelope like every other
gateway route. Once a replica answered 2xx, the body is handed to the input-drift counters
(`drift.py`), which parse it later, in a batch, off this path.
"""

from __future__ import annotations

import aiohttp
import orjson
from starlette.types import Message, Receive, Scope, Send

from converge.config import GatewaySettings
from converge.gateway.auth import Auth
from converge.gateway.dataplane import Route
from converge.gateway.drift import InputDrift
from converge.gateway.errors import GatewayError, bad, decode, read_body, respond
from converge.gateway.governance import Governance
from converge.gateway.upstream import Forwarder, Request, classify

PREFIX = "/v2/models/"


class V2:
    drift: InputDrift | None = None  # set by the app where this process serves /v2

    def __init__(
        self, config: GatewaySettings, *, auth: Auth, governance: Governance, forwarder: Forwarder
    ) -> None:
        self.config, self.auth, self.governance, self.forwarder = config, auth, governance, forwarder

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        caller = await self.auth.caller(scope)
        path: str = scope["path"]
        name, _, tail = path[len(PREFIX) :].partition("/")
        if "/versions/" in "/" + tail:  # /v2/models/{name}/versions/{v}/... : one version per deployment
            tail = tail.split("/", 2)[2] if tail.count("/") >= 2 else ""
        route = self.auth.route(caller, name, "v2")
        method = scope["method"]
        if tail == "ready" and method == "GET":
            ready = bool(route.endpoints) and route.denial is None
            return await respond(send, 200 if ready else 503, orjson.dumps({"name": name, "ready": ready}))
        if tail == "" and method == "GET":
            return await self._metadata(send, route, name)
        if tail == "infer" and method == "POST":
            raw = await read_body(receive, self.config.max_body_bytes)
            self.governance.permit(route)
            if self.governance.hooks:
                body = decode(raw)
                if not isinstance(body, dict):
                    raise bad("body", "A V2 inference request is a JSON object with 'inputs'")
                raw = await self.governance.run_hooks(caller=caller, route=route, endpoint="v2", body=body)
            request = Request(
                caller=caller,
                route=route,
                endpoint="v2",
                path=f"{PREFIX}{route.model_name}/infer",
                body=raw,
                model=name,
                stream=False,
                include_usage=False,
                reserve=0,
            )
            if self.drift is None:
                return await self.forwarder.forward(request, receive, send)
            return await self._forward_counted(request, receive, send, drift=self.drift)
        raise GatewayError(404, f"Unknown V2 route {path}", code="not_found")

    async def _forward_counted(
        self, request: Request, receive: Receive, send: Send, *, drift: InputDrift
    ) -> None:
        """Forward, and count the inputs of a request the replica accepted (2xx): what it
        refused (a wrong shape, a wrong type) says nothing about the inputs' distribution."""
        status = 0

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.forwarder.forward(request, receive, watched)
        if 200 <= status < 300:
            drift.record(request.route, request.body)

    async def _metadata(self, send: Send, route: Route, name: str) -> None:
        _, pool, replica = await self.forwarder.acquire(route, ())
        if replica is None:
            raise GatewayError(
                503, f"'{name}' has no ready replica", type_="server_error", code="no_ready_replica"
            )
        ok = False
        try:
            async with self.forwarder.http.get(f"{replica.endpoint}{PREFIX}{route.model_name}") as response:
                data = await response.read()
                ok = response.status < 500
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise classify(exc, replica.endpoint).answer(route) from None
        finally:
            pool.release(replica, ok=ok)
        await respond(send, response.status, data)
