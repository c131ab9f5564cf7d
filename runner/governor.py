"""The governor: how fast requests may leave, by requests/min and tokens/min.

Two ``aiolimiter`` leaky buckets, one counting requests and one counting tokens, where a request
weighs what the API's token limiter counts: prompt tokens plus n x the output limit. Like the
API's own buckets they start full, so a minute's worth may go at once.

Limits come from the user (``--rpm``/``--tpm``) or are learned from ``x-ratelimit-*`` headers;
headers that are missing or nonsense (``-1``, ``0``, ``inf``) are ignored. Several runners of
one job share an organization's limits: each governs at its ``share`` of them.

The gate in front of the buckets holds every request:
- at the start, until one probe request has been answered (its headers name the limits, so
  the first burst cannot overshoot a limit nobody told us about);
- during a pause (after a 429 that exhausted a limit, or while the API is unreachable), then
  lets one probe through again before the rest, and empties the buckets, so requests resume at
  the limit's rate instead of all at once.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Mapping

from aiolimiter import AsyncLimiter

from . import durations
from .clock import SYSTEM, Clock

PROBE_WAIT = 5.0  # longest the other requests wait for the probe's answer
_ELECTED = -1  # the probe's place in the gate, before it has a ticket


def parse_duration(text: str | None) -> float | None:
    """A reset header (a Go duration such as ``6m0s``, or the plain seconds some compatible
    servers send) in seconds, or None."""
    if not text:
        return None
    seconds = durations.parse_duration(text)
    if seconds is not None:
        return seconds
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _number(text: str | None, minimum: int) -> int | None:
    """A header's integer value if it is a finite number >= ``minimum``, else None."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or value < minimum or value > 1e12:
        return None
    return int(value)


# -- aiolimiter's private state -------------------------------------------------------------------
# aiolimiter has no public way to lower a bucket's free capacity without waiting, nor to change
# its rate in place, so the four functions below reach into an AsyncLimiter. They are the only
# code that touches its private attributes, and aiolimiter is pinned to the 1.3 series for them
# (pyproject.toml); tests/test_aiolimiter_contract.py checks every assumption they make:
#   _level         the capacity in use (a float, 0 to max_rate; more holds acquire() back for
#                  longer). It leaks at _rate_per_sec since _last_check, and has_capacity()
#                  applies that leak first (so _limiter_level is current, and the level set
#                  just after it counts from now).
#   _rate_per_sec  the leak rate, max_rate / time_period, which the constructor caches.
#   _waiters       a heap of (amount, order, future), one per acquire() that waits.
#   _wake_next()   wakes the first waiter if it now fits, else arms a timer for when it will.
LIMITER_PRIVATE_ATTRS = ("_level", "_rate_per_sec", "_waiters", "_wake_next")


def _limiter_level(lim: AsyncLimiter) -> float:
    """The capacity ``lim`` has in use now (leaked up to now first)."""
    lim.has_capacity(0)
    return lim._level


def _set_limiter_level(lim: AsyncLimiter, level: float) -> None:
    """Make ``level`` of ``lim``'s capacity in use; call it right after :func:`_limiter_level`,
    so what leaks from here on counts from now."""
    lim._level = level


def _rescale_limiter_level(lim: AsyncLimiter, new_limit: int, old_limit: int) -> None:
    """Scale the capacity ``lim`` has in use from ``old_limit`` to ``new_limit``; an empty
    bucket is left alone (which needs no running event loop)."""
    if lim._level:
        lim._level = _limiter_level(lim) * new_limit / old_limit


def _set_limiter_rate(lim: AsyncLimiter, max_rate: int) -> None:
    """Change ``lim``'s capacity and rate in place; requests already waiting wait at the new
    rate (and for no more than the new capacity, which is all aiolimiter can grant)."""
    lim.max_rate = max_rate
    lim._rate_per_sec = max_rate / lim.time_period
    if lim._waiters:
        # acquire() re-checks the amount it was called with, which can never fit a smaller
        # capacity: such waiters are woken with _Resized, to ask again for what fits now.
        kept = []
        for a, n, f in lim._waiters:
            if a <= max_rate:
                kept.append((a, n, f))
            elif not f.done():
                f.set_exception(_Resized())
        lim._waiters = kept
        heapq.heapify(lim._waiters)
        lim._wake_next()


