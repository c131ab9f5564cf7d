"""How the simulated API answers one request body, whichever way the body arrived.

The synchronous endpoints and the Batch API both run a body through ``_Answers``: the checks the
real API makes (400, 404), the prompt tokens it counts, and the reply with its usage. A reply
depends only on the body's bytes (their sha256), so tests can predict it, and a batch line is
answered exactly as the same body sent on its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..endpoints import CHAT, EMBEDDINGS, ENDPOINTS, RESPONSES, Endpoint
from ..errors import UnknownTierError
from ..pricing import Price, PriceTable
from ..tokens import count_request
from .config import SimConfig
from .outputs import json_texts

# Aliases the real API answers with a dated snapshot; pricing must follow the snapshot.
_SNAPSHOTS = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-4o": "gpt-4o-2024-08-06"}
_MAX_COMPLETION = 64
# The service tiers the real API accepts (OpenAPI spec); another value is a 400.
_SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")
_EMBED_DIMS = 8
_PROMPT_CACHE_MAX = 65_536
_WORDS = (
    "sim", "reply", "token", "batch", "alpha", "beta", "gamma", "delta",
    "one", "two", "three", "four", "red", "green", "blue", "done",
)  # fmt: skip
_INVALID = "invalid_request_error"
# Chat's usage details carry more zero fields than the ones batchrun reads.
_CHAT_DETAILS = (
    {"audio_tokens": 0},
    {"audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
)


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


class _ApiError(Exception):
    """An error answer: its HTTP status and the API's error object.

    ``verbatim``: the error already has the shape it must be sent in, so the proxy mode does
    not rewrite its code.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = _INVALID,
        code: str | dict[str, Any] | None = None,
        param: str | None = None,
        *,
        verbatim: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.verbatim = verbatim

    def body(self, *, proxy: bool = False, key: str = "") -> dict[str, Any]:
        """The JSON body; ``proxy`` sends the code as the status string, as LiteLLM does, and
        ``key`` is appended to the message (the echo-key mode)."""
        code = str(self.status) if proxy and not self.verbatim else self.code
        message = f"{self.message} [api key: {key}]" if key else self.message
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": code}}


@dataclass(frozen=True, slots=True)
class _Tokens:
    """A reply's usage: what is billed (input, cached, output) and the reasoning share."""

    input: int
    cached: int
    output: int
    reasoning: int

    @property
    def billed(self) -> tuple[int, int, int]:
        return self.input, self.cached, self.output


@dataclass(frozen=True, slots=True)
class _Request:
    """A body that passed the API's checks, with what its reply depends on."""

    endpoint: Endpoint
    body: dict[str, Any]
    model: str  # as requested
    served: str  # the model the reply names
    price: Price
    digest: bytes  # sha256 of the body's bytes
    prompt: int  # input tokens as counted by ``runner.tokens``
    limit: int | None  # output tokens per choice, if the request sets a limit
    tier: str = "default"  # the service tier the reply reports and is billed at

    def cost(self, tokens: _Tokens, *, batch: bool = False) -> int:
        """What the reply is billed: at the tier it reports (standard prices when the price
        table has none for it), or at Batch API prices."""
        tier = None if self.tier in ("auto", "default") else self.tier
        try:
            return self.price.cost(*tokens.billed, batch=batch, tier=tier)
        except UnknownTierError:
            return self.price.cost(*tokens.billed, batch=batch)

    @property
    def weight(self) -> int:
        """Tokens the rate limiter counts: prompt + n x the output limit."""
        return self.prompt + (self.endpoint.output_limit(self.body) or 0)


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _ApiError(400, f"Invalid '{name}': expected an integer of at least 1.", param=name)
    return value


def _output_limit(endpoint: Endpoint, body: Mapping[str, Any]) -> int | None:
    """The per-choice output limit, after refusing malformed limits and ``n`` with a 400."""
    limits = [_positive_int(body, key) for key in endpoint.limit_keys]
    if endpoint.per_choice:
        _positive_int(body, "n")
    return next((limit for limit in limits if limit is not None), None)


def _check_input(body: Mapping[str, Any]) -> None:
    value = body.get("input")
    if not (isinstance(value, str) or (isinstance(value, list) and value)):
        raise _ApiError(400, "'input' must be a non-empty string or array.", param="input")


