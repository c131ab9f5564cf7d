"""What to do with each outcome: accept, retry (and after how long), fail the row, or stop.

The policy follows the API's documented error codes (see the facts file): rate limits and
server-side failures are retried with full-jitter exponential backoff that never undercuts the
server's own ``retry-after-ms`` / ``retry-after`` / reset headers; a request the API rejects on
its merits fails alone; a bad key or an exhausted quota stops the whole run.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .executor import Outcome
from .governor import parse_duration

QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    }
)
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class Action(Enum):
    OK = "ok"
    RETRY = "retry"
    FAIL = "fail"  # this request can never succeed as written
    FATAL = "fatal"  # nothing in this run can succeed


@dataclass(slots=True)
class Verdict:
    action: Action
    kind: str  # short error kind for the attempts table ("ok", "rate_limit", "server", ...)
    code: str | None = None
    message: str | None = None
    maybe_billed: bool = False  # the server may have charged for this attempt
    rate_limited: bool = False  # a real rate-limit 429: pause every worker
    retry_after: float | None = None  # what the server asked for, in seconds
    data: dict[str, Any] | None = None  # the parsed 2xx body


def _error_object(body: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        msg = err.get("message")
        return err, msg if isinstance(msg, str) else None
    return None, None


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The server's requested wait: retry-after-ms, retry-after (seconds or HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000
            if value >= 0:
                return value
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        try:
            value = float(ra)
            if value >= 0:
                return value
        except ValueError:
            try:
                parsed = email.utils.parsedate_to_datetime(ra)
            except (TypeError, ValueError):
                return None
            return max(0.0, parsed.timestamp() - time.time())
    return None


def classify(out: Outcome) -> Verdict:
    """Decide what one attempt's outcome means."""
    status = out.status
    if status is None:
        kind = out.error or "connection"
        message = _NETWORK_MESSAGES.get(kind)
        return Verdict(Action.RETRY, kind, message=message, maybe_billed=out.maybe_sent)
    if 200 <= status < 300:
        try:
            data = json.loads(out.body)
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("usage"), dict):
            # A 2xx we cannot read was probably billed: charge it, then ask again.
            return Verdict(
                Action.RETRY,
                "invalid_response",
                message=f"HTTP {status} with an unreadable body",
                maybe_billed=True,
            )
        return Verdict(Action.OK, "ok", data=data)
    err, message = _error_object(out.body)
    code = err.get("code") if err else None
    etype = err.get("type") if err else None
    message = message or f"HTTP {status}"
    if status in (401, 403):
        return Verdict(Action.FATAL, "auth", code=code or str(status), message=message)
    if status == 429:
        if etype == "insufficient_quota" or code in QUOTA_CODES:
            return Verdict(Action.FATAL, "quota", code=code or etype, message=message)
        if message.startswith("Request too large"):
            return Verdict(Action.FAIL, "too_large", code=code, message=message)
        return Verdict(
            Action.RETRY,
            "rate_limit",
            code=code or "rate_limit_exceeded",
            message=message,
            rate_limited=True,
            retry_after=retry_after(out.headers) or _reset_hint(out.headers, etype),
        )
    if status in RETRY_STATUSES or status >= 500:
        return Verdict(
            Action.RETRY,
            "server" if status >= 500 else f"http_{status}",
            code=code or str(status),
            message=message,
            retry_after=retry_after(out.headers),
        )
    return Verdict(Action.FAIL, f"http_{status}", code=code or str(status), message=message)


_NETWORK_MESSAGES = {
    "timeout": "request timed out (outcome unknown)",
    "connection": "connection lost (outcome unknown)",
    "connect": "could not connect",
}


def _reset_hint(headers: Mapping[str, str], etype: str | None) -> float | None:
    name = "x-ratelimit-reset-tokens" if etype == "tokens" else "x-ratelimit-reset-requests"
    return parse_duration(headers.get(name))


@dataclass(frozen=True, slots=True)
class Backoff:
    """Full-jitter exponential backoff: uniform(0, min(ceiling, base * 2**(attempt-1)))."""

    base: float = 0.5
    ceiling: float = 30.0

    def delay(self, attempt: int, server_hint: float | None, rng: random.Random) -> float:
        jitter = rng.uniform(0, min(self.ceiling, self.base * 2 ** max(attempt - 1, 0)))
        if server_hint is not None:
            # Never earlier than the server asked; a little jitter spreads the herd.
            return server_hint + rng.uniform(0, min(self.base, server_hint * 0.1 + 0.01))
        return jitter
