"""Input drift of V2 deployments, counted off the hot path and written in batches.

Per request (`InputDrift.record`, from v2.py once a replica answered 2xx) the body's bytes are
appended to a list: no parsing, no numpy, no database. Every `flush_s` the loop takes the list,
decodes it in a worker thread and adds each feature's values to its window with one
`searchsorted` + `bincount` per feature over the whole batch, against bin edges fixed by the
reference. Then, on its own connection like the meter (`_Loop`), it upserts the open and the
closed windows, writes a reference it took, and reads the references people put.

A feature is a numeric column of an input tensor: `0`, `1`, ... of a request's one tensor
(`[rows, features]`, as scikit-learn models take it), or with several tensors the tensor's name
(one column) or `name[j]`. At most `max_features` per deployment and `max_deployments` per
gateway are tracked (one idle for twice `window_max_s` is let go); labels are those names,
fixed by the reference, so they stay bounded.

The reference is the deployment's `drift_references` row: histograms of the training data
(PUT /deployments/{id}/drift/reference), or else the first full window (`window_rows` rows)
after the deployment's revision went live, which the gateway that saw it writes (the first
writer wins; other replicas adopt it on their next read). A window closes once it holds
`window_rows` rows and is `window_min_s` old, or after `window_max_s` with `min_rows`; its PSI
and KS per feature against the reference become the gauges `converge_drift_psi` and
`converge_drift_ks`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import psycopg
import structlog
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from psycopg.types.json import Jsonb

from converge.config import DriftSettings
from converge.core import drift
from converge.gateway.dataplane import Route
from converge.gateway.metering import _Loop

log = structlog.get_logger(__name__)
NUMERIC = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}
)
MAX_NAME = 64  # a feature label is at most this long
PRUNE_EVERY_S = 3600.0

# One tensor of a request: its features' names and its values as [rows, features].
Block = tuple[tuple[str, ...], drift.Floats]
Features = list[tuple[str, drift.Floats]]

UPSERT_WINDOW_SQL = (
    "INSERT INTO drift_windows (id, deployment_id, reference_version, gateway_id, revision, started_at,"
    " ended_at, complete, rows, features) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (id) DO UPDATE SET ended_at = EXCLUDED.ended_at, complete = EXCLUDED.complete,"
    " rows = EXCLUDED.rows, features = EXCLUDED.features"
)
# A first window replaces only a first window of another revision: a reference people put, or
# the one another gateway replica already took for this revision, wins.
INSERT_REFERENCE_SQL = (
    "INSERT INTO drift_references (deployment_id, version, source, revision, rows, features, created_by,"
    " created_at) VALUES (%s, %s, 'first_window', %s, %s, %s, %s, %s)"
    " ON CONFLICT (deployment_id) DO UPDATE SET version = EXCLUDED.version, source = EXCLUDED.source,"
    " revision = EXCLUDED.revision, rows = EXCLUDED.rows, features = EXCLUDED.features,"
    " created_by = EXCLUDED.created_by, created_at = EXCLUDED.created_at"
    " WHERE drift_references.source = 'first_window'"
    " AND drift_references.revision IS DISTINCT FROM EXCLUDED.revision"
)
VERSIONS_SQL = "SELECT deployment_id, version FROM drift_references WHERE deployment_id = ANY(%s)"
REFERENCES_SQL = (
    "SELECT deployment_id, version, source, revision, rows, features, created_at FROM drift_references"
    " WHERE deployment_id = ANY(%s)"
)
PRUNE_SQL = (
    "DELETE FROM drift_windows WHERE id IN (SELECT id FROM drift_windows"
    " WHERE ended_at < now() - make_interval(days => %s) LIMIT 10000)"
)


# -- what a request holds ------------------------------------------------------------------------


def _matrix(shape: Any, data: Any) -> drift.Floats | None:
    """A tensor's data as `[rows, columns]` floats, or None when it is no such tensor."""
    if type(shape) is not list or not shape:
        return None
    size = 1
    for d in shape:
        if type(d) is not int or d < 0:
            return None
        size *= d
    try:
        array = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return None
    if shape[0] == 0 or array.size != size:
        return None
    return array.reshape(shape[0], -1)


