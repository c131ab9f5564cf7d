"""Every setting of the simulator, each with the help text the CLI shows for it.

This module imports nothing heavy: the ``simulate`` command builds its options from these
fields without loading the server.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..money import usd_to_pico

# Injected faults, drawn from one uniform number per request: their probabilities share [0, 1].
# Append only: the order fixes which request a seed gives which fault.
_FAULTS = (
    "429",
    "500",
    "503",
    "reset",
    "reset_after_bill",
    "slow",
    "invalid_json",
    "html",
    "no_usage",
    "empty_usage",
    "bad_usage",
    "short_embeddings",
    "code_object",
    "inf_header",
    "slowloris",
)

QUEUE_DISTS = ("fixed", "exponential", "lognormal")  # how a batch's queue delay is drawn


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(slots=True, kw_only=True)
class SimConfig:
    """What the simulator enforces and injects; every default is unlimited and fault-free.

    Change a running server's config with ``update`` (or ``POST /_sim/config``): a patch is
    validated as a whole and applied all or nothing.
    """

    # Rate limits
    rpm: int | None = _setting(None, "Requests per minute (a bucket that starts full).")
    tpm: int | None = _setting(
        None, "Tokens per minute, counting prompt + n x the output limit of each request."
    )
    reject_counts_against_limit: bool = _setting(
        True, "A rejected request still spends a unit of request capacity, as the real API's."
    )
    # Latency
    latency_ms: float = _setting(0.0, "Service time of every API request, in milliseconds.")
    latency_jitter: float = _setting(0.0, "Latency varies by up to this fraction, +-.")
    # Injected faults: probabilities per request, at most 1 in all
    p_429: float = _setting(0.0, "Share of requests answered with an injected 429.")
    p_500: float = _setting(0.0, "Share answered 500 server_error (not billed).")
    p_503: float = _setting(0.0, "Share answered 503 overloaded (not billed).")
    p_reset: float = _setting(0.0, "Share whose connection is reset before billing.")
    p_reset_after_bill: float = _setting(0.0, "Share billed, then reset halfway through the body.")
    p_slow: float = _setting(0.0, "Share delayed by --slow-s more (billed even if abandoned).")
    slow_s: float = _setting(5.0, "Extra delay of a slow request, in seconds.")
    p_invalid_json: float = _setting(0.0, "Share billed with a truncated JSON body.")
    p_html: float = _setting(0.0, "Share answered with a proxy's HTML 502 page.")
    p_no_usage: float = _setting(0.0, "Share billed with a 200 body that has no usage.")
    p_empty_usage: float = _setting(0.0, 'Share billed with "usage": {}.')
    p_bad_usage: float = _setting(0.0, 'Share billed with string counts ("prompt_tokens": "12").')
    p_short_embeddings: float = _setting(
        0.0, "Share of embeddings requests billed with fewer vectors than inputs."
    )
    p_code_object: float = _setting(
        0.0, 'Share answered 400 whose error code is an object ({"detail": "bad"}).'
    )
    p_inf_header: float = _setting(
        0.0, "Share billed with x-ratelimit-limit-requests: inf and remaining: nan."
    )
    p_slowloris: float = _setting(
        0.0, "Share billed whose body then arrives at one byte per second."
    )
    # What a 429 says about retrying
    p_429_retry_ms: float = _setting(100.0, "retry-after-ms of an injected 429.")
    retry_headers: bool = _setting(True, "Send retry-after and retry-after-ms on 429s.")
    retry_after: str | None = _setting(
        None, "Send this retry-after value on every 429 (e.g. 99999999, inf)."
    )
    retry_after_ms: str | None = _setting(
        None, "Send this retry-after-ms value on every 429 (e.g. 99999999, inf)."
    )
    # Misbehaving-server modes
    proxy: bool = _setting(
        False,
        "Behave like the LiteLLM proxy: hold over-limit requests instead of 429, no reset "
        "headers, error codes as status strings, a wrong key is 400 no_db_connection.",
    )
    usage_ignores_limits: bool = _setting(
        False, "Completions run past the output limit (up to 4x) and are billed for it."
    )
    input_factor: float = _setting(
        1.0,
        "Bill this multiple of the prompt tokens tiktoken counts, rounded up (a server with a "
        "tokenizer of its own).",
    )
    output_share: float | None = _setting(
        None,
        "Completions run to about this share of their limit (the median; 256 tokens stand in "
        "for no limit), varying lognormally from body to body and cut at the limit, as real "
        "output lengths do. Unset: 1 to 64 tokens, evenly.",
    )
    fixed_output_tokens: int | None = _setting(
        None, "Every completion is this many tokens, whatever its limit (a mock model)."
    )
    # A request with a JSON schema (response_format / text.format json_schema) is answered
    # with a JSON object built from its schema; JSON mode (json_object) with a small object.
    p_output_not_json: float = _setting(
        0.0,
        "Share of answers to requests asking for JSON (a JSON schema, or JSON mode) whose "
        "output is cut short and does not parse; drawn per body (the same body, the same "
        "answer).",
    )
    p_output_mismatch: float = _setting(
        0.0,
        "Share of answers to requests with a JSON schema whose output is JSON that does not "
        "match it (a required property missing, or one too many); drawn per body.",
    )
    response_model: str | None = _setting(
        None,
        "Name this model in every response instead of the one requested (a proxy or router "
        "falling back to another model); billed at its prices when the simulator's price table "
        "knows it, else at the requested model's.",
    )
    response_service_tier: str | None = _setting(
        None,
        "Report this service_tier in every response, and bill at its prices, instead of the "
        "request's own (which is echoed, auto as default, as the real API does); a tier the "
        "simulator's price table has no prices for is billed at standard prices.",
    )
    conversation_tokens: int = _setting(
        0,
        "Extra input tokens billed for a Responses request with previous_response_id or "
        "conversation.",
    )
    echo_key: bool = _setting(
        False, "Put the client's full API key in every JSON body (to catch leaks)."
    )
    # The account
    seed: int = _setting(0, "Seed of the fault RNG: the same seed injects the same faults.")
    quota_usd: str | None = _setting(
        None, "Answer 429 insufficient_quota once this many dollars are billed."
    )
    api_key: str | None = _setting(None, "Require this bearer token (any key when unset).")
    # Batch API
    batch_lines_per_s: float = _setting(1000.0, "Batch lines processed per second.")
    batch_window_s: float = _setting(
        86400.0, 'Seconds a batch may run before it expires (its "24h" window).'
    )
    batch_enqueued_tokens: int | None = _setting(
        None, "Enqueued-token limit per model over validating and in-progress batches."
    )
    batch_p_500: float = _setting(0.0, "Share of batch lines answered 500 (the error file).")
    batch_p_garbled: float = _setting(
        0.0, "Share of billed batch lines written to the output file cut short (unreadable)."
    )
    batch_lose_output: bool = _setting(
        False, "End batches without their output file (a storage fault): lines billed, no results."
    )
    batch_validate_s: float = _setting(0.0, "Seconds a batch spends validating.")
    batch_finalize_s: float = _setting(0.0, "Seconds a batch spends finalizing or cancelling.")
    batch_cancel_s: float | None = _setting(
        None,
        "Seconds a cancelled batch spends cancelling before it is cancelled (the real API: up "
        "to ~10 minutes); unset: --batch-finalize-s.",
    )
    batch_max_requests: int = _setting(50_000, "Most requests one batch input file may hold.")
    batch_max_bytes: int = _setting(200 * 1024 * 1024, "Largest batch input file, in bytes.")
    # Batch timing: when a batch starts and how fast the Batch API works through its lines
    batch_queue_s: float = _setting(
        0.0,
        "Seconds a batch waits in_progress before its first line runs (the queue delay): "
        "exactly this, or the mean of the distribution --batch-queue-dist draws it from.",
    )
    batch_queue_dist: str = _setting(
        "fixed",
        "How each batch's queue delay is drawn around --batch-queue-s: fixed, exponential, "
        "or lognormal (median --batch-queue-s, sigma 1); seeded by --seed.",
    )
    batch_shared_lines_per_s: float | None = _setting(
        None,
        "Batch lines processed per second across all in-progress batches together (they "
        "share it, line by line); unset: each batch runs at --batch-lines-per-s of its own.",
    )
    batch_p_stuck: float = _setting(
        0.0,
        "Share of batches that stay in_progress without progress until they are cancelled "
        "or expire (capacity short at the Batch API); seeded by --seed.",
    )
    # Flex processing (service_tier "flex")
    flex_p_unavailable: float = _setting(
        0.0,
        'Share of service_tier "flex" requests answered 429 resource_unavailable (capacity '
        "short: not billed, not counted against the rate limits).",
    )
    flex_latency_ms: float = _setting(
        0.0, 'Extra service time of a service_tier "flex" request, in milliseconds.'
    )
    flex_refuse_models: str | None = _setting(
        None,
        'Comma-separated models whose service_tier "flex" requests are answered 400 (as some '
        "providers and gateways answer flex for a model without it), never billed.",
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings that would make the server misbehave instead of the client."""
        for f in dataclasses.fields(self):
            kind, optional = _kind(f)
            value = getattr(self, f.name)
            if value is None and optional:
                continue
            if kind is float and not (
                isinstance(value, int | float) and not isinstance(value, bool)
            ):
                raise ValueError(f"{f.name} must be a number")
            if kind is not float and (type(value) is not kind):
                raise ValueError(f"{f.name} must be of type {kind.__name__}")
            if kind is float and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite")
        for name in ("rpm", "tpm", "batch_enqueued_tokens", "batch_max_requests"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer")
        if self.batch_max_bytes < 1:
            raise ValueError("batch_max_bytes must be a positive integer")
        probs = [getattr(self, f"p_{name}") for name in _FAULTS]
        if any(not 0 <= p <= 1 for p in probs) or sum(probs) > 1 + 1e-9:
            raise ValueError("fault probabilities must be in [0, 1] and sum to at most 1")
        for name in ("batch_p_500", "batch_p_garbled", "batch_p_stuck", "flex_p_unavailable"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1]")
        for name in (
            "latency_ms",
            "latency_jitter",
            "slow_s",
            "p_429_retry_ms",
            "conversation_tokens",
            "batch_validate_s",
            "batch_finalize_s",
            "batch_queue_s",
            "flex_latency_ms",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.output_share is not None and not 0 < self.output_share <= 1:
            raise ValueError("output_share must be above 0 and at most 1")
        if not 0 < self.input_factor <= 1000:
            raise ValueError("input_factor must be above 0 and at most 1000")
        if self.fixed_output_tokens is not None and not 1 <= self.fixed_output_tokens <= 100_000:
            raise ValueError("fixed_output_tokens must be from 1 to 100000")
        outputs = (self.p_output_not_json, self.p_output_mismatch)
        if any(not 0 <= p <= 1 for p in outputs) or sum(outputs) > 1 + 1e-9:
            raise ValueError(
                "p_output_not_json and p_output_mismatch must be in [0, 1] and sum to at most 1"
            )
        for name in ("batch_lines_per_s", "batch_window_s", "batch_shared_lines_per_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
        if self.batch_queue_dist not in QUEUE_DISTS:
            raise ValueError(f"batch_queue_dist must be one of {', '.join(QUEUE_DISTS)}")
        for name in (
            "retry_after",
            "retry_after_ms",
            "api_key",
            "response_model",
            "response_service_tier",
            "flex_refuse_models",
        ):
            value = getattr(self, name)
            if value is not None and (not value or not value.isprintable()):
                raise ValueError(f"{name} must be a non-empty printable string")
        if self.quota_usd is not None:
            usd_to_pico(self.quota_usd)
        if self.batch_cancel_s is not None and self.batch_cancel_s < 0:
            raise ValueError("batch_cancel_s must not be negative")

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a patch atomically: unknown fields or invalid values change nothing."""
        known = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown config field {name!r}")
            values[name] = _coerce(known[name], value)
        dataclasses.replace(self, **values)  # runs validate() on a copy
        for name, value in values.items():
            setattr(self, name, value)


@dataclass(frozen=True, slots=True)
class _Setting:
    """One SimConfig field as the CLI sees it."""

    name: str
    kind: type  # int, float, str or bool
    default: Any
    help: str


def _kind(f: dataclasses.Field[Any]) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a field annotated ``T`` or ``T | None``."""
    annotation = str(f.type)
    base = annotation.split("|")[0].strip()
    return {"int": int, "float": float, "str": str, "bool": bool}[base], "None" in annotation


def _settings() -> tuple[_Setting, ...]:
    """Every SimConfig field, in declaration order."""
    out = []
    for f in dataclasses.fields(SimConfig):
        out.append(_Setting(f.name, _kind(f)[0], f.default, f.metadata["help"]))
    return tuple(out)


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    """Accept a JSON value for field ``f``: an integral float for an int, an int for a float."""
    kind, optional = _kind(f)
    if value is None:
        if not optional:
            raise ValueError(f"{f.name} must not be null")
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{f.name} must be true or false")
        return value
    if isinstance(value, bool):
        raise ValueError(f"{f.name}: booleans are not accepted")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise ValueError(f"{f.name} must be an integer")
        return value
    if kind is float:
        if not isinstance(value, int | float):
            raise ValueError(f"{f.name} must be a number")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{f.name} must be a string")
    return value
