"""Registry sources: create, and sync (new tags/objects become versions, idempotently)."""

from __future__ import annotations

import hashlib
import re
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import obstore
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from converge.config import Settings
from converge.control.events.service import record
from converge.control.experiments import registry
from converge.control.library import acquire
from converge.control.library import repository as library_repo
from converge.control.library import service as library
from converge.control.library.schemas import ModelCreate
from converge.control.projects.principal import Principal
from converge.control.sources import repository
from converge.control.sources.schemas import SourceCreate, SourceUpdate
from converge.errors import Conflict, NotFound
from converge.kit.unique import flush_or_conflict
from converge.models import Source, SourceItem
from converge.storage.artifacts import ArtifactStore
from converge.storage.db import transaction, try_advisory_xact_lock
from converge.storage.oci import OciClient, OciRef

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RemoteItem:
    key: str  # tag or object key
    digest: str  # manifest digest or ETag: a new digest under an old key is a new version
    uri: str


async def create(session: AsyncSession, principal: Principal, *, body: SourceCreate) -> Source:
    options = body.options.model_dump(exclude_none=True)
    source = Source(
        name=body.name,
        kind=body.kind,
        uri=body.uri.rstrip("/"),
        model_name=body.model_name,
        interval_s=body.interval_s,
        enabled=body.enabled,
        options=options,
        created_by=principal.subject,
        next_run_at=datetime.now(UTC),
    )
    session.add(source)
    await flush_or_conflict(session, f"A source named '{body.name}' already exists")
    await record(
        session,
        principal,
        action="source.created",
        project_id=None,
        object_type="source",
        object_id=source.id,
        changes={"name": source.name, "kind": source.kind, "uri": source.uri, "model": source.model_name},
    )
    return source


async def get(session: AsyncSession, source_id: uuid.UUID) -> Source:
    source = await repository.get(session, source_id)
    if source is None:
        raise NotFound(f"Source {source_id} not found")
    return source


async def update(
    session: AsyncSession, principal: Principal, *, source_id: uuid.UUID, body: SourceUpdate
) -> Source:
    source = await get(session, source_id)
    changes = body.model_dump(exclude_none=True)
    for field, value in changes.items():
        setattr(source, field, value)
    await session.flush()
    await record(
        session,
        principal,
        action="source.updated",
        project_id=None,
        object_type="source",
        object_id=source.id,
        changes=changes,
    )
    return source


async def delete(session: AsyncSession, principal: Principal, *, source_id: uuid.UUID) -> None:
    source = await get(session, source_id)
    await record(
        session,
        principal,
        action="source.deleted",
        project_id=None,
        object_type="source",
        object_id=source.id,
        changes={"name": source.name},
    )
    await session.delete(source)
    await session.flush()


async def list_remote(source: Source, settings: Settings) -> list[RemoteItem]:
    if source.kind == "mlflow":  # the registered model's ready versions, by number
        registered = registry.ModelRef.parse(source.uri)
        versions = await registry.list_versions(
            source.options["tracking_uri"], registered.name, timeout_s=settings.mlflow.timeout_s
        )
        return [RemoteItem(key=f"{v.name}/{v.version}", digest=v.digest, uri=v.ref.uri) for v in versions]
    if source.kind == "oci":
        client = OciClient(insecure=source.options.get("insecure"))
        ref = OciRef.parse(source.uri)
        items = []
        for tag in sorted(await client.list_tags(ref)):
            tagged = ref.with_tag(tag)
            items.append(RemoteItem(key=tag, digest=await client.manifest_digest(tagged), uri=str(tagged)))
        return items
    parsed = urlparse(source.uri)
    store = acquire.s3_store(settings, bucket=parsed.netloc, options=source.options)
    prefix = parsed.path.strip("/")
    items = []
    async for batch in obstore.list(store, prefix=prefix or None):
        for obj in batch:
            path = obj["path"]
            digest = (obj.get("e_tag") or f"{obj['size']}-{obj['last_modified']}").strip('"')
            items.append(RemoteItem(key=path, digest=digest, uri=f"s3://{parsed.netloc}/{path}"))
    return sorted(items, key=lambda i: i.key)