class _Answers:
    """Checks bodies and writes replies, with a cache of prompt-token counts."""

    def __init__(self, config: SimConfig, prices: PriceTable) -> None:
        self.config = config
        self.prices = prices
        self._prompt_cache: dict[tuple[str, bytes], int] = {}

    def clear(self) -> None:
        self._prompt_cache.clear()

    def price(self, requested: str, served: str | None = None) -> Price | None:
        """The price of the model the response names when the table knows it (a snapshot
        with its own entry costs what it costs), else the requested model's."""
        own = self.prices.lookup(served) if served else None
        return own or self.prices.lookup(requested)

    def prompt_tokens(self, url: str, body: dict[str, Any], digest: bytes) -> int:
        """Input tokens of a body (raises what the token counter raises on a bad body)."""
        key = (url, digest)
        tokens = self._prompt_cache.get(key)
        if tokens is None:
            tokens = count_request(url, body).tokens
            if len(self._prompt_cache) >= _PROMPT_CACHE_MAX:
                self._prompt_cache.clear()
            self._prompt_cache[key] = tokens
        return tokens

    def prepare(self, url: str, raw: bytes) -> _Request:
        """Check a body as the API would; raises ``_ApiError`` with the API's 400 or 404."""
        try:
            body = json.loads(raw)
        except ValueError:
            message = (
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly.)"
            )
            raise _ApiError(400, message) from None
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            raise _ApiError(400, "You must provide a model parameter.")
        if b"__sim_400__" in raw:
            message = (
                "This model's maximum context length is 128000 tokens. However, your messages "
                "resulted in 131072 tokens. Please reduce the length of the messages."
            )
            raise _ApiError(400, message, code="context_length_exceeded", param="messages")
        asked = body.get("service_tier")
        if asked is not None and asked not in _SERVICE_TIERS:
            message = (
                f"Invalid value for 'service_tier': {json.dumps(asked)}. Supported values are: "
                + ", ".join(f"'{t}'" for t in _SERVICE_TIERS)
                + "."
            )
            raise _ApiError(400, message, param="service_tier")
        tier = self.config.response_service_tier or (
            "default" if asked in (None, "auto") else asked
        )
        served = self.config.response_model or _SNAPSHOTS.get(model, model)
        price = None if b"__sim_404__" in raw else self.price(model, served)
        if price is None:
            message = f"The model `{model}` does not exist or you do not have access to it."
            raise _ApiError(404, message, code="model_not_found")
        endpoint = ENDPOINTS[url]
        digest = hashlib.sha256(raw).digest()
        limit = _output_limit(endpoint, body)
        if endpoint is EMBEDDINGS:
            _check_input(body)
        try:
            prompt = self.prompt_tokens(url, body, digest)
        except Exception as exc:  # the token counter refused the body: so would the API
            raise _ApiError(400, f"Invalid request body: {exc}") from None
        return _Request(endpoint, body, model, served, price, digest, prompt, limit, tier)

    def reply(self, req: _Request) -> tuple[dict[str, Any], _Tokens]:
        """The 200 body and its usage."""
        if req.endpoint is EMBEDDINGS:
            return _embeddings(req)
        config = self.config
        choices = req.endpoint.choices(req.body)
        if config.output_share is not None and not config.usage_ignores_limits:
            sizes = _realistic_sizes(req.digest, choices, req.limit, config.output_share)
        else:
            sizes = _completion_sizes(req.digest, choices, req.limit, config.usage_ignores_limits)
        if config.fixed_output_tokens is not None:
            sizes = [config.fixed_output_tokens] * len(sizes)
        output = sum(sizes)
        reasoning = output // 2 if _is_reasoning(req.model) else 0
        prompt = req.prompt
        if config.input_factor != 1.0:
            prompt = math.ceil(prompt * config.input_factor)
        if req.endpoint is RESPONSES and (
            req.body.get("previous_response_id") or req.body.get("conversation")
        ):
            prompt += config.conversation_tokens  # the stored conversation, billed as input
        tokens = _Tokens(prompt, _cached_tokens(req.digest, req.prompt), output, reasoning)
        texts = json_texts(req.endpoint.url, req.body, req.digest, choices, config)
        if req.endpoint is CHAT:
            return _chat(req, sizes, tokens, texts), tokens
        return _response(req, tokens, texts), tokens


def _usage(endpoint: Endpoint, tokens: _Tokens) -> dict[str, Any]:
    """A usage object with the endpoint's own field names (``Endpoint.usage_fields``)."""
    in_key, out_key, in_details, out_details = endpoint.usage_fields
    extra_in, extra_out = _CHAT_DETAILS if endpoint is CHAT else ({}, {})
    usage: dict[str, Any] = {in_key: tokens.input}
    if out_key:
        usage[out_key] = tokens.output
    usage["total_tokens"] = tokens.input + tokens.output
    if in_details:
        usage[in_details] = {"cached_tokens": tokens.cached, **extra_in}
    if out_details:
        usage[out_details] = {"reasoning_tokens": tokens.reasoning, **extra_out}
    return usage


