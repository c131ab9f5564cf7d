"""An OpenAI-compatible HTTP server for tests, benchmarks and demos.

It answers ``POST /v1/chat/completions``, ``/v1/responses`` and ``/v1/embeddings`` with bodies
shaped like the real API's, enforces RPM/TPM token buckets with the real headers and 429 bodies,
injects faults from a seeded RNG, and keeps an exact billing ledger, so that batchrun's own spend
accounting can be checked against what a server actually billed. Control endpoints:
``GET /_sim/ledger``, ``GET|POST /_sim/config`` (POST = JSON patch of ``SimConfig``) and
``POST /_sim/reset`` (ledger, buckets and RNG; not the config).

Replies are deterministic given the request body (sha256 of its bytes), so tests can predict
them. The server is aiohttp's low-level ``web.Server`` (no router, no access log) to stay fast.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import os
import random
import signal
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from .money import format_exact, usd_to_pico
from .pricing import Price, PriceTable, load_price_table
from .tokens import count_request

__all__ = ["Ledger", "SimConfig", "Simulator", "SimulatorThread", "go_duration", "serve"]

ORG = "org-sim"
CHAT, RESPONSES, EMBEDDINGS = "/v1/chat/completions", "/v1/responses", "/v1/embeddings"
_ENDPOINTS = frozenset({CHAT, RESPONSES, EMBEDDINGS})
# Aliases the real API answers with a dated snapshot; pricing must follow the snapshot.
_SNAPSHOTS = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-4o": "gpt-4o-2024-08-06"}
_FAULTS = ("429", "500", "503", "reset", "reset_after_bill", "slow", "invalid_json", "html")
_MAX_COMPLETION = 64
_EMBED_DIMS = 8
_PROMPT_CACHE_MAX = 65_536
_WORDS = (
    "sim", "reply", "token", "batch", "alpha", "beta", "gamma", "delta",
    "one", "two", "three", "four", "red", "green", "blue", "done",
)  # fmt: skip
_LIMITS_URL = "Visit https://platform.openai.com/account/rate-limits to learn more."
_HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


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


def mask_key(key: str) -> str:
    """The API's masked form of a key (first 3 + last 4); short keys are hidden entirely."""
    return f"{key[:3]}...{key[-4:]}" if len(key) >= 12 else "***"


@dataclass(slots=True)
class SimConfig:
    """What the simulator enforces and injects; every default means unlimited and fault-free."""

    rpm: int | None = None
    tpm: int | None = None
    latency_ms: float = 0.0
    latency_jitter: float = 0.0  # fraction of latency_ms, uniform +-
    p_429: float = 0.0
    p_500: float = 0.0
    p_503: float = 0.0
    p_reset: float = 0.0
    p_reset_after_bill: float = 0.0
    p_slow: float = 0.0
    slow_s: float = 5.0
    p_invalid_json: float = 0.0
    p_html: float = 0.0
    p_429_retry_ms: float = 100.0  # retry-after-ms of an injected 429
    seed: int = 0
    quota_usd: str | None = None
    api_key: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings that would make the server misbehave instead of the client."""
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None")
        probs = [getattr(self, f"p_{f}") for f in _FAULTS]
        if any(not 0 <= p <= 1 for p in probs) or sum(probs) > 1 + 1e-9:
            raise ValueError("fault probabilities must be in [0, 1] and sum to at most 1")
        if min(self.latency_ms, self.latency_jitter, self.slow_s, self.p_429_retry_ms) < 0:
            raise ValueError("latencies and delays must not be negative")
        if self.quota_usd is not None:
            usd_to_pico(self.quota_usd)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a patch atomically: unknown fields or invalid values change nothing."""
        known = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown config field {name!r}")
            values[name] = _coerce(name, str(known[name].type), value)
        dataclasses.replace(self, **values)  # runs validate() on a copy
        for name, value in values.items():
            setattr(self, name, value)


