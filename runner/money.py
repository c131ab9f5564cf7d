"""Exact money: integer picodollars (10**-12 USD).

Prices are quoted per million tokens with up to six decimals (``$0.0375`` for a Batch API
cached input token), so one token costs a whole number of picodollars. Integers sum exactly in
Python, SQLite and PostgreSQL alike; a signed 64-bit column holds up to about $9.2 million.
"""

from __future__ import annotations

from decimal import ROUND_UP, Decimal, InvalidOperation

PICO_PER_USD = 10**12
# The most any amount may be: a signed 64-bit column holds 9.22e18 picodollars ($9.2M).
MAX_PICO = 9_000_000 * PICO_PER_USD
# No model costs more than this per 1M tokens; a larger price is a typo in a price file.
MAX_USD_PER_MTOK = 100_000
# A price per 1M tokens in USD, times this, is the price of one token in picodollars.
PICO_PER_TOKEN_PER_USD_PER_MTOK = 10**6
CENT = Decimal("0.01")


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


def format_usd(pico: int) -> str:
    """The one way an amount is shown to a person, so ``price``, a run, ``status`` and the report
    agree on every figure:

    - $1 and more: cents, with thousands separators ($12.35, $1,234.50);
    - below $1: four significant digits, trailing zeros dropped down to cents ($0.9837,
      $0.0001234, $0.60, $0.005); an amount that rounds to $1 is shown in cents ($1.00);
    - zero: $0; a negative amount: the same rule after a minus sign (-$0.50).

    Rounded away from zero, so a displayed cost is never below the true one. JSON carries
    :func:`format_exact`'s unrounded strings instead.
    """
    if pico == 0:
        return "$0"
    sign = "-" if pico < 0 else ""
    d = pico_to_decimal(abs(pico))
    if d < 1:
        q = d.quantize(Decimal(1).scaleb(d.adjusted() - 3), rounding=ROUND_UP)
        if q < 1:
            places = max(2, -q.normalize().as_tuple().exponent)  # type: ignore[operator]
            return f"{sign}${q:.{places}f}"
    return f"{sign}${d.quantize(CENT, rounding=ROUND_UP):,.2f}"


# Kept for callers written before the one rule: the same function.
format_money = format_usd


def format_interval(low_pico: int, high_pico: int) -> str:
    """``$3.80-$4.45``: an interval, in the one money format."""
    return f"{format_usd(low_pico)}-{format_usd(high_pico)}"


def format_range(total_pico: int, low_pico: int, high_pico: int, note: str = "") -> str:
    """``$4.10 ($3.80-$4.45)``: a projected amount and its interval (``note`` goes inside the
    parentheses: ``, 95%``)."""
    return f"{format_usd(total_pico)} ({format_interval(low_pico, high_pico)}{note})"


def format_exact(pico: int) -> str:
    """Exact decimal dollars as a string (for JSON): never rounded."""
    d = pico_to_decimal(pico).normalize()
    if d.as_tuple().exponent > -2:  # at least cents: "0.50", not "0.5"
        d = d.quantize(Decimal("0.01"))
    return format(d, "f")
