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
from .pricing import PriceTable
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
class FlexLane:
    """The flex lane of the plan: the requests of the models the price table marks
    flex-capable, sent with ``service_tier: "flex"`` from the switch until the time left is down
    to the standard tail (then what is left of them goes at the standard tier)."""

    models: tuple[str, ...]
    requests: int
    weight: int  # their tokens as the rate limits count them
    floor_pico: int  # at flex prices (the table's flex_*, else the Batch API's)
    worst_pico: int
    tail_seconds: float | None  # through the sync API at the limits, at the flex latency
    planned: float | None  # ... with the margin: the flex window before the standard tail


def flex_lane(
    models: tuple[str, ...],
    requests: int,
    weight: int,
    bounds: tuple[int, int],
    limits: TailLimits,
    deadline: Deadline,
) -> FlexLane | None:
    """The flex lane for ``requests`` of flex-capable ``models`` (None: no such request)."""
    if requests <= 0 or not models:
        return None
    tail = sync_seconds(requests, weight, limits, deadline.flex_latency)
    return FlexLane(
        models=models,
        requests=requests,
        weight=weight,
        floor_pico=bounds[0],
        worst_pico=bounds[1],
        tail_seconds=tail,
        planned=None if tail is None else tail * (1 + deadline.margin),
    )


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
    cancel: float = 0.0  # seconds cancelling the open batches is planned to take
    flex: FlexLane | None = None  # the flex lane, when the job has flex-capable models

    @property
    def latest_switch(self) -> float | None:
        """Epoch seconds by which the batches are cancelled (the rest then goes sync, the
        flex lane's requests at flex first): the standard tail, the cancel time and the
        flex window before the deadline."""
        if self.planned is None:
            return None
        flex = self.flex.planned if self.flex is not None and self.flex.planned else 0.0
        return self.deadline - self.planned - self.cancel - flex

    @property
    def flex_fallback(self) -> float | None:
        """Epoch seconds by which the flex lane falls back to the standard tier (at the
        latest: the time left is then down to the standard tail)."""
        if self.flex is None or self.planned is None:
            return None
        return self.deadline - self.planned

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
    *,
    cancel: float = 0.0,
    flex: FlexLane | None = None,
) -> DeadlinePlan:
    """The plan; ``cancel``: seconds cancelling open batches may take (0: none will be open);
    ``flex``: the flex lane (see ``flex_lane``)."""
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
        cancel=cancel,
        flex=flex,
    )


def switch_due(
    now: float,
    deadline: Deadline,
    left: int,
    weight: int,
    limits: TailLimits,
    latency: float,
    *,
    cancel: float = 0.0,
    flex_left: int = 0,
    flex_weight: int = 0,
) -> bool:
    """Whether the batches must be cancelled now: the time left is down to what the ``left``
    requests not yet finished need through the sync API (unknown limits: at once, since no
    plan can promise anything then), plus ``cancel`` seconds for cancelling the open batches,
    plus the flex window of the ``flex_left`` of them that go flex first (their time at the
    limits at the flex latency, with the margin).

    The same test, without the flex window and with what is left of the cancel time, says
    when the flex lane must fall back to the standard tier (``flex_fallback_due``)."""
    assert deadline.at is not None
    if left <= 0:
        return False
    tail = sync_seconds(left, weight, limits, latency)
    if tail is None:
        return True
    planned = planned_seconds(tail, deadline) + max(0.0, cancel)
    if flex_left > 0:
        flex = sync_seconds(flex_left, flex_weight, limits, deadline.flex_latency)
        planned += (flex or 0.0) * (1 + deadline.margin)
    return deadline.at - now <= planned


def flex_fallback_due(
    now: float,
    deadline: Deadline,
    left: int,
    weight: int,
    limits: TailLimits,
    latency: float,
    cancel_left: float = 0.0,
) -> bool:
    """Whether the flex lane must go to the standard tier now: the time left is down to what
    the ``left`` requests not yet finished need at the standard tier with the margin (plus
    what may be left of cancelling batches that still hold some of them)."""
    return switch_due(now, deadline, left, weight, limits, latency, cancel=cancel_left)


def clock_text(epoch: float, now: float) -> str:
    """``14:05:09 (in 1h02m)`` in local time, or ``... (3m ago)``."""
    at = datetime.fromtimestamp(epoch, tz=UTC).astimezone()
    shown = at.strftime("%Y-%m-%d %H:%M:%S" if abs(epoch - now) > 86400 else "%H:%M:%S")
    delta = epoch - now
    return f"{shown} ({'in ' + span(delta) if delta >= 0 else span(-delta) + ' ago'})"


def price_plan(
    plan: Plan,
    deadline: Deadline,
    rpm: int | None,
    tpm: int | None,
    now: float | None = None,
    table: PriceTable | None = None,
) -> DeadlinePlan:
    """``price --deadline``: the plan for a whole job file, at the limits given (with
    ``table``, the flex lane of the models it marks flex-capable)."""
    now = time.time() if now is None else now
    at = resolve(deadline.spec, now) if deadline.spec is not None else deadline.at
    deadline = replace(deadline, at=at)
    total = plan.total
    limits = TailLimits(rpm, tpm, "given" if rpm or tpm else "unknown")
    flex = None
    if table is not None:
        flex = plan_flex_lane(
            {m: (t.requests, t.input_tokens, t.output_limit_tokens)
             for m, t in plan.standard_by_model.items()},
            table, limits, deadline,
        )  # fmt: skip
    return make_plan(
        deadline,
        now,
        total.requests,
        total.input_tokens + total.output_limit_tokens,
        limits,
        (total.batch_floor_pico, total.batch_worst_pico),
        (total.floor_pico, total.worst_pico),
        cancel=deadline.cancel,
        flex=flex,
    )


def plan_flex_lane(
    open_by_model: dict[str, tuple[int, int, int]],
    table: PriceTable,
    limits: TailLimits,
    deadline: Deadline,
) -> FlexLane | None:
    """The flex lane of requests not yet finished, by model (requests, input tokens, output
    limit tokens; requests asking for a service tier of their own left out): those of the
    models ``table`` marks flex-capable, priced at flex. An unknown model is an error."""
    models: list[str] = []
    requests = weight = floor = worst = 0
    for model, (n, tokens_in, limit) in sorted(open_by_model.items()):
        price = table.resolve(model)
        if n <= 0 or not price.flex_capable:
            continue
        models.append(model)
        low, high = price.bounds(tokens_in, limit, requests=n, tier="flex")
        requests, weight = requests + n, weight + tokens_in + limit
        floor, worst = floor + low, worst + high
    return flex_lane(tuple(models), requests, weight, (floor, worst), limits, deadline)


# The public API's names (``runner.deadline_plan``, ``runner.resolve_deadline``).
deadline_plan = price_plan
resolve_deadline = resolve