def _names(prefix: str, columns: int) -> tuple[str, ...]:
    if prefix == "":
        return tuple(str(j) for j in range(columns))
    return (prefix,) if columns == 1 else tuple(f"{prefix}[{j}]"[:MAX_NAME] for j in range(columns))


def blocks_of(body: Any, *, limit: int) -> list[Block]:
    """The numeric tensors of a V2 inference request with their features' names (see the
    module docstring), at most `limit` features in all."""
    inputs = body.get("inputs") if type(body) is dict else None
    if type(inputs) is not list:
        return []
    tensors = []
    for tensor in inputs:
        if type(tensor) is dict and type(kind := tensor.get("datatype")) is str and kind in NUMERIC:
            matrix = _matrix(tensor.get("shape"), tensor.get("data"))
            if matrix is not None and matrix.shape[1]:
                tensors.append((str(tensor.get("name", "")), matrix))
    single = len(tensors) == 1
    blocks, room = [], limit
    for name, matrix in tensors:
        if room <= 0:
            break
        names = _names("" if single else name[:MAX_NAME] or "?", matrix.shape[1])[:room]
        blocks.append((names, matrix[:, : len(names)]))
        room -= len(names)
    return blocks


def features_of(body: Any, *, limit: int) -> Features:
    """The same, column by column: `[(name, values)]`."""
    return [
        (name, matrix[:, j]) for names, matrix in blocks_of(body, limit=limit) for j, name in enumerate(names)
    ]


def _rows(blocks: list[Block]) -> int:
    return max(int(matrix.shape[0]) for _, matrix in blocks)


def _columns(requests: list[list[Block]]) -> dict[str, drift.Floats]:
    """Every request's values per feature name: one concatenation per tensor layout."""
    stacked: dict[tuple[str, ...], list[drift.Floats]] = {}
    for blocks in requests:
        for names, matrix in blocks:
            stacked.setdefault(names, []).append(matrix)
    parts: dict[str, list[drift.Floats]] = {}
    for names, matrices in stacked.items():
        matrix = np.concatenate(matrices) if len(matrices) > 1 else matrices[0]
        for j, name in enumerate(names):
            parts.setdefault(name, []).append(matrix[:, j])
    return {name: np.concatenate(p) if len(p) > 1 else p[0] for name, p in parts.items()}


# -- references and windows ----------------------------------------------------------------------


