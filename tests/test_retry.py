"""What each outcome means (retry, fail, stop) and how long to wait before trying again."""

from __future__ import annotations

import json
import random

import pytest

from runner.endpoints import CHAT, EMBEDDINGS
from runner.retry import Action, Backoff, classify, retry_after
from runner.transport import Outcome


def err(
    status: int,
    message: str = "x",
    type_: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Outcome:
    body = json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()
    return Outcome(status=status, body=body, headers=headers or {})


@pytest.mark.parametrize(
    ("outcome", "action", "kind"),
    [
        (
            err(429, "Rate limit reached for gpt-4o", "requests", "rate_limit_exceeded"),
            Action.RETRY,
            "rate_limit",
        ),
        (
            err(
                429,
                "Request too large for gpt-4o on tokens per min",
                "tokens",
                "rate_limit_exceeded",
            ),
            Action.FAIL,
            "too_large",
        ),
        (
            err(429, "You exceeded your current quota", "insufficient_quota", "insufficient_quota"),
            Action.FATAL,
            "quota",
        ),
        (err(429, "spend limit", None, "project_spend_limit_exceeded"), Action.FATAL, "quota"),
        (
            err(401, "Incorrect API key", "invalid_request_error", "invalid_api_key"),
            Action.FATAL,
            "auth",
        ),
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


def test_a_rate_limit_429_says_which_limit_it_hit() -> None:
    tokens = classify(err(429, "Rate limit reached ... on tokens per min (TPM)", "tokens"))
    requests = classify(err(429, "Rate limit reached ... on requests per min (RPM)", "requests"))
    assert tokens.limit_kind == "tokens" and requests.limit_kind == "requests"
    assert tokens.rate_limited and tokens.retry_after is None


@pytest.mark.parametrize("value", ["inf", "nan", "-3", "1e400"])
def test_nonsense_retry_headers_count_as_absent(value: str) -> None:
    assert retry_after({"retry-after-ms": value}) is None
    assert retry_after({"retry-after": value}) is None


def test_error_codes_and_messages_are_text_whatever_the_server_sent() -> None:
    body = json.dumps({"error": {"message": ["a", 1], "code": {"detail": "bad"}, "type": 7}})
    v = classify(Outcome(400, body.encode()))
    assert v.action is Action.FAIL
    assert v.code == '{"detail": "bad"}' and v.message == '["a", 1]'
    assert classify(Outcome(429, b'{"error": {"code": 429}}')).code == "429"


def test_a_success_that_does_not_answer_its_request_is_malformed_and_maybe_billed() -> None:
    body = json.dumps({"data": [{"embedding": [0.1]}], "usage": {"prompt_tokens": 3}})
    v = classify(Outcome(200, body.encode()), EMBEDDINGS, json.dumps({"input": ["a", "b", "c"]}))
    assert (v.action, v.kind, v.maybe_billed) == (Action.RETRY, "invalid_response", True)
    assert "1 embedding(s) for 3 input(s)" in (v.message or "")
    ok = json.dumps({"choices": [{"message": {}}], "usage": {}})
    assert classify(Outcome(200, ok.encode()), CHAT, "{}").action is Action.OK


def test_a_success_without_usage_is_still_a_result() -> None:
    # the books charge its worst case; throwing it away would buy it again
    assert classify(Outcome(200, b'{"choices": [{}]}'), CHAT, "{}").action is Action.OK


def test_backoff_is_full_jitter_and_never_earlier_than_the_server_asked() -> None:
    rng = random.Random(1)
    b = Backoff(base=0.5, ceiling=4.0)
    samples = [b.delay(5, None, rng) for _ in range(2000)]
    assert 0 <= min(samples) < 0.2 and 3.5 < max(samples) <= 4.0  # uniform over [0, 4]
    assert all(b.delay(3, 2.0, rng) >= 2.0 for _ in range(200))


def test_a_server_wait_is_cut_to_max_wait() -> None:
    b = Backoff(base=0.5, ceiling=4.0, max_wait=10.0)
    assert 10.0 <= b.delay(1, 99_999_999.0, random.Random(0)) <= 10.5


def test_a_proxys_429_with_a_string_code_and_no_retry_headers_is_a_rate_limit() -> None:
    body = json.dumps({"error": {"message": "rpm limit exceeded", "type": None, "code": "429"}})
    v = classify(Outcome(429, body.encode(), headers={}))
    assert (v.action, v.kind, v.rate_limited, v.retry_after) == (
        Action.RETRY,
        "rate_limit",
        True,
        None,
    )
    assert v.code == "429"
