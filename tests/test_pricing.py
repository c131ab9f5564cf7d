"""The price table: resolution rules, user overrides, billing from usage, batch prices."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from runner.cli import error_status
from runner.endpoints import CHAT, Usage
from runner.errors import PriceError, UnknownModelError
from runner.money import price_per_mtok_to_pico_per_token
from runner.pricing import PriceTable, load_price_table

# USD per 1M tokens -> picodollars per token is a factor of 10**6.
MTOK = 10**6


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return load_price_table()


def user_prices(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(text, encoding="utf-8")
    return path


# -- resolution --------------------------------------------------------------------------------


def test_bundled_table_is_dated_and_prices_are_picodollars_per_token(table: PriceTable) -> None:
    assert table.as_of == "2026-11-01"
    mini = table.resolve("gpt-4o-mini")
    assert (mini.input, mini.cached_input, mini.output) == (150_000, 75_000, 600_000)
    assert (mini.batch_input, mini.batch_output) == (75_000, 300_000)
    assert mini.origin == "bundled"


@pytest.mark.parametrize(
    ("snapshot", "family"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("o1-2024-12-17", "o1"),
    ],
)
def test_dated_snapshot_resolves_to_its_family(
    table: PriceTable, snapshot: str, family: str
) -> None:
    assert table.resolve(snapshot) is table.prices[family]


def test_snapshot_with_its_own_entry_is_not_priced_as_its_family(table: PriceTable) -> None:
    own = table.resolve("gpt-4o-2024-05-13")
    assert own.model == "gpt-4o-2024-05-13"
    assert (own.input, own.output) == (5 * MTOK, 15 * MTOK)  # 5.00 / 15.00 per 1M
    assert (table.resolve("gpt-4o").input, table.resolve("gpt-4o").output) == (
        2_500_000,
        10 * MTOK,
    )


@pytest.mark.parametrize(
    "model", ["gpt-9-ultra", "gpt-4-1106-preview", "ft:gpt-4o-mini:acme::abc", "", "gpt-4o-mini-x"]
)
def test_unknown_model_is_an_error_never_zero(table: PriceTable, model: str) -> None:
    assert table.lookup(model) is None
    with pytest.raises(UnknownModelError) as info:
        table.resolve(model)
    assert error_status(info.value) == 2
    assert repr(model) in str(info.value) and "price file" in str(info.value)


# -- user price files --------------------------------------------------------------------------


def test_user_file_overrides_one_field_and_keeps_the_others(tmp_path: Path) -> None:
    path = user_prices(tmp_path, '[models.gpt-4o-mini]\ninput = "0.12"\n')
    t = load_price_table(path)
    mini = t.resolve("gpt-4o-mini")
    assert mini.input == 120_000
    assert (mini.cached_input, mini.output, mini.max_output) == (75_000, 600_000, 16384)
    assert mini.origin == str(path)
    assert t.user_file == str(path)
    assert t.resolve("gpt-4o-mini-2024-07-18") is mini  # snapshots follow the override
    assert t.resolve("gpt-4o").origin == "bundled"


def test_overriding_input_moves_cached_input_when_the_model_has_no_cache_discount(
    tmp_path: Path,
) -> None:
    t = load_price_table(user_prices(tmp_path, '[models.gpt-4]\ninput = "25"\n'))
    assert t.resolve("gpt-4").input == t.resolve("gpt-4").cached_input == 25 * MTOK


def test_user_file_adds_a_model(tmp_path: Path) -> None:
    path = user_prices(
        tmp_path,
        'as_of = "2026-12-01"\n[models.my-finetune]\ninput = "0.30"\ncached_input = "0.15"\n'
        'output = "1.20"\nmax_output = 16384\n',
    )
    t = load_price_table(path)
    ft = t.resolve("my-finetune")
    assert (ft.input, ft.cached_input, ft.output, ft.max_output) == (
        300_000,
        150_000,
        1_200_000,
        16384,
    )
    assert (ft.batch_input, ft.batch_output) == (150_000, 600_000)  # half, by default
    assert ft.origin == str(path)
    assert t.as_of == "2026-11-01 (user file as of 2026-12-01)"


def test_new_model_without_max_output_cannot_price_unlimited_requests(tmp_path: Path) -> None:
    t = load_price_table(user_prices(tmp_path, '[models.m]\ninput = "1"\noutput = "2"\n'))
    assert t.resolve("m").max_output is None
    assert t.resolve("m").cached_input == t.resolve("m").input


@pytest.mark.parametrize("missing", ["input", "output"])
def test_new_model_without_input_or_output_is_a_price_error(tmp_path: Path, missing: str) -> None:
    fields = {"input": '"0.30"', "output": '"1.20"'}
    del fields[missing]
    body = "".join(f"{k} = {v}\n" for k, v in fields.items())
    path = user_prices(tmp_path, f"[models.new-model]\n{body}")
    with pytest.raises(PriceError, match=rf"models\.new-model: {missing} is required"):
        load_price_table(path)


def test_bare_toml_floats_stay_exact_decimals(tmp_path: Path) -> None:
    path = user_prices(
        tmp_path,
        "[models.gpt-4o-mini]\ninput = 0.15\ncached_input = 0.075\noutput = 0.6\n"
        "[models.cheap]\ninput = 0.0375\noutput = 1.1\nmax_output = 100\n",
    )
    t = load_price_table(path)
    mini, cheap = t.resolve("gpt-4o-mini"), t.resolve("cheap")
    assert (mini.input, mini.cached_input, mini.output) == (150_000, 75_000, 600_000)
    assert (cheap.input, cheap.output) == (37_500, 1_100_000)
    assert all(type(v) is int for v in (cheap.input, cheap.output, cheap.batch_input))


@pytest.mark.parametrize(
    "value",
    [
        '"0.0000001"',  # 7 decimals: a tenth of a picodollar per token
        "0.0000001",
        "1.0000000000000001",  # a binary float would silently round this to 1.0
        '"0.1234567"',
    ],
)
def test_prices_with_more_than_six_decimals_are_rejected(tmp_path: Path, value: str) -> None:
    path = user_prices(tmp_path, f"[models.gpt-4o-mini]\ninput = {value}\n")
    with pytest.raises(PriceError, match="more than six decimals"):
        load_price_table(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.gpt-4o-mini\n", "invalid TOML"),
        ('as_of = "2026-12-01"\n', "at least one"),
        ('[models.gpt-4o-mini]\ninput = "-1"\n', "not a price"),
        ('[models.gpt-4o-mini]\ninput = "cheap"\n', "not a price"),
        ('[models.gpt-4o-mini]\nprice = "1"\n', "unknown field"),
        ("[models.gpt-4o-mini]\nmax_output = 1.5\n", "max_output"),
        ('[models]\ngpt-4o-mini = "1"\n', "must be a table"),
    ],
)
def test_invalid_user_price_files_are_price_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PriceError, match=message) as info:
        load_price_table(user_prices(tmp_path, text))
    assert str(tmp_path / "prices.toml") in str(info.value)


def test_floats_are_refused_where_money_enters_from_python() -> None:
    with pytest.raises(TypeError):
        price_per_mtok_to_pico_per_token(0.15)  # type: ignore[arg-type]
    assert price_per_mtok_to_pico_per_token("0.075") == 75_000
    assert price_per_mtok_to_pico_per_token(Decimal("0.000001")) == 1


# -- billing from usage ------------------------------------------------------------------------


def test_cost_bills_cached_tokens_at_the_cached_price(table: PriceTable) -> None:
    mini = table.resolve("gpt-4o-mini")
    # (1000 - 400) x 0.15 + 400 x 0.075 + 50 x 0.60, per 1M tokens
    assert mini.cost(1000, 400, 50) == 600 * 150_000 + 400 * 75_000 + 50 * 600_000
    assert mini.cost(1000) == 1000 * 150_000
    assert mini.cost(10, cached_tokens=50) == 10 * 75_000  # cached is a subset of input
    assert mini.cost(10, cached_tokens=-5) == 10 * 150_000


def test_reasoning_tokens_are_not_billed_twice(table: PriceTable) -> None:
    usage = CHAT.read_usage(
        {
            "model": "o3-2025-04-16",
            "usage": {
                "prompt_tokens": 100,
                "completion_tokens": 500,
                "completion_tokens_details": {"reasoning_tokens": 400},
            },
        }
    )
    assert usage.reasoning_tokens == 400 and usage.output_tokens == 500
    o3 = table.resolve("o3")
    assert table.bill("o3", usage) == 100 * o3.input + 500 * o3.output


def test_response_snapshot_with_its_own_entry_is_billed_at_its_own_price(
    table: PriceTable,
) -> None:
    assert table.for_response("gpt-4o", "gpt-4o-2024-05-13").input == 5 * MTOK
    usage = Usage("gpt-4o-2024-05-13", 1000, 0, 100, 0)
    assert table.bill("gpt-4o", usage) == 1000 * 5 * MTOK + 100 * 15 * MTOK


def test_response_snapshot_without_its_own_entry_is_billed_as_requested(
    table: PriceTable,
) -> None:
    assert table.for_response("gpt-4o", "gpt-4o-2024-08-06") is table.prices["gpt-4o"]
    assert table.for_response("gpt-4o-mini", None) is table.prices["gpt-4o-mini"]
    assert table.for_response("gpt-4o-mini", "") is table.prices["gpt-4o-mini"]
    with pytest.raises(UnknownModelError):
        table.for_response("gpt-9-ultra", "gpt-9-ultra-2026-01-01")


def test_batch_prices_are_half_rounded_up_unless_given(tmp_path: Path, table: PriceTable) -> None:
    mini = table.resolve("gpt-4o-mini")
    assert mini.batch_cached_input == 37_500  # half of 0.075 per 1M
    assert mini.cost(1000, 400, 50, batch=True) == 600 * 75_000 + 400 * 37_500 + 50 * 300_000
    odd = user_prices(tmp_path, '[models.odd]\ninput = "0.000001"\noutput = "0.000003"\n')
    price = load_price_table(odd).resolve("odd")
    # 1 and 3 picodollars per token: halves round up, so batch books never fall below the bill
    assert (price.batch_input, price.batch_output, price.batch_cached_input) == (1, 2, 1)


def test_overriding_a_standard_price_moves_its_batch_price(tmp_path: Path) -> None:
    path = user_prices(tmp_path, '[models.gpt-4o-mini]\ninput = "0.20"\n')
    mini = load_price_table(path).resolve("gpt-4o-mini")
    assert (mini.input, mini.batch_input, mini.batch_output) == (200_000, 100_000, 300_000)


def test_a_batch_bill_uses_batch_prices(table: PriceTable) -> None:
    usage = Usage("gpt-4o-mini", 1000, 0, 100, 0)
    assert table.bill("gpt-4o-mini", usage, batch=True) * 2 == table.bill("gpt-4o-mini", usage)
