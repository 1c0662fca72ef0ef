"""Who is calling, and what they may reach: API keys verified against the snapshot (cached per
snapshot), organisation keys' project header, and the caller's deployments by name.

A verified Authorization header is remembered until the snapshot changes (a revoked or edited
key reaches the gateway as a new snapshot), so a request pays one dict lookup, not a hash.
"""

from __future__ import annotations

import contextlib
import hmac
import time
import uuid
from dataclasses import dataclass

from starlette.types import Scope

from converge.config import Settings
from converge.core import apikeys
from converge.gateway.dataplane import DataPlane, KeyEntry, ProjectEntry, Route
from converge.gateway.errors import GatewayError
from converge.gateway.limits import Limits
from converge.observability import tracing

# What each model server answers; a server not listed here is assumed to speak all of /v1.
SERVES = {
    "llama-cpp": frozenset({"chat", "completions"}),
    "embeddings": frozenset({"embeddings"}),
    "v2": frozenset({"v2"}),
}


@dataclass(slots=True)
class Caller:
    key: KeyEntry | None  # None: the bootstrap token
    project: ProjectEntry

    @property
    def scopes(self) -> tuple[tuple[str, Limits | None], ...]:
        project = (self.project.scope, self.project.limits)
        return ((self.key.scope, self.key.limits), project) if self.key is not None else (project,)


def _key_of(caller: Caller) -> str:
    return caller.key.prefix if caller.key is not None else "bootstrap"


NEW_KEY_WAIT_S = 5.0  # how long a request with a key not yet in the snapshot waits for it


def _refused(message: str, code: str | None = None) -> GatewayError:
    return GatewayError(401, message, type_="authentication_error", code=code)