def version_name(item: RemoteItem, kind: str) -> str:
    base = item.key if kind == "oci" else item.key.rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", base).strip("-._+")[:100] or "v"
    return name


async def sync(
    sessions: async_sessionmaker[AsyncSession],
    *,
    source_id: uuid.UUID,
    settings: Settings,
    store: ArtifactStore,
) -> tuple[Source, list[str]]:
    """One pass over a source, all or nothing; a failure is recorded on the source instead.

    Safe to run from several processes: a per-source advisory lock lets one of them work,
    and (key, digest) rows make a second pass register nothing.
    """
    created: list[str] = []
    error: str | None = None
    try:
        async with transaction(sessions) as session:
            if not await try_advisory_xact_lock(session, _lock_key(source_id)):
                return await get(session, source_id), []
            source = await get(session, source_id)
            for item in await list_remote(source, settings):
                if not await repository.seen(session, source.id, item.key, item.digest):
                    created.append(await _register(session, source, item, settings=settings, store=store))
            await _finish(session, source, created=created, error=None)
            return source, created
    except NotFound:
        raise
    except Exception as exc:  # shown on the source; the next pass retries from scratch
        log.warning("source_sync_failed", source_id=str(source_id), error=str(exc))
        error = f"{type(exc).__name__}: {exc}"[:2000]
    async with transaction(sessions) as session:
        source = await get(session, source_id)
        await _finish(session, source, created=[], error=error)
        return source, []


def _lock_key(source_id: uuid.UUID) -> int:
    return zlib.crc32(source_id.bytes)


async def _finish(session: AsyncSession, source: Source, *, created: list[str], error: str | None) -> None:
    now = datetime.now(UTC)
    source.last_error = error
    source.last_sync_at = now
    source.next_run_at = now + timedelta(seconds=source.interval_s)
    await session.flush()
    await record(
        session,
        None,
        action="source.synced",
        project_id=None,
        object_type="source",
        object_id=source.id,
        changes={"name": source.name, "new_versions": created, "error": error},
    )


async def _free_version_name(session: AsyncSession, model_id: uuid.UUID, item: RemoteItem, kind: str) -> str:
    """The tag or object name; if taken (a tag moved to new content, or another key has the same
    file name), suffixed with the content digest, then with a hash of key and digest."""
    base = version_name(item, kind)
    digest = item.digest.removeprefix("sha256:")[:12]
    keyed = hashlib.sha256(f"{item.key}@{item.digest}".encode()).hexdigest()[:12]
    for name in (base, f"{base}-{digest}", f"{base}-{keyed}"):
        if await library_repo.version_by_name(session, model_id, name) is None:
            return name
    raise Conflict(f"No free version name for {item.key}")


async def _register(
    session: AsyncSession, source: Source, item: RemoteItem, *, settings: Settings, store: ArtifactStore
) -> str:
    model = await library_repo.model_by_name(session, source.model_name)
    if model is None:
        model = await library.create_model(
            session, None, body=ModelCreate(name=source.model_name, tags=["synced"])
        )
    acquired = await acquire.from_uri(
        store, settings, item.uri, expected_sha256=None, may_read_server_paths=False, options=source.options
    )
    name = await _free_version_name(session, model.id, item, source.kind)
    provenance = {
        "kind": "sync",
        "uri": item.uri,
        "known": True,
        "name": source.name,
        "digest": item.digest,
        **acquired.details,
    }
    version = await library.register_version(
        session,
        None,
        model=model,
        version=name,
        acquired=acquired,
        source=provenance,
        approvals_required=settings.library.approvals_required,
    )
    session.add(SourceItem(source_id=source.id, key=item.key, digest=item.digest, version_id=version.id))
    await session.flush()
    return name
