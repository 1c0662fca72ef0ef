"""Leadership among processes sharing one database: a session-level advisory lock per role,
and, for a leader whose writes must never race a successor's, a fencing epoch.

The lock lives exactly as long as the connection holding it, so a leader that dies (or loses
the database) stops leading when its connection goes, and another process takes over: at once
after a kill (the server sees the socket close), within the keepalive bound below when the
leader's host or network vanishes silently (the server probes the idle connection).

A lock alone does not fence: a leader that lost its connection may still be half-way through a
pass on its pool's other connections. So `lease` also bumps the role's epoch in
`leader_leases` when it wins the lock, and `fence` (run first in each of the leader's writing
transactions) takes a share lock on that row and refuses if the epoch moved on. The successor's
bump waits for such a transaction to end, so a stale write either committed before the new
leader started reading, or never commits at all.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# The server drops a silent peer after idle + interval * count seconds (5 + 2 * 3 = 11 s);
# these are per-session settings any user may set, so no server configuration is needed.
KEEPALIVE = {"tcp_keepalives_idle": 5, "tcp_keepalives_interval": 2, "tcp_keepalives_count": 3}
KEEPALIVE_BOUND_S = 11.0


class Fenced(RuntimeError):
    """This process's lease epoch is no longer the current one: another leader took over."""


@dataclass(frozen=True)
class Lease:
    role: str
    epoch: int
    holder: str
    conn: psycopg.AsyncConnection[Any]  # the autocommit connection whose lock is the leadership


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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


@asynccontextmanager
async def lease(
    conninfo: str, *, key: int, role: str, poll_s: float = 1.0, holder: str | None = None
) -> AsyncIterator[Lease]:
    """`leadership`, plus the next epoch of `role` once the lock is won (see `fence`)."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        for name, value in KEEPALIVE.items():
            await conn.execute(f"SET {name} = {int(value)}")
        while not await try_lead(conn, key):
            await asyncio.sleep(poll_s)
        who = holder or holder_name()
        yield Lease(role=role, epoch=await claim(conn, role=role, holder=who), holder=who, conn=conn)


async def claim(conn: psycopg.AsyncConnection[Any], *, role: str, holder: str) -> int:
    """The role's next epoch, recorded with its holder (waits for stale leaders' fenced writes)."""
    cur = await conn.execute(
        "INSERT INTO leader_leases (role, epoch, holder, acquired_at) VALUES (%s, 1, %s, now())"
        " ON CONFLICT (role) DO UPDATE SET epoch = leader_leases.epoch + 1,"
        " holder = EXCLUDED.holder, acquired_at = EXCLUDED.acquired_at RETURNING epoch",
        (role, holder),
    )
    row = await cur.fetchone()
    assert row is not None  # INSERT ... RETURNING always answers a row
    return int(row[0])


async def fence(session: AsyncSession, *, role: str, epoch: int, lock: bool = True) -> None:
    """Raise `Fenced` unless `epoch` is still the role's current one; the share lock it takes
    holds a successor's `claim` back until this transaction ends (`lock=False`: a check only,
    for a transaction that writes nothing and must not be made a writing one)."""
    query = "SELECT epoch FROM leader_leases WHERE role = :role" + (" FOR SHARE" if lock else "")
    current = await session.scalar(text(query), {"role": role})
    if current != epoch:
        raise Fenced(f"the {role} lease is at epoch {current}; this process held epoch {epoch}")


async def current(session: AsyncSession, *, role: str) -> tuple[int, str] | None:
    """(epoch, holder) of the role's lease, or None before anyone led."""
    row = (
        await session.execute(
            text("SELECT epoch, holder FROM leader_leases WHERE role = :role"), {"role": role}
        )
    ).first()
    return (int(row[0]), str(row[1])) if row else None