class Auth:
    def __init__(self, settings: Settings, *, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.pepper = settings.auth.secret_key.get_secret_value()
        self.bootstrap = (
            settings.bootstrap_token.get_secret_value().encode() if settings.bootstrap_token else None
        )
        self.project_header = settings.gateway.project_header
        self.default_project = settings.gateway.default_project
        self._header = self.project_header.lower().encode()
        self._tokens: dict[bytes, KeyEntry | None] = {}
        self._tokens_for: object = None
        self._misses: dict[str, float] = {}

    async def caller(self, scope: Scope, *, traced: bool = True) -> Caller:
        """Who sends this request (the key of its Authorization header), or a 401/404. While
        tracing is on it is a span (`traced=False` is that span's own call)."""
        if traced and tracing.ENABLED:
            with tracing.span("gateway.auth") as span:
                caller = await self.caller(scope, traced=False)
                if span is not None:
                    span.set_attributes(
                        {"converge.project": caller.project.name, "converge.key": _key_of(caller)}
                    )
                return caller
        auth = project_name = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value
            elif name == self._header or name == b"x-converge-project":
                project_name = value
        if not auth or not auth[:7].lower() == b"bearer ":
            raise _refused("Send a Converge API key as 'Authorization: Bearer cvg_...'", "missing_api_key")
        key = self._verified().get(auth, False)
        if key is False:
            key = await self._verify(auth[7:].strip())
            self._verified()[auth] = key
        if key is None:
            if self.bootstrap is not None and hmac.compare_digest(auth[7:].strip(), self.bootstrap):
                return Caller(key=None, project=self._org_project(project_name))
            raise _refused("Invalid API key", "invalid_api_key")
        assert isinstance(key, KeyEntry)
        if key.revoked:
            raise _refused(f"API key {key.prefix} was revoked", "revoked_api_key")
        if key.expires_at is not None and key.expires_at <= time.time():
            raise _refused(f"API key {key.prefix} has expired", "expired_api_key")
        if key.project_id is None:
            return Caller(key=key, project=self._org_project(project_name))
        project = self.dataplane.snapshot.projects.get(key.project_id)
        if project is None:
            raise _refused("The key's project no longer exists")
        return Caller(key=key, project=project)

    async def caller_for(self, *, key_id: uuid.UUID | None, project_id: uuid.UUID) -> Caller:
        """The caller for work the control plane does on someone's behalf (a knowledge base's
        embeddings): the key that asked for it, checked as a request with it would be, or the
        project itself when no key asked (the bootstrap token, an OIDC user). A key or project
        made a moment ago may not be in the snapshot yet: its reload is waited for once."""
        key, project = self._entries(key_id, project_id)
        if project is None or (key_id is not None and key is None):
            self.dataplane.mark_dirty()
            await self.dataplane.wait_for_change(2.0)
            key, project = self._entries(key_id, project_id)
        if project is None:
            raise _refused("The project no longer exists")
        if key_id is None:
            return Caller(key=None, project=project)
        if key is None or key.revoked:
            raise _refused("The API key that started this work was revoked", "revoked_api_key")
        if key.expires_at is not None and key.expires_at <= time.time():
            raise _refused(f"API key {key.prefix} has expired", "expired_api_key")
        return Caller(key=key, project=project)

    def _entries(
        self, key_id: uuid.UUID | None, project_id: uuid.UUID
    ) -> tuple[KeyEntry | None, ProjectEntry | None]:
        snapshot = self.dataplane.snapshot
        key = next((e for e in snapshot.keys.values() if e.id == key_id), None) if key_id else None
        return key, snapshot.projects.get(project_id)

    def route(self, caller: Caller, model: str, endpoint: str | None = None) -> Route:
        """The caller's deployment of that name; with an endpoint, one whose server answers it.

        Another project's deployment answers exactly like one that does not exist."""
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

    def _verified(self) -> dict[bytes, KeyEntry | None]:
        """Authorization header -> its key (None: not a key), for the current snapshot only."""
        snapshot = self.dataplane.snapshot
        if self._tokens_for is not snapshot or len(self._tokens) > 100_000:  # keys may have changed
            self._tokens, self._tokens_for = {}, snapshot
        return self._tokens

    async def _verify(self, token: bytes) -> KeyEntry | None:
        parts = apikeys.split(token.decode(errors="replace"))
        if parts is None:
            return None
        entry = self.dataplane.snapshot.keys.get(parts[0])
        if entry is None and time.monotonic() - self._misses.get(parts[0], -60.0) > 30.0:
            # Perhaps a key created a moment ago, whose reload is on its way: wait for it. Only
            # a prefix still unknown after two reloads begun since (the first may have started
            # before the key was committed) is not waited for again for a while, so made-up keys
            # cost nothing, and a slow reload never turns a new key into 30 s of 401s.
            deadline, reloads = time.monotonic() + NEW_KEY_WAIT_S, 0
            while entry is None and reloads < 2 and (left := deadline - time.monotonic()) > 0:
                self.dataplane.mark_dirty()
                reloads += await self.dataplane.wait_for_change(left)
                entry = self.dataplane.snapshot.keys.get(parts[0])
            if entry is None and reloads >= 2:
                if len(self._misses) > 10_000:
                    self._misses.clear()
                self._misses[parts[0]] = time.monotonic()
        if entry is None:
            return None
        return entry if apikeys.matches(parts[1], entry.secret_hash, pepper=self.pepper) else None

    def _org_project(self, name: bytes | None) -> ProjectEntry:
        """Organisation keys name their project in a header (the OpenAI SDK's `project=`)."""
        snapshot = self.dataplane.snapshot
        wanted = name.decode(errors="replace") if name else self.default_project
        project_id = snapshot.project_names.get(wanted)
        if project_id is None:
            with contextlib.suppress(ValueError):
                project_id = uuid.UUID(wanted)
        if project_id not in snapshot.projects:
            raise GatewayError(
                404,
                f"No project '{wanted}'; organisation keys choose one with the "
                f"'{self.project_header}' header",
                code="project_not_found",
            )
        return snapshot.projects[project_id]
