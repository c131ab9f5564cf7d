"""The governor: how fast requests may leave, by requests/min and tokens/min.

Two ``aiolimiter`` leaky buckets, one counting requests and one counting tokens, where a request
weighs what the API's token limiter counts: prompt tokens plus n x the output limit. Like the
API's own buckets they start full, so a minute's worth may go at once.

Limits come from the user (``--rpm``/``--tpm``) or are learned from ``x-ratelimit-*`` headers;
headers that are missing or nonsense (``-1``, ``0``) are ignored. After a rate-limit 429 every
worker waits for the reset the server named, rather than each one retrying on its own.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping

from aiolimiter import AsyncLimiter

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | None) -> float | None:
    """A Go duration string (``12ms``, ``1.5s``, ``6m0s``, ``1h2m3s``) in seconds, or None."""
    if not text:
        return None
    text = text.strip()
    pos = 0
    total = 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        try:  # some compatible servers send plain seconds
            value = float(text)
        except ValueError:
            return None
        return value if value >= 0 else None
    return total


def _positive_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(float(text))
    except ValueError:
        return None
    return value if value > 0 else None


def _nonnegative_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(float(text))
    except ValueError:
        return None
    return value if value >= 0 else None


class _Bucket:
    """One limit (requests or tokens per minute) and where it came from."""

    __slots__ = ("learned", "limit", "limiter")

    def __init__(self, limit: int, learned: bool) -> None:
        self.limit = limit
        self.learned = learned
        self.limiter = AsyncLimiter(limit, 60)

    async def acquire(self, amount: float) -> None:
        # aiolimiter refuses an amount larger than its capacity; such a request can only be
        # sent on an empty bucket, which is what acquiring the full capacity waits for.
        await self.limiter.acquire(min(amount, self.limit))

    def align(self, remaining: int) -> None:
        """Drain our bucket to match a server that says it has ``remaining`` capacity left."""
        # aiolimiter has no public way to lower the free capacity without waiting, so this
        # reaches into its level; has_capacity() leaks first so the level is current.
        lim = self.limiter
        lim.has_capacity(0)
        if remaining < self.limit - lim._level:
            lim._level = float(self.limit - remaining)


class Governor:
    """Admit requests at the rate the account allows, shared by every worker of a run."""

    def __init__(self, rpm: int | None = None, tpm: int | None = None) -> None:
        self.requests = _Bucket(rpm, learned=False) if rpm else None
        self.tokens = _Bucket(tpm, learned=False) if tpm else None
        self._paused_until = 0.0
        self.pauses = 0
        self.longest_pause = 0.0
        # Admitted and not yet answered, by admission number (ascending) and weight.
        self._next_ticket = 0
        self._inflight: dict[int, int] = {}

    async def acquire(self, weight: int) -> int:
        """Wait until one request weighing ``weight`` tokens may be sent.

        Returns a ticket to hand back to :meth:`done` when the request is answered (or is not
        sent after all)."""
        while True:
            delay = self._paused_until - time.monotonic()
            if delay <= 0:
                break
            await asyncio.sleep(delay)
        if self.requests is not None:
            await self.requests.acquire(1)
        if self.tokens is not None and weight > 0:
            await self.tokens.acquire(weight)
        ticket = self._next_ticket
        self._next_ticket += 1
        self._inflight[ticket] = weight
        return ticket

    def pause(self, seconds: float) -> None:
        """Hold every worker for ``seconds`` (after a rate-limit 429)."""
        if seconds <= 0:
            return
        until = time.monotonic() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self.pauses += 1
            self.longest_pause = max(self.longest_pause, seconds)

    def done(self, ticket: int, headers: Mapping[str, str]) -> None:
        """The request admitted as ``ticket`` was answered (or abandoned); learn from its
        ``x-ratelimit-*`` headers, any of which may be absent."""
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
        self.requests = self._learn(
            self.requests,
            headers.get("x-ratelimit-limit-requests"),
            headers.get("x-ratelimit-remaining-requests"),
            headers.get("x-ratelimit-reset-requests"),
            later_requests,
        )
        self.tokens = self._learn(
            self.tokens,
            headers.get("x-ratelimit-limit-tokens"),
            headers.get("x-ratelimit-remaining-tokens"),
            headers.get("x-ratelimit-reset-tokens"),
            later_tokens,
        )

    def _learn(
        self,
        bucket: _Bucket | None,
        limit_h: str | None,
        remaining_h: str | None,
        reset_h: str | None,
        inflight: int,
    ) -> _Bucket | None:
        limit = _positive_int(limit_h)
        if limit is None:
            return bucket
        if bucket is None or (bucket.learned and bucket.limit != limit) or limit < bucket.limit:
            # A server limit below the user's setting wins: the server enforces it anyway.
            bucket = _Bucket(limit, learned=True)
        remaining = _nonnegative_int(remaining_h)
        if remaining is not None and remaining <= limit:
            bucket.align(max(0, remaining - inflight))
            if remaining == 0:
                reset = parse_duration(reset_h)
                if reset:
                    # Empty: one bucket slot frees in limit/60 s; wait for that, not the reset
                    # (the reset header is the time until the bucket is *full* again).
                    self.pause(min(reset, 60.0 / limit))
        return bucket
