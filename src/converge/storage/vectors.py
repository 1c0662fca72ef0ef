"""pgvector plumbing for knowledge bases: one `kb_chunks` partition per base and its HNSW index.

Names and DDL only (no domain logic): the partition of a base is `kb_chunks_<uuid hex>`, made
when the base is made and dropped when it is deleted, inside the caller's transaction. The
HNSW index is built on `embedding::halfvec(<dim>)` with cosine distance: half the memory of a
`vector` index, while the stored `vector` keeps full precision for exact search and re-ranking.
A query must use the same expression (`halfvec_expr`) for the planner to pick the index.
"""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64


def partition_name(kb_id: uuid.UUID) -> str:
    return f"kb_chunks_{kb_id.hex}"


def index_name(kb_id: uuid.UUID) -> str:
    return f"ix_kb_chunks_{kb_id.hex}_hnsw"


def halfvec_expr(dimension: int, column: str = "embedding") -> str:
    """The indexed expression; `dimension` is an int from the database, never user text."""
    return f"({column}::halfvec({int(dimension)}))"


async def create_partition(session: AsyncSession, kb_id: uuid.UUID) -> None:
    """Make the base's partition without stopping other bases' searches and writes.

    `CREATE TABLE ... PARTITION OF` takes an ACCESS EXCLUSIVE lock on `kb_chunks` (it would
    queue behind every open search and block every new one); a table made alone and then
    ATTACHed takes SHARE UPDATE EXCLUSIVE, which readers and writers do not wait for. The CHECK
    constraint lets ATTACH skip scanning the (empty) table; the parent's indexes and foreign
    key are cloned onto it by ATTACH."""
    name, value = partition_name(kb_id), str(uuid.UUID(str(kb_id)))
    await session.execute(
        text(
            f"CREATE TABLE {name} (LIKE kb_chunks INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING CONSTRAINTS)"
        )
    )
    await session.execute(text(f"ALTER TABLE {name} ADD CONSTRAINT {name}_kb CHECK (kb_id = '{value}')"))
    await session.execute(text(f"ALTER TABLE kb_chunks ATTACH PARTITION {name} FOR VALUES IN ('{value}')"))


async def drop_partition(session: AsyncSession, kb_id: uuid.UUID) -> None:
    await session.execute(text(f"DROP TABLE IF EXISTS {partition_name(kb_id)}"))


async def create_hnsw_index(session: AsyncSession, kb_id: uuid.UUID, *, dimension: int) -> None:
    """Build the base's HNSW index (in the caller's transaction: writers to this base wait,
    readers and other bases do not)."""
    await session.execute(
        text(
            f"CREATE INDEX IF NOT EXISTS {index_name(kb_id)} ON {partition_name(kb_id)} "
            f"USING hnsw ({halfvec_expr(dimension)} halfvec_cosine_ops) "
            f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
        )
    )


async def has_hnsw_index(session: AsyncSession, kb_id: uuid.UUID) -> bool:
    found = await session.scalar(text("SELECT to_regclass(:name) IS NOT NULL"), {"name": index_name(kb_id)})
    return bool(found)
