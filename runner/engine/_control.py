"""How a run stands and when it stops: its outcome, its live counters, and ``Control``."""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..budgets import BudgetBooks
from ..settings import Stopping


class RunOutcome(enum.Enum):
    """How a run ended."""

    COMPLETE = "complete"  # every request has a final result (some may have failed)
    CAPPED = "capped"  # stopped: the next request could pass the spend cap
    OVERRUN = "overrun"  # stopped: a response cost more than its reserved worst case
    FATAL = "fatal"  # the API refused the run (auth, quota)
    UNREACHABLE = "unreachable"  # the API could not be reached for longer than the limit
    REFUSED = "refused"  # the first requests were all refused the same way (wrong URL or key)
    STORE_ERROR = "store_error"  # the database could not be written
    INTERRUPTED = "interrupted"  # a signal (or the caller) stopped it
    DETACHED = "detached"  # Batch API: stopped watching; the batches go on at OpenAI
    BATCHES_OPEN = "batches_open"  # all that is left is in batches open at OpenAI
    SAMPLED = "sampled"  # ``price --sample``: the sample has its results; the rest waits
    UNPRICED = "unpriced"  # --strict-models: a response the price table cannot price arrived


@dataclass(slots=True)
class RunStats:
    """Live counters of this run, for progress and the final report."""

    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: int = 0
    attempts: int = 0
    retries: int = 0
    rate_limited: int = 0
    capacity_waits: int = 0  # flex 429s "resource_unavailable": capacity short, not a limit
    unknown_charges: int = 0
    usage_missing: int = 0
    overruns: int = 0
    overrun_pico: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    settled_pico: int = 0  # the job's books as last seen (all runners, all runs)
    reserved_pico: int = 0
    cap_pico: int = 0
    in_flight: int = 0
    concurrency: int = 0  # the pool's current size (sync backend)
    paused_for: float = 0.0  # seconds every request is held for (a pause is on)
    limit_rate: float | None = None  # requests/s the rate limits allow this runner, if known
    # Batch API: the batches this runner watches, what they report completed (not recorded
    # yet: results arrive per batch), and when the next poll is due (the clock's monotonic()).
    open_batches: int = 0
    batch_completed: int = 0
    next_poll: float | None = None
    # The job's projected total (total, low, high of the 95% interval), from the results in.
    projected: tuple[int, int, int] | None = None
    errors: dict[str, int] = field(default_factory=dict)
    # Results the price table could not price (a model or service tier the response names),
    # booked at worst case: name -> results.
    unpriced: dict[str, int] = field(default_factory=dict)
    # Results whose outputs are not the JSON their requests asked for: flag value -> results.
    invalid_outputs: dict[str, int] = field(default_factory=dict)
    notices: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    # The budget the run draws on, as the last claim saw it; and set when that claim stopped
    # at the budget rather than at the job's cap (the run's end then names the budget).
    budget: BudgetBooks | None = None
    budget_stop: BudgetBooks | None = None

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


@dataclass(slots=True)
class RunReport:
    outcome: RunOutcome
    stats: RunStats
    message: str | None = None
    signal: int | None = None  # the signal that stopped the run, if one did


class Control:
    """When the run stops, and why.

    ``stop`` asks for an orderly stop (nothing new is sent; requests in flight get the grace
    period); calling it again changes nothing. Only a second signal (``interrupt``) or the end
    of the grace period makes it a hard stop.
    """

    def __init__(self, stopping: Stopping) -> None:
        self.grace = stopping.grace
        self.stopping = False
        self.outcome: RunOutcome | None = None
        self.message: str | None = None
        self.signal: int | None = None
        self.hard = asyncio.Event()
        self.listeners: list[Callable[[], None]] = []

    def stop(self, outcome: RunOutcome, message: str | None = None) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.outcome = outcome
        self.message = message
        for listener in self.listeners:
            listener()
        # In-flight requests get the grace period (after a fatal answer only a moment: more
        # requests would meet the same refusal), then the run ends regardless.
        grace = self.grace if outcome is RunOutcome.INTERRUPTED else min(self.grace, 2.0)
        asyncio.get_running_loop().call_later(grace, self.hard.set)

    def interrupt(self, signum: int, name: str) -> None:
        """A signal: the first stops in order, a second stops at once."""
        if self.stopping and self.signal is not None:
            self.hard.set()
            return
        self.signal = signum
        if self.stopping:  # already stopping for another reason: a signal now means "now"
            self.hard.set()
            return
        self.stop(RunOutcome.INTERRUPTED, f"stopped by {name}")
