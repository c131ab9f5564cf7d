"""The endpoint table: output limits, usage, and what a well-formed response holds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from runner.endpoints import CHAT, EMBEDDINGS, ENDPOINTS, RESPONSES, Usage, endpoint_for


def test_the_three_endpoints_batchrun_runs() -> None:
    assert set(ENDPOINTS) == {"/v1/chat/completions", "/v1/responses", "/v1/embeddings"}
    assert endpoint_for("/v1/completions") is None
    assert CHAT.path == "/chat/completions"


def test_read_usage_of_a_chat_completion() -> None:
    body = {
        "model": "gpt-4o-mini-2024-07-18",
        "usage": {
            "prompt_tokens": 2048,
            "completion_tokens": 300,
            "total_tokens": 2348,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 64},
        },
    }
    assert CHAT.read_usage(body) == Usage("gpt-4o-mini-2024-07-18", 2048, 1024, 300, 64)


def test_read_usage_of_a_responses_body() -> None:
    body = {
        "model": "gpt-4.1-mini-2025-04-14",
        "usage": {
            "input_tokens": 1500,
            "input_tokens_details": {"cached_tokens": 1152},
            "output_tokens": 80,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 1580,
        },
    }
    assert RESPONSES.read_usage(body) == Usage("gpt-4.1-mini-2025-04-14", 1500, 1152, 80, 0)


def test_read_usage_of_an_embeddings_body() -> None:
    body = {"model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    assert EMBEDDINGS.read_usage(body) == Usage("text-embedding-3-small", 8, 0, 0, 0)


@pytest.mark.parametrize(
    "usage",
    [
        {
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },
        {"prompt_tokens": 7, "completion_tokens": 3},
        {
            "input_tokens": 7,
            "output_tokens": 3,
            "input_tokens_details": None,
            "output_tokens_details": None,
        },
        {
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "prompt_tokens_details": "n/a",
            "completion_tokens_details": [1],
        },
    ],
)
def test_read_usage_tolerates_missing_null_or_odd_detail_objects(usage: dict[str, Any]) -> None:
    endpoint = RESPONSES if "input_tokens" in usage else CHAT
    assert endpoint.read_usage({"model": "gpt-4o", "usage": usage}) == Usage("gpt-4o", 7, 0, 3, 0)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"usage": None},
        {"usage": "n/a"},
        {"model": 5},
        {"usage": {}},
        {"usage": {"prompt_tokens": "12", "completion_tokens": 3}},
        {"usage": {"prompt_tokens": 12, "completion_tokens": -3}},
        {"usage": {"prompt_tokens": 12, "completion_tokens": 1.5}},
        {"usage": {"prompt_tokens": 12}},
    ],
)
def test_missing_or_unreadable_usage_is_incomplete_never_zero(body: dict[str, Any]) -> None:
    assert not CHAT.read_usage(body).complete  # the caller charges the worst case


def test_read_usage_clamps_nonsense_details() -> None:
    usage = CHAT.read_usage(
        {
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": 50},  # more than the prompt
                "completion_tokens_details": {"reasoning_tokens": True},
            }
        }
    )
    assert usage == Usage(None, 10, 10, 0, 0)


def test_embeddings_usage_needs_no_output_count() -> None:
    assert EMBEDDINGS.read_usage({"usage": {"prompt_tokens": 4}}).complete


@pytest.mark.parametrize(
    ("endpoint", "body", "limit"),
    [
        (CHAT, {"max_completion_tokens": 7}, 7),
        (CHAT, {"max_tokens": 7, "n": 4}, 28),
        (CHAT, {"max_completion_tokens": 7, "max_tokens": 99}, 7),  # the newer name wins
        (CHAT, {}, None),
        (RESPONSES, {"max_output_tokens": 9, "n": 3}, 9),  # n is not a Responses parameter
        (EMBEDDINGS, {"max_tokens": 5}, 0),
    ],
)
def test_output_limit_per_endpoint(endpoint: Any, body: dict[str, Any], limit: int | None) -> None:
    assert endpoint.output_limit(body) == limit


@pytest.mark.parametrize(
    ("endpoint", "request_body", "response", "problem"),
    [
        (CHAT, {"n": 1}, {"choices": [{}]}, None),
        (CHAT, {"n": 3}, {"choices": [{}]}, "1 choice(s) for n=3"),
        (CHAT, {}, {"choices": []}, "no choices in the response"),
        (CHAT, {}, {"id": "x"}, "no choices in the response"),
        (RESPONSES, {}, {"output": []}, None),
        (RESPONSES, {}, {"id": "x"}, "no output list in the response"),
        (EMBEDDINGS, {"input": ["a", "b", "c"]}, {"data": [{}]}, "1 embedding(s) for 3 input(s)"),
        (EMBEDDINGS, {"input": "a"}, {"data": [{}]}, None),
        (EMBEDDINGS, {"input": [1, 2, 3]}, {"data": [{}]}, None),  # one token array
        (EMBEDDINGS, {"input": [[1], [2]]}, {"data": [{}, {}]}, None),
    ],
)
def test_a_response_must_answer_its_request(
    endpoint: Any, request_body: dict[str, Any], response: dict[str, Any], problem: str | None
) -> None:
    assert endpoint.check_response(json.dumps(request_body), response) == problem
