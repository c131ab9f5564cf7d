"""Exact money: integer picodollars, parsing and display that never round down."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.money import format_exact, format_money, format_usd, pico_to_decimal, usd_to_pico
from runner.pricing import load_price_table
from runner.simulator import SimulatorThread

from .helpers import write_job

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
    ("usd", "shown"),
    [
        ("0", "$0"),
        ("12.345", "$12.35"),  # cents from $1 up, rounded up
        ("12.341", "$12.35"),
        ("1", "$1.00"),
        ("1.000000000001", "$1.01"),  # a picodollar over is never shown as the dollar
        ("1234567.5", "$1,234,567.50"),  # thousands separators
        ("999.995", "$1,000.00"),
        ("999.99", "$999.99"),
        ("0.9837", "$0.9837"),  # four significant digits below $1
        ("0.98370001", "$0.9838"),
        ("0.99995", "$1.00"),  # rounds to a dollar: shown in cents, not as $1.000
        ("0.9999", "$0.9999"),
        ("0.0001234", "$0.0001234"),
        ("0.00012345", "$0.0001235"),
        ("0.60", "$0.60"),  # trailing zeros dropped down to cents
        ("0.5", "$0.50"),
        ("0.005", "$0.005"),  # a $0.005 cap is never shown as $0.01
        ("0.00651", "$0.00651"),
        ("0.000000000001", "$0.000000000001"),  # one picodollar, exactly
        ("0.000000001234", "$0.000000001234"),
        ("0.000000012345", "$0.00000001235"),
        ("-0.5", "-$0.50"),  # negative: the same rule after a minus sign
        ("-1.234", "-$1.24"),
        ("-0.000123456", "-$0.0001235"),
    ],
)
def test_one_money_format_cents_from_a_dollar_four_digits_below(usd: str, shown: str) -> None:
    assert format_usd(usd_to_pico(usd)) == shown


def test_a_shown_amount_is_never_below_the_true_one() -> None:
    for pico in (1, 999, 10**8 + 1, 987_654_321_987, 10**12 - 1, 10**12 + 1, 123 * 10**13 + 7):
        assert usd_to_pico(format_usd(pico).replace(",", "")) >= pico


def test_format_money_is_the_same_rule() -> None:
    assert format_money is format_usd


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


# -- the same amount, the same text, in every command ------------------------------------------


@pytest.mark.parametrize(("model", "max_tokens"), [("gpt-4o-mini", 64), ("gpt-4o", 4096)])
def test_price_run_and_status_print_the_same_amount_the_same_way(
    tmp_path: Path, simulator: SimulatorThread, model: str, max_tokens: int
) -> None:
    """The job's floor and worst case, below $1 and above it, read alike everywhere."""
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 40, max_tokens=max_tokens, model=model)
    env = {"OPENAI_API_KEY": "sk-test-key"}
    price = CliRunner().invoke(main, ["price", str(job)], env=env)
    assert price.exit_code == 0, price.output
    total = next(line for line in price.stdout.splitlines() if line.startswith("total "))
    floor, worst = total.split()[-2:]
    assert re.fullmatch(r"\$0\.\d+|\$[1-9][\d,]*\.\d\d", worst), worst
    ran = CliRunner().invoke(
        main, ["run", str(job), "--db", str(db), "--cap", "50", "--base-url", simulator.base_url],
        env=env,
    )  # fmt: skip
    assert ran.exit_code == 0, ran.output
    assert f"at worst case ({worst} for all of them)" in ran.stdout
    status = CliRunner().invoke(main, ["status", "--db", str(db)], env=env)
    assert f"estimate   floor {floor}, worst case {worst}," in status.stdout
    exact = json.loads(CliRunner().invoke(main, ["status", "--db", str(db), "--json"]).stdout)
    assert format_usd(usd_to_pico(exact["jobs"][0]["estimate_worst_usd"])) == worst
