"""The limiter's arithmetic, without a database: sliding windows, reservations, budgets."""

from __future__ import annotations

from datetime import UTC, datetime

from converge.gateway.limits import (
    Limiter,
    Limits,
    Rejection,
    Reservation,
    retry_after,
    seconds_to_next_month,
)

KEY = "k:1"
T0 = 1_800_000_000.0 - 1_800_000_000.0 % 60  # the start of a minute


def test_sliding_window_weighs_the_previous_minute():
    limiter = Limiter()
    scopes = ((KEY, Limits(rpm=10)),)
    for _ in range(10):
        assert isinstance(limiter.check(scopes, 0, T0 + 30), Reservation)
    assert isinstance(limiter.check(scopes, 0, T0 + 59), Rejection)
    # 15 s into the next minute, 10 * 0.75 = 7.5 still count: two more fit, not three.
    admitted = [isinstance(limiter.check(scopes, 0, T0 + 75), Reservation) for _ in range(3)]
    assert admitted == [True, True, False]


def test_reservations_settle_to_the_real_count():
    limiter = Limiter()
    scopes = ((KEY, Limits(tpm=100)), ("p:1", Limits(monthly_tokens=1000)))
    first = limiter.check(scopes, 80, T0)
    assert isinstance(first, Reservation)
    assert isinstance(limiter.check(scopes, 80, T0 + 1), Rejection)  # 80 + 80 > 100
    limiter.settle(first, 10)
    assert limiter.in_flight[KEY] == 0
    assert isinstance(limiter.check(scopes, 80, T0 + 2), Reservation)  # 10 + 80 <= 100
    assert limiter._count("p:1", "month", first.month) == (0, 90)


def test_budget_rejection_waits_for_next_month():
    limiter = Limiter()
    now = datetime(2026, 11, 30, 23, 59, 0, tzinfo=UTC).timestamp()
    rejected = limiter.check((("p:1", Limits(monthly_tokens=5)),), 6, now)
    assert isinstance(rejected, Rejection) and rejected.code == "insufficient_quota"
    assert rejected.retry_after == 60 == seconds_to_next_month(now)


def test_other_replicas_counts_are_added():
    limiter = Limiter()
    minute = int(T0 // 60)
    limiter.set_others({(KEY, "minute", minute): (9, 0)}, {KEY: 2})
    assert isinstance(limiter.check(((KEY, Limits(rpm=10)),), 0, T0 + 1), Reservation)
    assert isinstance(limiter.check(((KEY, Limits(rpm=10)),), 0, T0 + 2), Rejection)
    assert isinstance(limiter.check(((KEY, Limits(concurrency=3)),), 0, T0 + 3), Rejection)  # 2 + 1 running


def test_retry_after_is_when_the_window_makes_room():
    # Current minute full: wait for it to end and then for its share to fade enough.
    assert retry_after(current=10, previous=0, fraction=0.5, limit=10, need=1) == 36
    # Only the previous minute's share is in the way: 8 + 4 * (1 - f) <= 9 -> f >= 0.75 (15 s).
    assert retry_after(current=8, previous=4, fraction=0.5, limit=10, need=1) == 15


def test_unlimited_scopes_are_not_checked_but_still_counted():
    limiter = Limiter()
    reservation = limiter.check(((KEY, None),), 50, T0)
    assert isinstance(reservation, Reservation)
    rows, flights = limiter.take_dirty()
    assert {(r[0], r[1]) for r in rows} == {(KEY, "minute"), (KEY, "month")}
    assert flights == [(KEY, 1)]
    assert Limits.from_json({}) is None and Limits.from_json({"rpm": 5}) == Limits(rpm=5)
