"""What each outcome means (retry, fail, stop) and how long to wait before trying again."""

from __future__ import annotations

import json
import random

import pytest

from runner.executor import Outcome
from runner.governor import Governor, parse_duration
from runner.retry import Action, Backoff, classify, retry_after


def err(status: int, message: str = "x", type_: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None) -> Outcome:
    body = json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()
    return Outcome(status=status, body=body, headers=headers or {})


@pytest.mark.parametrize(
    ("outcome", "action", "kind"),
    [
        (err(429, "Rate limit reached for gpt-4o", "requests", "rate_limit_exceeded"),
         Action.RETRY, "rate_limit"),
        (err(429, "Request too large for gpt-4o on tokens per min", "tokens",
             "rate_limit_exceeded"), Action.FAIL, "too_large"),
        (err(429, "You exceeded your current quota", "insufficient_quota", "insufficient_quota"),
         Action.FATAL, "quota"),
        (err(429, "spend limit", None, "project_spend_limit_exceeded"), Action.FATAL, "quota"),
        (err(401, "Incorrect API key", "invalid_request_error", "invalid_api_key"),
         Action.FATAL, "auth"),
        (err(403, "region"), Action.FATAL, "auth"),
        (err(400, "context_length_exceeded", "invalid_request_error"), Action.FAIL, "http_400"),
        (err(404, "model_not_found"), Action.FAIL, "http_404"),
        (err(422, "bad"), Action.FAIL, "http_422"),
        (err(408), Action.RETRY, "http_408"),
        (err(409), Action.RETRY, "http_409"),
        (err(500), Action.RETRY, "server"),
        (err(503), Action.RETRY, "server"),
        (Outcome(502, b"<html>bad gateway</html>"), Action.RETRY, "server"),
        (Outcome(None, error="timeout", maybe_sent=True), Action.RETRY, "timeout"),
        (Outcome(None, error="connect"), Action.RETRY, "connect"),
        (Outcome(200, b'{"id": "x", "usage": {"prompt_tokens": 1}}'), Action.OK, "ok"),
        (Outcome(200, b'{"id": "x", "usa'), Action.RETRY, "invalid_response"),
    ],
)
def test_each_outcome_is_classified_as_the_api_documents(
    outcome: Outcome, action: Action, kind: str
) -> None:
    v = classify(outcome)
    assert (v.action, v.kind) == (action, kind)


def test_an_unreadable_success_and_a_timeout_count_as_possibly_billed() -> None:
    assert classify(Outcome(200, b"{oops")).maybe_billed
    assert classify(Outcome(None, error="timeout", maybe_sent=True)).maybe_billed
    assert not classify(Outcome(None, error="connect")).maybe_billed
    assert not classify(err(500)).maybe_billed


def test_retry_headers_are_read_in_order_of_precision() -> None:
    assert retry_after({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None


def test_a_rate_limit_429_without_retry_after_waits_for_the_named_reset() -> None:
    v = classify(err(429, "Rate limit reached", "tokens", "rate_limit_exceeded",
                     {"x-ratelimit-reset-tokens": "1.5s"}))
    assert v.rate_limited and v.retry_after == 1.5


def test_backoff_is_full_jitter_and_never_earlier_than_the_server_asked() -> None:
    rng = random.Random(1)
    b = Backoff(base=0.5, ceiling=4.0)
    samples = [b.delay(5, None, rng) for _ in range(2000)]
    assert 0 <= min(samples) < 0.2 and 3.5 < max(samples) <= 4.0  # uniform over [0, 4]
    assert all(b.delay(3, 2.0, rng) >= 2.0 for _ in range(200))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("12ms", 0.012), ("1s", 1.0), ("1.5s", 1.5), ("6m0s", 360.0), ("1h2m3s", 3723.0),
     ("2m30.5s", 150.5), ("-1", None), ("", None), ("soon", None), ("0", 0.0)],
)
def test_go_durations_parse_with_ms_before_m(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


async def test_the_governor_learns_limits_from_headers_and_ignores_nonsense() -> None:
    g = Governor()
    t = await g.acquire(10)
    g.done(t, {"x-ratelimit-limit-requests": "-1", "x-ratelimit-limit-tokens": "0"})
    assert g.requests is None and g.tokens is None
    t = await g.acquire(10)
    g.done(t, {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "590",
                "x-ratelimit-limit-tokens": "90000", "x-ratelimit-remaining-tokens": "1000"})
    assert g.requests is not None and g.requests.limit == 600
    assert g.tokens is not None and g.tokens.limit == 90000
    # the token bucket was drained to what the server said was left
    assert not g.tokens.limiter.has_capacity(2000)
    assert g.tokens.limiter.has_capacity(900)


async def test_a_user_limit_above_the_servers_gives_way_to_the_server() -> None:
    g = Governor(rpm=10_000)
    t = await g.acquire(1)
    g.done(t, {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499"})
    assert g.requests is not None and g.requests.limit == 500


async def test_only_requests_admitted_after_the_answered_one_are_subtracted() -> None:
    g = Governor(rpm=100)
    tickets = [await g.acquire(1) for _ in range(11)]
    assert g.requests is not None
    headers = {"x-ratelimit-limit-requests": "100"}
    # The last request is answered first: the server had received all 11 (89 left), so the
    # 10 still in flight were already counted there and must not be subtracted again.
    g.done(tickets[-1], {**headers, "x-ratelimit-remaining-requests": "89"})
    assert g.requests.limiter.has_capacity(89)
    # The first request, answered now, was seen when only it had arrived (99 left); the 9
    # admitted after it and still unanswered may not have arrived yet.
    g.done(tickets[0], {**headers, "x-ratelimit-remaining-requests": "99"})
    assert g.requests.limiter.has_capacity(89)
    # A server with less room than we think (another client shares the account) drains us.
    g.done(tickets[1], {**headers, "x-ratelimit-remaining-requests": "50"})
    assert not g.requests.limiter.has_capacity(50)
    assert g.requests.limiter.has_capacity(42)
