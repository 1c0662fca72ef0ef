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

import structlog

log = structlog.get_logger(__name__)
T = TypeVar("T")


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks and wait until each has ended, however it ends (cancelled or failed).

    A task that lost its cancel (a library that caught CancelledError, Python 3.11's wait_for
    returning normally when its future completed in the same moment) is cancelled again each
    second, so a shutdown cannot hang on one stubborn loop."""
    pending = {task for task in tasks if task is not None and not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
        if pending:
            log.warning("tasks_ignored_cancel", tasks=sorted(t.get_name() for t in pending))
    for ended in tasks:  # retrieve outcomes, so none is reported as never retrieved
        if ended is not None and not ended.cancelled():
            ended.exception()


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
