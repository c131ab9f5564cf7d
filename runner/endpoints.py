"""What batchrun knows about each API endpoint it runs, in one table.

Per endpoint: the job-file url, how a request's output limit is read, which counting rule
``tokens`` applies to its input, how its response's usage is read, which prices apply, and what
a well-formed response must hold. The job-file reader, the token counter, the plan, pricing, the
transport and the simulator all read these entries; adding an endpoint is one entry here plus
its counting rule in ``tokens`` and tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHAT",
    "EMBEDDINGS",
    "ENDPOINTS",
    "MAX_CHOICES",
    "MAX_OUTPUT_TOKENS",
    "RESPONSES",
    "Endpoint",
    "Usage",
    "endpoint_for",
]


# No model writes more than this many tokens in one completion, and the API allows at most this
# many choices (n): larger values are mistakes, and their worst cases would not fit the books.
MAX_OUTPUT_TOKENS = 10_000_000
MAX_CHOICES = 128
# A usage count beyond this is nonsense from a broken server: its cost is booked at worst case.
MAX_USAGE_TOKENS = 2**31 - 1
# The Batch API's only completion window: a batch finishes within it, or expires (its completed
# lines are still returned and billed).
BATCH_WINDOW = "24h"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one response, in the shape every endpoint shares.

    ``complete`` is False when the response carried no readable usage (missing, empty or
    non-numeric counts): the caller must then charge the request's worst case, never $0.
    """

    model: str | None  # the model the response names (often a dated snapshot)
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int  # a subset of output_tokens, already billed inside it
    complete: bool = True


def _count(value: Any) -> int | None:
    """A token count as the API sends it: a non-negative integer (or an integral float) no
    larger than any real response's."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_USAGE_TOKENS:
        return value
    return None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One API endpoint batchrun can run."""

    url: str  # as written in a job file, e.g. "/v1/chat/completions"
    name: str  # short name, and the name of its input-counting rule in ``tokens``
    # Body keys holding the output limit, in the order the API reads them (first present wins).
    limit_keys: tuple[str, ...]
    # Whether the limit applies to each of ``n`` completions (chat's ``n``).
    per_choice: bool
    # Limit keys that belong to other endpoints: the API rejects them, and the reservation
    # (prompt + n x limit) would silently be wrong. Key -> hint for the user.
    foreign_limits: Mapping[str, str]
    # usage field names: (input, output, input details, output details)
    usage_fields: tuple[str, str | None, str | None, str | None]
    # False: billed for input only (no output price applies)
    has_output: bool
    # What a well-formed 200 body holds, given the request's JSON text: None if fine, else why
    # not (a response that does not answer its request is not a result).
    check_response: Callable[[str, Mapping[str, Any]], str | None]
    # The Batch API's limit on inputs summed over one batch (embeddings), if any.
    # The answer of a response in plain text, and why it ended (for spreadsheets, not for books).
    text_of: Callable[[Mapping[str, Any]], tuple[str, str | None]] = field(
        default=lambda _data: ("", None)
    )
    batch_max_inputs: int | None = None
    inputs_of: Callable[[Mapping[str, Any]], int] = field(default=lambda _body: 1)

    @property
    def path(self) -> str:
        """The url relative to the API's base URL (which ends in ``/v1``)."""
        return self.url[3:] if self.url.startswith("/v1/") else self.url

    def choices(self, body: Mapping[str, Any]) -> int:
        n = body.get("n", 1) if self.per_choice else 1
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1

    def output_limit(self, body: Mapping[str, Any]) -> int | None:
        """The most output tokens the request may be billed for (all choices), or None when
        it sets no limit; 0 for an endpoint without output."""
        if not self.has_output:
            return 0
        for key in self.limit_keys:
            limit = body.get(key)
            if limit is not None:
                return limit * self.choices(body)
        return None

    def read_usage(self, data: Mapping[str, Any]) -> Usage:
        """The usage of a response body. Detail objects may be missing or null; missing or
        unreadable main counts make the usage incomplete (see ``Usage.complete``)."""
        raw = data.get("usage")
        model = data.get("model")
        model = model if isinstance(model, str) else None
        u = _obj(raw)
        in_key, out_key, in_details, out_details = self.usage_fields
        inp = _count(u.get(in_key))
        out = _count(u.get(out_key)) if out_key else 0
        if inp is None or out is None:
            return Usage(model, inp or 0, 0, out or 0, 0, complete=False)
        cached = _count(_obj(u.get(in_details)).get("cached_tokens")) if in_details else 0
        reasoning = _count(_obj(u.get(out_details)).get("reasoning_tokens")) if out_details else 0
        return Usage(
            model=model,
            input_tokens=inp,
            cached_tokens=min(cached or 0, inp),
            output_tokens=out,
            reasoning_tokens=min(reasoning or 0, out),
        )