def _embeddings(req: _Request) -> tuple[dict[str, Any], _Tokens]:
    body = req.body
    dims = body.get("dimensions")
    dims = dims if isinstance(dims, int) and 0 < dims <= 4096 else _EMBED_DIMS
    b64 = body.get("encoding_format") == "base64"  # the openai client's default
    data = [
        {"object": "embedding", "index": i, "embedding": _embedding(req.digest, i, dims, b64)}
        for i in range(EMBEDDINGS.inputs_of(body))
    ]
    tokens = _Tokens(req.prompt, 0, 0, 0)
    payload = {
        "object": "list",
        "data": data,
        "model": req.served,
        "usage": _usage(EMBEDDINGS, tokens),
    }
    return payload, tokens


def _chat(
    req: _Request, sizes: list[int], tokens: _Tokens, texts: list[tuple[str, bool]] | None = None
) -> dict[str, Any]:
    """``texts``: the choices' contents when the request asks for JSON, and whether each was
    cut short (``outputs``)."""
    limit = req.limit
    choices: list[dict[str, Any]] = [
        {
            "index": i,
            "message": {
                "role": "assistant",
                "content": texts[i][0]
                if texts is not None
                else _text(req.digest, k - k // 2 if tokens.reasoning else k),
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "length"
            if (texts[i][1] if texts is not None else limit is not None and k >= limit)
            else "stop",
        }
        for i, k in enumerate(sizes)
    ]
    return {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.served,
        "choices": choices,
        "usage": _usage(CHAT, tokens),
        "service_tier": req.tier,
        "system_fingerprint": "fp_simulator",
    }


def _response(
    req: _Request, tokens: _Tokens, texts: list[tuple[str, bool]] | None = None
) -> dict[str, Any]:
    body, limit = req.body, req.limit
    truncated = texts[0][1] if texts is not None else limit is not None and tokens.output >= limit
    message = {
        "type": "message",
        "id": _new_id("msg_"),
        "status": "incomplete" if truncated else "completed",
        "role": "assistant",
        "content": [
            {
                "type": "output_text",
                "text": texts[0][0]
                if texts is not None
                else _text(req.digest, tokens.output - tokens.reasoning),
                "annotations": [],
            }
        ],
    }
    return {
        "id": _new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if truncated else "completed",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": limit,
        "model": req.served,
        "output": [message],
        "parallel_tool_calls": True,
        "temperature": body.get("temperature", 1.0),
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "service_tier": req.tier,
        "usage": _usage(RESPONSES, tokens),
    }


def _completion_sizes(digest: bytes, n: int, limit: int | None, overrun: bool) -> list[int]:
    """Deterministic completion lengths, one per choice: in [1, min(limit, 64)], or with
    ``overrun`` in (limit, 4 x limit] (a server that ignores the limit)."""
    sizes = []
    for i in range(n):
        if i == 0:
            h = digest[8:12]
        else:
            h = hashlib.blake2b(digest + i.to_bytes(4, "big"), digest_size=4).digest()
        r = int.from_bytes(h, "big")
        if overrun and limit:
            sizes.append(limit + 1 + r % (3 * limit))
        else:
            cap = min(limit, _MAX_COMPLETION) if limit else _MAX_COMPLETION
            sizes.append(1 + r % cap)
    return sizes


_SIGMA = 0.6  # spread of log output lengths: about a third of bodies below half the median


def _realistic_sizes(digest: bytes, n: int, limit: int | None, share: float) -> list[int]:
    """Completion lengths around ``share`` of the limit, lognormal per body (deterministic:
    the same body always gets the same length), never past the limit."""
    base = limit if limit else 256
    sizes = []
    for i in range(n):
        h = hashlib.blake2b(digest + b"len" + i.to_bytes(4, "big"), digest_size=16).digest()
        u1 = (int.from_bytes(h[:8], "big") + 1) / 2**64
        u2 = int.from_bytes(h[8:], "big") / 2**64
        z = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
        size = round(base * share * math.exp(_SIGMA * z))
        sizes.append(max(1, min(size, limit) if limit else size))
    return sizes


def _cached_tokens(digest: bytes, prompt: int) -> int:
    """One body in three gets a cache hit on its whole 128-token-aligned prefix."""
    if prompt < 1024 or digest[1] % 3:
        return 0
    return min(prompt, 1024 + (prompt - 1024) // 128 * 128)


def _text(digest: bytes, words: int) -> str:
    start = digest[2]
    return " ".join(_WORDS[(start + j) % len(_WORDS)] for j in range(max(words, 1)))


def _is_reasoning(model: str) -> bool:
    return model.startswith(("o", "gpt-5"))


def _embedding(digest: bytes, index: int, dims: int, as_base64: bool) -> list[float] | str:
    raw = hashlib.shake_128(digest + index.to_bytes(4, "big")).digest(dims)
    values = [round((b - 127.5) / 128.0, 6) for b in raw]
    if as_base64:
        return base64.b64encode(struct.pack(f"<{dims}f", *values)).decode("ascii")
    return values
