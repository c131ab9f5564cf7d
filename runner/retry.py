"""What to do with each outcome: accept, retry (and after how long), fail the row, or stop.

The policy follows the API's documented error codes: rate limits and server-side failures are
retried with full-jitter exponential backoff that never undercuts the server's own
``retry-after-ms`` / ``retry-after`` headers (but never waits longer than ``max_wait`` at once);
a request the API rejects on its merits fails alone; a bad key or an exhausted quota stops the
whole run. Error fields are kept as text whatever type the server sent them in.
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .endpoints import Endpoint
from .transport import Outcome

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
_TEXT_LIMIT = 2000  # longest error message kept


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
    rate_limited: bool = False  # a real rate-limit 429: governed, not a failed attempt
    limit_kind: str = "requests"  # which limit a rate-limit 429 hit: "requests" or "tokens"
    retry_after: float | None = None  # what the server asked for, in seconds
    data: dict[str, Any] | None = None  # the parsed 2xx body


def _text(value: Any) -> str | None:
    """An error field as text: servers send codes as strings, numbers or objects."""
    if value is None:
        return None
    if isinstance(value, str):
        return value[:_TEXT_LIMIT]
    try:
        return json.dumps(value, ensure_ascii=False, default=str)[:_TEXT_LIMIT]
    except (TypeError, ValueError):
        return repr(value)[:_TEXT_LIMIT]


def _error_object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    err = doc.get("error") if isinstance(doc, dict) else None
    return err if isinstance(err, dict) else None


def _seconds(text: str | None, scale: float = 1.0) -> float | None:
    if not text:
        return None
    try:
        value = float(text) * scale
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The server's requested wait: retry-after-ms, retry-after (seconds or HTTP date).

    Infinite or nonsense values count as absent.
    """
    value = _seconds(headers.get("retry-after-ms"), 0.001)
    if value is not None:
        return value
    ra = headers.get("retry-after")
    value = _seconds(ra)
    if value is not None or not ra:
        return value
    try:
        parsed = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, parsed.timestamp() - (time.time() if now is None else now))


def _limit_kind(etype: str | None, message: str) -> str:
    if etype == "tokens" or "tokens per min" in message or "(TPM)" in message:
        return "tokens"
    return "requests"


UNREADABLE = "unreadable"  # the code of a 2xx whose body is not a JSON object
CAPACITY_CODE = "resource_unavailable"  # a 429 of flex processing: capacity is short now


def describe_body(out: Outcome, limit: int = 60) -> str:
    """What came back, for a person: its content type and its first words (an HTML page's
    title), e.g. "text/html: 'Welcome to nginx!'"."""
    kind = (out.headers.get("content-type") or "no content type").split(";")[0].strip()
    text = out.body[:4096].decode("utf-8", "replace")
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    words = " ".join((title.group(1) if title else re.sub(r"<[^>]+>", " ", text)).split())
    if len(words) > limit:
        words = words[: limit - 3] + "..."
    return f"{kind}: {words!r}" if words else f"{kind}, an empty body"


def classify(
    out: Outcome, endpoint: Endpoint | None = None, request: str = "", *, now: float | None = None
) -> Verdict:
    """Decide what one attempt's outcome means. ``endpoint`` and ``request`` (the body sent)
    let a 2xx be checked against what was asked (n choices, one vector per input); ``now``
    (epoch seconds, the run's clock) is what a Retry-After date counts from."""
    status = out.status
    if status is None:
        kind = out.error or "connection"
        message = _NETWORK_MESSAGES.get(kind)
        return Verdict(Action.RETRY, kind, message=message, maybe_billed=out.maybe_sent)
    if 200 <= status < 300:
        try:
            data = json.loads(out.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
        if not isinstance(data, dict):
            # A 2xx we cannot read was probably billed: charge it, then ask again.
            return Verdict(
                Action.RETRY,
                "invalid_response",
                code=UNREADABLE,
                message=f"HTTP {status} with an unreadable body",
                maybe_billed=True,
            )
        if endpoint is not None:
            problem = endpoint.check_response(request, data)
            if problem is not None:
                return Verdict(
                    Action.RETRY,
                    "invalid_response",
                    message=f"HTTP {status} with a malformed response: {problem}",
                    maybe_billed=True,
                )
        return Verdict(Action.OK, "ok", data=data)
    if 300 <= status < 400:
        # The API never redirects: a redirect is a base URL that points somewhere else (a
        # login page, http to https). Not followed: the body would be sent where it was not
        # meant to go.
        target = out.headers.get("location") or "nowhere given"
        return Verdict(
            Action.FAIL,
            "redirect",
            message=f"HTTP {status} redirect to {_text(target)} (redirects are not followed: "
            "point the base URL at the API itself)",
        )
    err = _error_object(out.body)
    code = _text(err.get("code")) if err else None
    etype = _text(err.get("type")) if err else None
    message = (_text(err.get("message")) if err else None) or f"HTTP {status}"
    if status in (401, 403):
        return Verdict(Action.FATAL, "auth", code=code or str(status), message=message)
    if status == 429:
        if etype == "insufficient_quota" or code in QUOTA_CODES:
            return Verdict(Action.FATAL, "quota", code=code or etype, message=message)
        if code == CAPACITY_CODE:
            # Flex processing without capacity now: not a limit of ours (nothing to pause),
            # not billed; asked again after a backoff that grows (see ``Backoff``).
            return Verdict(
                Action.RETRY, "capacity", code=code, message=message,
                retry_after=retry_after(out.headers, now),
            )  # fmt: skip
        if message.startswith("Request too large"):
            return Verdict(Action.FAIL, "too_large", code=code, message=message)
        return Verdict(
            Action.RETRY,
            "rate_limit",
            code=code or "rate_limit_exceeded",
            message=message,
            rate_limited=True,
            limit_kind=_limit_kind(etype, message),
            retry_after=retry_after(out.headers, now),
        )
    if status in RETRY_STATUSES or status >= 500:
        return Verdict(
            Action.RETRY,
            "server" if status >= 500 else f"http_{status}",
            code=code or str(status),
            message=message,
            retry_after=retry_after(out.headers, now),
        )
    return Verdict(Action.FAIL, f"http_{status}", code=code or str(status), message=message)


_NETWORK_MESSAGES = {
    "timeout": "request timed out (outcome unknown)",
    "connection": "connection lost (outcome unknown)",
    "connect": "could not connect",
}


@dataclass(frozen=True, slots=True)
class Backoff:
    """Full-jitter exponential backoff: uniform(0, min(ceiling, base * 2**(attempt-1))),
    or the server's wait plus a little jitter; never more than ``max_wait`` at once."""

    base: float = 0.5
    ceiling: float = 30.0
    max_wait: float = 120.0

    def delay(self, attempt: int, server_hint: float | None, rng: random.Random) -> float:
        if server_hint is not None:
            # Never earlier than the server asked; a little jitter spreads the herd.
            hint = min(server_hint, self.max_wait)
            return hint + rng.uniform(0, min(self.base, hint * 0.1 + 0.01))
        return rng.uniform(0, min(self.ceiling, self.base * 2 ** max(attempt - 1, 0)))


def fatal_message(kind: str, message: str | None) -> str:
    """What a FATAL verdict (``classify``) means for the run, for a person."""
    what = {
        "auth": "the API rejected the API key (HTTP 401/403)",
        "quota": "the account has no quota left",
    }.get(kind, "the API refused the run")
    return f"{what}: {message}" if message else what