def _stamp(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


class Reference:
    """A reference's bin edges and counts per feature, by name."""

    __slots__ = (
        "counts",
        "created_at",
        "edges",
        "features",
        "index",
        "names",
        "revision",
        "rows",
        "source",
        "version",
    )

    def __init__(
        self,
        *,
        version: uuid.UUID,
        source: str,
        revision: int | None,
        rows: int,
        features: list[dict[str, Any]],
        created_at: float,
    ) -> None:
        self.version, self.source, self.revision, self.rows = version, source, revision, rows
        self.created_at, self.features = created_at, features
        self.names = tuple(str(f["name"]) for f in features)
        self.edges = [np.asarray(f["edges"], dtype=np.float64) for f in features]
        self.counts = [np.asarray(f["counts"], dtype=np.float64) for f in features]
        self.index = {name: i for i, name in enumerate(self.names)}


class Window:
    """Counts of one window against one reference, kept as running sums."""

    __slots__ = ("counts", "dirty", "id", "n", "reference", "rows", "squares", "started", "sums", "updated")

    def __init__(self, reference: Reference, started: float) -> None:
        self.id, self.reference, self.started, self.updated = uuid.uuid4(), reference, started, started
        self.counts = [np.zeros(e.size + 1, dtype=np.int64) for e in reference.edges]
        size = len(reference.names)
        self.n = np.zeros(size, dtype=np.int64)
        self.sums, self.squares = np.zeros(size), np.zeros(size)
        self.rows, self.dirty = 0, False

    def add(self, requests: list[list[Block]], now: float) -> None:
        """Every request's values, one histogram update per feature for the whole batch."""
        index = self.reference.index
        self.rows += sum(_rows(blocks) for blocks in requests)
        with np.errstate(over="ignore", invalid="ignore"):
            for name, column in _columns(requests).items():
                i = index.get(name)
                if i is None:
                    continue
                values = drift.as_values(column)
                self.counts[i] += drift.histogram(values, self.reference.edges[i])
                self.n[i] += values.size
                self.sums[i] += values.sum()
                self.squares[i] += np.dot(values, values)
        self.updated, self.dirty = now, True

    def due(self, config: DriftSettings, now: float) -> bool:
        age = now - self.started
        full = self.rows >= config.window_rows and age >= config.window_min_s
        return full or (age >= config.window_max_s and self.rows >= config.min_rows)

    def compare(self) -> list[drift.Comparison | None]:
        return [drift.compare(ref, win) for ref, win in zip(self.reference.counts, self.counts, strict=True)]

    def summary(self, comparisons: list[drift.Comparison | None] | None) -> list[dict[str, Any]]:
        features = []
        for i, name in enumerate(self.reference.names):
            moments = drift.Moments.of(
                int(self.n[i]), total=float(self.sums[i]), squares=float(self.squares[i])
            )
            found = comparisons[i] if comparisons is not None else None
            features.append(
                {
                    "name": name,
                    "count": moments.count,
                    "mean": moments.mean,
                    "std": moments.std,
                    "counts": self.counts[i].tolist(),
                    "psi": found.psi if found else None,
                    "ks": found.ks if found else None,
                }
            )
        return features


class Tracker:
    """One deployment's reference, its open window and the last closed window's comparison."""

    def __init__(self, deployment_id: uuid.UUID, *, label: str, revision: int) -> None:
        self.deployment_id, self.label, self.revision = deployment_id, label, revision
        self.seen = 0.0  # when its last request was counted
        self.reference: Reference | None = None
        self.window: Window | None = None
        self.last: tuple[tuple[str, drift.Comparison], ...] = ()  # what the gauges show
        self.collected: dict[str, list[drift.Floats]] = {}  # a first window, value by value
        self.collected_rows = 0
        self.taken: Reference | None = None  # a first window taken here, to be written
        self.closed: list[tuple[Window, list[dict[str, Any]]]] = []  # to be written

    def adopt(self, reference: Reference | None, now: float) -> None:
        self.reference, self.last = reference, ()
        self.window = Window(reference, now) if reference is not None else None
        self.collected, self.collected_rows = {}, 0

    def redeployed(self, revision: int, now: float) -> None:
        """A new revision serves: a first-window reference is retaken, a training one stays."""
        self.revision = revision
        kept = self.reference if self.reference is not None and self.reference.source == "training" else None
        self.adopt(kept, now)
        self.taken = None

    def absorb(self, requests: list[list[Block]], *, config: DriftSettings, now: float) -> None:
        start = 0
        while self.reference is None and start < len(requests):
            self._collect(requests[start], config)
            start += 1
            if self.collected_rows >= config.window_rows:
                self._take_reference(config, now)
        if start < len(requests) and self.window is not None:
            self.window.add(requests[start:], now)

    def _collect(self, blocks: list[Block], config: DriftSettings) -> None:
        for names, matrix in blocks:
            for j, name in enumerate(names):
                if name in self.collected or len(self.collected) < config.max_features:
                    self.collected.setdefault(name, []).append(matrix[:, j])
        self.collected_rows += _rows(blocks)

    def _take_reference(self, config: DriftSettings, now: float) -> None:
        columns = {name: np.concatenate(parts) for name, parts in self.collected.items()}
        features = drift.reference_features(columns, bins=config.bins)
        reference = Reference(
            version=uuid.uuid4(),
            source="first_window",
            revision=self.revision,
            rows=self.collected_rows,
            features=features,
            created_at=now,
        )
        self.adopt(reference, now)
        self.taken = reference

    def close_if_due(self, config: DriftSettings, now: float) -> None:
        window = self.window
        if window is None or not window.due(config, now):
            return
        comparisons = window.compare()
        names = window.reference.names
        self.last = tuple((names[i], c) for i, c in enumerate(comparisons) if c is not None)
        window.updated = now
        self.closed.append((window, window.summary(comparisons)))
        self.window = Window(window.reference, now)


# -- the service ---------------------------------------------------------------------------------


class InputDrift(_Loop):
    """Counts V2 inputs per deployment and writes window summaries (see the module docstring)."""

    name = "gateway_drift"

    def __init__(
        self,
        config: DriftSettings,
        *,
        conninfo: str,
        gateway_id: str,
        routes: Callable[[], Mapping[uuid.UUID, Route]],
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(conninfo=conninfo, interval_s=config.flush_s)
        self.config, self.gateway_id, self._routes = config, gateway_id, routes
        self.trackers: dict[uuid.UUID, Tracker] = {}
        self.pending: list[tuple[uuid.UUID, int, str, bytes]] = []
        self.pending_bytes = 0
        self._next_prune = time.monotonic() + 60.0
        self.dropped = Counter(
            "converge_drift_dropped_total",
            "V2 requests left out of the input-drift statistics: backlog (bodies waiting over"
            " max_pending_bytes) or deployments (more than max_deployments tracked)",
            ["reason"],
            registry=registry,
        )
        registry.register(_DriftCollector(lambda: list(self.trackers.values())))

    # -- the hot path: one append -----------------------------------------------------------------

    def record(self, route: Route, body: bytes) -> None:
        """Count this inference request's inputs at the next flush (the replica answered 2xx)."""
        if route.deployment_id not in self.trackers and len(self.trackers) >= self.config.max_deployments:
            self.dropped.labels("deployments").inc()
            return
        if self.pending_bytes + len(body) > self.config.max_pending_bytes:
            self.dropped.labels("backlog").inc()
            return
        self.pending.append((route.deployment_id, route.revision, route.label, body))
        self.pending_bytes += len(body)

    # -- each round -------------------------------------------------------------------------------

    async def _once(self) -> None:
        batch, self.pending, self.pending_bytes = self.pending, [], 0
        now = time.time()
        if batch:
            # A worker thread: decoding a second's bodies must not hold up the event loop in one piece.
            await asyncio.to_thread(self._absorb, batch, now)
        for tracker in list(self.trackers.values()):
            tracker.close_if_due(self.config, now)
        self._forget(now)
        if not self.trackers:
            return
        conn = await self._connection()
        await self._write(conn)
        await self._load(conn, now)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY_S
            await conn.execute(PRUNE_SQL, (self.config.retention_days,))

    def _absorb(self, batch: list[tuple[uuid.UUID, int, str, bytes]], now: float) -> None:
        grouped: dict[uuid.UUID, list[tuple[int, str, bytes]]] = {}
        for deployment_id, revision, label, body in batch:
            grouped.setdefault(deployment_id, []).append((revision, label, body))
        for deployment_id, requests in grouped.items():
            tracker = self.trackers.get(deployment_id)
            if tracker is None:
                if len(self.trackers) >= self.config.max_deployments:
                    self.dropped.labels("deployments").inc(len(requests))
                    continue
                revision, label, _ = requests[0]
                tracker = self.trackers[deployment_id] = Tracker(
                    deployment_id, label=label, revision=revision
                )
            decoded: list[list[Block]] = []
            for revision, label, body in requests:
                if revision != tracker.revision:  # what came before belongs to the old revision
                    tracker.absorb(decoded, config=self.config, now=now)
                    tracker.redeployed(revision, now)
                    decoded = []
                tracker.label, tracker.seen = label, now
                try:
                    blocks = blocks_of(orjson.loads(body), limit=self.config.max_features)
                except orjson.JSONDecodeError:
                    continue
                if blocks:
                    decoded.append(blocks)
            tracker.absorb(decoded, config=self.config, now=now)

    def _forget(self, now: float) -> None:
        """Deleted deployments, and those idle for two window_max_s (their gauges go too: no
        inputs, no drift; the reference is in the database for when requests come back)."""
        live, idle = self._routes(), now - 2 * self.config.window_max_s
        for deployment_id, tracker in list(self.trackers.items()):
            quiet = tracker.seen < idle and tracker.taken is None and not tracker.closed
            if deployment_id not in live or quiet:
                del self.trackers[deployment_id]

    async def _write(self, conn: psycopg.AsyncConnection[Any]) -> None:
        references, windows = [], []
        for tracker in self.trackers.values():
            if (taken := tracker.taken) is not None:
                references.append(self._reference_row(tracker, taken))
            for window, features in tracker.closed:
                windows.append(self._window_row(tracker, window=window, features=features, complete=True))
            if tracker.window is not None and tracker.window.dirty:
                open_ = tracker.window
                windows.append(self._window_row(tracker, window=open_, features=open_.summary(None)))
        if not references and not windows:
            return
        try:
            async with conn.transaction(), conn.cursor() as cur:
                if references:
                    await cur.executemany(INSERT_REFERENCE_SQL, references)
                if windows:
                    await cur.executemany(UPSERT_WINDOW_SQL, windows)
        except psycopg.errors.ForeignKeyViolation:
            # A deployment deleted since the snapshot last said: its counts have nowhere to go.
            self._drop_missing(await _existing(conn, list(self.trackers)))
            raise
        for tracker in self.trackers.values():
            tracker.taken, tracker.closed = None, []
            if tracker.window is not None:
                tracker.window.dirty = False

    def _drop_missing(self, existing: set[uuid.UUID]) -> None:
        for deployment_id in [d for d in self.trackers if d not in existing]:
            del self.trackers[deployment_id]

    def _reference_row(self, tracker: Tracker, reference: Reference) -> tuple[Any, ...]:
        return (
            tracker.deployment_id,
            reference.version,
            reference.revision,
            reference.rows,
            Jsonb(reference.features),
            f"gateway:{self.gateway_id}",
            _stamp(reference.created_at),
        )

    def _window_row(
        self, tracker: Tracker, *, window: Window, features: list[dict[str, Any]], complete: bool = False
    ) -> tuple[Any, ...]:
        return (
            window.id,
            tracker.deployment_id,
            window.reference.version,
            self.gateway_id,
            tracker.revision,
            _stamp(window.started),
            _stamp(window.updated),
            complete,
            window.rows,
            Jsonb(features),
        )

    async def _load(self, conn: psycopg.AsyncConnection[Any], now: float) -> None:
        """Adopt the references in the database: people's, or another replica's first window."""
        ids = list(self.trackers)
        cur = await conn.execute(VERSIONS_SQL, (ids,))
        versions = {deployment_id: version for deployment_id, version in await cur.fetchall()}
        changed = []
        for deployment_id, tracker in self.trackers.items():
            version = versions.get(deployment_id)
            held = tracker.reference.version if tracker.reference is not None else None
            if version is None and held is not None:
                tracker.adopt(None, now)  # put away (DELETE): the next full window becomes it
            elif version is not None and version != held:
                changed.append(deployment_id)
        if not changed:
            return
        cur = await conn.execute(REFERENCES_SQL, (changed,))
        for deployment_id, version, source, revision, rows, features, created_at in await cur.fetchall():
            found = self.trackers.get(deployment_id)
            if found is None or (source == "first_window" and revision != found.revision):
                continue  # an older revision's first window: this revision takes its own
            found.adopt(
                Reference(
                    version=version,
                    source=source,
                    revision=revision,
                    rows=rows,
                    features=features,
                    created_at=created_at.timestamp(),
                ),
                now,
            )


async def _existing(conn: psycopg.AsyncConnection[Any], ids: list[uuid.UUID]) -> set[uuid.UUID]:
    cur = await conn.execute("SELECT id FROM deployments WHERE id = ANY(%s)", (ids,))
    return {row[0] for row in await cur.fetchall()}


class _DriftCollector:
    """The last closed window's PSI and KS per deployment and feature, read at scrape time."""

    def __init__(self, trackers: Callable[[], list[Tracker]]) -> None:
        self._trackers = trackers

    def collect(self) -> Iterator[Any]:
        psi = GaugeMetricFamily(
            "converge_drift_psi",
            "Population stability index of a V2 deployment's input feature: its last window against"
            " the reference (> 0.2: a significant shift)",
            labels=["deployment", "feature"],
        )
        ks = GaugeMetricFamily(
            "converge_drift_ks",
            "Two-sample Kolmogorov-Smirnov statistic (over the reference's bins) of a V2 deployment's"
            " input feature: its last window against the reference",
            labels=["deployment", "feature"],
        )
        for tracker in self._trackers():
            for name, comparison in tracker.last:
                psi.add_metric([tracker.label, name], comparison.psi)
                ks.add_metric([tracker.label, name], comparison.ks)
        yield psi
        yield ks
