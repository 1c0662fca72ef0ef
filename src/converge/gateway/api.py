"""The data path as a plain ASGI app: OpenAI-compatible /v1 and Open Inference (V2) /v2.

Per request and in memory only: authenticate the key (cached, `auth.py`), resolve the model
name inside the caller's project, check the body (`openai.py`, `params.py`), apply governance
(`governance.py`) and limits, pick a replica and forward the body as bytes, meter
(`upstream.py`); V2 in `v2.py`. Rulesets apply after the hooks (`guard.py`); RAG models and
agents are answered by `virtual_handler` (`virtual.py`); the control plane's chat calls go
through `chat`/`chat_stream` (`inprocess.py`). No pydantic, no database, no INFO log on this path. This module
is the dispatch by path and the lifecycle of the services behind it. Errors use the OpenAI
envelope (`errors.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import aiohttp
import orjson
import structlog
from prometheus_client import CollectorRegistry
from starlette.types import Message, Receive, Scope, Send

from converge.config import Settings
from converge.gateway import upstream
from converge.gateway.auth import Auth, Caller
from converge.gateway.dataplane import DataPlane
from converge.gateway.errors import JSON, GatewayError, respond
from converge.gateway.governance import Governance, Hook, HookContext, Refusal
from converge.gateway.guard import Guardrails
from converge.gateway.hits import HitLog
from converge.gateway.inprocess import ChatStream, ChatTurn
from converge.gateway.inprocess import chat as chat_in_process
from converge.gateway.inprocess import chat_stream as stream_in_process
from converge.gateway.limits import Limiter
from converge.gateway.metering import CounterSync, Meter, Spool
from converge.gateway.metrics import GatewayMetrics
from converge.gateway.openai import PATHS as OPENAI_PATHS
from converge.gateway.openai import OpenAI
from converge.gateway.routing import Pool
from converge.gateway.v2 import V2
from converge.gateway.virtual import VirtualHandler, VirtualModel
from converge.observability import tracing

__all__ = [
    "Caller",
    "ChatStream",
    "ChatTurn",
    "Gateway",
    "GatewayError",
    "Hook",
    "HookContext",
    "Refusal",
    "VirtualHandler",
    "VirtualModel",
]

log = structlog.get_logger(__name__)
HEALTH = ("/v2/health/live", "/v2/health/ready")
V2_TAILS = frozenset({"", "ready", "infer"})


def route_template(path: str) -> str:
    """The route a path matches, with names as placeholders: a span's name stays bounded."""
    if path in OPENAI_PATHS or path in HEALTH or path == "/v1/models":
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v2/models/"):
        _, _, tail = path[len("/v2/models/") :].partition("/")
        versioned = tail.startswith("versions/")
        if versioned:
            tail = tail.split("/", 2)[2] if tail.count("/") >= 2 else ""
        if tail in V2_TAILS:
            return (
                "/v2/models/{name}"
                + ("/versions/{version}" if versioned else "")
                + (f"/{tail}" if tail else "")
            )
    return "unmatched"


