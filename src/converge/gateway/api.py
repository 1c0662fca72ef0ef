"""The data path as a plain ASGI app: OpenAI-compatible /v1 and Open Inference (V2) /v2.

Per request and in memory only: authenticate the key (cached), resolve the model name inside
the caller's project, apply governance and limits, pick a replica, forward the body as bytes,
meter. Bodies are parsed once with orjson and checked against the parameter table of the server
that answers them (`params.py`), then forwarded unchanged unless a parameter had to be
translated; no pydantic, no database, no INFO log on this path.

Errors use the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}``: unknown
model 404, malformed body 400 naming the field, over a limit 429 with Retry-After, upstream
timeout 504, unreachable 503, bad upstream answer 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog
from prometheus_client import CollectorRegistry
from starlette.types import Receive, Scope, Send

from converge.config import Settings
from converge.core import apikeys
from converge.gateway import params, upstream, usage
from converge.gateway.dataplane import WAITING_PHASES, DataPlane, KeyEntry, ProjectEntry, Route
from converge.gateway.limits import Limiter, Limits, Rejection
from converge.gateway.metering import CounterSync, Meter, Spool
from converge.gateway.metrics import GatewayMetrics
from converge.gateway.routing import Pool, QueueFull, QueueTimeout, Replica

log = structlog.get_logger(__name__)

OPENAI_PATHS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
# What each model server answers; a server not listed here is assumed to speak all of /v1.
SERVES = {
    "llama-cpp": frozenset({"chat", "completions"}),
    "embeddings": frozenset({"embeddings"}),
    "v2": frozenset({"v2"}),
}
JSON = (b"content-type", b"application/json")
UPSTREAM_HEADERS = {"Content-Type": "application/json"}


@dataclass(slots=True)
class Caller:
    key: KeyEntry | None  # None: the bootstrap token
    project: ProjectEntry

    @property
    def scopes(self) -> tuple[tuple[str, Limits | None], ...]:
        project = (self.project.scope, self.project.limits)
        return ((self.key.scope, self.key.limits), project) if self.key is not None else (project,)


@dataclass(slots=True)
class Refusal:
    """What a governance hook answers to refuse a request (403 unless it says otherwise)."""

    message: str
    status: int = 403
    code: str = "refused_by_policy"


@dataclass(slots=True)
class HookContext:
    caller: Caller
    route: Route
    endpoint: str
    body: dict[str, Any]  # a hook may change it; the changed body is what gets forwarded


Hook = Callable[[HookContext], Awaitable[Refusal | None]]


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


def _bad(param: str, message: str, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


class Gateway:
    """The ASGI app and the services behind it (snapshot, meter, counter sync)."""

    name = "gateway"

    def __init__(self, settings: Settings, *, registry: CollectorRegistry) -> None:
        self.settings, self.config = settings, settings.gateway
        self.pepper = settings.auth.secret_key.get_secret_value()
        self.bootstrap = (
            settings.bootstrap_token.get_secret_value().encode() if settings.bootstrap_token else None
        )
        self.project_header = self.config.project_header.lower().encode()
        self.limiter = Limiter()
        self.pools: dict[uuid.UUID, Pool] = {}
        self.hooks: list[Hook] = []  # governance and guardrails (rulesets plug in here)
        self.metrics = GatewayMetrics(registry, lambda: {p.name: p for p in self.pools.values()})
        self.dataplane: DataPlane | None = None
        self.meter: Meter | None = None
        self.sync: CounterSync | None = None
        self.http: aiohttp.ClientSession | None = None
        self._tokens: dict[bytes, KeyEntry | None] = {}
        self._tokens_for: object = None
        self._misses: dict[str, float] = {}
        self._woken: dict[uuid.UUID, float] = {}
        self._unary_timeout, self._stream_timeout = upstream.timeouts(self.config)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        parts = (self.dataplane, self.meter, self.sync)
        return all(p is not None and p.healthy for p in parts)

    async def start(self, *, sessions: Any, conninfo: str) -> None:
        self.http = upstream.session(self.config)
        self.dataplane = DataPlane(
            sessions=sessions, conninfo=conninfo, refresh_s=self.config.snapshot_refresh_s
        )
        self.meter = Meter(
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
        await self.dataplane.start()
        await self.meter.start()
        await self.sync.start()

    async def stop(self) -> None:
        for part in (self.sync, self.meter, self.dataplane):
            if part is not None:
                await part.stop()
        if self.http is not None:
            await self.http.close()

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path in ("/v2/health/live", "/v2/health/ready"):
            ok = self.healthy
            body = orjson.dumps({"live": True} if path.endswith("live") else {"ready": ok})
            return await _respond(send, 200 if ok or path.endswith("live") else 503, body)
        endpoint = OPENAI_PATHS.get(path)
        if endpoint is not None:
            if method != "POST":
                raise GatewayError(405, f"{path} takes POST", code="method_not_allowed")
            caller = await self._authenticate(scope)
            return await self._inference(receive, send, caller, endpoint, path)
        if path == "/v1/models" or path.startswith("/v1/models/"):
            if method != "GET":
                raise GatewayError(405, f"{path} takes GET", code="method_not_allowed")
            return await self._models(send, await self._authenticate(scope), path[len("/v1/models/") :])
        if path.startswith("/v2/models/"):
            return await self._v2(scope, receive, send, path)
        raise GatewayError(404, f"Unknown path {path}: the gateway serves /v1/* (OpenAI) and /v2/* (V2)")

    # -- authentication -----------------------------------------------------------------------

    async def _authenticate(self, scope: Scope) -> Caller:
        assert self.dataplane is not None
        auth = project_name = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value
            elif name == self.project_header or name == b"x-converge-project":
                project_name = value
        if not auth or not auth[:7].lower() == b"bearer ":
            raise GatewayError(
                401,
                "Send a Converge API key as 'Authorization: Bearer cvg_...'",
                type_="authentication_error",
                code="missing_api_key",
            )
        key = self._verified().get(auth, False)
        if key is False:
            key = await self._verify(auth[7:].strip())
            self._verified()[auth] = key
        if key is None:
            if self.bootstrap is not None and hmac.compare_digest(auth[7:].strip(), self.bootstrap):
                return Caller(key=None, project=self._org_project(project_name))
            raise GatewayError(401, "Invalid API key", type_="authentication_error", code="invalid_api_key")
        assert isinstance(key, KeyEntry)
        if key.revoked:
            raise GatewayError(
                401, f"API key {key.prefix} was revoked", type_="authentication_error", code="revoked_api_key"
            )
        if key.expires_at is not None and key.expires_at <= time.time():
            raise GatewayError(
                401, f"API key {key.prefix} has expired", type_="authentication_error", code="expired_api_key"
            )
        if key.project_id is None:
            return Caller(key=key, project=self._org_project(project_name))
        project = self.dataplane.snapshot.projects.get(key.project_id)
        if project is None:
            raise GatewayError(401, "The key's project no longer exists", type_="authentication_error")
        return Caller(key=key, project=project)

    def _verified(self) -> dict[bytes, KeyEntry | None]:
        """Authorization header -> its key (None: not a key), for the current snapshot only."""
        assert self.dataplane is not None
        snapshot = self.dataplane.snapshot
        if self._tokens_for is not snapshot or len(self._tokens) > 100_000:  # keys may have changed
            self._tokens, self._tokens_for = {}, snapshot
        return self._tokens

    async def _verify(self, token: bytes) -> KeyEntry | None:
        assert self.dataplane is not None
        parts = apikeys.split(token.decode(errors="replace"))
        if parts is None:
            return None
        entry = self.dataplane.snapshot.keys.get(parts[0])
        if entry is None and time.monotonic() - self._misses.get(parts[0], -60.0) > 30.0:
            # Perhaps a key created a moment ago, whose reload is on its way: wait for it (a
            # prefix that is still unknown after that is not waited for again for a while, so
            # made-up keys cost nothing).
            self.dataplane.mark_dirty()
            await self.dataplane.wait_for_change(2.0)
            entry = self.dataplane.snapshot.keys.get(parts[0])
            if entry is None:
                if len(self._misses) > 10_000:
                    self._misses.clear()
                self._misses[parts[0]] = time.monotonic()
        if entry is None:
            return None
        return entry if apikeys.matches(parts[1], entry.secret_hash, pepper=self.pepper) else None

    def _org_project(self, name: bytes | None) -> ProjectEntry:
        """Organisation keys name their project in a header (the OpenAI SDK's `project=`)."""
        assert self.dataplane is not None
        snapshot = self.dataplane.snapshot
        wanted = name.decode(errors="replace") if name else self.config.default_project
        project_id = snapshot.project_names.get(wanted)
        if project_id is None:
            with contextlib.suppress(ValueError):
                project_id = uuid.UUID(wanted)
        if project_id not in snapshot.projects:
            raise GatewayError(
                404,
                f"No project '{wanted}'; organisation keys choose one with the "
                f"'{self.config.project_header}' header",
                code="project_not_found",
            )
        return snapshot.projects[project_id]

    # -- routes -------------------------------------------------------------------------------

    def _route(self, caller: Caller, model: str, endpoint: str | None = None) -> Route:
        """The caller's deployment of that name; with an endpoint, one whose server answers it."""
        assert self.dataplane is not None
        route = self.dataplane.snapshot.routes.get(caller.project.id, {}).get(model)
        if route is None:
            raise GatewayError(
                404,
                f"The model '{model}' does not exist or you do not have access to it",
                param="model",
                code="model_not_found",
            )
        if endpoint is not None and endpoint not in SERVES.get(route.server, (endpoint,)):
            answers = (
                "the /v1 routes" if endpoint == "v2" else "the V2 routes" if route.server == "v2" else ""
            )
            raise GatewayError(
                400,
                f"'{model}' is served by {route.server}, which does not answer {endpoint} requests"
                + (f"; use {answers}" if answers else ""),
                param="model",
                code="unsupported_endpoint",
            )
        return route

    async def _models(self, send: Send, caller: Caller, wanted: str) -> None:
        assert self.dataplane is not None
        routes = self.dataplane.snapshot.listed.get(caller.project.id, [])
        entries = [
            {"id": name, "object": "model", "created": r.created, "owned_by": caller.project.name}
            for r in routes
            for name in (r.name, *r.aliases)
        ]
        if wanted:
            found = next((e for e in entries if e["id"] == wanted), None)
            if found is None:
                self._route(caller, wanted)  # the 404 with its usual message
                found = {"id": wanted, "object": "model", "created": 0, "owned_by": caller.project.name}
            return await _respond(send, 200, orjson.dumps(found))
        await _respond(send, 200, orjson.dumps({"object": "list", "data": entries}))

    def _pool(self, route: Route) -> Pool:
        pool = self.pools.get(route.deployment_id)
        if pool is None:
            pool = Pool(
                name=route.label,
                max_per_replica=self.config.max_in_flight_per_replica,
                queue_size=self.config.queue_size,
                breaker_failures=self.config.breaker_failures,
                breaker_open_s=self.config.breaker_open_s,
                on_breaker=lambda r, label=route.label: log.warning(
                    "gateway_breaker", deployment=label, replica=r.endpoint, state=r.state.name.lower()
                ),
            )
            self.pools[route.deployment_id] = pool
        pool.update(route.endpoints)
        return pool

    # -- inference ----------------------------------------------------------------------------

    async def _inference(
        self, receive: Receive, send: Send, caller: Caller, endpoint: str, path: str
    ) -> None:
        raw = await self._read_body(receive)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _bad("body", f"The request body is not valid JSON: {exc}") from None
        try:
            model = params.model_of(body)
            route = self._route(caller, model, endpoint)
            ask = params.read(body, endpoint=endpoint, server=route.server, model=model)
        except params.Invalid as exc:
            raise _bad(exc.param, exc.message, exc.code) from None
        if ask.rewrite:  # a parameter was translated for this server
            raw = orjson.dumps(body)
        raw = await self._govern(caller, route, endpoint, body, raw)
        # Reserve the worst case: the prompt (at most one token per 4 bytes of body, a generous
        # bound) plus the completion asked for (or the default), settled to the real count later.
        asked = ask.completion_limit or self.config.default_max_tokens
        completion = 0 if endpoint == "embeddings" else asked * ask.choices
        reserve = len(raw) // 4 + 1 + completion
        await self._forward(receive, send, caller, route, endpoint, path, raw, ask, reserve)

    async def _govern(
        self, caller: Caller, route: Route, endpoint: str, body: dict[str, Any], raw: bytes
    ) -> bytes:
        if route.denial is not None:
            self.metrics.rejected.labels("governance").inc()
            raise GatewayError(
                403,
                f"'{route.name}' may not serve: {route.denial}",
                type_="permission_error",
                code="deployment_not_permitted",
            )
        if not self.hooks:
            return raw
        context = HookContext(caller=caller, route=route, endpoint=endpoint, body=body)
        for hook in self.hooks:
            refusal = await hook(context)
            if refusal is not None:
                self.metrics.rejected.labels("hook").inc()
                raise GatewayError(
                    refusal.status, refusal.message, type_="permission_error", code=refusal.code
                )
        return orjson.dumps(context.body)

    async def _forward(
        self,
        receive: Receive,
        send: Send,
        caller: Caller,
        route: Route,
        endpoint: str,
        path: str,
        raw: bytes,
        ask: params.Ask,
        reserve: int,
    ) -> None:
        started, t0 = time.time(), time.perf_counter()
        admitted = self.limiter.check(caller.scopes, reserve, started)
        if isinstance(admitted, Rejection):
            self.metrics.rejected.labels(admitted.code).inc()
            raise GatewayError(
                429,
                admitted.message,
                type_="rate_limit_error" if admitted.code == "rate_limit_exceeded" else "insufficient_quota",
                code=admitted.code,
                headers=((b"retry-after", str(admitted.retry_after).encode()), *admitted.headers),
            )
        status, prompt, completion, ttft = 499, 0, 0, None
        stream = ask.stream
        try:
            if stream:
                status, prompt, completion, ttft = await self._stream(
                    receive,
                    send,
                    caller,
                    route,
                    endpoint,
                    path,
                    raw,
                    t0,
                    include_usage=ask.include_usage is True,
                )
            else:
                status, prompt, completion = await self._unary(send, caller, route, endpoint, path, raw)
        except GatewayError as exc:
            status = exc.status
            raise
        finally:
            if status >= 400 and prompt == 0 and completion == 0:
                used = 0  # nothing was generated: give the reservation back
            else:
                used = prompt + completion if (prompt or completion) else reserve
            self.limiter.settle(admitted, used)
            elapsed = time.perf_counter() - t0
            series = self.metrics.series(route.label, endpoint)
            series.requests(status).inc()
            series.latency.observe(elapsed)
            if prompt:
                series.prompt.inc(prompt)
            if completion:
                series.completion.inc(completion)
            assert self.meter is not None
            self.meter.record(
                started=started,
                project_id=caller.project.id,
                key_id=caller.key.id if caller.key else None,
                deployment_id=route.deployment_id,
                model=ask.model,
                endpoint=endpoint,
                status=status,
                stream=stream,
                prompt_tokens=prompt,
                completion_tokens=completion,
                latency_ms=elapsed * 1000,
                ttft_ms=ttft * 1000 if ttft is not None else None,
            )

    async def _acquire(
        self, route: Route, exclude: tuple[Replica, ...]
    ) -> tuple[Route, Pool, Replica | None]:
        """A replica slot, waking the deployment or waiting for it to become ready if need be."""
        assert self.dataplane is not None
        pool = self._pool(route)
        deadline = None
        while True:
            try:
                replica = await pool.acquire(exclude, self.config.queue_timeout_s)
            except QueueFull:
                self.metrics.rejected.labels("queue_full").inc()
                raise _unavailable(
                    f"'{route.name}' is at capacity ({self.config.queue_size} requests waiting); retry shortly",
                    "queue_full",
                    retry_after=1,
                ) from None
            except QueueTimeout:
                raise _unavailable(
                    f"'{route.name}' had no free replica within {self.config.queue_timeout_s:g} s",
                    "queue_timeout",
                    retry_after=1,
                ) from None
            if replica is not None or pool.replicas or exclude:
                return route, pool, replica
            # No ready replica at all: wake a deployment scaled to zero, wait for one that starts.
            if route.phase not in WAITING_PHASES and route.desired_replicas > 0:
                return route, pool, None
            now = time.monotonic()
            deadline = deadline or now + self.config.wake_timeout_s
            if now >= deadline:
                raise _unavailable(
                    f"'{route.name}' did not become ready within {self.config.wake_timeout_s:g} s",
                    "not_ready",
                    retry_after=5,
                )
            if len(pool.waiters) + pool.waking >= self.config.queue_size:
                raise _unavailable(
                    f"'{route.name}' is starting and its queue is full", "queue_full", retry_after=1
                )
            if route.desired_replicas == 0 and now - self._woken.get(route.deployment_id, 0.0) > 5.0:
                self._woken[route.deployment_id] = now
                await self.dataplane.request_wake(route.deployment_id)
            pool.waking += 1  # waiting for a replica to start counts against the queue too
            try:
                await self.dataplane.wait_for_change(min(1.0, deadline - now))
            finally:
                pool.waking -= 1
            fresh = self.dataplane.snapshot.by_id.get(route.deployment_id)
            if fresh is None:
                raise GatewayError(404, f"The model '{route.name}' no longer exists", code="model_not_found")
            route, pool = fresh, self._pool(fresh)

    async def _attempt(
        self, route: Route, url_path: str, raw: bytes, *, stream: bool, tried: tuple[Replica, ...]
    ) -> tuple[Route, Pool, Replica, aiohttp.ClientResponse]:
        """Send to a replica, retrying on another (with backoff) after a connect failure or a 503.

        `tried` are replicas that already failed this request; they are not asked again."""
        assert self.http is not None
        last: upstream.UpstreamError | None = None
        for attempt in range(self.config.retries + 1):
            route, pool, replica = await self._acquire(route, tried)
            if replica is None:
                break
            try:
                response = await self.http.post(
                    replica.endpoint + url_path,
                    data=raw,
                    headers=UPSTREAM_HEADERS,
                    timeout=self._stream_timeout if stream else self._unary_timeout,
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = upstream.classify(exc, replica.endpoint)
            else:
                if response.status != 503:
                    return route, pool, replica, response
                response.release()
                last = upstream.UpstreamError(503, "the model server is overloaded", retryable=True)
            pool.release(replica, ok=False)
            self.metrics.upstream_errors.labels(route.label, str(last.status)).inc()
            if not last.retryable:
                break
            tried += (replica,)
            if attempt < self.config.retries:
                await asyncio.sleep(self.config.retry_backoff_s * (2**attempt))
        if last is None:
            raise _unavailable(f"'{route.name}' has no ready replica", "no_ready_replica", retry_after=5)
        raise _upstream_failed(route, last)

    async def _unary(
        self, send: Send, caller: Caller, route: Route, endpoint: str, path: str, raw: bytes
    ) -> tuple[int, int, int]:
        tried: tuple[Replica, ...] = ()
        while True:
            route, pool, replica, response = await self._attempt(route, path, raw, stream=False, tried=tried)
            try:
                data = await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = upstream.classify(exc, replica.endpoint)
                pool.release(replica, ok=False)
                self.metrics.upstream_errors.labels(route.label, str(error.status)).inc()
                if error.retryable and len(tried) < self.config.retries:
                    tried += (replica,)  # it died while answering: nothing was sent yet, ask another
                    continue
                raise _upstream_failed(route, error) from None
            status = response.status
            pool.release(replica, ok=status < 500)
            break
        if status >= 500:
            self.metrics.upstream_errors.labels(route.label, str(status)).inc()
            raise _upstream_failed(
                route, upstream.UpstreamError(502, f"the model server failed ({status})", retryable=False)
            )
        prompt = completion = 0
        if status == 200 and endpoint != "v2":
            used = usage.usage_of(data)
            if used is None:
                self.metrics.upstream_errors.labels(route.label, "502").inc()
                raise _upstream_failed(
                    route,
                    upstream.UpstreamError(502, "the model server's answer has no usage", retryable=False),
                )
            prompt, completion = used
        headers = [(b"content-type", response.headers.get("Content-Type", "application/json").encode())]
        headers += self._limit_headers(caller)
        await _respond(send, status, data, headers)
        return status, prompt, completion

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        caller: Caller,
        route: Route,
        endpoint: str,
        path: str,
        raw: bytes,
        t0: float,
        *,
        include_usage: bool,
    ) -> tuple[int, int, int, float | None]:
        route, pool, replica, response = await self._attempt(route, path, raw, stream=True, tried=())
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        tally = usage.StreamUsage(
            owed=include_usage, endpoint=endpoint, prompt_estimate=_prompt_estimate(raw)
        )
        ttft: float | None = None
        ok: bool | None = True
        status = response.status
        try:
            if status != 200:
                data = await response.read()
                ok = status < 500
                if status >= 500:
                    error = upstream.UpstreamError(
                        502, f"the model server failed ({status})", retryable=False
                    )
                    raise _upstream_failed(route, error)
                await _respond(
                    send,
                    status,
                    data,
                    [(b"content-type", response.headers.get("Content-Type", "application/json").encode())],
                )
                return status, 0, 0, None
            headers = [
                (b"content-type", response.headers.get("Content-Type", "text/event-stream").encode()),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                *self._limit_headers(caller),
            ]
            content = response.content
            idle = self.config.idle_stream_timeout_s
            first_wait = self.config.first_byte_timeout_s
            while True:
                try:
                    async with asyncio.timeout(first_wait if ttft is None else idle):
                        chunk = await content.readany()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    ok = False
                    error = upstream.classify(exc, replica.endpoint)
                    self.metrics.upstream_errors.labels(route.label, str(error.status)).inc()
                    if ttft is None:  # nothing was sent yet: a proper error answer
                        raise _upstream_failed(route, error) from None
                    break  # the stream had begun: all that is left is to end it
                if not chunk:
                    if ttft is None:
                        await send({"type": "http.response.start", "status": 200, "headers": headers})
                    if rest := tally.end():
                        await send({"type": "http.response.body", "body": rest, "more_body": True})
                    break
                chunk = tally.feed(chunk)
                if not chunk:  # only part of an event so far
                    continue
                if ttft is None:
                    # The headers go out with the first chunk, so a replica that fails before
                    # its first token still gets a proper error status.
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    ttft = time.perf_counter() - t0
                    self.metrics.series(route.label, endpoint).ttft.observe(ttft)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return (status, *tally.used(), ttft)
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()
            ok = None  # the client left: not the replica's fault
            return (499, tally.prompt, tally.completion, ttft)
        finally:
            watcher.cancel()
            response.close()  # on a client that left this also cancels the upstream generation
            pool.release(replica, ok=ok)

    def _limit_headers(self, caller: Caller) -> list[tuple[bytes, bytes]]:
        key = caller.key
        if key is not None and key.limits is not None:
            return self.limiter.headers(key.scope, key.limits)
        if caller.project.limits is not None:
            return self.limiter.headers(caller.project.scope, caller.project.limits)
        return []

    # -- V2 -----------------------------------------------------------------------------------

    async def _v2(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        caller = await self._authenticate(scope)
        rest = path[len("/v2/models/") :]
        name, _, tail = rest.partition("/")
        if "/versions/" in "/" + tail:  # /v2/models/{name}/versions/{v}/... : one version per deployment
            tail = tail.split("/", 2)[2] if tail.count("/") >= 2 else ""
        route = self._route(caller, name, "v2")
        method = scope["method"]
        if tail == "ready" and method == "GET":
            ready = bool(route.endpoints) and route.denial is None
            return await _respond(send, 200 if ready else 503, orjson.dumps({"name": name, "ready": ready}))
        if tail == "" and method == "GET":
            return await self._v2_metadata(send, route, name)
        if tail == "infer" and method == "POST":
            raw = await self._read_body(receive)
            raw = await self._govern(caller, route, "v2", orjson.loads(raw) if self.hooks else {}, raw)
            path_up = f"/v2/models/{route.model_name}/infer"
            return await self._forward(receive, send, caller, route, "v2", path_up, raw, params.Ask(name), 0)
        raise GatewayError(404, f"Unknown V2 route {path}", code="not_found")

    async def _v2_metadata(self, send: Send, route: Route, name: str) -> None:
        assert self.http is not None
        _, pool, replica = await self._acquire(route, ())
        if replica is None:
            raise GatewayError(
                503, f"'{name}' has no ready replica", type_="server_error", code="no_ready_replica"
            )
        ok = False
        try:
            async with self.http.get(f"{replica.endpoint}/v2/models/{route.model_name}") as response:
                data = await response.read()
                ok = response.status < 500
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _upstream_failed(route, upstream.classify(exc, replica.endpoint)) from None
        finally:
            pool.release(replica, ok=ok)
        await _respond(send, response.status, data)

    # -- plumbing -----------------------------------------------------------------------------

    async def _read_body(self, receive: Receive) -> bytes:
        limit = self.config.max_body_bytes
        message = await receive()
        body = message.get("body", b"")
        if not message.get("more_body"):
            return body
        parts = [body]
        size = len(body)
        while message.get("more_body"):
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise GatewayError(
                    413, f"The request body is larger than {limit} bytes", code="body_too_large"
                )
            parts.append(chunk)
        return b"".join(parts)

    async def _error(self, send: Send, exc: GatewayError) -> None:
        if exc.status >= 500:
            log.debug("gateway_error", status=exc.status, message=exc.message)
        await _respond(send, exc.status, exc.body(), [JSON, *exc.headers])


def _unavailable(message: str, code: str, *, retry_after: int) -> GatewayError:
    headers = ((b"retry-after", str(retry_after).encode()),)
    return GatewayError(503, message, type_="server_error", code=code, headers=headers)


def _upstream_failed(route: Route, error: upstream.UpstreamError) -> GatewayError:
    code = {504: "upstream_timeout", 503: "upstream_unavailable"}.get(error.status, "bad_upstream_answer")
    return GatewayError(error.status, f"'{route.name}': {error.message}", type_="server_error", code=code)


def _prompt_estimate(raw: bytes) -> int:
    """Prompt tokens of a stream whose upstream counts none (llama.cpp): about 4 bytes a token."""
    return len(raw) // 4 + 1


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = headers if headers is not None else [JSON]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