class _Resized(Exception):
    """A waiter asked for more than a bucket holds after it shrank (see _set_limiter_rate)."""


class _Bucket:
    """One limit (requests or tokens per minute) and where it came from."""

    __slots__ = ("learned", "limit", "limiter", "org_limit")

    def __init__(self, org_limit: int, learned: bool, share: float) -> None:
        self.org_limit = org_limit
        self.learned = learned
        self.limit = max(1, int(org_limit * share))
        self.limiter = AsyncLimiter(self.limit, 60)

    async def acquire(self, amount: float) -> None:
        # aiolimiter refuses an amount larger than its capacity; such a request can only be
        # sent on an empty bucket, which is what acquiring the full capacity waits for.
        while True:
            try:
                await self.limiter.acquire(min(amount, self.limit))
                return
            except _Resized:
                continue  # the limit shrank while this waited: ask for what fits now

    def _level(self) -> float:
        return _limiter_level(self.limiter)

    def free(self) -> float:
        """The capacity free now (0 to the limit; read-only)."""
        return min(float(self.limit), max(0.0, self.limit - self._level()))

    def align(self, remaining: int) -> None:
        """Drain our bucket to match a server that says it has ``remaining`` capacity left."""
        if remaining < self.limit - self._level():
            _set_limiter_level(self.limiter, float(self.limit - max(0, remaining)))

    def empty(self, until_seconds: float = 0.0) -> None:
        """Use up all capacity until ``until_seconds`` from now: after a pause, requests leave
        at the limit's rate (what leaks during the pause is not a burst waiting at its end)."""
        level = self.limit + until_seconds * self.limit / 60.0
        if level > self._level():
            _set_limiter_level(self.limiter, level)

    def set_free(self, free: int) -> None:
        """Make ``free`` of the capacity available now (within 0 and the limit)."""
        self._level()  # leak first
        _set_limiter_level(self.limiter, float(self.limit - min(max(0, free), self.limit)))

    def rescale(self, share: float) -> None:
        """Govern at ``share`` of the organization's limit from now on, in place: the part of
        the bucket in use stays in use (no burst when the share grows), and requests already
        waiting wait at the new rate."""
        limit = max(1, int(self.org_limit * share))
        if limit == self.limit:
            return
        _rescale_limiter_level(self.limiter, limit, self.limit)
        self.limit = limit
        _set_limiter_rate(self.limiter, limit)

    def seconds_for(self, amount: float) -> float:
        """How long the limit takes to free ``amount`` of capacity."""
        return min(amount, self.limit) / self.limit * 60.0