class Gateway:
    """The ASGI app and the services behind it (snapshot, meter, counter sync)."""

    name = "gateway"
    # Built in start(), once the services they use exist.
    auth: Auth
    forwarder: upstream.Forwarder
    openai: OpenAI
    v2: V2

    def __init__(self, settings: Settings, *, registry: CollectorRegistry) -> None:
        self.settings, self.config = settings, settings.gateway
        self.limiter = Limiter()
        self.pools: dict[uuid.UUID, Pool] = {}
        self.hooks: list[Hook] = []  # governance and guardrails (rulesets plug in here)
        self.metrics = GatewayMetrics(registry, lambda: {p.name: p for p in self.pools.values()})
        self.dataplane: DataPlane | None = None
        self.meter: Meter | None = None
        self.sync: CounterSync | None = None
        self.http: aiohttp.ClientSession | None = None
        self.hits: HitLog | None = None
        # Answers RAG models and agents (set by the app: the gateway cannot import it).
        self.virtual_handler: VirtualHandler | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        parts = (self.dataplane, self.meter, self.sync, self.hits)
        return all(p is not None and p.healthy for p in parts)

    async def start(self, *, sessions: Any, conninfo: str) -> None:
        self.http = http = upstream.session(self.config)
        self.dataplane = dataplane = DataPlane(
            sessions=sessions, conninfo=conninfo, refresh_s=self.config.snapshot_refresh_s
        )
        self.meter = meter = Meter(
            conninfo=conninfo,
            interval_s=self.config.meter_flush_s,
            key_touch_s=self.settings.auth.key_last_used_resolution_s,
            on_dropped=self.metrics.meter_dropped.inc,
            retention_days=self.config.usage_retention_days,
            spool=Spool(
                self.settings.data_dir / "gateway" / "usage.spool",
                max_bytes=self.config.usage_spool_max_bytes,
            ),
        )
        self.sync = CounterSync(conninfo=conninfo, interval_s=self.config.limits_sync_s, limiter=self.limiter)
        self.auth = Auth(self.settings, dataplane=dataplane)
        self.forwarder = upstream.Forwarder(
            self.config,
            http=http,
            dataplane=dataplane,
            meter=meter,
            limiter=self.limiter,
            metrics=self.metrics,
            pools=self.pools,
        )
        governance = Governance(self.hooks, self.metrics)

        def ignore(ids: list[int]) -> None:
            if len(dataplane.ignore) > 10_000:  # notifications that never came back
                dataplane.ignore.clear()
            dataplane.ignore.update(str(i) for i in ids)

        self.hits = hits = HitLog(conninfo=conninfo, interval_s=self.config.meter_flush_s, on_written=ignore)
        guardrails = Guardrails(dataplane=dataplane, metrics=self.metrics, hits=hits)
        self.openai = OpenAI(
            self.config,
            auth=self.auth,
            governance=governance,
            forwarder=self.forwarder,
            guardrails=guardrails,
            virtual_handler=lambda: self.virtual_handler,
        )
        self.v2 = V2(self.config, auth=self.auth, governance=governance, forwarder=self.forwarder)
        await dataplane.start()
        await meter.start()
        await self.sync.start()
        await hits.start()

    async def stop(self) -> None:
        for part in (self.hits, self.sync, self.meter, self.dataplane):
            if part is not None:
                await part.stop()
        if self.http is not None:
            await self.http.close()

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send, *, traced: bool = True) -> None:
        if traced and tracing.ENABLED:  # off: one flag read, no other cost
            await self._traced(scope, receive, send)
            return
        try:
            await self._handle(scope, receive, send)
        except GatewayError as exc:
            await self._error(send, exc)
        except Exception:
            log.exception("gateway_failed", path=scope.get("path"))
            with contextlib.suppress(Exception):  # unless the answer had already started
                await self._error(
                    send, GatewayError(500, "Internal error in the gateway", type_="server_error")
                )

    async def _traced(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The request as a server span that continues the client's `traceparent`; the answer
        carries the span's own."""
        method = scope["method"]
        template = route_template(scope["path"])
        active = tracing.ActiveSpan(
            f"{method} {template}",
            kind="server",
            headers=scope["headers"],
            attributes={"http.request.method": method, "http.route": template},
        )
        header = (b"traceparent", active.traceparent())
        status = 500

        async def traced_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self(scope, receive, traced_send, traced=False)
        finally:
            active.end(status=status)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        endpoint = OPENAI_PATHS.get(path)
        if endpoint is not None:
            if method != "POST":
                raise GatewayError(405, f"{path} takes POST", code="method_not_allowed")
            caller = await self.auth.caller(scope)
            return await self.openai.infer(receive, send, caller=caller, endpoint=endpoint, path=path)
        if path in HEALTH:
            ok = self.healthy
            body = orjson.dumps({"live": True} if path.endswith("live") else {"ready": ok})
            return await respond(send, 200 if ok or path.endswith("live") else 503, body)
        if path == "/v1/models" or path.startswith("/v1/models/"):
            if method != "GET":
                raise GatewayError(405, f"{path} takes GET", code="method_not_allowed")
            caller = await self.auth.caller(scope)
            return await self.openai.models(send, caller, path[len("/v1/models/") :])
        if path.startswith("/v2/models/"):
            return await self.v2.handle(scope, receive, send)
        raise GatewayError(404, f"Unknown path {path}: the gateway serves /v1/* (OpenAI) and /v2/* (V2)")

    # -- in-process callers ---------------------------------------------------------------------

    async def call(self, caller: Caller, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """POST an OpenAI request as `caller` without HTTP: the same checks, limits, routing,
        forwarding and metering as a request from outside (the control plane's own clients,
        knowledge-base embeddings, use it). Returns (status, decoded JSON body); errors come
        back as their OpenAI envelope, not raised."""
        endpoint = OPENAI_PATHS.get(path)
        if endpoint is None:
            raise ValueError(f"{path} is not an OpenAI path the gateway serves")
        raw = orjson.dumps(body)
        sent = False
        status, parts = 500, list[bytes]()

        async def receive() -> Message:
            nonlocal sent
            if sent:  # the caller stays connected until the answer is complete
                await asyncio.get_running_loop().create_future()
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        try:
            await self.openai.infer(receive, send, caller=caller, endpoint=endpoint, path=path)
        except GatewayError as exc:
            return exc.status, orjson.loads(exc.body())
        return status, orjson.loads(b"".join(parts)) if parts else None

    async def chat(
        self, caller: Caller, body: dict[str, Any], *, ruleset_id: uuid.UUID | None = None
    ) -> ChatTurn:
        """A chat completion as `caller`, with its trace (see inprocess.py): the same limits,
        queueing, rulesets and metering as over HTTP. `body["model"]` names a deployment or
        alias of the caller's project; `ruleset_id` replaces the deployment's default ruleset.
        Errors raise GatewayError, the trace so far on `error.turn`."""
        return await chat_in_process(self.openai, caller, body=body, ruleset_id=ruleset_id)

    async def chat_stream(
        self, caller: Caller, body: dict[str, Any], *, ruleset_id: uuid.UUID | None = None
    ) -> ChatStream:
        """The same, streamed: iterate the chunk dicts; `.turn` is complete once it ended.
        An error before the first chunk raises GatewayError here."""
        return await stream_in_process(self.openai, caller, body=body, ruleset_id=ruleset_id)

    async def _error(self, send: Send, exc: GatewayError) -> None:
        if exc.status >= 500:
            log.debug("gateway_error", status=exc.status, message=exc.message)
        await respond(send, exc.status, exc.body(), [JSON, *exc.headers])
