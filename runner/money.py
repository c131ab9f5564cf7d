"""Exact money: integer picodollars (10**-12 USD).

Prices are quoted per million tokens with up to six decimals (``$0.0375`` for a Batch API
cached input token), so one token costs a whole number of picodollars. Integers sum exactly in
Python, SQLite and PostgreSQL alike; a signed 64-bit column holds up to about $9.2 million.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

PICO_PER_USD = 10**12
# The most any amount may be: a signed 64-bit column holds 9.22e18 picodollars ($9.2M).
MAX_PICO = 9_000_000 * PICO_PER_USD
# No model costs more than this per 1M tokens; a larger price is a typo in a price file.
MAX_USD_PER_MTOK = 100_000
# A price per 1M tokens in USD, times this, is the price of one token in picodollars.
PICO_PER_TOKEN_PER_USD_PER_MTOK = 10**6


def usd_to_pico(value: str | int | Decimal) -> int:
    """Parse a dollar amount exactly; refuse fractions of a picodollar and floats."""
    if isinstance(value, float):
        raise TypeError("money must not be a float; pass a string or Decimal")
    try:
        d = Decimal(str(value).strip().lstrip("$"))
    except InvalidOperation:
        raise ValueError(f"not a dollar amount: {value!r}") from None
    if not d.is_finite():
        raise ValueError(f"not a dollar amount: {value!r}")
    pico = d * PICO_PER_USD
    if pico != pico.to_integral_value():
        raise ValueError(f"{value!r} is finer than 10**-12 dollars")
    return int(pico)


def price_per_mtok_to_pico_per_token(value: str | int | Decimal) -> int:
    """$ per 1M tokens -> picodollars per token (exact, at most six decimals)."""
    if isinstance(value, float):
        raise TypeError("prices must not be floats; pass a string or Decimal")
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"not a price: {value!r}") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"not a price: {value!r}")
    if d > MAX_USD_PER_MTOK:
        raise ValueError(f"{value!r} is more than ${MAX_USD_PER_MTOK:,} per 1M tokens")
    per_token = d * PICO_PER_TOKEN_PER_USD_PER_MTOK
    if per_token != per_token.to_integral_value():
        raise ValueError(f"price {value!r} has more than six decimals")
    return int(per_token)


def pico_to_decimal(pico: int) -> Decimal:
    """Picodollars as an exact Decimal number of dollars."""
    return Decimal(pico).scaleb(-12)


def format_usd(pico: int, places: int = 6) -> str:
    """Human display, rounded up so a displayed cost is never below the true one."""
    d = pico_to_decimal(pico)
    q = Decimal(1).scaleb(-places)
    rounded = d.quantize(q, rounding="ROUND_CEILING")
    return f"${rounded:,.{places}f}"


def format_money(pico: int) -> str:
    """Human display with enough digits to read: cents from a dollar up, else two significant
    digits (a $0.005 cap shows as $0.005, never $0.01), at most six decimals; rounded up, so a
    displayed cost is never below the true one."""
    if pico >= PICO_PER_USD or pico <= 0:
        return format_usd(max(pico, 0), 2)
    places = 2
    while places < 6 and pico < 10 ** (12 - places + 1):  # fewer than 2 significant digits
        places += 1
    exact = pico_to_decimal(pico).normalize()
    needed = -exact.as_tuple().exponent  # type: ignore[operator]
    return format_usd(pico, max(2, min(places, needed)) if needed <= places else places)


def format_exact(pico: int) -> str:
    """Exact decimal dollars as a string (for JSON): never rounded."""
    d = pico_to_decimal(pico).normalize()
    if d.as_tuple().exponent > -2:  # at least cents: "0.50", not "0.5"
        d = d.quantize(Decimal("0.01"))
    return format(d, "f")
