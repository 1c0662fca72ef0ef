"""Rate limits, concurrency limits and monthly token budgets, shared by every gateway replica.

Algorithm
---------
Each scope (an API key, a project) has counters per window: requests and tokens per minute
(window = minute number), tokens per calendar month (UTC), and requests in flight.

*Per minute* uses the sliding-window approximation: the estimate at time t, a fraction f into
the current minute, is ``current + previous * (1 - f)``. A request is admitted when the
estimate plus this request fits the limit. Tokens are *reserved* at admission (the prompt
estimate plus the request's ``max_completion_tokens``, else ``max_tokens``, else the configured
default, times ``n``) and *settled* to the real count when the answer is in, on the same
counters, so every endpoint shares one budget.

*Across replicas* each gateway keeps its own counts exactly and in memory, writes them as
absolute values to ``gateway_counters`` (one row per gateway, scope, window: no lost updates,
a retried write is harmless) every ``limits_sync_s``, and reads back the sum of the other
replicas' rows. Admission compares ``own (exact, live) + others (as of the last sync)`` to the
limit. A restarted gateway gets a new id; its predecessor's rows still count for their window.

Bounded error
-------------
A replica does not see what the others admitted since their last sync and its last read: at
most ``sync + read latency`` (about ``limits_sync_s``, 0.5 s by default) of traffic. With N
replicas each admitting r requests per second, a limit can be exceeded by at most
``(N - 1) * r * limits_sync_s`` requests (tokens: the same in tokens) in a window, and never with
one replica. The sliding window also assumes the previous minute's requests were spread evenly,
as every sliding-window-counter limiter does (error bounded by the previous minute's count
times how uneven it was). Concurrency counts of other replicas older than 10 s are ignored (a
replica that died leaves nothing held). Monthly budgets count settled tokens plus reservations
in flight, so a request never starts once the budget is spent.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

MINUTE = 60.0
INFLIGHT_STALE_S = 10.0


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    monthly_tokens: int | None = None
    # An enforced money budget that measured cost has reached: (the month it was reached in, why).
    # Set from project_budgets by the snapshot; it stops counting when that month ends.
    spent_budget: tuple[int, str] | None = None

    @staticmethod
    def from_json(data: dict[str, Any] | None) -> Limits | None:
        if not data:
            return None
        limits = Limits(
            rpm=data.get("rpm"),
            tpm=data.get("tpm"),
            concurrency=data.get("concurrency"),
            monthly_tokens=data.get("monthly_tokens"),
        )
        return limits if limits != Limits() else None


@dataclass(frozen=True, slots=True)
class Rejection:
    code: str  # rate_limit_exceeded | insufficient_quota
    message: str
    retry_after: int  # seconds
    headers: tuple[tuple[bytes, bytes], ...]


class Reservation:
    __slots__ = ("scopes", "tokens", "minute", "month")

    def __init__(self, scopes: tuple[str, ...], tokens: int, minute: int, month: int) -> None:
        self.scopes, self.tokens, self.minute, self.month = scopes, tokens, minute, month


def month_of(now: float) -> int:
    d = datetime.fromtimestamp(now, UTC)
    return d.year * 12 + d.month - 1


def seconds_to_next_month(now: float) -> int:
    d = datetime.fromtimestamp(now, UTC)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return max(1, math.ceil(datetime(year, month, 1, tzinfo=UTC).timestamp() - now))


def retry_after(*, current: float, previous: float, fraction: float, limit: int, need: float) -> int:
    """Seconds until the sliding-window estimate leaves room for `need`, if nothing else comes."""
    room = limit - need
    if current > room:  # even once the previous minute has faded the current one is too full:
        wait = (1 - fraction) * MINUTE + (MINUTE * (1 - room / current) if current else 0.0)
    elif previous > 0:  # the previous minute's share must fade enough
        wait = MINUTE * (current + previous * (1 - fraction) - room) / previous
    else:
        wait = 1.0
    return max(1, math.ceil(wait))


class Limiter:
    """Admission against the limits of every scope a request belongs to (key, project)."""

    def __init__(self, *, gateway_id: str | None = None) -> None:
        self.gateway_id = gateway_id or f"gw-{uuid.uuid4().hex[:16]}"
        # own exact counts: (scope, kind, window) -> [requests, tokens]; kind: minute | month
        self.own: dict[tuple[str, str, int], list[int]] = {}
        self.others: dict[tuple[str, str, int], tuple[int, int]] = {}
        self.in_flight: dict[str, int] = {}
        self.others_in_flight: dict[str, int] = {}
        self.dirty: set[tuple[str, str, int]] = set()
        self.dirty_in_flight: set[str] = set()

    def _count(self, scope: str, kind: str, window: int) -> tuple[int, int]:
        own = self.own.get((scope, kind, window))
        other = self.others.get((scope, kind, window))
        r = (own[0] if own else 0) + (other[0] if other else 0)
        t = (own[1] if own else 0) + (other[1] if other else 0)
        return r, t

    def check(
        self, scopes: tuple[tuple[str, Limits | None], ...], tokens: int, now: float | None = None
    ) -> Rejection | Reservation:
        now = time.time() if now is None else now
        minute = int(now // MINUTE)
        fraction = (now % MINUTE) / MINUTE
        month = month_of(now)
        for scope, limits in scopes:
            if limits is None:
                continue
            if limits.rpm is not None or limits.tpm is not None:
                cur_r, cur_t = self._count(scope, "minute", minute)
                prev_r, prev_t = self._count(scope, "minute", minute - 1)
                if limits.rpm is not None and cur_r + prev_r * (1 - fraction) + 1 > limits.rpm:
                    wait = retry_after(
                        current=cur_r, previous=prev_r, fraction=fraction, limit=limits.rpm, need=1
                    )
                    return self._reject(
                        scope, f"{limits.rpm} requests per minute", wait, "requests", limits.rpm, 0
                    )
                if limits.tpm is not None and cur_t + prev_t * (1 - fraction) + tokens > limits.tpm:
                    if tokens > limits.tpm:
                        return Rejection(
                            code="rate_limit_exceeded",
                            message=(
                                f"This request reserves {tokens} tokens, more than the {_who(scope)}'s limit"
                                f" of {limits.tpm} tokens per minute; lower max_tokens (or max_completion_tokens)"
                            ),
                            retry_after=60,
                            headers=(),
                        )
                    wait = retry_after(
                        current=cur_t, previous=prev_t, fraction=fraction, limit=limits.tpm, need=tokens
                    )
                    remaining = max(0, int(limits.tpm - cur_t - prev_t * (1 - fraction)))
                    return self._reject(
                        scope, f"{limits.tpm} tokens per minute", wait, "tokens", limits.tpm, remaining
                    )
            if limits.concurrency is not None:
                running = self.in_flight.get(scope, 0) + self.others_in_flight.get(scope, 0)
                if running + 1 > limits.concurrency:
                    return self._reject(scope, f"{limits.concurrency} concurrent requests", 1, "", 0, 0)
            if limits.spent_budget is not None and limits.spent_budget[0] == month:
                return Rejection(
                    code="insufficient_quota",
                    message=limits.spent_budget[1],
                    retry_after=seconds_to_next_month(now),
                    headers=(),
                )
            if limits.monthly_tokens is not None:
                used = self._count(scope, "month", month)[1]
                if used + tokens > limits.monthly_tokens:
                    left = max(0, limits.monthly_tokens - used)
                    return Rejection(
                        code="insufficient_quota",
                        message=(
                            f"The {_who(scope)}'s monthly token budget is spent ({used} of"
                            f" {limits.monthly_tokens} used, {left} left, this request reserves {tokens});"
                            " it renews on the 1st (UTC) or when an owner raises it"
                        ),
                        retry_after=seconds_to_next_month(now),
                        headers=(),
                    )
        names = tuple(scope for scope, _ in scopes)
        for scope in names:
            self._add(scope, "minute", minute, 1, tokens)
            self._add(scope, "month", month, 0, tokens)
            self.in_flight[scope] = self.in_flight.get(scope, 0) + 1
            self.dirty_in_flight.add(scope)
        return Reservation(names, tokens, minute, month)

    def settle(self, reservation: Reservation, tokens: int) -> None:
        """Replace the reservation by what the request really used, and end it."""
        delta = tokens - reservation.tokens
        for scope in reservation.scopes:
            if delta:
                self._add(scope, "minute", reservation.minute, 0, delta)
                self._add(scope, "month", reservation.month, 0, delta)
            self.in_flight[scope] -= 1
            self.dirty_in_flight.add(scope)

    def headers(
        self, scope: str, limits: Limits | None, now: float | None = None
    ) -> list[tuple[bytes, bytes]]:
        """OpenAI's x-ratelimit-* headers for a scope with per-minute limits."""
        if limits is None or (limits.rpm is None and limits.tpm is None):
            return []
        now = time.time() if now is None else now
        minute = int(now // MINUTE)
        fraction = (now % MINUTE) / MINUTE
        cur_r, cur_t = self._count(scope, "minute", minute)
        prev_r, prev_t = self._count(scope, "minute", minute - 1)
        reset = max(1, math.ceil((1 - fraction) * MINUTE))
        out: list[tuple[bytes, bytes]] = []
        for unit, limit, current, previous in (
            ("requests", limits.rpm, cur_r, prev_r),
            ("tokens", limits.tpm, cur_t, prev_t),
        ):
            if limit is not None:
                left = max(0, int(limit - current - previous * (1 - fraction)))
                out += rate_headers(unit, limit, left, reset)
        return out

    def _add(self, scope: str, kind: str, window: int, requests: int, tokens: int) -> None:
        key = (scope, kind, window)
        counts = self.own.get(key)
        if counts is None:
            self.own[key] = [requests, tokens]
        else:
            counts[0] += requests
            counts[1] += tokens
        self.dirty.add(key)

    def _reject(self, scope: str, what: str, wait: int, unit: str, limit: int, remaining: int) -> Rejection:
        headers = rate_headers(unit, limit, remaining, wait) if unit else ()
        return Rejection(
            code="rate_limit_exceeded",
            message=f"Rate limit reached for the {_who(scope)}: {what}. Retry after {wait} s.",
            retry_after=wait,
            headers=headers,
        )

    # -- sharing with other replicas (see CounterSync in gateway/metering.py) -------------

    def take_dirty(self) -> tuple[list[tuple[str, str, int, int, int]], list[tuple[str, int]]]:
        rows = [
            (s, k, w, counts[0], counts[1])
            for (s, k, w) in self.dirty
            if (counts := self.own.get((s, k, w))) is not None
        ]
        flights = [(s, self.in_flight.get(s, 0)) for s in self.dirty_in_flight]
        self.dirty, self.dirty_in_flight = set(), set()
        return rows, flights

    def forget_before(self, minute: int) -> None:
        """Drop own minute windows that no longer count (older than the previous minute)."""
        for key in [k for k in self.own if k[1] == "minute" and k[2] < minute - 1]:
            del self.own[key]

    def set_others(
        self, counts: dict[tuple[str, str, int], tuple[int, int]], in_flight: dict[str, int]
    ) -> None:
        self.others, self.others_in_flight = counts, in_flight


def rate_headers(unit: str, limit: int, remaining: int, reset_s: int) -> tuple[tuple[bytes, bytes], ...]:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-<unit> headers."""
    return (
        (f"x-ratelimit-limit-{unit}".encode(), str(limit).encode()),
        (f"x-ratelimit-remaining-{unit}".encode(), str(remaining).encode()),
        (f"x-ratelimit-reset-{unit}".encode(), f"{reset_s}s".encode()),
    )


def _who(scope: str) -> str:
    return "API key" if scope.startswith("k:") else "project"
