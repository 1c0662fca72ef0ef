"""Background services: the long-running parts of a process (workers, listeners, flush loops).

A service is started once at start-up, stopped at shutdown (in the reverse order), and reported
by `/readiness` under its `name`. The base runs one task, `_run`, and is healthy while that task
runs. A service with more tasks starts them with `_spawn`; one whose health means more than
running (connected, loaded) overrides `healthy`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks and wait until each has ended, however it ends (cancelled or failed)."""
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


class Service:
    name = "service"

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def healthy(self) -> bool:
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    async def start(self) -> None:
        self._spawn(self._run())

    async def stop(self) -> None:
        await cancel(*self._tasks)

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=self.name)
        self._tasks.append(task)
        return task

    async def _run(self) -> None:
        raise NotImplementedError
