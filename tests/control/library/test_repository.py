"""The Model Library's SQL: what the name filter matches, and that an index serves it.

Rows are inserted straight through the session (names the API would refuse included) in a
transaction that is rolled back.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, insert, text
from sqlalchemy.ext.asyncio import AsyncSession

from converge.control.library import repository
from converge.models import LibraryModel

TRIGRAM_INDEX = "ix_library_models_name_trgm"


@pytest.fixture
async def session(app: Any) -> AsyncIterator[AsyncSession]:
    async with app.state.converge.engine.connect() as conn:
        outer = await conn.begin()
        try:
            yield AsyncSession(bind=conn, expire_on_commit=False, join_transaction_mode="create_savepoint")
        finally:
            await outer.rollback()


async def _add_models(session: AsyncSession, names: list[str]) -> None:
    await session.execute(insert(LibraryModel), [{"name": name, "created_by": "test"} for name in names])


async def _names(session: AsyncSession, name: str) -> set[str]:
    rows = await repository.list_models(
        session, visible=None, name=name, tag=None, format=None, state=None, after=None, limit=100
    )
    return {model.name for model in rows}


async def test_name_filter_matches_like_wildcards_and_the_escape_character_literally(session):
    p = f"lit-{uuid.uuid4().hex[:8]}"
    names = [f"{p}-50%-off", f"{p}-500-off", f"{p}-a_b", f"{p}-axb", f"{p}-c\\d", f"{p}-cd"]
    names += [f"{p}-e/f", f"{p}-ef"]  # `/`: the escape character SQLAlchemy's autoescape uses
    await _add_models(session, names)

    assert await _names(session, f"{p}-50%") == {f"{p}-50%-off"}
    assert await _names(session, f"{p}-%-off") == set()  # not "anything, then -off"
    assert await _names(session, f"{p}-a_b") == {f"{p}-a_b"}
    assert await _names(session, f"{p}-c\\d") == {f"{p}-c\\d"}  # PostgreSQL's default escape
    assert await _names(session, f"{p}-e/f") == {f"{p}-e/f"}
    assert await _names(session, f"{p}-A_B") == {f"{p}-a_b"}  # still case-insensitive
    assert await _names(session, p) == set(names)


async def test_a_selective_name_filter_is_served_by_the_trigram_index(session):
    # Enough rows, with statistics, that walking the id order to fill a page is the costly plan.
    p = f"trg-{uuid.uuid4().hex[:8]}"
    await _add_models(session, [f"{p}-llama-{i:05d}" for i in range(2000)])
    # Statistics, as autovacuum would gather; no VACUUM: new names are in the index at once
    # (fastupdate off), with no pending list for the planner to price.
    await session.execute(text("ANALYZE library_models"))  # sees this transaction's rows
    # ANALYZE writes the table's row count in place, outside transactions: an autovacuum of the
    # shared test database between here and the EXPLAIN can put back a count without these rows.
    # With sequential scans priced out the plan still says whether the index can serve the filter.
    await session.execute(text("SET LOCAL enable_seqscan = off"))
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    engine = session.bind.engine
    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        assert f"{p}-llama-01234" in await _names(session, "01234")
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)

    # The engine is the session app's: the controller's passes run statements on it meanwhile.
    statement, parameters = next(s for s in reversed(statements) if "FROM library_models" in s[0])
    conn = await session.connection()
    plan = "\n".join(row[0] for row in await conn.exec_driver_sql(f"EXPLAIN {statement}", parameters))
    assert TRIGRAM_INDEX in plan, plan
