"""The background-service base: health follows its tasks, and stop ends them however they end."""

import asyncio

import pytest

from converge.kit.service import Service, cancel


class Ticker(Service):
    name = "ticker"

    def __init__(self, *, fail_after: int | None = None) -> None:
        super().__init__()
        self.ticks = 0
        self.fail_after = fail_after
        self.cleaned_up = False

    async def _run(self) -> None:
        try:
            while True:
                await asyncio.sleep(0.001)
                self.ticks += 1
                if self.fail_after is not None and self.ticks >= self.fail_after:
                    raise RuntimeError("boom")
        finally:
            self.cleaned_up = True


async def test_healthy_only_while_its_task_runs_and_stop_ends_it() -> None:
    ticker = Ticker()
    assert not ticker.healthy  # not started
    await ticker.start()
    while ticker.ticks < 3:
        await asyncio.sleep(0.001)
    assert ticker.healthy
    await ticker.stop()
    assert ticker.cleaned_up
    assert not ticker.healthy


async def test_a_crashed_task_is_unhealthy_and_stop_does_not_raise_its_error() -> None:
    ticker = Ticker(fail_after=2)
    await ticker.start()
    while not ticker._tasks[0].done():
        await asyncio.sleep(0.001)
    assert not ticker.healthy
    await ticker.stop()  # the RuntimeError stays in the task; shutdown goes on


async def test_every_spawned_task_counts_for_health() -> None:
    class Two(Service):
        async def start(self) -> None:
            self._spawn(asyncio.sleep(3600))
            self._spawn(asyncio.sleep(0))

    two = Two()
    await two.start()
    await asyncio.sleep(0.01)  # the second has finished: the service is no longer whole
    assert not two.healthy
    await two.stop()
    assert all(task.done() for task in two._tasks)


async def test_cancel_waits_for_each_task_and_skips_none() -> None:
    finished: list[str] = []

    async def slow_cleanup() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.01)  # cleanup that itself awaits
            finished.append("slow")

    async def failing() -> None:
        raise ValueError("already failed")

    tasks = [asyncio.create_task(slow_cleanup()), asyncio.create_task(failing())]
    await asyncio.sleep(0)
    await cancel(*tasks, None)
    assert finished == ["slow"]
    assert tasks[0].cancelled()
    with pytest.raises(ValueError):
        tasks[1].result()


async def test_cancel_cancels_again_a_task_that_swallowed_its_cancel() -> None:
    rounds: list[int] = []

    async def stubborn() -> None:
        # What Python 3.11's wait_for does when its future completes as the cancel lands: the
        # CancelledError is lost and the loop goes on.
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                rounds.append(len(rounds))
                if len(rounds) == 1:
                    continue  # swallowed once
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel(task), 10)  # the guard only: it ends after ~1 s, not 10
    assert task.cancelled()
    assert rounds == [0, 1]
