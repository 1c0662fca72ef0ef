"""What a job ingests: the files of an upload (in the artifact store) or the objects under
an S3 prefix (read with the library's S3 credentials, or those of the registered source the
prefix belongs to), each a document with a source (its name or URL) and a way to read it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore.store import S3Store
from sqlalchemy.ext.asyncio import AsyncSession

from converge.config import Settings
from converge.control.library import acquire
from converge.control.library import repository as library_repo
from converge.storage.artifacts import ArtifactStore


class Unusable(Exception):
    """The job cannot go on (no gateway, no deployment, a prefix that cannot be listed, the
    embedding deployment away after every retry); the message is the job's reason."""


@dataclass(frozen=True, slots=True)
class Ref:
    """A document to ingest: its source (file name or object URL), the name its type comes
    from, and how to read it."""

    source: str
    name: str
    read: Callable[[], Awaitable[bytes]]
    size: int | None = None


async def refs(
    session: AsyncSession, source: dict[str, Any], *, settings: Settings, store: ArtifactStore
) -> list[Ref]:
    if source.get("kind") == "upload":
        return [_upload(store, entry) for entry in source.get("files", [])]
    if source.get("kind") == "s3":
        return await _s3(session, str(source.get("url", "")), settings=settings)
    raise Unusable(f"unknown source kind {source.get('kind')!r}")


def _upload(store: ArtifactStore, entry: dict[str, Any]) -> Ref:
    digest = str(entry["sha256"])

    async def read() -> bytes:  # checked against its digest as it is read
        return b"".join([bytes(c) async for c in store.open_stream(digest, verify=True)])

    return Ref(source=str(entry["name"]), name=str(entry["name"]), read=read, size=entry.get("bytes"))


async def _s3(session: AsyncSession, url: str, *, settings: Settings) -> list[Ref]:
    parts = urlsplit(url)
    registered = await library_repo.source_for_uri(session, url)
    options = dict(registered.options) if registered else {}
    s3 = acquire.s3_store(settings, bucket=parts.netloc, options=options)
    limit = settings.rag.max_files
    objects: list[tuple[str, int]] = []
    try:
        async for batch in obstore.list(s3, prefix=parts.path.strip("/") or None):
            objects += [(obj["path"], int(obj["size"])) for obj in batch if not obj["path"].endswith("/")]
            if len(objects) > limit:
                raise Unusable(
                    f"{url} holds more than {limit} objects (rag.max_files): ingest a narrower prefix"
                )
    except Unusable:
        raise
    except Exception as exc:  # obstore's errors name the cause (credentials, bucket, network)
        raise Unusable(f"cannot list {url}: {exc}") from None
    return [_object(s3, f"s3://{parts.netloc}/{key}", key=key, size=size) for key, size in sorted(objects)]


def _object(s3: S3Store, source: str, *, key: str, size: int) -> Ref:
    async def read() -> bytes:
        result = await obstore.get_async(s3, key)
        return bytes(await result.bytes_async())

    return Ref(source=source, name=key, read=read, size=size)
