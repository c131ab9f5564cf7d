"""The price table: what one token of each model costs, and what a request can cost.

A bundled, dated table (``prices.toml``) is merged with an optional user TOML file of the same
shape. Prices are exact integers of picodollars per token (see ``money``). A model that the table
does not know is an error, never $0: an unpriced request would make the spend cap meaningless.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from .calibration import PPM
from .endpoints import MAX_OUTPUT_TOKENS, Endpoint, Usage
from .errors import PriceError, UnknownModelError, UnknownTierError
from .money import price_per_mtok_to_pico_per_token

# "gpt-4o-mini-2024-07-18" -> "gpt-4o-mini"; "gpt-4-0613" -> "gpt-4"; "gpt-3.5-turbo-0125".
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")
_PRICE_FIELDS = (
    "input",
    "cached_input",
    "output",
    "batch_input",
    "batch_cached_input",
    "batch_output",
)
# Optional prices of the service tiers a request may ask for (``service_tier``): priority needs
# its own; flex without its own is billed at the Batch API's prices (OpenAI's flex guide).
TIER_FIELDS = (
    "priority_input",
    "priority_cached_input",
    "priority_output",
    "flex_input",
    "flex_cached_input",
    "flex_output",
)
# The service tiers a request may name; "auto" and "default" are the standard prices.
SERVICE_TIERS = ("auto", "default", "flex", "priority")
_STANDARD_TIERS = frozenset({None, "auto", "default"})


def tier_of(body: Mapping[str, Any]) -> str | None:
    """The tier a request body asks for, as priced: None for standard prices (no
    ``service_tier``, "auto", "default"), else the tier's name (not checked here)."""
    tier = body.get("service_tier")
    return None if tier in _STANDARD_TIERS else str(tier)


def tier_of_json(body_json: str) -> str | None:
    """``tier_of`` of a stored (compact) body; parses it only when it names a tier."""
    if '"service_tier":' not in body_json:
        return None
    try:
        body = json.loads(body_json)
    except ValueError:
        return None
    return tier_of(body) if isinstance(body, dict) else None


