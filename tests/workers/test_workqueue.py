"""The controller's work queue: each key once, never two workers on one key, delays and backoff."""

from __future__ import annotations

import asyncio

import pytest

from converge.workers.workqueue import WorkQueue


async def test_a_key_added_many_times_is_handed_out_once_in_first_added_order():
    queue: WorkQueue[str] = WorkQueue()
    for key in ("a", "b", "a", "c", "b"):
        queue.add(key)
    assert len(queue) == 3
    assert [await queue.get() for _ in range(3)] == ["a", "b", "c"]


async def test_a_key_added_while_processing_comes_back_only_after_done():
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    assert await queue.get() == "a"
    queue.add("a")  # a change seen mid-reconcile
    assert len(queue) == 0  # not handed to a second worker meanwhile
    queue.add("b")
    assert await queue.get() == "b"
    queue.done("a")
    assert await queue.get() == "a"  # and not lost


async def test_a_delayed_key_waits_behind_ready_ones_and_a_waiting_get_wakes_for_it():
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("later", 0.2)
    queue.add("now")
    assert await queue.get() == "now"
    assert queue.delayed == 1 and len(queue) == 0
    assert await asyncio.wait_for(queue.get(), timeout=10) == "later"
    assert queue.delayed == 0


async def test_the_earlier_of_two_delays_wins():
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("k", 3600)
    queue.add_after("k", 0.01)
    assert await asyncio.wait_for(queue.get(), timeout=10) == "k"
    queue.done("k")
    assert queue.delayed == 0  # the hour-long one was superseded, not kept


async def test_retries_back_off_exponentially_per_key_up_to_the_cap_and_forget_resets():
    queue: WorkQueue[str] = WorkQueue(base_delay_s=0.5, max_delay_s=3.0)
    assert [queue.retry("bad") for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert queue.retry("other") == 0.5  # its own count
    queue.forget("bad")
    assert queue.failures("bad") == 0 and queue.retry("bad") == 0.5


async def test_a_retried_key_is_handed_out_once_its_delay_is_over():
    queue: WorkQueue[str] = WorkQueue(base_delay_s=0.01)
    queue.retry("k")
    assert queue.delayed == 1 and len(queue) == 0
    assert await asyncio.wait_for(queue.get(), timeout=10) == "k"


@pytest.mark.parametrize("delay", [0, -1])
async def test_no_delay_queues_at_once(delay):
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("k", delay)
    assert len(queue) == 1 and queue.delayed == 0