def _coerce(name: str, kind: str, value: Any) -> Any:
    """Accept JSON/CLI values for a field whose annotation is ``kind``."""
    if value is None:
        if "None" not in kind:
            raise ValueError(f"{name} must not be null")
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}: booleans are not accepted")
    if kind.startswith("int"):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise ValueError(f"{name} must be an integer")
        return value
    if kind.startswith("float"):
        if not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


@dataclass(slots=True)
class Ledger:
    """What the simulated API billed: the ground truth batchrun's own accounting must match."""

    requests_received: int = 0
    requests_billed: int = 0
    billed_pico: int = 0
    duplicate_bodies: int = 0  # billed bodies byte-identical to one billed before
    rate_limited: int = 0  # 429s of type requests/tokens, injected ones included
    status_counts: dict[str, int] = field(default_factory=dict)  # also "reset", "reset_after_bill"
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)  # by requested model
    seen_bodies: set[bytes] = field(default_factory=set, repr=False)

    @property
    def billed_usd(self) -> str:
        """Exact decimal dollars, never rounded."""
        return format_exact(self.billed_pico)

    def clear(self) -> None:
        """Back to zero in place, so references held by callers stay live."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default_factory() if callable(f.default_factory) else f.default)

    def count(self, status: str) -> None:
        self.status_counts[status] = self.status_counts.get(status, 0) + 1

    def bill(self, model: str, digest: bytes, usage: tuple[int, int, int], pico: int) -> None:
        """Record one billed request; ``usage`` is (input, cached, output) tokens."""
        self.requests_billed += 1
        self.billed_pico += pico
        if digest in self.seen_bodies:
            self.duplicate_bodies += 1
        else:
            self.seen_bodies.add(digest)
        row = self.by_model.get(model)
        if row is None:
            row = self.by_model[model] = dict.fromkeys(
                ("requests", "input_tokens", "cached_tokens", "output_tokens", "billed_pico"), 0
            )
        row["requests"] += 1
        row["input_tokens"] += usage[0]
        row["cached_tokens"] += usage[1]
        row["output_tokens"] += usage[2]
        row["billed_pico"] += pico

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests_received": self.requests_received,
            "requests_billed": self.requests_billed,
            "billed_pico": self.billed_pico,
            "billed_usd": self.billed_usd,
            "duplicate_bodies": self.duplicate_bodies,
            "rate_limited": self.rate_limited,
            "status_counts": dict(self.status_counts),
            "by_model": {m: dict(row) for m, row in self.by_model.items()},
        }


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


@dataclass(slots=True)
class _Rejection:
    kind: str  # "requests" or "tokens"
    message: str
    retry_s: float | None  # None: retrying cannot help (request too large)


class _Limiter:
    """RPM and TPM buckets; a rejected request still spends one unit of request capacity."""

    def __init__(self) -> None:
        self.requests: _Bucket | None = None
        self.tokens: _Bucket | None = None

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

    def admit(self, model: str, weight: int, spend_tokens: bool = True) -> _Rejection | None:
        """Spend capacity for one request, or say why it is rejected."""
        req, tok = self.requests, self.tokens
        head = f"for {model} in organization {ORG} on"
        if req is not None and req.level < 1:
            used = req.used()
            self._spend_request()
            wait = req.seconds_until(1)
            return _Rejection(
                "requests",
                f"Rate limit reached {head} requests per min (RPM): Limit {req.capacity}, "
                f"Used {used}, Requested 1. Please try again in {go_duration(wait)}. "
                + _LIMITS_URL,
                wait,
            )
        if tok is not None and weight > tok.capacity:
            self._spend_request()
            return _Rejection(
                "tokens",
                f"Request too large {head} tokens per min (TPM): Limit {tok.capacity}, "
                f"Requested {weight}. The input or output tokens must be reduced in order to "
                "run successfully. " + _LIMITS_URL,
                None,
            )
        if tok is not None and tok.level < weight:
            used = tok.used()
            self._spend_request()
            wait = tok.seconds_until(weight)
            return _Rejection(
                "tokens",
                f"Rate limit reached {head} tokens per min (TPM): Limit {tok.capacity}, "
                f"Used {used}, Requested {weight}. Please try again in {go_duration(wait)}. "
                + _LIMITS_URL,
                wait,
            )
        self._spend_request()
        if tok is not None and spend_tokens:
            tok.level -= weight
        return None

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(bucket.capacity)
                out[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(bucket.level)))
                out[f"x-ratelimit-reset-{kind}"] = go_duration(
                    (bucket.capacity - bucket.level) / bucket.rate
                )
        return out


class _BadRequest(Exception):
    """A body the real API would refuse with 400 invalid_request_error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadRequest(f"Invalid '{name}': expected an integer of at least 1.", name)
    return value


