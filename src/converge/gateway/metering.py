"""Batched writes of the data path: usage records (COPY) and the shared limit counters.

Nothing here runs per request: a request appends a tuple to a list, and a loop writes the list
every `meter_flush_s` with one COPY on its own connection. If the database is away, each failed
batch is appended to a spool file in the data directory (`Spool`), so a restart of the process
loses nothing either; when the database is back the spool is replayed first, in order, then
memory. Only rows beyond the spool's bound are dropped (counted and logged); without a spool,
rows wait in memory up to `MAX_PENDING`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import structlog

from converge.gateway.limits import INFLIGHT_STALE_S, Limiter, month_of
from converge.kit.service import Service
from converge.observability import tracing

log = structlog.get_logger(__name__)
MAX_PENDING = 200_000
COLUMNS = (
    "at",
    "project_id",
    "key_id",
    "deployment_id",
    "model",
    "endpoint",
    "status",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "ttft_ms",
)
COPY_SQL = f"COPY usage_records ({', '.join(COLUMNS)}) FROM STDIN"
# Expired rows go in slices, so no single statement holds many row locks or runs for long.
PRUNE_SQL = (
    "DELETE FROM usage_records WHERE id IN"
    " (SELECT id FROM usage_records WHERE at < now() - make_interval(days => %s) LIMIT %s)"
)
PRUNE_BATCH = 10_000
PRUNE_EVERY_S = 3600.0
PRUNE_LOCK_KEY = 0x43564755  # one gateway replica prunes at a time; the others skip that round
TOUCH_KEYS_SQL = (
    "UPDATE api_keys SET last_used_at = now() WHERE id = ANY(%s)"
    " AND (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => %s))"
)
UPSERT_SQL = (
    'INSERT INTO gateway_counters (gateway_id, scope, kind, "window", requests, tokens, updated_at)'
    " VALUES (%s, %s, %s, %s, %s, %s, now())"
    ' ON CONFLICT (gateway_id, scope, kind, "window") DO UPDATE'
    " SET requests = EXCLUDED.requests, tokens = EXCLUDED.tokens, updated_at = now()"
)
OTHERS_SQL = (
    'SELECT scope, kind, "window", sum(requests)::bigint, sum(tokens)::bigint FROM gateway_counters'
    " WHERE gateway_id <> %s AND ((kind = 'minute' AND \"window\" >= %s) OR (kind = 'month' AND \"window\" = %s)"
    " OR (kind = 'inflight' AND updated_at > now() - make_interval(secs => %s)))"
    ' GROUP BY scope, kind, "window"'
)
CLEANUP_SQL = (
    "DELETE FROM gateway_counters WHERE (kind = 'minute' AND \"window\" < %s)"
    " OR (kind = 'inflight' AND updated_at < now() - interval '1 hour')"
)


_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class _Clock:
    """UTC timestamps in COPY's text form; the seconds part is formatted once per second."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second, self.text = -1, ""

    def __call__(self, at: float) -> str:
        second = int(at)
        if second != self.second:
            self.second, self.text = second, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
        return f"{self.text}.{int((at - second) * 1e6):06d}+00"


NULL = "\\N"


def _id(value: uuid.UUID | None) -> str:
    return NULL if value is None else str(value)


class Spool:
    """Usage rows the database could not take yet: COPY text lines appended to one file.

    Append-only while the database is away; replayed with one streamed COPY (a transaction)
    and then emptied. A process killed between that commit and the truncation would replay the
    spool twice: a window of microseconds, against losing every row of an outage.
    """

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        self.path, self.max_bytes = path, max_bytes
        self.rows = self._count()  # what an earlier process left is part of the backlog

    def _count(self) -> int:
        try:
            with self.path.open("rb") as stream:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(1 << 20), b""))
        except FileNotFoundError:
            return 0

    @property
    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, lines: list[str]) -> int:
        """Write what fits under the bound; the number of lines that did not fit."""
        room = self.max_bytes - self.size
        data = bytearray()
        kept = 0
        for line in lines:
            encoded = line.encode()
            if len(data) + len(encoded) > room:
                break
            data += encoded
            kept += 1
        if data:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)  # once per failed batch (a second), not per request
            finally:
                os.close(fd)
            self.rows += kept
        return len(lines) - kept

    def lines(self) -> list[str]:
        with self.path.open("r", encoding="utf-8", newline="\n") as stream:
            return stream.readlines()

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.path, 0)
        self.rows = 0


