"""The load of server pods, for the controller's autoscaler: in-flight requests and queue depth
from each ready replica's `/converge/stats`, as the local backend reads its processes'.

The controller's pods may reach model servers (the project namespaces' NetworkPolicy admits
them), so this is plain HTTP to the pod IPs, not the Kubernetes API. Readings are kept for
`max_age_s` (a controller pass observes every deployment about once a second) and asked for
all replicas at once with a short timeout; a replica that does not answer (vLLM serves no
`/converge/stats`, a pod going away) keeps zeros, as it does locally.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from time import monotonic

import httpx

from converge.runtime.base import EngineStats, Replica, ReplicaPhase

_Reading = tuple[float, int, int, EngineStats | None]  # (when, in flight, queued, the engine's own)


class PodLoad:
    def __init__(self, *, timeout_s: float = 0.5, max_age_s: float = 1.0) -> None:
        self._timeout_s, self._max_age_s = timeout_s, max_age_s
        self._client: httpx.AsyncClient | None = None
        self._read: dict[str, _Reading] = {}  # endpoint -> its last reading

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def of(self, replicas: Sequence[Replica]) -> list[Replica]:
        """`replicas` with the in-flight and queue-depth readings of the ready ones."""
        now = monotonic()
        stale = {
            r.endpoint
            for r in replicas
            if r.phase == ReplicaPhase.READY
            and r.endpoint
            and now - self._read.get(r.endpoint, (float("-inf"), 0, 0, None))[0] >= self._max_age_s
        }
        if stale:
            await asyncio.gather(*(self._fetch(endpoint, now) for endpoint in stale))
        live = {r.endpoint for r in replicas if r.endpoint}
        self._read = {e: v for e, v in self._read.items() if e in live}  # pods that went are forgotten
        out = []
        for r in replicas:
            reading = self._read.get(r.endpoint or "") if r.phase == ReplicaPhase.READY else None
            out.append(
                r
                if reading is None
                else r.model_copy(
                    update={"in_flight": reading[1], "queue_depth": reading[2], "engine": reading[3]}
                )
            )
        return out

    async def _fetch(self, endpoint: str, now: float) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout_s, trust_env=False)
        try:
            data = (await self._client.get(f"{endpoint}/converge/stats")).raise_for_status().json()
            in_flight, queued = int(data["in_flight"]), int(data.get("queue_depth", 0))
            self._read[endpoint] = (now, in_flight, queued, EngineStats.of(data))
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            self._read[endpoint] = (now, 0, 0, None)  # asked again after max_age_s, not on every pass
