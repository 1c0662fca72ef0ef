"""All SQL for the Model Library."""

from __future__ import annotations

import uuid
from collections.abc import Collection

from sqlalchemy import ColumnElement, and_, exists, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from converge.core.lifecycle import VersionState
from converge.models import Approval, Artifact, LibraryModel, ModelVersion, Source


def visible_to(projects: Collection[uuid.UUID] | None) -> ColumnElement[bool] | None:
    if projects is None:
        return None
    return or_(LibraryModel.visibility == "public", LibraryModel.projects.overlap(list(projects)))


async def get_model(session: AsyncSession, model_id: uuid.UUID) -> LibraryModel | None:
    return await session.get(LibraryModel, model_id)


async def model_by_name(session: AsyncSession, name: str) -> LibraryModel | None:
    return await session.scalar(select(LibraryModel).where(LibraryModel.name == name))


async def list_models(
    session: AsyncSession,
    *,
    visible: Collection[uuid.UUID] | None,
    name: str | None,
    tag: str | None,
    format: str | None,
    state: str | None,
    after: uuid.UUID | None,
    limit: int,
) -> list[LibraryModel]:
    q = select(LibraryModel).order_by(LibraryModel.id).limit(limit + 1)
    if (cond := visible_to(visible)) is not None:
        q = q.where(cond)
    if name:
        # `%`, `_` and the escape character in the filter match themselves. The ESCAPE form is
        # still served by ix_library_models_name_trgm: it plans as `name ~~* like_escape(...)`,
        # folded to a constant. Under 3 characters there is no trigram to look up and the table
        # is scanned: ~10 ms at 10,000 models when nothing matches.
        q = q.where(LibraryModel.name.icontains(name, autoescape=True))
    if tag:
        q = q.where(LibraryModel.tags.contains([tag]))
    if format or state:
        version_cond = [ModelVersion.model_id == LibraryModel.id]
        if format:
            version_cond.append(ModelVersion.format == format)
        if state:
            version_cond.append(ModelVersion.state == state)
        q = q.where(exists().where(and_(*version_cond)))
    if after is not None:
        q = q.where(LibraryModel.id > after)
    return list((await session.scalars(q)).all())


async def list_versions(
    session: AsyncSession,
    model_id: uuid.UUID,
    *,
    state: str | None = None,
    after: uuid.UUID | None = None,
    limit: int = 100,
) -> list[ModelVersion]:
    q = (
        select(ModelVersion)
        .where(ModelVersion.model_id == model_id)
        .order_by(ModelVersion.id)
        .limit(limit + 1)
    )
    if state:
        q = q.where(ModelVersion.state == state)
    if after is not None:
        q = q.where(ModelVersion.id > after)
    return list((await session.scalars(q)).all())


async def get_version(
    session: AsyncSession, version_id: uuid.UUID, *, lock: bool = False
) -> ModelVersion | None:
    q = select(ModelVersion).where(ModelVersion.id == version_id)
    if lock:
        q = q.with_for_update()
    return await session.scalar(q)


async def version_by_name(session: AsyncSession, model_id: uuid.UUID, version: str) -> ModelVersion | None:
    q = select(ModelVersion).where(ModelVersion.model_id == model_id, ModelVersion.version == version)
    return await session.scalar(q)


async def approvals_for(session: AsyncSession, version_ids: Collection[uuid.UUID]) -> list[Approval]:
    q = select(Approval).where(Approval.version_id.in_(list(version_ids))).order_by(Approval.id)
    return list((await session.scalars(q)).all())


async def upsert_artifact(
    session: AsyncSession, *, sha256: str, size_bytes: int, is_directory: bool, filename: str
) -> None:
    stmt = insert(Artifact).values(
        sha256=sha256, size_bytes=size_bytes, is_directory=is_directory, filename=filename
    )
    await session.execute(stmt.on_conflict_do_nothing(index_elements=["sha256"]))


async def get_artifact(session: AsyncSession, sha256: str) -> Artifact | None:
    return await session.get(Artifact, sha256)


async def source_for_uri(session: AsyncSession, uri: str) -> Source | None:
    """The registered source a URI comes from, if any: what makes a version's provenance 'known'.

    Read here (not through the sources domain, which builds on the library) so the library
    does not depend on sources.
    """
    for source in (await session.scalars(select(Source))).all():
        base = source.uri.rstrip("/")
        if uri == base or uri.startswith((base + "/", base + ":", base + "@")):
            return source
    return None


async def approved_versions(session: AsyncSession) -> list[tuple[ModelVersion, LibraryModel, int]]:
    """Every approved version with its model and artifact size, in id order (the Kubernetes
    `Model` objects' source, read in one query each pass)."""
    q = (
        select(ModelVersion, LibraryModel, Artifact.size_bytes)
        .join(LibraryModel, LibraryModel.id == ModelVersion.model_id)
        .join(Artifact, Artifact.sha256 == ModelVersion.artifact_sha256)
        .where(ModelVersion.state == VersionState.APPROVED.value)
        .order_by(ModelVersion.id)
    )
    return [(version, model, size) for version, model, size in (await session.execute(q)).all()]
