"""Budgets: one hard spending limit shared by every job that draws on it, by period.

A budget is a named amount per day, week, month or in total, in a time zone. Its spend is kept
per period (the period a request was *reserved* in owns its cost, its settlement, an unknown
outcome and an overrun), and the store checks a claim against it under a lock on the budget's
row, in the same transaction as the job's cap (see ``store.claims``).

Pure functions only (no database): periods, validation, and the words a person reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import UsageError
from .money import MAX_PICO, format_usd, usd_to_pico
from .settings import BUDGET_PERIODS as PERIODS

# ``run --budget none``: this run draws on no budget, not even the database's default.
NO_BUDGET = "none"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# What the text says of a period: "$5.00 of $10.00 this month".
THIS_PERIOD = {"day": "today", "week": "this week", "month": "this month", "total": "in total"}


@dataclass(frozen=True, slots=True)
class Budget:
    """One budget as stored."""

    id: int
    name: str
    amount_pico: int
    per: str  # one of PERIODS
    tz: str
    is_default: bool = False


@dataclass(frozen=True, slots=True)
class Period:
    """One period of a budget: ``start`` (epoch seconds, 0 for ``total``) until ``end``
    (None: never resets)."""

    start: int
    end: int | None


@dataclass(frozen=True, slots=True)
class BudgetBooks:
    """A budget's books for one period, as a claim or ``budget show`` reads them."""

    budget: Budget
    period: Period
    settled_pico: int = 0  # results and unknown outcomes booked in the period
    reserved_pico: int = 0  # worst cases reserved in the period, not settled yet
    unknown_pico: int = 0  # the part of ``settled_pico`` charged for unknown outcomes

    @property
    def left_pico(self) -> int:
        return max(0, self.budget.amount_pico - self.settled_pico - self.reserved_pico)

    @property
    def billed_pico(self) -> int:
        """What the API billed that is known: spent minus unknown outcomes."""
        return self.settled_pico - self.unknown_pico


@dataclass(frozen=True, slots=True)
class JobDraw:
    """One job's share of a budget's period."""

    job_id: int
    path: str
    settled_pico: int
    reserved_pico: int
    unknown_pico: int


def period_of(per: str, tz: str, now: float) -> Period:
    """The period of a ``per`` budget in zone ``tz`` that holds the instant ``now``."""
    if per == "total":
        return Period(0, None)
    zone = ZoneInfo(tz)
    today = datetime.fromtimestamp(now, zone).date()
    if per == "day":
        first, after = today, today + timedelta(days=1)
    elif per == "week":  # ISO weeks: from Monday
        first = today - timedelta(days=today.weekday())
        after = first + timedelta(days=7)
    else:
        first = today.replace(day=1)
        after = (first + timedelta(days=32)).replace(day=1)
    return Period(_midnight(first, zone), _midnight(after, zone))


def _midnight(day: date, zone: ZoneInfo) -> int:
    return int(datetime.combine(day, time(0), tzinfo=zone).timestamp())


def check_name(name: str) -> str:
    if name.lower() == NO_BUDGET:
        raise UsageError(f"budget: {NO_BUDGET!r} is not a budget name (`--budget none` means none)")
    if not _NAME.match(name):
        raise UsageError(
            f"budget: {name!r} is not a budget name: up to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_amount(text: str) -> int:
    """A budget's amount in dollars, exact; not negative, not absurd."""
    try:
        pico = usd_to_pico(text)
    except (TypeError, ValueError):
        raise UsageError(f"budget: {text!r} is not a dollar amount such as 100 or 0.50") from None
    if pico < 0:
        raise UsageError(f"budget: the amount must not be negative ({text})")
    if pico > MAX_PICO:
        raise UsageError(
            f"budget: {text} is more than the most batchrun keeps ({format_usd(MAX_PICO)})"
        )
    return pico


def check_per(per: str) -> str:
    if per not in PERIODS:
        raise UsageError(f"budget: no period {per!r}; expected one of {', '.join(PERIODS)}")
    return per


def check_tz(tz: str) -> str:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(
            f"budget: no time zone {tz!r}; give an IANA name such as UTC or Europe/Paris"
        ) from None
    return tz


def when(epoch: int | None, tz: str) -> str:
    """A period boundary as a person reads it, in the budget's zone."""
    if epoch is None:
        return "never"
    local = datetime.fromtimestamp(epoch, ZoneInfo(tz))
    return f"{local:%Y-%m-%d %H:%M} {local.tzname() or tz}"


def iso(epoch: int | None, tz: str) -> str | None:
    """A period boundary for JSON: ISO 8601 with its offset."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, ZoneInfo(tz)).isoformat()


def describe(books: BudgetBooks) -> str:
    """ "budget team: $100.00 of $100.00 this month; resets 2027-01-01 00:00 UTC"."""
    b = books.budget
    spent = books.settled_pico + books.reserved_pico
    this = THIS_PERIOD[b.per]
    text = f"budget {b.name}: {format_usd(spent)} of {format_usd(b.amount_pico)} {this}"
    if books.reserved_pico:
        text += f" ({format_usd(books.reserved_pico)} of it reserved by requests in flight)"
    if books.period.end is not None:
        text += f"; resets {when(books.period.end, b.tz)}"
    return text