def _output_plan(path: str, body: Mapping[str, Any]) -> tuple[int, int | None]:
    """(number of completions, output-token limit or None) as the rate limiter counts them."""
    if path == CHAT:
        limit = _positive_int(body, "max_completion_tokens")
        if limit is None:
            limit = _positive_int(body, "max_tokens")
        return _positive_int(body, "n") or 1, limit
    if path == RESPONSES:
        return 1, _positive_int(body, "max_output_tokens")
    return 1, None


def _completion_sizes(digest: bytes, n: int, limit: int | None) -> list[int]:
    """Deterministic completion lengths in [1, min(limit, 64)], one per choice."""
    cap = min(limit, _MAX_COMPLETION) if limit else _MAX_COMPLETION
    sizes = [1 + int.from_bytes(digest[8:12], "big") % cap]
    for i in range(1, n):
        h = hashlib.blake2b(digest + i.to_bytes(4, "big"), digest_size=4).digest()
        sizes.append(1 + int.from_bytes(h, "big") % cap)
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


def _id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _embedding(digest: bytes, index: int, dims: int, as_base64: bool) -> list[float] | str:
    raw = hashlib.shake_128(digest + index.to_bytes(4, "big")).digest(dims)
    values = [round((b - 127.5) / 128.0, 6) for b in raw]
    if as_base64:
        return base64.b64encode(struct.pack(f"<{dims}f", *values)).decode("ascii")
    return values


def _embedding_inputs(body: Mapping[str, Any]) -> int:
    """How many vectors the request asks for (a string, tokens, or a list of either)."""
    value = body.get("input")
    if isinstance(value, str):
        return 1
    if isinstance(value, list) and value:
        return 1 if all(isinstance(v, int) for v in value) else len(value)
    raise _BadRequest("'input' must be a non-empty string or array.", "input")


def _json(status: int, payload: Any, headers: dict[str, str]) -> web.Response:
    headers["Content-Type"] = "application/json"
    return web.Response(status=status, body=json.dumps(payload).encode(), headers=headers)


def _error(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    headers: dict[str, str],
    param: str | None = None,
) -> tuple[str, web.StreamResponse]:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return str(status), _json(status, {"error": error}, headers)


