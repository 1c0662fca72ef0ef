"""The gateway's view of the world: keys, projects, routes, rulesets and virtual models, cached
in memory.

The data path never queries the database per request. It reads an immutable `Snapshot` built
from the tables (keys, projects, deployments and their current specs) and swapped whole when
something changes: the controller NOTIFYs `converge_routes` when a deployment's observed state
changes, every committed event NOTIFYs `converge_events` (keys revoked, limits changed, versions
revoked), and a periodic full reload catches anything missed while the listener reconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.core import guardrails
from converge.core.rbac import role_allows
from converge.gateway.limits import Limits
from converge.gateway.virtual import VirtualModel
from converge.kit import channels
from converge.kit.service import Service
from converge.models import (
    Agent,
    ApiKey,
    Deployment,
    DeploymentRevision,
    DeploymentRuleset,
    LibraryModel,
    ModelVersion,
    Project,
    ProjectBudget,
    RagModel,
    Ruleset,
)

log = structlog.get_logger(__name__)
WAITING_PHASES = frozenset({"Pending", "Progressing", "ScaledToZero"})


@dataclass(frozen=True, slots=True)
class KeyEntry:
    id: uuid.UUID
    prefix: str
    secret_hash: str
    project_id: uuid.UUID | None  # None: an organisation key
    expires_at: float | None  # epoch seconds
    revoked: bool
    limits: Limits | None
    scope: str  # "k:<id>": this key's limit counters


@dataclass(frozen=True, slots=True)
class ProjectEntry:
    id: uuid.UUID
    name: str
    limits: Limits | None
    scope: str  # "p:<id>": this project's limit counters


@dataclass(slots=True)
class Route:
    """One deployment as the data path sees it."""

    deployment_id: uuid.UUID
    project_id: uuid.UUID
    name: str
    label: str  # "<project>/<deployment>", the metrics label
    server: str  # llama-cpp | embeddings | v2
    model_name: str  # what the replicas answer to
    aliases: tuple[str, ...]
    phase: str
    endpoints: tuple[str, ...]  # ready replicas
    desired_replicas: int
    created: int
    denial: str | None = None  # why governance refuses it, or None
    revision: int = 0  # the deployment revision that serves
    ruleset_id: uuid.UUID | None = None  # its default ruleset


@dataclass(frozen=True, slots=True)
class RulesetEntry:
    project_id: uuid.UUID
    compiled: guardrails.Compiled


@dataclass(slots=True)
class Snapshot:
    keys: dict[str, KeyEntry] = field(default_factory=dict)  # by prefix
    projects: dict[uuid.UUID, ProjectEntry] = field(default_factory=dict)
    project_names: dict[str, uuid.UUID] = field(default_factory=dict)
    routes: dict[uuid.UUID, dict[str, Route]] = field(default_factory=dict)  # project -> name -> route
    listed: dict[uuid.UUID, list[Route]] = field(default_factory=dict)  # project -> its deployments
    by_id: dict[uuid.UUID, Route] = field(default_factory=dict)
    rulesets: dict[uuid.UUID, RulesetEntry] = field(default_factory=dict)  # by id, the current version
    virtual: dict[uuid.UUID, dict[str, VirtualModel]] = field(default_factory=dict)  # project -> name ->


def _denial(deployment: Deployment, version_state: str, model: str, version: str) -> str | None:
    if version_state == "revoked" or deployment.phase == "Revoked":
        return f"model version {model} {version} is revoked"
    for condition in (deployment.status or {}).get("conditions", []):
        if condition.get("type") == "Admitted" and not condition.get("status"):
            return condition.get("message") or "the deployment policy no longer admits this deployment"
    return None


def _ready_endpoints(status: dict[str, Any]) -> tuple[str, ...]:
    return tuple(
        r["endpoint"] for r in status.get("replicas", []) if r.get("phase") == "ready" and r.get("endpoint")
    )


def _epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def key_entry(key: ApiKey) -> KeyEntry:
    return KeyEntry(
        id=key.id,
        prefix=key.prefix,
        secret_hash=key.secret_hash,
        project_id=key.project_id,
        expires_at=_epoch(key.expires_at),
        revoked=key.revoked_at is not None,
        limits=Limits.from_json(key.limits),
        scope=f"k:{key.id}",
    )


def _compiled(row: Ruleset, previous: Snapshot | None) -> RulesetEntry:
    """Compiled once per version: a reload reuses what the previous snapshot compiled."""
    old = previous.rulesets.get(row.id) if previous is not None else None
    if old is not None and old.compiled.version == row.version and old.compiled.name == row.name:
        return old
    try:
        compiled = guardrails.compile_spec(row.spec, id_=row.id, name=row.name, version=row.version)
    except guardrails.InvalidSpec as exc:
        # The API stores only specs that compile; one that does not (edited by hand) refuses
        # everything rather than letting requests through unguarded.
        log.error("gateway_ruleset_invalid", ruleset=str(row.id), field=exc.field, error=exc.message)
        everything = guardrails.compile_spec(
            {"input": {"patterns": [{"name": "invalid-ruleset", "regex": "(?s)^"}]}},
            id_=row.id,
            name=row.name,
            version=row.version,
        )
        compiled = everything
    return RulesetEntry(project_id=row.project_id, compiled=compiled)


async def _load_genai(
    session: AsyncSession, snap: Snapshot, previous: Snapshot | None
) -> dict[uuid.UUID, uuid.UUID]:
    """Rulesets and virtual models into the snapshot; deployment -> its default ruleset."""
    for ruleset in await session.scalars(select(Ruleset)):
        snap.rulesets[ruleset.id] = _compiled(ruleset, previous)
    rows = await session.execute(select(DeploymentRuleset.deployment_id, DeploymentRuleset.ruleset_id))
    defaults = {deployment_id: ruleset_id for deployment_id, ruleset_id in rows}
    for kind, table in (("rag_model", RagModel), ("agent", Agent)):
        named = await session.execute(
            select(table.id, table.project_id, table.name, table.revision, table.created_at)
        )
        for id_, project_id, name, revision, created_at in named:
            snap.virtual.setdefault(project_id, {})[name] = VirtualModel(
                id=id_,
                project_id=project_id,
                kind=kind,  # type: ignore[arg-type]  # one of the two literals above
                name=name,
                revision=revision,
                created=int(created_at.timestamp()),
            )
    return defaults


async def load_snapshot(session: AsyncSession, previous: Snapshot | None = None) -> Snapshot:
    snap = Snapshot()
    for key in await session.scalars(select(ApiKey)):
        # A key whose role cannot call models (an organisation's library approver) is not a
        # data-path credential at all: it answers like an unknown key.
        if role_allows(key.role, "inference:use"):
            snap.keys[key.prefix] = key_entry(key)
    enforced = select(ProjectBudget).where(ProjectBudget.enforce, ProjectBudget.exceeded)
    spent = {b.project_id: b for b in await session.scalars(enforced)}
    for row in await session.scalars(select(Project)):
        limits = Limits.from_json(row.limits)
        if row.id in spent:  # an enforced money budget is spent: refuse like a spent token budget
            budget = spent[row.id]
            why = (
                f"The project's monthly budget of {budget.monthly:g} is spent ({budget.spent:.2f} measured"
                f" this month); it renews on the 1st (UTC) or when an owner raises it (PUT /cost/budgets/{row.name})"
            )
            limits = dataclasses.replace(limits or Limits(), spent_budget=(budget.month, why))
        snap.projects[row.id] = ProjectEntry(id=row.id, name=row.name, limits=limits, scope=f"p:{row.id}")
        snap.project_names[row.name] = row.id
    rows = await session.execute(
        select(
            Deployment, DeploymentRevision.spec, ModelVersion.state, ModelVersion.version, LibraryModel.name
        )
        .join(
            DeploymentRevision,
            (DeploymentRevision.deployment_id == Deployment.id)
            & (DeploymentRevision.revision == Deployment.revision),
        )
        .join(ModelVersion, ModelVersion.id == Deployment.model_version_id)
        .join(LibraryModel, LibraryModel.id == ModelVersion.model_id)
        .where(Deployment.deleting.is_(False))
        .order_by(Deployment.name)
    )
    defaults = await _load_genai(session, snap, previous)
    for deployment, spec, state, version, model in rows:
        project = snap.projects.get(deployment.project_id)
        if project is None:
            continue
        route = Route(
            deployment_id=deployment.id,
            project_id=deployment.project_id,
            name=deployment.name,
            label=f"{project.name}/{deployment.name}",
            server=spec.get("server", "llama-cpp"),
            model_name=spec.get("model_name", deployment.name),
            aliases=tuple(deployment.aliases or ()),
            phase=deployment.phase,
            endpoints=_ready_endpoints(deployment.status or {}),
            desired_replicas=deployment.desired_replicas,
            created=int(deployment.created_at.timestamp()),
            denial=_denial(deployment, state, model, version),
            revision=deployment.revision,
            ruleset_id=defaults.get(deployment.id),
        )
        snap.by_id[deployment.id] = route
        snap.listed.setdefault(deployment.project_id, []).append(route)
    for project_id, routes in snap.listed.items():
        # Names win over aliases, aliases over the served model name, whatever order rows came in.
        names: dict[str, Route] = {}
        for route in routes:
            names.setdefault(route.model_name, route)
        for route in routes:
            for alias in route.aliases:
                names[alias] = route
        for route in routes:
            names[route.name] = route
        snap.routes[project_id] = names
    return snap


class DataPlane(Service):
    """Holds the current snapshot and keeps it fresh (LISTEN/NOTIFY plus a periodic reload)."""

    name = "gateway-snapshot"

    def __init__(
        self, *, sessions: async_sessionmaker[AsyncSession], conninfo: str, refresh_s: float
    ) -> None:
        super().__init__()
        self._sessions, self._conninfo, self._refresh_s = sessions, conninfo, refresh_s
        self.snapshot = Snapshot()
        self.loaded_at = 0.0
        self._dirty = asyncio.Event()
        self._changed = asyncio.Condition()
        self._listening = asyncio.Event()
        self._wake_conn: psycopg.AsyncConnection[Any] | None = None
        self.ignore: set[str] = set()  # event ids this gateway wrote itself (guardrail hits)

    @property
    def healthy(self) -> bool:
        return self.loaded_at > 0 and super().healthy

    async def start(self) -> None:
        await self.reload()
        self._spawn(self._listen())
        self._spawn(self._reloader())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout=10)

    async def stop(self) -> None:
        await super().stop()
        if self._wake_conn is not None:
            await self._wake_conn.close()

    async def reload(self) -> None:
        async with self._sessions() as session:
            snapshot = await load_snapshot(session, self.snapshot)
        self.snapshot, self.loaded_at = snapshot, time.monotonic()
        async with self._changed:
            self._changed.notify_all()

    def mark_dirty(self) -> None:
        self._dirty.set()

    async def wait_for_change(self, within_s: float) -> bool:
        """Until the next reload (or the timeout): waiters re-check the snapshot after it.
        True when a reload came, False when the time ran out first."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within_s):  # unlike wait_for, never swallows a cancel
                    await self._changed.wait()
                    return True
        return False

    async def request_wake(self, deployment_id: uuid.UUID) -> None:
        """Ask the controller (whichever process leads) to scale a deployment up from zero."""
        if self._wake_conn is None or self._wake_conn.closed:
            self._wake_conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        await self._wake_conn.execute("SELECT pg_notify(%s, %s)", (channels.WAKE, str(deployment_id)))

    async def _reloader(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally when the
            # event is set in the same moment the task is cancelled, and this loop would then
            # outlive the cancel (a shutdown that never ends).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._refresh_s):
                    await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.reload()
            except Exception:
                log.exception("gateway_snapshot_reload_failed")
                await asyncio.sleep(1.0)
                self._dirty.set()
            await asyncio.sleep(0.05)  # a burst of notifications costs one reload

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {channels.ROUTES}")
                    await conn.execute(f"LISTEN {channels.EVENTS}")
                    self._listening.set()
                    self._dirty.set()  # whatever changed while we were not listening
                    async for notify in conn.notifies():
                        if notify.payload in self.ignore:  # our own guardrail hits change nothing
                            self.ignore.discard(notify.payload)
                            continue
                        self._dirty.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("gateway_listener_reconnecting", exc_info=True)
                await asyncio.sleep(1.0)
