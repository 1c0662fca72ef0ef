"""Leadership among processes sharing one database: a session-level advisory lock per role.

The lock lives exactly as long as the connection holding it, so a leader that dies (or loses
the database) stops leading when its connection goes, and another process takes over.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg


async def try_lead(conn: psycopg.AsyncConnection[Any], key: int) -> bool:
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
    row = await cur.fetchone()
    return bool(row and row[0])


@asynccontextmanager
async def leadership(
    conninfo: str, *, key: int, poll_s: float = 2.0
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """Connect, wait until this process holds the lock `key`, and yield the (autocommit)
    connection that holds it; leaving the block, or losing the connection, gives it up."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        while not await try_lead(conn, key):
            await asyncio.sleep(poll_s)
        yield conn
