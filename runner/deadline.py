"""``--deadline WHEN``: when a job must be finished, and the plan that is cheapest by then.

The Batch API bills half but promises only 24 h; the synchronous API is as fast as the rate
limits allow, at full price. The plan sends everything through the Batch API first and keeps
computing how long the requests not yet finished would take through the synchronous API at the
limits (with the buckets full: a minute's worth goes at once), planned ``1 + margin`` times
longer plus ``slack`` seconds. The latest switch time is the deadline less that: when the time
left comes down to it, the open batches are cancelled and the rest goes synchronously.

Pure functions of the clock they are given, so tests run them on fake time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from .durations import parse_duration, span
from .errors import UsageError
from .plan import Plan, least_seconds
from .settings import Deadline

DEADLINE_EVENT = "deadline"  # the event that records a job's deadline (detail: SPEC|EPOCH)


def resolve(spec: str, now: float) -> float:
    """The deadline ``spec`` names, in epoch seconds: a duration from ``now``, or an ISO time
    (a time without a zone is local time)."""
    seconds = parse_duration(spec)
    if seconds is not None:
        if seconds <= 0:
            raise UsageError(f"--deadline {spec}: the duration must be above zero")
        return now + seconds
    try:
        when = datetime.fromisoformat(spec.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--deadline {spec!r}: give an ISO time (2026-12-03T08:00, 2026-12-03 08:00+01:00) "
            "or a duration (90s, 45m, 8h, 1h30m)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return when.timestamp()


def is_relative(spec: str) -> bool:
    return parse_duration(spec) is not None


@dataclass(frozen=True, slots=True)
class TailLimits:
    """The rate limits the sync tail runs at (None: not known)."""

    rpm: int | None
    tpm: int | None
    # "given" (--rpm/--tpm), "learned" (the API's headers), "concurrency" (no limit known: the
    # pool's size over the latency seen, as a request rate), or "unknown"
    source: str = "given"

    @property
    def burst(self) -> bool:
        """Whether the limits are buckets that start full (a concurrency bound is not)."""
        return self.source in ("given", "learned")

    def describe(self) -> str:
        parts = [f"{self.rpm:,} RPM" if self.rpm else "", f"{self.tpm:,} TPM" if self.tpm else ""]
        shown = " / ".join(p for p in parts if p) or "none"
        return {
            "given": f"{shown} (given)",
            "learned": f"{shown} (learned from the API's headers)",
            "concurrency": f"{shown} (no limit known: the pool's concurrency over its latency)",
        }.get(self.source, "unknown (learned from the first synchronous answer)")


def sync_seconds(
    requests: int, weight: int, limits: TailLimits, latency: float = 1.0
) -> float | None:
    """Seconds the synchronous API needs for ``requests`` weighing ``weight`` tokens at the
    limits (buckets full at the start: a minute's worth goes at once), plus one request's
    latency; None without a limit."""
    if requests <= 0:
        return 0.0
    least = least_seconds(requests, weight, limits.rpm, limits.tpm, burst=limits.burst)
    return None if least is None else least + latency


def planned_seconds(seconds: float, deadline: Deadline) -> float:
    """What the plan allows the sync tail: its time at the limits, with the margin and slack."""
    return seconds * (1 + deadline.margin) + deadline.slack


@dataclass(frozen=True, slots=True)
class DeadlinePlan:
    """The plan for the requests not yet finished, as ``run`` and ``price`` show it."""

    deadline: float  # epoch seconds
    now: float
    requests: int  # not yet finished
    weight: int  # their tokens as the rate limits count them
    batch_floor_pico: int
    batch_worst_pico: int
    sync_floor_pico: int
    sync_worst_pico: int
    limits: TailLimits
    margin: float
    slack: float
    tail_seconds: float | None  # all of them through the sync API at the limits
    planned: float | None  # ... with the margin and slack
    spec: str = ""

    @property
    def latest_switch(self) -> float | None:
        """Epoch seconds by which the batches are cancelled (the rest then goes sync)."""
        return None if self.planned is None else self.deadline - self.planned

    @property
    def feasible(self) -> bool | None:
        """Whether even all-sync at the limits finishes by the deadline (None: no limit known)."""
        if self.tail_seconds is None:
            return None
        return self.now + self.tail_seconds <= self.deadline

    @property
    def batch_window(self) -> float | None:
        """Seconds the batches have before the switch (0: the switch is due at once)."""
        switch = self.latest_switch
        return None if switch is None else max(0.0, switch - self.now)


def make_plan(
    deadline: Deadline,
    now: float,
    requests: int,
    weight: int,
    limits: TailLimits,
    batch_bounds: tuple[int, int],
    sync_bounds: tuple[int, int],
) -> DeadlinePlan:
    assert deadline.at is not None
    tail = sync_seconds(requests, weight, limits)
    return DeadlinePlan(
        deadline=deadline.at,
        now=now,
        requests=requests,
        weight=weight,
        batch_floor_pico=batch_bounds[0],
        batch_worst_pico=batch_bounds[1],
        sync_floor_pico=sync_bounds[0],
        sync_worst_pico=sync_bounds[1],
        limits=limits,
        margin=deadline.margin,
        slack=deadline.slack,
        tail_seconds=tail,
        planned=None if tail is None else planned_seconds(tail, deadline),
        spec=deadline.spec or "",
    )


def switch_due(
    now: float, deadline: Deadline, left: int, weight: int, limits: TailLimits, latency: float
) -> bool:
    """Whether the batches must be cancelled now: the time left is down to what the ``left``
    requests not yet finished need through the sync API (unknown limits: at once, since no
    plan can promise anything then)."""
    assert deadline.at is not None
    if left <= 0:
        return False
    tail = sync_seconds(left, weight, limits, latency)
    if tail is None:
        return True
    return deadline.at - now <= planned_seconds(tail, deadline)


def clock_text(epoch: float, now: float) -> str:
    """``14:05:09 (in 1h02m)`` in local time, or ``... (3m ago)``."""
    at = datetime.fromtimestamp(epoch, tz=UTC).astimezone()
    shown = at.strftime("%Y-%m-%d %H:%M:%S" if abs(epoch - now) > 86400 else "%H:%M:%S")
    delta = epoch - now
    return f"{shown} ({'in ' + span(delta) if delta >= 0 else span(-delta) + ' ago'})"


def price_plan(
    plan: Plan, deadline: Deadline, rpm: int | None, tpm: int | None, now: float | None = None
) -> DeadlinePlan:
    """``price --deadline``: the plan for a whole job file, at the limits given."""
    now = time.time() if now is None else now
    at = resolve(deadline.spec, now) if deadline.spec is not None else deadline.at
    total = plan.total
    return make_plan(
        replace(deadline, at=at),
        now,
        total.requests,
        total.input_tokens + total.output_limit_tokens,
        TailLimits(rpm, tpm, "given" if rpm or tpm else "unknown"),
        (total.batch_floor_pico, total.batch_worst_pico),
        (total.floor_pico, total.worst_pico),
    )


# The public API's names (``runner.deadline_plan``, ``runner.resolve_deadline``).
deadline_plan = price_plan
resolve_deadline = resolve
