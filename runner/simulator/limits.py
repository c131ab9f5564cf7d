"""Rate limits as the real API enforces them: RPM/TPM token buckets, 429 messages, headers.

Both buckets start full and refill continuously over a minute. The proxy mode waits for room
instead of rejecting, the way the LiteLLM proxy queues over-limit requests.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import SimConfig

_ORG = "org-sim"
_LIMITS_URL = "Visit https://platform.openai.com/account/rate-limits to learn more."


def go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration.String`` at millisecond precision (``12ms``, ``6m0s``).

    Rounded up, so a bucket that is not quite full never reports ``0s``.
    """
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class _Bucket:
    """A token bucket that starts full and refills continuously, like the API's limits."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.rate = capacity / 60.0
        self.level = float(capacity)
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def seconds_until(self, level: float) -> float:
        return max(0.0, (level - self.level) / self.rate)

    def used(self) -> int:
        return math.ceil(self.capacity - self.level - 1e-9)


@dataclass(frozen=True, slots=True)
class _Rejection:
    """Why a request was refused, and when retrying could succeed."""

    kind: str  # "requests" or "tokens": the error type of the 429
    message: str
    retry_s: float | None  # None: retrying cannot help (request too large)


def _rate_limited(model: str, kind: str, limit: int, used: int, want: int, wait: float) -> str:
    unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
    return (
        f"Rate limit reached for {model} in organization {_ORG} on {unit}: Limit {limit}, "
        f"Used {used}, Requested {want}. Please try again in {go_duration(wait)}. " + _LIMITS_URL
    )


def _injected_429(model: str, rpm: int | None, wait: float) -> _Rejection:
    """A 429 the fault RNG chose: it reads like an RPM limit that is exhausted."""
    limit = rpm or 10_000
    return _Rejection("requests", _rate_limited(model, "requests", limit, limit, 1, wait), wait)


class _Limiter:
    """RPM and TPM buckets, following the config's limits as they change."""

    def __init__(self) -> None:
        self.requests: _Bucket | None = None
        self.tokens: _Bucket | None = None
        self._queue = asyncio.Lock()  # proxy mode: held requests are admitted in order

    def sync(self, config: SimConfig, now: float) -> None:
        """Follow config changes (a new limit starts a new, full bucket) and refill."""
        if config.rpm is None:
            self.requests = None
        elif self.requests is None or self.requests.capacity != config.rpm:
            self.requests = _Bucket(config.rpm, now)
        else:
            self.requests.refill(now)
        if config.tpm is None:
            self.tokens = None
        elif self.tokens is None or self.tokens.capacity != config.tpm:
            self.tokens = _Bucket(config.tpm, now)
        else:
            self.tokens.refill(now)

    def _spend_request(self) -> None:
        req = self.requests
        if req is not None:
            # Rejections push the bucket below zero, but at most one minute's worth.
            req.level = max(req.level - 1, -req.capacity)

    def admit(
        self, model: str, weight: int, *, spend_tokens: bool = True, reject_spends: bool = True
    ) -> _Rejection | None:
        """Spend capacity for one request, or say why it is rejected.

        ``reject_spends``: a rejection still spends a unit of request capacity (the real API's
        behaviour, so a client that retries too fast only makes its wait longer).
        """
        req, tok = self.requests, self.tokens
        if req is not None and req.level < 1:
            used = req.used()
            if reject_spends:
                self._spend_request()
            wait = req.seconds_until(1)
            message = _rate_limited(model, "requests", req.capacity, used, 1, wait)
            return _Rejection("requests", message, wait)
        if tok is not None and weight > tok.capacity:
            if reject_spends:
                self._spend_request()
            message = (
                f"Request too large for {model} in organization {_ORG} on tokens per min (TPM): "
                f"Limit {tok.capacity}, Requested {weight}. The input or output tokens must be "
                "reduced in order to run successfully. " + _LIMITS_URL
            )
            return _Rejection("tokens", message, None)
        if tok is not None and tok.level < weight:
            if reject_spends:
                self._spend_request()
            wait = tok.seconds_until(weight)
            message = _rate_limited(model, "tokens", tok.capacity, tok.used(), weight, wait)
            return _Rejection("tokens", message, wait)
        self._spend_request()
        if tok is not None and spend_tokens:
            tok.level -= weight
        return None

    async def admit_when_ready(
        self, config: SimConfig, model: str, weight: int
    ) -> _Rejection | None:
        """Hold the request until both buckets have room (the proxy's way); only a request
        that can never fit is rejected."""
        async with self._queue:
            while True:
                self.sync(config, time.monotonic())
                rejection = self.admit(model, weight, reject_spends=False)
                if rejection is None or rejection.retry_s is None:
                    return rejection
                await asyncio.sleep(max(rejection.retry_s, 0.001))

    def headers(self, *, resets: bool = True) -> dict[str, str]:
        """The x-ratelimit-* headers; ``resets=False`` leaves out the reset times."""
        out: dict[str, str] = {}
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(bucket.capacity)
                out[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(bucket.level)))
                if resets:
                    out[f"x-ratelimit-reset-{kind}"] = go_duration(
                        (bucket.capacity - bucket.level) / bucket.rate
                    )
        return out
