"""Guardrail hits as `guardrail.hit` events, written off the request path in batches.

A hit appends a row to a list; a loop inserts the list every `meter_flush_s` into the events
outbox the way the control plane's transactions do (under the same advisory lock, so event ids
follow commit order, then one NOTIFY per event for SSE subscribers). The gateway's own
snapshot listener skips these notifications (`DataPlane.ignore`): a hit changes no route.
The data never holds the matched text: ruleset, version, rule, action, where, deployment, key.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import orjson
import psycopg

from converge.gateway.metering import _Loop
from converge.kit import channels

# Must equal converge.control.events.repository.EVENTS_LOCK_KEY (tests check it): the gateway
# cannot import the control plane.
EVENTS_LOCK_KEY = 0x45_76_6E_74
MAX_PENDING = 10_000
INSERT_SQL = (
    "INSERT INTO events (at, project_id, kind, object_id, data, restricted)"
    " VALUES (now(), %s, 'guardrail.hit', %s, %s::jsonb, false) RETURNING id"
)


class HitLog(_Loop):
    name = "gateway_guardrail_hits"

    def __init__(
        self, *, conninfo: str, interval_s: float, on_written: Callable[[list[int]], None] | None = None
    ) -> None:
        super().__init__(conninfo=conninfo, interval_s=interval_s)
        self.pending: list[tuple[uuid.UUID, str, str]] = []
        self.written = 0
        self._on_written = on_written

    def record(self, *, project_id: uuid.UUID, ruleset_id: Any, data: dict[str, Any]) -> None:
        if len(self.pending) < MAX_PENDING:  # beyond that, the counter still counts them
            self.pending.append((project_id, str(ruleset_id), orjson.dumps(data).decode()))

    async def _once(self) -> None:
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        try:
            conn = await self._connection()
            ids: list[int] = []
            async with conn.transaction(), conn.cursor() as cur:
                await cur.execute("SELECT pg_advisory_xact_lock(%s)", (EVENTS_LOCK_KEY,))
                for row in rows:
                    await cur.execute(INSERT_SQL, row)
                    found = await cur.fetchone()
                    if found is not None:
                        ids.append(found[0])
                if self._on_written is not None:
                    self._on_written(ids)  # before the NOTIFYs are delivered (at commit)
                for event_id in ids:
                    await cur.execute("SELECT pg_notify(%s, %s)", (channels.EVENTS, str(event_id)))
        except psycopg.errors.ForeignKeyViolation:
            return  # a project deleted meanwhile (events have no foreign key today; kept safe)
        except BaseException:
            self.pending[:0] = rows[: MAX_PENDING - len(self.pending)]
            raise
        self.written += len(rows)
