"""Loopback ports for replicas: free according to the OS, and never handed out twice by us.

Asking the OS for port 0 gives a port nobody is listening on *now*; between closing that probe
socket and the replica binding it, another process (or another replica still importing its
model) could take it. The in-process reservation closes the second hole; the first is handled
by the supervisor: a replica that fails to bind exits, and its restart gets a different port.
"""

from __future__ import annotations

from collections.abc import Callable

from converge.kit.net import free_port

os_free_port = free_port  # what the OS offers; PortAllocator adds our own reservations


class PortAllocator:
    def __init__(self, *, candidate: Callable[[], int] = os_free_port, attempts: int = 64) -> None:
        self._candidate, self._attempts = candidate, attempts
        self._reserved: set[int] = set()

    @property
    def reserved(self) -> frozenset[int]:
        return frozenset(self._reserved)

    def allocate(self) -> int:
        for _ in range(self._attempts):
            port = self._candidate()
            if port not in self._reserved:
                self._reserved.add(port)
                return port
        raise RuntimeError(f"no free loopback port after {self._attempts} attempts")

    def reserve(self, port: int) -> None:
        """Keep `port` (held by an adopted replica) out of future allocations."""
        self._reserved.add(port)

    def release(self, port: int | None) -> None:
        if port is not None:
            self._reserved.discard(port)
