"""A fake Kubernetes API server at the HTTP boundary, for the Kubernetes backend's tests.

An aiohttp server that keeps objects by (group, resource, namespace, name) and answers the
requests a client sends to a real API server, on the real paths (`/api/v1/namespaces/{ns}/pods`,
`/apis/apps/v1/namespaces/{ns}/deployments/{name}/status`, ...), with `Status` objects for errors.
What it implements, following the API conventions rather than what would be easiest:

- GET, LIST (label and field selectors, `limit`/`continue`), POST, PUT (optimistic concurrency on
  `metadata.resourceVersion`), PATCH (merge patch; a strategic merge patch is treated as one),
  DELETE (finalizers hold an object with `deletionTimestamp`; owner references and namespaces
  cascade);
- server-side apply (`application/apply-patch+yaml`, `fieldManager` required, `force`): managed
  fields per manager, fields a manager stops applying are removed, a field another manager owns
  with a different value is a 409 conflict unless forced (then it changes hands). The subset:
  lists are atomic (a real server merges some lists by key, such as containers by name);
- one global `resourceVersion` that grows with every write, `generation` that grows with spec
  changes, no write (and no new resourceVersion) for an apply that changes nothing;
- status subresources: writes to the main resource ignore `status`, writes to `/status` change
  only `status` (tests play the controllers and the kubelet through them, see `Actor`);
- watches: chunked JSON lines of `{type, object}`, synthetic ADDED events without a
  resourceVersion, replay from one, objects entering or leaving a label selector as ADDED or
  DELETED, BOOKMARK events when `allowWatchBookmarks=true`, and an ERROR event with a 410
  `Expired` Status for a resourceVersion older than the history kept (`compact` forgets it);
- pod logs (`/log` with `container`, `tailLines`, `follow`), and nodes;
- faults: the next N matching requests fail with a status, or an outage (`down`) answers 503 or
  cuts every connection, open watches and log streams included, until `up`.

Lists of built-in kinds leave `apiVersion` and `kind` out of their items, as a real server does.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from fake_objects import (
    APPLY,
    BUILTIN,
    BYPASS,
    CONVERGE,
    JSON,
    KSERVE,
    MERGE,
    STRATEGIC,
    ApiFailure,
    Kind,
    Obj,
    field_selector,
    json_response,
    label_selector,
    status_object,
)
from fake_store import Event, Store

DROP = object()  # a stream's queue item: the connection is cut
EXPIRED = object()  # a watch's queue item: answer 410 Expired and end


# --- store --------------------------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None


@dataclass
class Fault:
    status: int
    count: int
    method: str | None = None
    path: str | None = None  # a substring of the request path
    retry_after: int | None = None
    drop: bool = False

    def matches(self, request: web.Request) -> bool:
        return (
            self.count > 0
            and (self.method is None or request.method == self.method)
            and (self.path is None or self.path in request.path)
        )


class Faults:
    """What goes wrong: the next N matching requests, or everything during an outage."""

    def __init__(self, api: FakeKubeApi) -> None:
        self._api = api
        self._rules: list[Fault] = []
        self.outage: str | None = None  # "drop" | "503"

    def fail(
        self,
        status: int = 500,
        *,
        count: int = 1,
        method: str | None = None,
        path: str | None = None,
        retry_after: int | None = None,
        drop: bool = False,
    ) -> Fault:
        rule = Fault(status, count, method=method, path=path, retry_after=retry_after, drop=drop)
        self._rules.append(rule)
        return rule

    def down(self, *, drop: bool = True) -> None:
        """An outage until `up()`: connections cut (open streams too), or 503 for every request."""
        self.outage = "drop" if drop else "503"
        if drop:
            self._api.cut_streams()

    def up(self) -> None:
        self.outage = None

    def take(self, request: web.Request) -> Fault | None:
        if self.outage is not None:
            return Fault(503, 1, drop=self.outage == "drop")
        for rule in self._rules:
            if rule.matches(request):
                rule.count -= 1
                return rule
        return None


_FAULT_REASONS = {
    403: ("Forbidden", "the user cannot perform this request"),
    422: ("Invalid", "the object is invalid"),
    409: (
        "Conflict",
        "the object has been modified; please apply your changes to the latest version and try again",
    ),
    429: ("TooManyRequests", "the server has received too many requests and has asked us to try again later"),
    500: ("InternalError", "an error on the server prevented the request from succeeding"),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
    504: ("Timeout", "the server was unable to return a response in the time allotted"),
}


@dataclass(eq=False)
class _Stream:
    """An open watch or log stream: its queue, and the connection to cut in an outage."""

    queue: asyncio.Queue[Any]
    kind: Kind | None = None
    held: bool = False


class FakeKubeApi:
    def __init__(
        self,
        *,
        kserve: bool = True,
        history: int = 10_000,
        bookmark_interval_s: float = 0.1,
    ) -> None:
        self.kinds = {
            (k.group, k.version, k.plural): k for k in (*BUILTIN, *CONVERGE, *(KSERVE if kserve else ()))
        }
        self.faults = Faults(self)
        self.requests: list[Recorded] = []
        self.bookmark_interval_s = bookmark_interval_s
        self.store = Store(self.kinds, history=history)
        self.store.listeners.append(self._deliver)
        self._streams: set[_Stream] = set()
        self._logs: dict[tuple[str, str, str], list[str]] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- server ----------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware], client_max_size=16 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        self.cut_streams()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- steering and inspection (tests) ---------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self.store.rv

    def kind(self, api_version: str, kind: str) -> Kind:
        for k in self.kinds.values():
            if k.api_version == api_version and k.kind == kind:
                return k
        raise LookupError(f"{kind} ({api_version}) is not served")

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        k = self.kind(api_version, kind)
        stored = self.store.objects.get((k.group, k.plural, namespace or "", name))
        return copy.deepcopy(stored.obj) if stored else None

    def objects(self, api_version: str, kind: str, namespace: str | None = None) -> list[Obj]:
        k = self.kind(api_version, kind)
        return [
            copy.deepcopy(s.obj)
            for key, s in sorted(self.store.objects.items())
            if s.kind == k and (namespace is None or key[2] == namespace)
        ]

    def write_log(self, namespace: str, pod: str, line: str, *, container: str) -> None:
        self._logs.setdefault((namespace, pod, container), []).append(line)
        for stream in self._streams:
            if stream.kind is None:
                stream.queue.put_nowait((namespace, pod, container))

    def compact(self) -> None:
        """Forget the history (as etcd compaction does): a watch from an older resourceVersion is
        answered 410 Expired, and open watches get that ERROR event and end, as watchers that an
        API server can no longer serve from its window do."""
        self.store.history.clear()
        self.store.compacted = self.store.rv
        for stream in list(self._streams):
            if stream.kind is not None:
                self._streams.discard(stream)
                stream.queue.put_nowait(EXPIRED)

    def hold_watches(self) -> None:
        """Open watches stop receiving events (a stalled connection); new watches are not held."""
        for stream in self._streams:
            stream.held = True

    def cut_streams(self) -> None:
        for stream in list(self._streams):
            self._streams.discard(stream)
            stream.queue.put_nowait(DROP)

    # -- HTTP ------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if request.headers.get(BYPASS) != "1":
            self.requests.append(
                Recorded(
                    request.method, request.path, dict(request.query), request.headers.get("Content-Type")
                )
            )
            fault = self.faults.take(request)
            if fault is not None and fault.drop:
                assert request.transport is not None
                request.transport.close()  # the client sees the connection go, no answer
                raise asyncio.CancelledError
            if fault is not None:
                reason, message = _FAULT_REASONS.get(fault.status, ("InternalError", "injected failure"))
                headers, details = {}, None
                if fault.retry_after is not None:
                    headers["Retry-After"] = str(fault.retry_after)
                    details = {"retryAfterSeconds": fault.retry_after}
                return ApiFailure(fault.status, reason, message, details=details, headers=headers).response()
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except ApiFailure as failure:
            return failure.response()

    def _route(self, path: str) -> tuple[Kind, str | None, str | None, str | None]:
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiFailure(404, "NotFound", "the server could not find the requested resource")
        namespace = None
        namespace_sub = len(rest) == 3 and rest[0] == "namespaces" and rest[2] in ("status", "finalize")
        if len(rest) >= 3 and rest[0] == "namespaces" and not namespace_sub:
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise ApiFailure(404, "NotFound", "the server could not find the requested resource")
        kind = self.kinds.get((group, version, rest[0]))
        if kind is None or (namespace is not None and not kind.namespaced):
            raise ApiFailure(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if kind.namespaced and name is not None and namespace is None:
            raise ApiFailure(404, "NotFound", "the server could not find the requested resource")
        return kind, namespace, name, sub

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind, namespace, name, sub = self._route(request.path)
        method, query = request.method, request.query
        if name is None:
            if method == "GET" and query.get("watch") in ("true", "1"):
                return await self._watch(request, kind, namespace)
            if method == "GET":
                return json_response(200, self.store.collection(kind, namespace, query))
            if method == "POST":
                body = await self._body(request)
                return json_response(
                    201, self.store.create(kind, namespace, body, manager=self._manager(request))
                )
            raise ApiFailure(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        if sub == "log" and kind.kind == "Pod" and method == "GET":
            assert namespace is not None
            return await self._log(request, namespace, name)
        if sub not in (None, "status"):
            raise ApiFailure(404, "NotFound", "the server could not find the requested resource")
        subresource = sub or ""
        if subresource == "status" and not kind.status:
            raise ApiFailure(404, "NotFound", "the server could not find the requested resource")
        if method == "GET":
            return json_response(200, self.store.stored(kind, namespace, name).obj)
        if method == "DELETE":
            return json_response(200, self.store.delete(kind, namespace, name))
        body = await self._body(request)
        if method == "PUT":
            return json_response(
                200,
                self.store.replace(
                    kind, namespace, name, body, manager=self._manager(request), sub=subresource
                ),
            )
        if method == "PATCH":
            ctype = (request.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype == APPLY:
                manager = query.get("fieldManager")
                if not manager:
                    raise ApiFailure(
                        400, "BadRequest", "PATCH /apply requires a non-empty fieldManager query parameter"
                    )
                code, obj = self.store.apply(
                    kind,
                    namespace,
                    name,
                    body,
                    manager=manager,
                    force=query.get("force") == "true",
                    sub=subresource,
                )
                return json_response(code, obj)
            if ctype in (MERGE, STRATEGIC):
                return json_response(
                    200,
                    self.store.merge(
                        kind, namespace, name, body, manager=self._manager(request), sub=subresource
                    ),
                )
            raise ApiFailure(
                415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype}"
            )
        raise ApiFailure(405, "MethodNotAllowed", f"{method} is not supported")

    @staticmethod
    async def _body(request: web.Request) -> Obj:
        try:
            body = json.loads(await request.read())  # JSON is YAML: clients send JSON bodies
        except ValueError as exc:
            raise ApiFailure(400, "BadRequest", f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiFailure(400, "BadRequest", "the request body is not an object")
        return body

    @staticmethod
    def _manager(request: web.Request) -> str:
        return request.query.get("fieldManager") or request.headers.get("User-Agent", "unknown").split("/")[0]

    def _deliver(self, event: Event) -> None:
        for stream in self._streams:
            if stream.kind == event.kind and not stream.held:
                stream.queue.put_nowait(event)
            elif stream.kind is None and event.kind.kind == "Pod" and event.type == "DELETED":
                stream.queue.put_nowait(None)  # log followers of a deleted pod end

    # -- watch -----------------------------------------------------------------------------

    async def _watch(self, request: web.Request, kind: Kind, namespace: str | None) -> web.StreamResponse:
        query = request.query
        labels = label_selector(query.get("labelSelector"))
        fields = field_selector(query.get("fieldSelector"))
        bookmarks = query.get("allowWatchBookmarks") == "true"
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None

        def selected(obj: Obj | None) -> bool:
            if obj is None or (namespace is not None and obj["metadata"].get("namespace") != namespace):
                return False
            return labels(obj["metadata"].get("labels") or {}) and fields(obj)

        # Snapshot or replay, and registration, with no await between them: nothing is missed.
        stream = _Stream(asyncio.Queue(), kind=kind)
        initial: list[Obj] = []
        since = query.get("resourceVersion")
        expired = False
        if since in (None, "", "0"):
            initial = [
                {"type": "ADDED", "object": obj} for obj in self.store.matching(kind, namespace, query)
            ]
            initial = copy.deepcopy(initial)
        elif int(since) < self.store.compacted:
            expired = True
        else:
            for event in self.store.history:
                if event.rv > int(since) and event.kind == kind:
                    stream.queue.put_nowait(event)
        if not expired:
            self._streams.add(stream)

        response = web.StreamResponse(headers={"Content-Type": JSON, "Transfer-Encoding": "chunked"})
        await response.prepare(request)
        try:
            if expired:
                status = status_object(
                    410, "Expired", f"too old resource version: {since} ({self.store.compacted})"
                )
                await response.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
                return response
            for line in initial:
                await response.write(json.dumps(line).encode() + b"\n")
            await self._stream_events(
                request, response, stream, selected, bookmarks=bookmarks, timeout=timeout
            )
            return response
        except ConnectionResetError:  # the client went away (aiohttp's ClientConnectionResetError)
            return response
        finally:
            self._streams.discard(stream)

    async def _stream_events(
        self,
        request: web.Request,
        response: web.StreamResponse,
        stream: _Stream,
        selected: Callable[[Obj | None], bool],
        *,
        bookmarks: bool,
        timeout: float | None,
    ) -> None:
        assert stream.kind is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            wait = self.bookmark_interval_s if bookmarks else None
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    return
                wait = left if wait is None else min(wait, left)
            try:
                item = await asyncio.wait_for(stream.queue.get(), wait)
            except TimeoutError:
                if bookmarks and stream.queue.empty():
                    mark = {
                        "kind": stream.kind.kind,
                        "apiVersion": stream.kind.api_version,
                        "metadata": {"resourceVersion": str(self.store.rv)},
                    }
                    await response.write(json.dumps({"type": "BOOKMARK", "object": mark}).encode() + b"\n")
                continue
            if item is EXPIRED:
                expired = status_object(
                    410, "Expired", "The resourceVersion for the provided watch is too old."
                )
                await response.write(json.dumps({"type": "ERROR", "object": expired}).encode() + b"\n")
                return
            if item is DROP:
                if request.transport is not None:
                    request.transport.close()
                raise asyncio.CancelledError
            line = self._translate(item, selected)
            if line is not None:
                await response.write(json.dumps(line).encode() + b"\n")

    @staticmethod
    def _translate(event: Event, selected: Callable[[Obj | None], bool]) -> Obj | None:
        now_in, was_in = selected(event.obj) and event.type != "DELETED", selected(event.old)
        if event.type == "DELETED":
            return {"type": "DELETED", "object": event.obj} if was_in else None
        if now_in and was_in:
            return {"type": "MODIFIED", "object": event.obj}
        if now_in:
            return {"type": "ADDED", "object": event.obj}
        if was_in:  # left the selection: the watcher sees it go
            return {"type": "DELETED", "object": event.obj}
        return None

    # -- logs ------------------------------------------------------------------------------

    async def _log(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        pod = self.store.stored(self.kind("v1", "Pod"), namespace, name).obj
        spec = pod.get("spec", {})
        containers = [c["name"] for c in spec.get("containers", [])]
        init = [c["name"] for c in spec.get("initContainers", [])]
        container = request.query.get("container")
        if not container:
            if len(containers) != 1:
                raise ApiFailure(
                    400,
                    "BadRequest",
                    f"a container name must be specified for pod {name}, choose one of: [{' '.join(containers)}]"
                    + (f" or one of the init containers: [{' '.join(init)}]" if init else ""),
                )
            container = containers[0]
        if container not in containers + init:
            raise ApiFailure(400, "BadRequest", f"container {container} is not valid for pod {name}")
        lines = self._logs.get((namespace, name, container), [])
        tail = request.query.get("tailLines")
        shown = lines[-int(tail) :] if tail and int(tail) > 0 else ([] if tail == "0" else lines)
        if request.query.get("follow") != "true":
            text = "".join(f"{line}\n" for line in shown)
            return web.Response(status=200, body=text.encode(), headers={"Content-Type": "text/plain"})
        stream = _Stream(asyncio.Queue())
        self._streams.add(stream)
        response = web.StreamResponse(headers={"Content-Type": "text/plain", "Transfer-Encoding": "chunked"})
        await response.prepare(request)
        try:
            for line in shown:
                await response.write(f"{line}\n".encode())
            seen = len(lines)
            while True:
                item = await stream.queue.get()
                if item is None:
                    if ("", "pods", namespace, name) not in self.store.objects:
                        return response
                    continue
                if item is DROP:
                    if request.transport is not None:
                        request.transport.close()
                    raise asyncio.CancelledError
                if item == (namespace, name, container):
                    lines = self._logs[(namespace, name, container)]
                    for line in lines[seen:]:
                        await response.write(f"{line}\n".encode())
                    seen = len(lines)
        finally:
            self._streams.discard(stream)


class Actor:
    """Another party that talks to the API over HTTP: the kubelet, a controller, a person with
    kubectl. Its requests skip the faults (and are not recorded), so tests can play the cluster
    through an outage of the client under test."""

    def __init__(self, api: FakeKubeApi, manager: str) -> None:
        self.api, self.manager = api, manager
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Actor:
        self._session = aiohttp.ClientSession(base_url=self.api.url, headers={BYPASS: "1"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _send(
        self, method: str, path: str, *, body: Obj | None = None, ctype: str = JSON, **params: str
    ) -> tuple[int, Obj]:
        assert self._session is not None, "use `async with Actor(...)`"
        data = json.dumps(body).encode() if body is not None else None
        async with self._session.request(
            method,
            path,
            data=data,
            params={"fieldManager": self.manager, **params},
            headers={"Content-Type": ctype},
        ) as resp:
            return resp.status, await resp.json(content_type=None)

    def _path(self, obj: Obj, sub: str | None = None, *, name: bool = True) -> str:
        kind = self.api.kind(obj["apiVersion"], obj["kind"])
        meta = obj.get("metadata", {})
        return kind.path(meta.get("namespace"), meta["name"] if name else None, sub)

    async def create(self, obj: Obj) -> Obj:
        code, body = await self._send("POST", self._path(obj, name=False), body=obj)
        assert code == 201, body
        return body

    async def apply(self, obj: Obj, *, force: bool = False) -> tuple[int, Obj]:
        params = {"force": "true"} if force else {}
        return await self._send("PATCH", self._path(obj), body=obj, ctype=APPLY, **params)

    async def merge(self, obj: Obj, patch: Obj) -> Obj:
        code, body = await self._send("PATCH", self._path(obj), body=patch, ctype=MERGE)
        assert code == 200, body
        return body

    async def set_status(self, obj: Obj, status: Obj) -> Obj:
        """A merge patch on the status subresource, as controllers and the kubelet write it."""
        code, body = await self._send(
            "PATCH", self._path(obj, "status"), body={"status": status}, ctype=MERGE
        )
        assert code == 200, body
        return body

    async def delete(self, obj: Obj) -> Obj:
        code, body = await self._send("DELETE", self._path(obj))
        assert code == 200, body
        return body