class Governor:
    """Admit requests at the rate the account allows, shared by every worker of a run."""

    def __init__(
        self,
        rpm: int | None = None,
        tpm: int | None = None,
        *,
        probe: bool = True,
        clock: Clock = SYSTEM,
    ) -> None:
        # The buckets leak by the event loop's time, which ``clock.monotonic`` is.
        self.clock = clock
        self.share = 1.0
        self.requests = _Bucket(rpm, False, 1.0) if rpm else None
        self.tokens = _Bucket(tpm, False, 1.0) if tpm else None
        self._paused_until = 0.0
        self.pauses = 0
        self.longest_pause = 0.0
        # The probe gate: while set, one request is out alone and the rest wait for its answer.
        self._probe_ticket: int | None = None
        self._probing = probe
        self._probe_done = asyncio.Event()
        self._probe_started = 0.0
        # Admitted and not yet answered, by admission number (ascending) and weight.
        self._next_ticket = 0
        self._newest_answer = -1  # the latest admitted request answered so far
        self._inflight: dict[int, int] = {}
        self._weights = 0  # sum of admitted weights, for the average request weight
        self._admitted = 0

    # -- admission ------------------------------------------------------------------------------

    async def acquire(self, weight: int) -> int:
        """Wait until one request weighing ``weight`` tokens may be sent.

        Returns a ticket to hand back to :meth:`done` when the request is answered (or is not
        sent after all)."""
        probe = False
        while True:
            delay = self._paused_until - self.clock.monotonic()
            if delay > 0:
                await self.clock.sleep(delay)
                continue
            if self._probing:
                if self._probe_ticket is None:
                    probe = True  # this request is the probe
                    self._probe_ticket = _ELECTED
                    self._probe_started = self.clock.monotonic()
                    break
                waited = self.clock.monotonic() - self._probe_started
                if waited < PROBE_WAIT:
                    self._probe_done.clear()
                    try:
                        async with asyncio.timeout(PROBE_WAIT - waited):
                            await self._probe_done.wait()
                    except TimeoutError:
                        self._probing = False  # a slow probe: go on at the known rate
                    continue
                self._probing = False
            break
        if self.requests is not None:
            await self.requests.acquire(1)
        if self.tokens is not None and weight > 0:
            await self.tokens.acquire(weight)
        ticket = self._next_ticket
        self._next_ticket += 1
        self._inflight[ticket] = weight
        self._weights += weight
        self._admitted += 1
        if probe and self._probe_ticket == _ELECTED:
            self._probe_ticket = ticket
        return ticket

    def _end_probe(self, ticket: int, passed: bool) -> None:
        if ticket == self._probe_ticket:
            self._probe_ticket = None
            if passed:
                self._probing = False
            self._probe_done.set()

    def pause(self, seconds: float, *, probe: bool = True) -> None:
        """Hold every request for ``seconds``; then one probe goes first, and the rest follow
        at the limits' rate (the buckets are emptied)."""
        if seconds <= 0:
            return
        until = self.clock.monotonic() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self.pauses += 1
            self.longest_pause = max(self.longest_pause, seconds)
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.empty(self._paused_until - self.clock.monotonic())
        if probe:
            self._probing = True
            self._probe_ticket = None

    def pause_until_epoch(self, until: float) -> None:
        """A pause another runner shared, as an epoch time."""
        self.pause(until - self.clock.now(), probe=False)

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - self.clock.monotonic())

    def rate(self) -> float | None:
        """Requests per second the limits allow at the average weight seen, if any is known."""
        rates = []
        if self.requests is not None:
            rates.append(self.requests.limit / 60.0)
        if self.tokens is not None:
            weight = self._weights / self._admitted if self._admitted else 0
            if weight > 0:
                rates.append(self.tokens.limit / 60.0 / weight)
        return min(rates) if rates else None

    def headroom(self) -> float | None:
        """Requests the limits would let go at once now, at the average weight seen: the
        capacity the buckets have free (they start full, and are aligned to the remaining the
        server reports), or None if no limit is known. Nothing during a pause or while the
        probe is out (the buckets are emptied for a pause; the probe may still show them
        used up). Read-only: it changes no bucket."""
        if self.paused_for > 0 or self._probing or self._probe_ticket is not None:
            return 0.0
        frees = []
        if self.requests is not None:
            frees.append(self.requests.free())
        if self.tokens is not None:
            weight = self._weights / self._admitted if self._admitted else 0
            if weight > 0:
                frees.append(self.tokens.free() / weight)
        return max(0.0, min(frees)) if frees else None

    def set_share(self, share: float) -> None:
        """Govern at ``share`` of the organization's limits (several runners share them)."""
        share = min(1.0, max(share, 0.001))
        if share == self.share:
            return
        self.share = share
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.rescale(share)

    # -- answers --------------------------------------------------------------------------------

    def done(self, ticket: int, headers: Mapping[str, str], *, passed: bool = True) -> None:
        """The request admitted as ``ticket`` was answered (or abandoned); learn from its
        ``x-ratelimit-*`` headers, any of which may be absent. ``passed``: it was not refused
        for a rate limit (a refused probe keeps the gate closed)."""
        self._end_probe(ticket, passed)
        self._inflight.pop(ticket, None)
        if not headers:
            return
        # The server's "remaining" already counts every request it received before this one;
        # only those admitted after it may still be on their way and must be subtracted.
        # Subtracting all in-flight requests would over-drain when replies come back out of order.
        later_requests = later_tokens = 0
        for t, w in reversed(self._inflight.items()):
            if t < ticket:
                break
            later_requests += 1
            later_tokens += w
        fresh = ticket > self._newest_answer
        self._newest_answer = max(self._newest_answer, ticket)
        self.requests = self._learn(
            self.requests,
            headers.get("x-ratelimit-limit-requests"),
            headers.get("x-ratelimit-remaining-requests"),
            headers.get("x-ratelimit-reset-requests"),
            later_requests,
            1,
            fresh,
            len(self._inflight),
        )
        self.tokens = self._learn(
            self.tokens,
            headers.get("x-ratelimit-limit-tokens"),
            headers.get("x-ratelimit-remaining-tokens"),
            headers.get("x-ratelimit-reset-tokens"),
            later_tokens,
            max(1, self._weights // max(self._admitted, 1)),
            fresh,
            sum(self._inflight.values()) if self.share < 1.0 else 0,
        )

    def _learn(
        self,
        bucket: _Bucket | None,
        limit_h: str | None,
        remaining_h: str | None,
        reset_h: str | None,
        inflight: int,
        need: int,
        fresh: bool = True,
        unanswered: int = 0,
    ) -> _Bucket | None:
        limit = _number(limit_h, 1)
        if limit is None:
            return bucket
        if (
            bucket is None
            or (bucket.learned and bucket.org_limit != limit)
            or limit < bucket.org_limit
        ):
            # A server limit below the user's setting wins: the server enforces it anyway.
            bucket = _Bucket(limit, True, self.share)
        remaining = _number(remaining_h, 0)
        if remaining is not None and remaining <= limit:
            if self.share >= 1.0:
                bucket.align(max(0, remaining - inflight))
            elif fresh:
                # Runners sharing the limits: this one may use its share of what the
                # organization has left, more or less than its own bucket says (what a runner
                # that fell behind leaves is not lost to the others), less what the others
                # may have on their way (as many as this runner has unanswered). Only the
                # newest answer counts: an older one tells of more room than there is.
                others = (1 / self.share - 1) * (unanswered + 2)
                bucket.set_free(int((remaining - others) * self.share) - inflight)
            if remaining < need:
                # Nothing left: wait until the bucket has room for one more request, not for
                # the reset (the time until the bucket is *full* again).
                wait = bucket.seconds_for(need - remaining)
                reset = parse_duration(reset_h)
                if reset is not None:
                    wait = min(wait, reset)
                self.pause(wait, probe=False)
        return bucket

    def rate_limited(
        self, headers: Mapping[str, str], server_wait: float | None, kind: str
    ) -> float:
        """A 429 for a rate limit: decide how long this request (and everyone) waits.

        If the headers show the limit that was hit is exhausted (or say nothing), every request
        pauses for as long as that limit needs: the server's ``server_wait`` (retry-after), else
        the limit's reset header capped by the time the limit takes to free one request's worth
        (the reset header is the time until the bucket is *full*). Then requests resume at the
        limit's rate. If the headers show headroom (a sporadic 429), only this request waits.
        Returns this request's wait.
        """
        limited = "tokens" if kind == "tokens" else "requests"
        bucket = self.tokens if limited == "tokens" else self.requests
        need = max(1, self._weights // max(self._admitted, 1)) if limited == "tokens" else 1
        wait = server_wait
        if wait is None:
            implied = bucket.seconds_for(need) if bucket is not None else None
            reset = parse_duration(headers.get(f"x-ratelimit-reset-{limited}"))
            if reset is not None and implied is not None:
                wait = min(reset, implied)
            else:
                wait = reset if reset is not None else implied
        remaining = _number(headers.get(f"x-ratelimit-remaining-{limited}"), 0)
        if remaining is not None and remaining >= need:
            return wait if wait is not None else 0.0  # headroom: back this one request off
        if wait is None:
            wait = 1.0  # no limit known and no retry header: a short pause, then a probe
        self.pause(wait)
        return wait