class _Loop(Service):
    """A background loop on its own autocommit connection, reconnecting after failures."""

    name = "gateway-loop"

    def __init__(self, *, conninfo: str, interval_s: float) -> None:
        super().__init__()
        self._conninfo, self._interval = conninfo, interval_s
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._round = asyncio.Lock()  # one round at a time on the one connection
        self.failures = 0

    async def stop(self) -> None:
        await super().stop()
        try:
            await self.once()  # the last batch
        except Exception as exc:
            self._final_flush_failed(exc)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()

    def _final_flush_failed(self, exc: Exception) -> None:
        log.warning(f"{self.name}_final_flush_failed", error=str(exc).splitlines()[0][:300])

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        return self._conn

    async def once(self) -> None:
        """One round now: the loop's, the last one at stop, or a caller's that will not wait for
        the interval. Rounds never overlap (they share one connection), and a failed round
        closes the connection it may have left mid-transaction; the next one reconnects."""
        async with self._round:
            try:
                await self._once()
            except Exception:
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.close()
                    self._conn = None
                raise

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.once()
                self.failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    log.warning(f"{self.name}_failed", failures=self.failures, exc_info=True)

    async def _once(self) -> None:
        raise NotImplementedError


class Meter(_Loop):
    """Usage records, one per request, written in batches."""

    name = "gateway_meter"

    def __init__(
        self,
        *,
        conninfo: str,
        interval_s: float,
        key_touch_s: int,
        on_dropped: Callable[[int], None],
        retention_days: int = 0,
        spool: Spool | None = None,
    ) -> None:
        super().__init__(conninfo=conninfo, interval_s=interval_s)
        self.spool = spool
        self.retention_days = retention_days  # 0: usage is kept for ever
        self._next_prune = time.monotonic() + 60.0  # the first round a minute after start
        self.pending: list[tuple[uuid.UUID, str]] = []  # (project, COPY text line)
        self._texts: dict[uuid.UUID | None, str] = {}
        self._clock = _Clock()
        self.keys_seen: set[uuid.UUID] = set()
        self.written = 0
        self._key_touch_s = key_touch_s  # api_keys.last_used_at is written at most this often
        self._on_dropped = on_dropped

    @property
    def backlog(self) -> int:
        """Rows waiting to be written: in memory and in the spool."""
        return len(self.pending) + (self.spool.rows if self.spool is not None else 0)

    def record(
        self,
        *,
        started: float,
        project_id: uuid.UUID,
        key_id: uuid.UUID | None,
        deployment_id: uuid.UUID | None,
        model: str,
        endpoint: str,
        status: int,
        stream: bool,
        prompt_tokens: int,
        completion_tokens: int,
        latency_ms: float,
        ttft_ms: float | None,
    ) -> None:
        # One COPY text line, made now: a few microseconds per request instead of a stall of
        # milliseconds when a whole second's rows are formatted at once.
        texts = self._texts
        project = texts.get(project_id) or texts.setdefault(project_id, str(project_id))
        key = texts.get(key_id) or texts.setdefault(key_id, _id(key_id))
        deployment = texts.get(deployment_id) or texts.setdefault(deployment_id, _id(deployment_id))
        if len(texts) > 50_000:
            texts.clear()
        line = (
            f"{self._clock(started)}\t{project}\t{key}\t{deployment}\t{model[:128].translate(_ESCAPES)}\t"
            f"{endpoint}\t{status}\t{'t' if stream else 'f'}\t{prompt_tokens}\t{completion_tokens}\t"
            f"{latency_ms:.3f}\t{NULL if ttft_ms is None else f'{ttft_ms:.3f}'}\n"
        )
        self.pending.append((project_id, line))
        if key_id is not None:
            self.keys_seen.add(key_id)
        if len(self.pending) > MAX_PENDING:
            drop = len(self.pending) - MAX_PENDING
            del self.pending[:drop]
            self._on_dropped(drop)

    def _final_flush_failed(self, exc: Exception) -> None:
        # The rows are in the spool (or, without one, lost with this process): say which.
        spooled = self.spool is not None and not self.pending
        log.warning(
            "gateway_meter_final_flush_failed",
            error=str(exc).splitlines()[0][:300],
            spool=str(self.spool.path) if spooled and self.spool is not None else None,
            lost=0 if spooled else len(self.pending),
        )
        if not spooled and self.pending:
            self._on_dropped(len(self.pending))
            self.pending = []

    async def _once(self) -> None:
        await self._flush()
        if self.retention_days and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY_S
            await self.prune()

    async def prune(self) -> int:
        """Delete the usage records older than the retention; the number deleted."""
        conn = await self._connection()
        deleted = 0
        while True:
            async with conn.transaction():
                cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PRUNE_LOCK_KEY,))
                row = await cur.fetchone()
                if not (row and row[0]):
                    break  # another replica is pruning now
                cur = await conn.execute(PRUNE_SQL, (self.retention_days, PRUNE_BATCH))
                deleted += cur.rowcount
            if cur.rowcount < PRUNE_BATCH:
                break
        if deleted:
            log.info("gateway_usage_pruned", rows=deleted, retention_days=self.retention_days)
        return deleted

    async def _flush(self) -> None:
        spooled = self.spool is not None and self.spool.size > 0
        if not self.pending and not self.keys_seen and not spooled:
            return
        rows, self.pending = self.pending, []
        keys, self.keys_seen = self.keys_seen, set()
        with tracing.span("gateway.meter.flush", rows=len(rows), keys=len(keys), spooled=spooled):
            try:
                conn = await self._connection()
                if spooled:  # older than anything in memory: they go first
                    await self._replay(conn)
                await self._write(conn, rows, keys)
            except BaseException:
                self.keys_seen |= keys
                self._keep(rows)
                raise
        self.written += len(rows)

    def _keep(self, rows: list[tuple[uuid.UUID, str]]) -> None:
        """Rows of a failed batch: to the spool when there is one, else back to memory."""
        if self.spool is None:
            self.pending[:0] = rows  # kept for the next batch, oldest first
            return
        try:
            dropped = self.spool.append([line for _, line in rows])
        except OSError:
            log.warning("gateway_meter_spool_failed", path=str(self.spool.path), exc_info=True)
            self.pending[:0] = rows
            return
        if dropped:
            log.error("gateway_meter_spool_full", dropped=dropped, max_bytes=self.spool.max_bytes)
            self._on_dropped(dropped)

    async def _write(
        self, conn: psycopg.AsyncConnection[Any], rows: list[tuple[uuid.UUID, str]], keys: set[uuid.UUID]
    ) -> None:
        try:
            await self._copy(conn, rows, keys)
        except psycopg.errors.ForeignKeyViolation:
            # A project deleted while its usage waited here: those rows have nowhere to go.
            rows[:] = await self._without_deleted_projects(conn, rows)
            await self._copy(conn, rows, keys)

    async def _replay(self, conn: psycopg.AsyncConnection[Any]) -> None:
        assert self.spool is not None
        lines = await asyncio.to_thread(self.spool.lines)
        rows = [(uuid.UUID(line.split("\t", 2)[1]), line) for line in lines]
        await self._write(conn, rows, set())
        self.spool.clear()
        self.written += len(rows)
        log.info("gateway_meter_spool_replayed", rows=len(rows))

    async def _without_deleted_projects(
        self, conn: psycopg.AsyncConnection[Any], rows: list[tuple[uuid.UUID, str]]
    ) -> list[tuple[uuid.UUID, str]]:
        ids = list({row[0] for row in rows})
        cur = await conn.execute("SELECT id FROM projects WHERE id = ANY(%s)", (ids,))
        alive = {row[0] for row in await cur.fetchall()}
        kept = [row for row in rows if row[0] in alive]
        log.info("gateway_meter_dropped_deleted_projects", rows=len(rows) - len(kept))
        return kept

    async def _copy(
        self, conn: psycopg.AsyncConnection[Any], rows: list[tuple[uuid.UUID, str]], keys: set[uuid.UUID]
    ) -> None:
        async with conn.transaction(), conn.cursor() as cur:
            if rows:
                async with cur.copy(COPY_SQL) as copy:
                    await copy.write("".join(line for _, line in rows).encode())
            if keys:
                await cur.execute(TOUCH_KEYS_SQL, (list(keys), self._key_touch_s))