class Simulator:
    """The server: one instance per port, state kept on ``ledger`` and ``config``."""

    def __init__(self, config: SimConfig | None = None, prices: PriceTable | None = None) -> None:
        self.config = config if config is not None else SimConfig()
        self.prices = prices if prices is not None else load_price_table()
        self.ledger = Ledger()
        self.base_url = ""
        self._limiter = _Limiter()
        self._rng = random.Random(self.config.seed)
        self._jitter_rng = random.Random(self.config.seed + 1)
        self._seeded = self.config.seed
        self._prompt_cache: dict[tuple[str, bytes], int] = {}
        self._quota: tuple[str, int] | None = None
        self._runner: web.ServerRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port) and return the base URL (``.../v1``)."""
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{bound}/v1"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def reset(self) -> None:
        """Forget everything billed and seen, refill the buckets, reseed the RNG."""
        self.ledger.clear()
        self._limiter = _Limiter()
        self._reseed()
        self._prompt_cache.clear()

    def _reseed(self) -> None:
        self._rng.seed(self.config.seed)
        self._jitter_rng.seed(self.config.seed + 1)
        self._seeded = self.config.seed

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_sim/"):
            return await self._control(request, path)
        self.ledger.requests_received += 1
        headers = {"x-request-id": _id("req_")}
        status, response = await self._api(request, path, headers)
        self.ledger.count(status)
        return response

    async def _control(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        headers: dict[str, str] = {}
        method = request.method
        if path == "/_sim/ledger" and method == "GET":
            return _json(200, self.ledger.to_dict(), headers)
        if path == "/_sim/config" and method in ("GET", "POST"):
            if method == "POST":
                try:
                    patch = json.loads(await request.read())
                    if not isinstance(patch, dict):
                        raise ValueError("expected a JSON object")
                    self.config.update(patch)
                except ValueError as exc:
                    return _error(400, str(exc), "invalid_request_error", None, headers)[1]
            return _json(200, dataclasses.asdict(self.config), headers)
        if path == "/_sim/reset" and method == "POST":
            self.reset()
            return _json(200, self.ledger.to_dict(), headers)
        _, response = _error(
            404, f"Invalid URL ({method} {path})", "invalid_request_error", None, {}
        )
        return response

    def _quota_pico(self) -> int | None:
        quota = self.config.quota_usd
        if quota is None:
            return None
        if self._quota is None or self._quota[0] != quota:
            self._quota = (quota, usd_to_pico(quota))
        return self._quota[1]

    def _prompt_tokens(self, path: str, body: dict[str, Any], digest: bytes) -> int:
        key = (path, digest)
        tokens = self._prompt_cache.get(key)
        if tokens is None:
            tokens = count_request(path, body).tokens
            if len(self._prompt_cache) >= _PROMPT_CACHE_MAX:
                self._prompt_cache.clear()
            self._prompt_cache[key] = tokens
        return tokens

    def _draw_fault(self) -> str | None:
        config = self.config
        if config.seed != self._seeded:
            self._reseed()
        u = self._rng.random()
        for name in _FAULTS:
            p = getattr(config, f"p_{name}")
            if u < p:
                return name
            u -= p
        return None

    def _price(self, requested: str, served: str) -> Price | None:
        """The response's snapshot has its own price when it costs differently."""
        return self.prices.prices.get(served) or self.prices.lookup(requested)

    async def _api(
        self, request: web.BaseRequest, path: str, headers: dict[str, str]
    ) -> tuple[str, web.StreamResponse]:
        """Answer one API request; returns the status label for the ledger and the response."""
        config, limiter = self.config, self._limiter
        limiter.sync(config, time.monotonic())
        headers.update(limiter.headers())
        invalid = "invalid_request_error"
        if request.method != "POST" or path not in _ENDPOINTS:
            return _error(404, f"Invalid URL ({request.method} {path})", invalid, None, headers)
        raw = await request.content.read()  # unlike request.read(), no 1 MB cap

        if config.api_key is not None:
            auth = request.headers.get("Authorization", "")
            given = auth[7:] if auth.startswith("Bearer ") else ""
            if not given:
                message = (
                    "You didn't provide an API key. You need to provide your API key in an "
                    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                )
                return _error(401, message, invalid, None, headers)
            if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                message = (
                    f"Incorrect API key provided: {mask_key(given)}. You can find your API key "
                    "at https://platform.openai.com/account/api-keys."
                )
                return _error(401, message, invalid, "invalid_api_key", headers)

        try:
            body = json.loads(raw)
        except ValueError:
            message = (
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly.)"
            )
            return _error(400, message, invalid, None, headers)
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            return _error(400, "You must provide a model parameter.", invalid, None, headers)
        if b"__sim_400__" in raw:
            message = (
                "This model's maximum context length is 128000 tokens. However, your messages "
                "resulted in 131072 tokens. Please reduce the length of the messages."
            )
            return _error(400, message, invalid, "context_length_exceeded", headers, "messages")
        served = _SNAPSHOTS.get(model, model)
        price = None if b"__sim_404__" in raw else self._price(model, served)
        if price is None:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return _error(404, message, invalid, "model_not_found", headers)

        digest = hashlib.sha256(raw).digest()
        try:
            n, limit = _output_plan(path, body)
            inputs = _embedding_inputs(body) if path == EMBEDDINGS else 0
            prompt = self._prompt_tokens(path, body, digest)
        except _BadRequest as exc:
            return _error(400, str(exc), invalid, None, headers, exc.param)
        except Exception as exc:  # the token counter refused the body: so would the API
            return _error(400, f"Invalid request body: {exc}", invalid, None, headers)

        quota = self._quota_pico()
        if quota is not None and self.ledger.billed_pico >= quota:
            message = (
                "You exceeded your current quota, please check your plan and billing details. "
                "For more information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors."
            )
            return _error(429, message, "insufficient_quota", "insufficient_quota", headers)

        fault = self._draw_fault()
        rejection = limiter.admit(model, prompt + n * (limit or 0), spend_tokens=fault != "429")
        headers.update(limiter.headers())
        if rejection is None and fault == "429":
            wait = config.p_429_retry_ms / 1000
            used = config.rpm or 10_000
            rejection = _Rejection(
                "requests",
                f"Rate limit reached for {model} in organization {ORG} on requests per min (RPM):"
                f" Limit {used}, Used {used}, Requested 1. Please try again in "
                f"{go_duration(wait)}. " + _LIMITS_URL,
                wait,
            )
        if rejection is not None:
            self.ledger.rate_limited += 1
            if rejection.retry_s is not None:
                headers["retry-after-ms"] = str(math.ceil(rejection.retry_s * 1000))
                headers["retry-after"] = str(max(1, math.ceil(rejection.retry_s)))
            return _error(429, rejection.message, rejection.kind, "rate_limit_exceeded", headers)

        await self._delay(fault)
        if fault == "reset":
            _abort(request)
            return "reset", web.Response()
        if fault == "500":
            message = "The server had an error while processing your request. Sorry about that!"
            return _error(500, message, "server_error", None, headers)
        if fault == "503":
            message = "The engine is currently overloaded, please try again later."
            return _error(503, message, "server_error", None, headers)
        if fault == "html":
            headers["Content-Type"] = "text/html"
            return "502", web.Response(status=502, body=_HTML_502, headers=headers)

        payload, usage = self._reply(path, body, model, served, digest, prompt, n, limit, inputs)
        self.ledger.bill(model, digest, usage, price.cost(*usage))
        if fault == "invalid_json":
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
            return "200", web.Response(status=200, body=data[: len(data) // 2], headers=headers)
        if fault == "reset_after_bill":
            return "reset_after_bill", await self._reset_mid_body(request, payload, headers)
        return "200", _json(200, payload, headers)

    async def _delay(self, fault: str | None) -> None:
        """Simulated service time; the handler is never cancelled, so slow work is still billed."""
        config = self.config
        delay = config.latency_ms / 1000
        if delay and config.latency_jitter:
            delay *= 1 + config.latency_jitter * (2 * self._jitter_rng.random() - 1)
        if fault == "slow":
            delay += config.slow_s
        if delay > 0:
            await asyncio.sleep(delay)

    async def _reset_mid_body(
        self, request: web.BaseRequest, payload: dict[str, Any], headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send the headers and half the body, then drop the connection."""
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
        response = web.StreamResponse(status=200, headers=headers)
        response.content_length = len(data)
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
        _abort(request)
        return response

    def _reply(
        self,
        path: str,
        body: dict[str, Any],
        requested: str,
        served: str,
        digest: bytes,
        prompt: int,
        n: int,
        limit: int | None,
        inputs: int,
    ) -> tuple[dict[str, Any], tuple[int, int, int]]:
        """The 200 body and its billed usage (input, cached, output tokens)."""
        created = int(time.time())
        if path == EMBEDDINGS:
            dims = body.get("dimensions")
            dims = dims if isinstance(dims, int) and 0 < dims <= 4096 else _EMBED_DIMS
            b64 = body.get("encoding_format") == "base64"  # the openai client's default
            data = [
                {"object": "embedding", "index": i, "embedding": _embedding(digest, i, dims, b64)}
                for i in range(inputs)
            ]
            usage = {"prompt_tokens": prompt, "total_tokens": prompt}
            return {"object": "list", "data": data, "model": served, "usage": usage}, (prompt, 0, 0)

        sizes = _completion_sizes(digest, n, limit)
        output = sum(sizes)
        reasoning = output // 2 if _is_reasoning(requested) else 0
        cached = _cached_tokens(digest, prompt)
        if path == CHAT:
            choices = [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": _text(digest, k - k // 2 if reasoning else k),
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "length" if limit is not None and k == limit else "stop",
                }
                for i, k in enumerate(sizes)
            ]
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": output,
                "total_tokens": prompt + output,
                "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": reasoning,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            }
            payload = {
                "id": _id("chatcmpl-"),
                "object": "chat.completion",
                "created": created,
                "model": served,
                "choices": choices,
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": "fp_simulator",
            }
            return payload, (prompt, cached, output)

        truncated = limit is not None and output == limit
        message = {
            "type": "message",
            "id": _id("msg_"),
            "status": "incomplete" if truncated else "completed",
            "role": "assistant",
            "content": [
                {
                    "type": "output_text",
                    "text": _text(digest, output - reasoning),
                    "annotations": [],
                }
            ],
        }
        payload = {
            "id": _id("resp_"),
            "object": "response",
            "created_at": created,
            "status": "incomplete" if truncated else "completed",
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": limit,
            "model": served,
            "output": [message],
            "parallel_tool_calls": True,
            "temperature": body.get("temperature", 1.0),
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": prompt + output,
            },
        }
        return payload, (prompt, cached, output)


def _abort(request: web.BaseRequest) -> None:
    """Drop the TCP connection with no (further) bytes: the client cannot know the outcome."""
    transport = request.transport
    if transport is not None:
        transport.abort()


_T = TypeVar("_T")


class SimulatorThread:
    """A Simulator on its own event loop in a background thread, for synchronous callers.

    Use as a context manager. State is read and changed on the server's loop, so
    ``ledger_snapshot`` and ``configure`` are safe from any thread.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        prices: PriceTable | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.simulator = Simulator(config, prices)
        self.base_url = ""
        self._address = (host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=loop.run_forever, name="batchrun-simulator", daemon=True
        )
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self.simulator.start(*self._address), loop)
        try:
            self.base_url = future.result(timeout=10)
        except BaseException:
            self.stop()  # e.g. the port is taken: do not leak the thread
            raise
        return self.base_url

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.simulator.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the server's loop and return its result."""
        if self._loop is None:
            return fn()

        async def run() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    @property
    def config(self) -> SimConfig:
        return self.simulator.config

    def ledger_snapshot(self) -> dict[str, Any]:
        return self.call(self.simulator.ledger.to_dict)

    def configure(self, **changes: Any) -> None:
        """Patch the config at runtime (validated; all or nothing)."""
        self.call(lambda: self.simulator.config.update(changes))

    def reset(self) -> None:
        self.call(self.simulator.reset)


async def _serve(config: SimConfig | None, host: str, port: int, prices: PriceTable | None) -> None:
    simulator = Simulator(config, prices)
    print(await simulator.start(host, port), flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        await simulator.stop()


def serve(
    config: SimConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    prices: PriceTable | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, printing the base URL first (for ``batchrun simulate``)."""
    asyncio.run(_serve(config, host, port, prices))


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m runner.simulator", description="OpenAI-compatible simulator server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--prices", help="a user price file merged over the bundled table")
    for f in dataclasses.fields(SimConfig):
        kind = str(f.type)
        convert = int if kind.startswith("int") else float if kind.startswith("float") else str
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=convert)
    args = vars(parser.parse_args(argv))
    host, port, prices = args.pop("host"), args.pop("port"), args.pop("prices")
    config = SimConfig(**{k: v for k, v in args.items() if v is not None})
    serve(config, host, port, load_price_table(prices) if prices else None)


if __name__ == "__main__":
    _main()
