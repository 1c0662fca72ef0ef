"""Probes of one replica: readiness, load (`/converge/stats`), and who really owns its port."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import psutil

from converge.runtime.base import EngineStats


@dataclass(frozen=True)
class Probe:
    ready: bool  # GET /health/ready answered 200
    in_flight: int | None = None  # None: /converge/stats not asked or not answered
    queue_depth: int | None = None
    engine: EngineStats | None = None


async def probe(client: httpx.AsyncClient, endpoint: str, *, stats: bool) -> Probe:
    try:
        resp = await client.get(f"{endpoint}/health/ready")
    except httpx.HTTPError:
        return Probe(ready=False)
    ready = resp.status_code == 200
    if not stats:
        return Probe(ready=ready)
    try:
        data = (await client.get(f"{endpoint}/converge/stats")).raise_for_status().json()
        return Probe(
            ready=ready,
            in_flight=int(data["in_flight"]),
            queue_depth=int(data.get("queue_depth", 0)),
            engine=EngineStats.of(data),
        )
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return Probe(ready=ready)


def listens_on(pid: int, port: int) -> bool:
    """Whether `pid` (or a process it forked) listens on `port`.

    A ready answer on a replica's port proves nothing if the replica failed to bind and some
    other server holds that port; this is asked once, before a replica first counts as ready.
    """
    try:
        root = psutil.Process(pid)
        for proc in (root, *root.children(recursive=True)):
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                    return True
    except psutil.AccessDenied:
        return True  # the OS will not say (macOS, hardened /proc): trust the probe
    except psutil.NoSuchProcess:
        return False
    return False