def _half_up(pico_per_token: int) -> int:
    """Half a price, rounded up: the Batch API's default discount, never under-billed."""
    return (pico_per_token + 1) // 2


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices in picodollars per token."""

    model: str
    input: int
    cached_input: int  # equals ``input`` for models without a cache discount
    output: int
    batch_input: int
    batch_output: int
    max_output: int | None  # largest possible completion; None if unknown
    source: str
    origin: str = "bundled"  # "bundled" or the user's price file path
    batch_cached_input: int = -1  # -1: half of cached_input (set in __post_init__)
    # Billed input tokens per token tiktoken counts, in ppm: a price file declares it for a
    # model served with its own tokenizer, so worst cases (and the cap) start from it.
    input_factor_ppm: int = PPM
    # Service-tier prices, None where the table has none: a request asking for priority is
    # then refused (never priced as standard); flex falls back to the Batch API's prices.
    priority_input: int | None = None
    priority_cached_input: int | None = None  # None: priority_input (an upper bound)
    priority_output: int | None = None
    flex_input: int | None = None
    flex_cached_input: int | None = None  # None: flex_input (an upper bound)
    flex_output: int | None = None
    # Whether the model takes ``service_tier: "flex"`` (``flex = true`` in the table, or flex
    # prices given): ``--via auto`` then sends its synchronous tail at flex (see
    # ``backends.auto``). None: not said (flex prices, if any, decide).
    flex: bool | None = None

    def __post_init__(self) -> None:
        if self.batch_cached_input < 0:
            object.__setattr__(self, "batch_cached_input", _half_up(self.cached_input))

    def rates(self, batch: bool = False, tier: str | None = None) -> tuple[int, int, int]:
        """(input, cached input, output) per token: the one place a lane and a service tier
        become prices. The Batch API bills batch prices whatever the tier; otherwise None,
        "auto" and "default" are standard, "flex" is its own prices or else the Batch API's,
        and "priority" needs its own. Raises UnknownTierError for a tier without prices."""
        if batch:
            return self.batch_input, self.batch_cached_input, self.batch_output
        if tier in _STANDARD_TIERS:
            return self.input, self.cached_input, self.output
        if tier == "flex":
            if self.flex_input is None or self.flex_output is None:
                return self.batch_input, self.batch_cached_input, self.batch_output
            cached = self.flex_cached_input
            return self.flex_input, self.flex_input if cached is None else cached, self.flex_output
        rate_in, rate_out = self.priority_input, self.priority_output
        if tier == "priority" and rate_in is not None and rate_out is not None:
            cached = self.priority_cached_input
            return rate_in, rate_in if cached is None else cached, rate_out
        raise UnknownTierError(self.model, str(tier))

    @property
    def flex_capable(self) -> bool:
        """Whether the table marks the model as taking ``service_tier: "flex"``: its ``flex``
        flag, else whether it has flex prices of its own."""
        if self.flex is not None:
            return self.flex
        return self.flex_input is not None and self.flex_output is not None

    def prices_tier(self, tier: str | None) -> bool:
        """Whether requests at ``tier`` (see ``rates``) can be priced."""
        try:
            self.rates(tier=tier)
        except UnknownTierError:
            return False
        return True

    def cost(
        self,
        input_tokens: int,
        cached_tokens: int = 0,
        output_tokens: int = 0,
        *,
        batch: bool = False,
        tier: str | None = None,
    ) -> int:
        """Picodollars billed for one response's usage, the way the API bills it (at ``tier``'s
        prices, see ``rates``).

        Cached tokens are a subset of the input tokens; reasoning tokens are already inside
        ``output_tokens`` and must not be added again.
        """
        rate_in, rate_cached, rate_out = self.rates(batch, tier)
        cached = min(max(cached_tokens, 0), input_tokens)
        return (input_tokens - cached) * rate_in + cached * rate_cached + output_tokens * rate_out

    def bounds(
        self,
        input_tokens: int,
        output_limit: int,
        *,
        batch: bool = False,
        requests: int = 1,
        tier: str | None = None,
    ) -> tuple[int, int]:
        """(floor, worst case) of ``requests`` requests with these token sums, at ``tier``'s
        prices: input only, and input plus the whole output limit. Linear in the tokens, so
        sums (of one tier) price like their parts.

        With an ``input_factor`` the input rate is scaled (not the tokens, so sums stay exact),
        and the worst case holds one more input token per request, for the server's rounding.
        """
        rate_in, _, rate_out = self.rates(batch, tier)
        slack = 0
        if self.input_factor_ppm != PPM:
            rate_in = -(-rate_in * self.input_factor_ppm // PPM)
            slack = requests * rate_in
        floor = input_tokens * rate_in
        return floor, floor + slack + output_limit * rate_out

    def expected_input(self, counted: int) -> int:
        """The input tokens the server is expected to bill for ``counted`` of tiktoken's."""
        if self.input_factor_ppm == PPM:
            return counted
        return -(-counted * self.input_factor_ppm // PPM)


@dataclass(slots=True)
class PriceTable:
    """Model name -> Price, with the date the bundled prices were checked."""

    as_of: str
    prices: dict[str, Price]
    sources: dict[str, str] = field(default_factory=dict)
    user_file: str | None = None
    _cache: dict[str, Price] = field(default_factory=dict, repr=False)

    @property
    def marks_flex(self) -> bool:
        """Whether any model of the table is flex-capable (see ``Price.flex_capable``)."""
        return any(p.flex_capable for p in self.prices.values())

    def lookup(self, model: str) -> Price | None:
        """The price for ``model``: its own entry, else its family's for a dated snapshot."""
        hit = self._cache.get(model)
        if hit is not None:
            return hit
        price = self.prices.get(model)
        if price is None:
            family = _SNAPSHOT.sub("", model)
            if family != model:
                price = self.prices.get(family)
        if price is not None:
            self._cache[model] = price
        return price

    def resolve(self, model: str) -> Price:
        price = self.lookup(model)
        if price is None:
            raise UnknownModelError(model)
        return price

    def for_response(self, requested: str, response_model: str | None) -> Price:
        """Bill by the model the response names when the table knows it (its own entry: a
        dated snapshot can cost more than its alias; else its family's), else by the model
        that was requested (see ``settle`` for telling the two apart)."""
        if response_model:
            own = self.lookup(response_model)
            if own is not None:
                return own
        return self.resolve(requested)

    def fingerprint(self) -> str:
        """A digest of every price: a job priced under one table knows when another is used.
        Tier prices count only where set, so tables without them keep their digests."""
        digest = hashlib.sha256()
        for name in sorted(self.prices):
            p = self.prices[name]
            fields = (p.input, p.cached_input, p.output, p.batch_input, p.batch_cached_input)
            factor = f":{p.input_factor_ppm}" if p.input_factor_ppm != PPM else ""
            tiers = "".join(
                f":{key}={value}" for key in TIER_FIELDS if (value := getattr(p, key)) is not None
            )
            if p.flex is not None:
                tiers += f":flex={p.flex}"
            digest.update(
                f"{name}:{fields}:{p.batch_output}:{p.max_output}{factor}{tiers};".encode()
            )
        return digest.hexdigest()

    def settle(
        self,
        requested: str,
        usage: Usage,
        *,
        endpoint: Endpoint | None = None,
        batch: bool = False,
        tier: str | None = None,
        asked: str | None = None,
    ) -> Bill:
        """What one response costs, by the model it names and the tier it reports (``tier``;
        the request's own, ``asked``, when it reports none), and what could not be priced.

        A response naming a model the table does not know is priced at the requested model
        and says so (``Bill.unpriced_model``); one reporting a tier its model has no prices
        for is priced at the requested tier and says so (``Bill.unpriced_tier``): the caller
        books such a result at its worst case. At Batch API prices (``batch``) the tier does
        not matter. An endpoint without output (embeddings) is billed for its input alone.
        """
        unpriced_model = None
        price = self.lookup(usage.model) if usage.model else None
        if price is None:
            price = self.resolve(requested)
            if usage.model:
                unpriced_model = usage.model
        reported = asked if tier is None else (None if tier in _STANDARD_TIERS else tier)
        unpriced_tier = None
        if not batch and not price.prices_tier(reported):
            unpriced_tier, reported = reported, asked
            if not price.prices_tier(reported):
                reported = None
        output = usage.output_tokens if endpoint is None or endpoint.has_output else 0
        pico = price.cost(
            usage.input_tokens, usage.cached_tokens, output, batch=batch, tier=reported
        )
        return Bill(pico, unpriced_model, unpriced_tier, None if batch else reported)

    def bill(
        self,
        requested: str,
        usage: Usage,
        *,
        endpoint: Endpoint | None = None,
        batch: bool = False,
        tier: str | None = None,
    ) -> int:
        """Picodollars the API bills for one response (at Batch API prices when ``batch``, else
        at ``tier``'s); see ``settle``."""
        return self.settle(requested, usage, endpoint=endpoint, batch=batch, tier=tier).pico


@dataclass(frozen=True, slots=True)
class Bill:
    """One response's cost, and what in it the price table could not price (then ``pico`` is
    at the requested model's or tier's prices: a floor, not the bill)."""

    pico: int
    unpriced_model: str | None = None  # the model the response names, unknown to the table
    unpriced_tier: str | None = None  # the tier the response reports, without prices
    tier: str | None = None  # the tier it was priced at (None: standard, or Batch API prices)

    @property
    def priced(self) -> bool:
        return self.unpriced_model is None and self.unpriced_tier is None


def _parse_entry(
    name: str, raw: Any, origin: str, base: Price | None, default_source: str
) -> Price:
    where = f"{origin}: models.{name}"
    if not isinstance(raw, dict):
        raise PriceError(f"{where}: must be a table")
    unknown = set(raw) - {
        *_PRICE_FIELDS, *TIER_FIELDS, "max_output", "source", "input_factor", "flex",
    }  # fmt: skip
    if unknown:
        raise PriceError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    values: dict[str, int] = {}
    for key in _PRICE_FIELDS:
        if key in raw:
            try:
                values[key] = price_per_mtok_to_pico_per_token(raw[key])
            except (TypeError, ValueError) as exc:
                raise PriceError(f"{where}: {key}: {exc}") from None
    tiers = _tier_prices(raw, where)
    max_output = raw.get("max_output")
    if max_output is not None and (
        not isinstance(max_output, int)
        or isinstance(max_output, bool)
        or not 0 <= max_output <= MAX_OUTPUT_TOKENS
    ):
        raise PriceError(
            f"{where}: max_output: must be a whole number of tokens, at most {MAX_OUTPUT_TOKENS:,}"
        )
    source = str(raw.get("source", default_source))
    factor = _input_factor(raw.get("input_factor"), where)
    flex = raw.get("flex")
    if flex is not None and not isinstance(flex, bool):
        raise PriceError(f"{where}: flex: must be true or false (takes service_tier flex)")
    tiers_flag: dict[str, Any] = {} if flex is None else {"flex": flex}
    if base is not None:
        merged = replace(base, origin=origin, source=source)
        if factor is not None:
            merged = replace(merged, input_factor_ppm=factor)
        if "input" in values and "cached_input" not in values and base.cached_input == base.input:
            values["cached_input"] = values["input"]
        # Batch prices not given follow the standard prices they halve.
        for std, bat in (("input", "batch_input"), ("output", "batch_output")):
            if std in values and bat not in values:
                values[bat] = _half_up(values[std])
        if "batch_cached_input" not in values:
            cached = values.get("cached_input", base.cached_input)
            values["batch_cached_input"] = _half_up(cached)
        for key, val in values.items():
            merged = replace(merged, **{key: val})
        if max_output is not None:
            merged = replace(merged, max_output=max_output)
        return replace(merged, **tiers, **tiers_flag) if tiers or tiers_flag else merged
    for key in ("input", "output"):
        if key not in values:
            raise PriceError(f"{where}: {key} is required for a model not in the bundled table")
    return Price(
        model=name,
        input=values["input"],
        cached_input=values.get("cached_input", values["input"]),
        output=values["output"],
        batch_input=values.get("batch_input", _half_up(values["input"])),
        batch_output=values.get("batch_output", _half_up(values["output"])),
        batch_cached_input=values.get(
            "batch_cached_input", _half_up(values.get("cached_input", values["input"]))
        ),
        max_output=max_output if max_output is not None else (0 if values["output"] == 0 else None),
        source=source,
        origin=origin,
        input_factor_ppm=PPM if factor is None else factor,
        **tiers,
        **tiers_flag,
    )


def _tier_prices(raw: dict[str, Any], where: str) -> dict[str, int]:
    """A price entry's service-tier prices (picodollars per token), those given only. A tier's
    input and output go together: half a tier could not price a request."""
    values: dict[str, int] = {}
    for key in TIER_FIELDS:
        if key in raw:
            try:
                values[key] = price_per_mtok_to_pico_per_token(raw[key])
            except (TypeError, ValueError) as exc:
                raise PriceError(f"{where}: {key}: {exc}") from None
    for tier in ("priority", "flex"):
        given = [k for k in (f"{tier}_input", f"{tier}_output") if k in values]
        if len(given) == 1 or (f"{tier}_cached_input" in values and not given):
            raise PriceError(
                f"{where}: {tier}_input and {tier}_output must be given together "
                f"({tier}_cached_input is optional)"
            )
    return values


def _input_factor(value: Any, where: str) -> int | None:
    """A price file's ``input_factor`` (a number of 0.5 to 4) in ppm, or None if not given."""
    if value is None:
        return None
    try:
        number = Decimal(str(value)) if not isinstance(value, bool) else None
    except ArithmeticError:
        number = None
    if number is None or not number.is_finite() or not Decimal("0.5") <= number <= 4:
        raise PriceError(
            f"{where}: input_factor: must be a number from 0.5 to 4 (billed input tokens per "
            "token tiktoken counts)"
        )
    return int((number * PPM).to_integral_value(rounding="ROUND_CEILING"))


def _load_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        # Decimal keeps "0.075" exact even when written as a bare TOML float.
        return tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise PriceError(f"{origin}: invalid TOML: {exc}") from None


def load_price_table(user_file: str | Path | None = None) -> PriceTable:
    """The bundled table, with ``user_file``'s entries overriding or adding models."""
    bundled = _load_toml(
        resources.files("runner").joinpath("prices.toml").read_text("utf-8"), "prices.toml"
    )
    sources = {str(k): str(v) for k, v in bundled.get("sources", {}).items()}
    prices: dict[str, Price] = {}
    for name, raw in bundled["models"].items():
        prices[name] = _parse_entry(name, raw, "bundled", None, "bundled")
    table = PriceTable(as_of=str(bundled["as_of"]), prices=prices, sources=sources)
    if user_file is None:
        return table
    path = Path(user_file)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PriceError(f"{path}: cannot read price file: {exc.__class__.__name__}") from None
    user = _load_toml(text, str(path))
    models = user.get("models")
    if not isinstance(models, dict) or not models:
        raise PriceError(f"{path}: expected at least one [models.NAME] table")
    for name, raw in models.items():
        prices[name] = _parse_entry(name, raw, str(path), prices.get(name), "user price file")
    if "as_of" in user:
        table.as_of = f"{table.as_of} (user file as of {user['as_of']})"
    table.user_file = str(path)
    return table
