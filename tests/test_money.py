"""Exact money: integer picodollars, parsing and display that never round down."""

from __future__ import annotations

from decimal import Decimal

import pytest

from runner.money import format_exact, format_money, format_usd, pico_to_decimal, usd_to_pico
from runner.pricing import load_price_table

# -- exact money -------------------------------------------------------------------------------


def test_a_million_cached_token_costs_sum_exactly() -> None:
    """0.075 USD per 1M cached tokens, a million times: the integer sum is the exact Decimal."""
    mini = load_price_table().resolve("gpt-4o-mini")
    total_pico = 0
    as_float = 0.0
    for i in range(1_000_000):
        k = i % 997 + 1
        total_pico += mini.cost(k, cached_tokens=k)
        as_float += 0.075e-6 * k
    tokens = 1003 * (997 * 998 // 2) + 45  # 1003 full cycles of 1..997, then 1..9
    exact = Decimal(tokens) * Decimal("0.075") / 10**6
    assert pico_to_decimal(total_pico) == exact == Decimal("37.42466655")
    assert format_exact(total_pico) == "37.42466655"
    assert Decimal(as_float) != exact  # what a float accumulator would have reported


@pytest.mark.parametrize(
    ("pico", "places", "shown"),
    [
        (0, 6, "$0.000000"),
        (1, 6, "$0.000001"),  # one picodollar is shown as a whole micro-dollar, never as 0
        (10**6, 6, "$0.000001"),
        (10**6 + 1, 6, "$0.000002"),
        (5 * 10**9, 2, "$0.01"),
        (10**10 + 1, 2, "$0.02"),
        (1_234_567_000_000_000, 6, "$1,234.567000"),
    ],
)
def test_format_usd_rounds_up(pico: int, places: int, shown: str) -> None:
    assert format_usd(pico, places) == shown


@pytest.mark.parametrize(
    ("pico", "text"),
    [(0, "0.00"), (5 * 10**11, "0.50"), (1, "0.000000000001"), (123 * 10**12, "123.00")],
)
def test_format_exact_never_rounds(pico: int, text: str) -> None:
    assert format_exact(pico) == text


@pytest.mark.parametrize(
    ("value", "pico"),
    [
        ("25", 25 * 10**12),
        ("$0.50", 5 * 10**11),
        (" 1.000000000001 ", 10**12 + 1),
        (Decimal("0.075"), 75 * 10**9),
        (3, 3 * 10**12),
    ],
)
def test_usd_to_pico_parses_exactly(value: str | int | Decimal, pico: int) -> None:
    assert usd_to_pico(value) == pico


def test_usd_to_pico_refuses_floats() -> None:
    with pytest.raises(TypeError, match="float"):
        usd_to_pico(0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["0.0000000000001", "1e-13", "0.0000000000015"])
def test_usd_to_pico_refuses_fractions_of_a_picodollar(value: str) -> None:
    with pytest.raises(ValueError, match="finer than"):
        usd_to_pico(value)


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "", "1,000"])
def test_usd_to_pico_refuses_non_amounts(value: str) -> None:
    with pytest.raises(ValueError, match="not a dollar amount"):
        usd_to_pico(value)


def test_shown_amounts_keep_their_digits_and_never_round_down() -> None:
    shown = {
        v: format_money(usd_to_pico(v))
        for v in ("0.005", "0.0047", "0.00651", "0.000002", "1.234", "12")
    }
    assert shown == {
        "0.005": "$0.005",  # a $0.005 cap is never shown as $0.01
        "0.0047": "$0.0047",
        "0.00651": "$0.0066",  # two significant digits, rounded up
        "0.000002": "$0.000002",
        "1.234": "$1.24",  # cents from a dollar up, rounded up
        "12": "$12.00",
    }