def _parse(request: str) -> Mapping[str, Any]:
    try:
        body = json.loads(request)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _check_chat(request: str, data: Mapping[str, Any]) -> str | None:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return "no choices in the response"
    if len(choices) == 1 and '"n"' not in request:
        return None
    n = CHAT.choices(_parse(request))
    if len(choices) != n:
        return f"{len(choices)} choice(s) for n={n}"
    return None


def _check_responses(request: str, data: Mapping[str, Any]) -> str | None:
    if not isinstance(data.get("output"), list):
        return "no output list in the response"
    return None


def _embedding_inputs(body: Mapping[str, Any]) -> int:
    """How many vectors an embeddings request asks for: a string or one token array is one."""
    value = body.get("input")
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


def _check_embeddings(request: str, data: Mapping[str, Any]) -> str | None:
    vectors = data.get("data")
    if not isinstance(vectors, list):
        return "no data list in the response"
    wanted = _embedding_inputs(_parse(request))
    if len(vectors) != wanted:
        return f"{len(vectors)} embedding(s) for {wanted} input(s)"
    return None


def _chat_text(data: Mapping[str, Any]) -> tuple[str, str | None]:
    texts: list[str] = []
    reason = None
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        message = _obj(choice.get("message"))
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif message.get("refusal"):
            texts.append(str(message["refusal"]))
        reason = reason or choice.get("finish_reason")
    return "\n".join(texts), reason if isinstance(reason, str) else None


def _responses_text(data: Mapping[str, Any]) -> tuple[str, str | None]:
    texts = [
        part.get("text", "")
        for item in data.get("output") or ()
        if isinstance(item, dict) and item.get("type") == "message"
        for part in item.get("content") or ()
        if isinstance(part, dict) and part.get("type") == "output_text"
    ]
    reason = _obj(data.get("incomplete_details")).get("reason") or data.get("status")
    return "".join(t for t in texts if isinstance(t, str)), reason if isinstance(
        reason, str
    ) else None


CHAT = Endpoint(
    url="/v1/chat/completions",
    name="chat",
    limit_keys=("max_completion_tokens", "max_tokens"),
    per_choice=True,
    foreign_limits={"max_output_tokens": "use max_completion_tokens"},
    usage_fields=(
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
    ),
    has_output=True,
    check_response=_check_chat,
    text_of=_chat_text,
)
RESPONSES = Endpoint(
    url="/v1/responses",
    name="responses",
    limit_keys=("max_output_tokens",),
    per_choice=False,
    foreign_limits={
        "max_tokens": "use max_output_tokens",
        "max_completion_tokens": "use max_output_tokens",
    },
    usage_fields=(
        "input_tokens",
        "output_tokens",
        "input_tokens_details",
        "output_tokens_details",
    ),
    has_output=True,
    check_response=_check_responses,
    text_of=_responses_text,
)
EMBEDDINGS = Endpoint(
    url="/v1/embeddings",
    name="embeddings",
    limit_keys=(),
    per_choice=False,
    foreign_limits={},
    usage_fields=("prompt_tokens", None, None, None),
    has_output=False,
    check_response=_check_embeddings,
    batch_max_inputs=50_000,
    inputs_of=_embedding_inputs,
)

ENDPOINTS: dict[str, Endpoint] = {e.url: e for e in (CHAT, RESPONSES, EMBEDDINGS)}


def endpoint_for(url: str) -> Endpoint | None:
    """The entry for a job-file url, or None when batchrun does not run that endpoint."""
    return ENDPOINTS.get(url)