class CounterSync(_Loop):
    """Shares this replica's limit counters and reads the other replicas' (see gateway/limits.py)."""

    name = "gateway_limits_sync"

    def __init__(self, *, conninfo: str, interval_s: float, limiter: Limiter) -> None:
        super().__init__(conninfo=conninfo, interval_s=interval_s)
        self._limiter = limiter
        self._cleaned_at = 0.0
        self.synced_at = 0.0

    async def _once(self) -> None:
        limiter = self._limiter
        now = time.time()
        minute = int(now // 60)
        rows, flights = limiter.take_dirty()
        try:
            conn = await self._connection()
            async with conn.cursor() as cur:
                params = [(limiter.gateway_id, *row) for row in rows]
                params += [(limiter.gateway_id, scope, "inflight", 0, count, 0) for scope, count in flights]
                if params:
                    await cur.executemany(UPSERT_SQL, params)
                await cur.execute(
                    OTHERS_SQL, (limiter.gateway_id, minute - 1, month_of(now), INFLIGHT_STALE_S)
                )
                counts: dict[tuple[str, str, int], tuple[int, int]] = {}
                in_flight: dict[str, int] = {}
                for scope, kind, window, requests, tokens in await cur.fetchall():
                    if kind == "inflight":
                        in_flight[scope] = int(requests)
                    else:
                        counts[(scope, kind, int(window))] = (int(requests), int(tokens))
                if now - self._cleaned_at > 60:
                    await cur.execute(CLEANUP_SQL, (minute - 2,))
                    self._cleaned_at = now
                    limiter.forget_before(minute)
        except BaseException:
            limiter.dirty |= {(s, k, w) for s, k, w, *_ in rows}  # rewrite them next time
            limiter.dirty_in_flight |= {s for s, _ in flights}
            raise
        limiter.set_others(counts, in_flight)
        self.synced_at = now
        # In-flight rows are refreshed while non-zero so they never look stale to the others.
        limiter.dirty_in_flight |= {s for s, n in limiter.in_flight.items() if n}
